"""Bad input gets an error that names the problem and the fix."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dfa import FeedbackEngine


def step(model, batch):
    F.cross_entropy(model(batch[0]), batch[1]).backward()


def test_unknown_module_path_lists_close_candidates(mlp):
    with pytest.raises(ValueError, match=r"'block\.0' matches no module.*Closest paths: \['blocks\.0'"):
        FeedbackEngine(blocks="block.0", output="head").attach(mlp)


def test_pattern_that_matches_nothing_names_the_containers(mlp):
    with pytest.raises(ValueError, match=r"'layers\.\*' matches no module.*Containers of blocks: \['blocks'\]"):
        FeedbackEngine(blocks="layers.*", output="head").attach(mlp)


def test_unknown_output_path_is_an_error(mlp):
    with pytest.raises(ValueError, match=r"output: 'heads' matches no module.*Closest paths: \['head'\]"):
        FeedbackEngine(blocks="blocks.*", output="heads").attach(mlp)


def test_auto_on_a_model_without_known_or_repeated_blocks_suggests_patterns(mlp):
    mlp.blocks = nn.ModuleList([nn.Linear(5, 7), nn.Linear(7, 7)])  # single layers: no rule finds blocks
    with pytest.raises(
        ValueError, match=r"found no HuggingFace model.*or repeated blocks.*blocks=\['blocks\.\*'\]; module containers"
    ):
        FeedbackEngine(output="head").attach(mlp)


def test_output_module_that_never_runs_is_an_error(mlp, batch):
    mlp.unused = nn.Linear(7, 3)
    dfa = FeedbackEngine(blocks="blocks.*", output="unused").attach(mlp)
    step(mlp, batch)
    with pytest.raises(RuntimeError, match="output point 'unused' did not run"):
        dfa.check_routed()
    with pytest.raises(RuntimeError, match="ran again before the output point 'unused'"):
        step(mlp, batch)


def test_output_that_runs_before_a_block_is_an_error(mlp, batch):
    with pytest.raises(ValueError, match="lies inside the feedback point 'blocks.0'"):
        FeedbackEngine(blocks="blocks.*", output="blocks.0.0").attach(mlp)
    FeedbackEngine(blocks=["blocks.1"], output="blocks.0").attach(mlp)
    with pytest.raises(RuntimeError, match=r"\['blocks.1'\] did not run before the output point 'blocks.0'"):
        step(mlp, batch)


def test_projector_with_wrong_sizes_names_both_shapes(mlp, batch):
    FeedbackEngine(blocks="blocks.*", output="head", projector=torch.zeros(3, 10)).attach(mlp)
    with pytest.raises(ValueError, match=r"maps 3 -> 10 features, but this model needs 3 -> 14"):
        step(mlp, batch)


def test_unknown_projector_name_lists_the_known_ones(mlp, batch):
    FeedbackEngine(blocks="blocks.*", output="head", projector="gausian").attach(mlp)
    with pytest.raises(ValueError, match=r"Unknown projector 'gausian'; known names: \[.*'gaussian'"):
        step(mlp, batch)


def test_block_output_that_is_not_a_tensor_is_an_error(batch):
    class DictBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(5, 3)

        def forward(self, x):
            return {"hidden": self.linear(x)}

    model = nn.ModuleDict({"block": DictBlock(), "head": nn.Linear(3, 3)})
    FeedbackEngine(blocks="block", output="head").attach(model)
    with pytest.raises(TypeError, match="Feedback point 'block' returned a dict"):
        model["block"](batch[0])


def test_point_output_without_the_error_rows_names_both_shapes(batch):
    class FirstTwoRows(nn.Linear):
        def forward(self, x):
            return super().forward(x)[:2]

    model = nn.Sequential(nn.Linear(5, 6), FirstTwoRows(6, 3))
    FeedbackEngine(blocks=["0"], output="1").attach(model)
    with pytest.raises(ValueError, match=r"outputs shape \(4, 6\).*row dimensions \(2,\) \(error shape \(2, 3\)\)"):
        model(batch[0]).sum().backward()


def test_error_without_a_batch_dimension_is_an_error(batch):
    model = nn.Sequential(nn.Linear(5, 6), nn.Flatten(0), nn.Linear(24, 3))
    FeedbackEngine(blocks=["0"], output="2").attach(model)
    with pytest.raises(ValueError, match=r"The error has shape \(3,\).*batch"):
        model(batch[0]).sum().backward()


def test_nested_points_are_an_error(mlp):
    with pytest.raises(ValueError, match="'blocks.0' and 'blocks.0.0' are nested"):
        FeedbackEngine(blocks=["blocks.0", "blocks.0.0"], output="head").attach(mlp)


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match=r"mode must be one of \('dfa', 'backprop', 'frozen'\), got 'bp'"):
        FeedbackEngine(mode="bp")


def test_attaching_twice_is_an_error(mlp):
    dfa = FeedbackEngine(blocks="blocks.*", output="head").attach(mlp)
    with pytest.raises(RuntimeError, match="already attached"):
        dfa.attach(mlp)


def test_non_finite_error_stops_before_touching_the_blocks(mlp, batch):
    FeedbackEngine(blocks="blocks.*", output="head").attach(mlp)
    logits = mlp(batch[0])
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        (logits * float("nan")).sum().backward()
    assert all(p.grad is None for p in mlp.blocks.parameters())
