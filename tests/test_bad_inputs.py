"""The bad-input catalogue: each bad configuration, path, shape, dtype, device or combination gets an error that
names the problem and the fix. docs/errors.md lists every entry (checked by the last test).

Each test matches the key phrases of both halves: what is wrong, and what to do instead.
"""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn

import lightning_dfa  # noqa: F401  (registers the strategies)
from lightning_dfa import DFA, DFAStrategy, FeedbackEngine
from lightning_dfa.cli import _check_baselines, resolve_recipe, run
from lightning_dfa.data import DigitsDataModule
from lightning_dfa.models import MLPClassifier
from lightning_dfa.projectors import build_projector

DOCS = Path(__file__).parents[1] / "docs" / "errors.md"


def trainer(**kwargs):
    return quiet_trainer(**{"max_steps": 1, "num_sanity_val_steps": 0, "limit_val_batches": 0, **kwargs})


def tiny():
    return MLPClassifier(hidden=8, depth=2)


def step(model, batch):
    F.cross_entropy(model(batch[0]), batch[1]).backward()


def cli_error(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", "digits-mlp", *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- arguments
def test_unknown_mode_names_the_valid_modes():
    with pytest.raises(ValueError, match=r"mode must be one of \('dfa', 'backprop', 'frozen'\), got 'bp'"):
        FeedbackEngine(mode="bp")


def test_negative_seed_asks_for_a_non_negative_integer():
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        FeedbackEngine(seed=-1)


def test_float_seed_asks_for_an_integer():
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got 1.5"):
        FeedbackEngine(seed=1.5)


def test_unknown_nonfinite_setting_names_both_choices():
    with pytest.raises(ValueError, match=r"nonfinite must be one of \('stop', 'skip'\), got 'ignore'.*'skip' skips"):
        FeedbackEngine(nonfinite="ignore")


def test_unknown_setting_names_the_closest_valid_one():
    with pytest.raises(TypeError, match=r"unknown DFA settings \['backprop_tpo'\] \(did you mean 'backprop_tpo' -> "):
        FeedbackEngine(backprop_tpo=1)


# ---------------------------------------------------------------------------------------------- projectors
def test_unknown_projector_name_fails_before_the_first_step_and_suggests_the_closest():
    run_ = trainer(strategy=DFAStrategy(projector="gausian"))
    with pytest.raises(ValueError, match=r"Unknown projector 'gausian'; known names: \[.*\]\. Did you mean 'gaussian'"):
        run_.fit(tiny(), datamodule=DigitsDataModule())
    assert run_.global_step == 0


def test_projector_setting_typo_suggests_the_closest_setting():
    with pytest.raises(ValueError, match=r"'seeded' has no setting 'tiles'\. Did you mean 'tile'\? Its settings: \["):
        build_projector({"class_path": "seeded", "init_args": {"tiles": 1024}}, 3, 14, seed=0)


def test_projector_config_without_class_path_shows_the_format():
    with pytest.raises(ValueError, match=r"needs 'class_path'.*got keys \['kind'\]: write e\.g\. \{'class_path'"):
        build_projector({"kind": "seeded"}, 3, 14, seed=0)


def test_projector_class_path_that_cannot_be_imported_asks_for_a_dotted_path():
    with pytest.raises(ValueError, match=r"Cannot import projector class_path 'mylib\.Fast'.*full dotted path"):
        build_projector("mylib.Fast", 3, 14, seed=0)


def test_projector_matrix_of_the_wrong_shape_names_the_needed_shape(mlp, batch):
    FeedbackEngine(blocks="blocks.*", output="head", projector=torch.zeros(3, 10)).attach(mlp)
    with pytest.raises(ValueError, match=r"maps 3 -> 10 features, .*needs 3 -> 14.*of shape \(3, 14\)"):
        step(mlp, batch)


def test_projector_matrix_that_is_not_2d_asks_for_a_2d_matrix():
    with pytest.raises(ValueError, match=r"must be 2-d, \(error size, sum of the feedback points' sizes\); got shape"):
        build_projector(torch.zeros(42), 3, 14, seed=0)


def test_integer_projector_matrix_asks_for_a_float_one():
    with pytest.raises(TypeError, match=r"must be floating point, got torch.int64: pass matrix.float\(\)"):
        build_projector(torch.zeros(3, 14, dtype=torch.long), 3, 14, seed=0)


def test_projector_matrix_with_nan_asks_for_finite_values():
    matrix = torch.zeros(3, 14)
    matrix[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf entries: draw it again, or replace them"):
        build_projector(matrix, 3, 14, seed=0)


# ---------------------------------------------------------------------------------------------- module paths
def test_unknown_block_path_lists_the_closest_paths(mlp):
    with pytest.raises(ValueError, match=r"'block\.0' matches no module.*Closest paths: \['blocks\.0'.*patterns"):
        FeedbackEngine(blocks="block.0", output="head").attach(mlp)


def test_unknown_output_path_lists_the_closest_paths(mlp):
    with pytest.raises(ValueError, match=r"output: 'heads' matches no module.*Closest paths: \['head'\]"):
        FeedbackEngine(blocks="blocks.*", output="heads").attach(mlp)


def test_dfa_on_a_model_without_known_blocks_says_how_to_name_them():
    class Layers(MLPClassifier):
        configure_dfa = None

        def __init__(self) -> None:
            super().__init__(hidden=8, depth=2)
            self.blocks = nn.ModuleList([nn.Linear(64, 8), nn.Linear(8, 8)])  # single layers: no rule finds blocks

    with pytest.raises(ValueError, match=r"found no HuggingFace model.*blocks=\['blocks\.\*'\].*DFAStrategy\(blocks="):
        trainer(strategy="dfa").fit(Layers(), datamodule=DigitsDataModule())


def test_auto_on_a_stack_of_layers_names_the_blocks_to_set():
    with pytest.raises(
        ValueError, match=r"or repeated blocks.*in Sequential.*blocks=\['0'\].*Set them with DFA\(blocks="
    ):
        FeedbackEngine().attach(nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)))


def test_output_none_with_no_module_after_the_blocks_asks_to_name_the_output():
    class HeadFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(7, 3)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(7, 7), nn.Tanh()) for _ in range(2))

    with pytest.raises(
        ValueError,
        match=r"no module with trainable parameters is registered after the last block "
        r"'blocks\.1'.*the module whose output the loss uses.*DFA\(output=\.\.\.\)",
    ):
        FeedbackEngine().attach(HeadFirst())


def test_dfa_on_a_model_without_submodules_says_it_needs_blocks():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3, 5))

    with pytest.raises(ValueError, match=r"Bare has no submodules.*Build it from submodules, or train it without DFA"):
        FeedbackEngine().attach(Bare())


def test_nested_points_ask_for_blocks_that_do_not_contain_each_other(mlp):
    with pytest.raises(ValueError, match="'blocks.0' and 'blocks.0.0' are nested; select blocks that do not contain"):
        FeedbackEngine(blocks=["blocks.0", "blocks.0.0"], output="head").attach(mlp)


def test_output_inside_a_block_names_an_output_outside_the_blocks(mlp):
    with pytest.raises(ValueError, match=r"lies inside the feedback point 'blocks\.0'.*Choose an output outside"):
        FeedbackEngine(blocks="blocks.*", output="blocks.0.0").attach(mlp)


def test_output_that_never_runs_asks_for_one_that_runs_last(mlp, batch):
    mlp.unused = nn.Linear(7, 3)
    dfa = FeedbackEngine(blocks="blocks.*", output="unused").attach(mlp)
    step(mlp, batch)
    with pytest.raises(RuntimeError, match="'unused' did not run.*Choose an output module that runs after every block"):
        dfa.check_routed()


def test_empty_blocks_list_names_the_accepted_forms(mlp):
    with pytest.raises(ValueError, match="blocks is empty: give module paths, glob patterns or 'auto'"):
        FeedbackEngine(blocks=[], output="head").attach(mlp)


# ---------------------------------------------------------------------------------------------- shapes
def test_point_output_without_the_error_rows_suggests_error_rows(batch):
    class FirstTwoRows(nn.Linear):
        def forward(self, x):
            return super().forward(x)[:2]

    model = nn.Sequential(nn.Linear(5, 6), FirstTwoRows(6, 3))
    FeedbackEngine(blocks=["0"], output="1").attach(model)
    with pytest.raises(ValueError, match=r"does not start with the error's row dimensions.*or set error_rows"):
        model(batch[0]).sum().backward()


def test_error_without_a_batch_dimension_asks_for_batched_outputs(batch):
    model = nn.Sequential(nn.Linear(5, 6), nn.Flatten(0), nn.Linear(24, 3))
    FeedbackEngine(blocks=["0"], output="2").attach(model)
    with pytest.raises(ValueError, match=r"shape \(3,\): the output point must return a batch of vectors.*Choose"):
        model(batch[0]).sum().backward()


def test_error_rows_leaving_no_features_names_the_valid_range(mlp, batch):
    FeedbackEngine(blocks="blocks.*", output="head", error_rows=2).attach(mlp)
    with pytest.raises(ValueError, match=r"error_rows must leave at least one feature dimension \(1 to 1\), got 2"):
        step(mlp, batch)


def test_error_size_that_changes_between_steps_says_to_keep_it_fixed(batch):
    class Narrowing(nn.Linear):
        width = 3

        def forward(self, x):
            return super().forward(x)[:, : self.width]

    model = nn.Sequential(nn.Linear(5, 6), Narrowing(6, 3))
    FeedbackEngine(blocks=["0"], output="1").attach(model)
    model(batch[0]).sum().backward()
    model[1].width = 2
    with pytest.raises(
        ValueError, match=r"has 2 features per row, the projector takes 3.*Keep the output's size fixed"
    ):
        model(batch[0]).sum().backward()


# ---------------------------------------------------------------------------------------------- Lightning
def test_dfa_strategy_with_a_dfa_callback_asks_to_remove_the_callback():
    run_ = trainer(strategy="dfa", callbacks=[DFA(blocks="blocks.*", output="head")])
    with pytest.raises(ValueError, match="already applies DFA; remove the DFA callback from callbacks"):
        run_.fit(tiny(), datamodule=DigitsDataModule())


def test_two_dfa_callbacks_are_refused_when_the_trainer_is_built():
    callbacks = [DFA(blocks="blocks.0", output="head"), DFA(blocks="blocks.1", output="head")]
    with pytest.raises(RuntimeError, match=r"more than one stateful callback of type `DFA`.*state_key` must be unique"):
        trainer(strategy="auto", callbacks=callbacks)


def test_dfa_strategy_on_two_devices_points_to_dfa_ddp():
    with pytest.raises(ValueError, match=r"runs on one device, but devices=2 were requested: use strategy='dfa_ddp'"):
        trainer(strategy="dfa", devices=2).fit(tiny(), datamodule=DigitsDataModule())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_accelerator_without_cuda_lists_the_available_ones():
    with pytest.raises(MisconfigurationException, match=r"accelerator is not available.*available.*\['cpu'\]"):
        pl.Trainer(strategy="dfa", accelerator="cuda")


def test_configure_dfa_returning_a_list_shows_the_expected_dict():
    class Listed(MLPClassifier):
        def configure_dfa(self):
            return ["blocks.*"]

    with pytest.raises(TypeError, match=r"configure_dfa\(\) must be a DFAConfig or a dict.*got list: e\.g\. \{"):
        trainer(strategy="dfa").fit(Listed(hidden=8, depth=2), datamodule=DigitsDataModule())


def test_configure_dfa_with_an_unknown_argument_suggests_the_closest():
    class Misspelt(MLPClassifier):
        def configure_dfa(self):
            return {"block": "blocks.*", "output": "head"}

    with pytest.raises(TypeError, match=r"unknown DFA settings \['block'\] \(did you mean 'block' -> 'blocks'\?\)"):
        trainer(strategy="dfa").fit(Misspelt(hidden=8, depth=2), datamodule=DigitsDataModule())


def test_resuming_with_another_seed_names_the_checkpoint_seed():
    with pytest.raises(ValueError, match=r"checkpoint's feedback seed is 0, this DFA's is 1: resume with seed=0"):
        FeedbackEngine(seed=1).load_state_dict({"seed": 0})


def test_attaching_twice_asks_to_detach_first(mlp):
    dfa = FeedbackEngine(blocks="blocks.*", output="head").attach(mlp)
    with pytest.raises(RuntimeError, match="already attached to a model; call detach"):
        dfa.attach(mlp)


# ---------------------------------------------------------------------------------------------- CLI and configs
def test_unknown_recipe_lists_the_shipped_recipes():
    with pytest.raises(SystemExit, match=r"'digits-cnn' is neither a file nor a shipped recipe; recipes: \[.*'digits"):
        resolve_recipe("digits-cnn")


def test_unknown_strategy_option_in_yaml_suggests_the_closest(capsys):
    err = cli_error(capsys, "--trainer.strategy.blok=blocks.*")
    assert err.startswith("error: 'blok' is not an option of lightning_dfa.DFAStrategy; did you mean 'blocks'?")


def test_unknown_section_in_a_config_file_suggests_the_closest(capsys, tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("modle:\n  class_path: lightning_dfa.models.MLPClassifier\n")
    err = cli_error(capsys, "--config", str(config))
    assert err.startswith("error: 'modle' is not an option of the config; did you mean 'model'?")


def test_unknown_trainer_option_suggests_the_closest(capsys, tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("trainer:\n  max_stepz: 3\n")
    err = cli_error(capsys, "--config", str(config))
    assert err.startswith("error: 'max_stepz' is not an option of trainer; did you mean 'max_steps'")


def test_unknown_baseline_mode_names_the_modes():
    with pytest.raises(ValueError, match=r"unknown modes \['bp'\]; choose from \['dfa', 'backprop', 'frozen'\]"):
        _check_baselines(["bp"], trainer(strategy="dfa"))


def test_baselines_without_a_dfa_strategy_say_which_strategy_to_use():
    with pytest.raises(ValueError, match=r"--baselines reruns .*strategy must be a lightning_dfa\.DFAStrategy"):
        _check_baselines(["backprop"], trainer(strategy="auto"))


# ---------------------------------------------------------------------------------------------- models and data
def test_mlp_with_an_unknown_activation_names_the_choices():
    with pytest.raises(ValueError, match=r"activation must be one of \['gelu', 'relu', 'tanh'\], got 'sigmoid'"):
        MLPClassifier(activation="sigmoid")


def test_causal_lm_without_config_or_pretrained_shows_both_forms():
    from lightning_dfa.models import CausalLM

    with pytest.raises(ValueError, match=r"needs exactly one of config=\{'model_type': 'gpt2'.*pretrained='<local"):
        CausalLM()


def test_causal_lm_with_a_missing_pretrained_folder_says_what_to_give(tmp_path):
    from lightning_dfa.models import CausalLM

    with pytest.raises(
        FileNotFoundError, match=r"is not a local folder with a config\.json\. Give a folder written by"
    ):
        CausalLM(pretrained=str(tmp_path / "missing"))


def test_text_data_from_a_missing_file_lists_the_accepted_sources(tmp_path):
    from lightning_dfa.data import TextDataModule

    data = TextDataModule(source=str(tmp_path / "corpus.txt"))
    with pytest.raises(FileNotFoundError, match=r"is not 'pydoc', 'hf:<dataset name>', or an existing file.*Give a"):
        data.documents  # noqa: B018 - the documents load on first use


def test_digits_with_bad_split_fractions_names_the_valid_range():
    with pytest.raises(ValueError, match=r"must be in \(0, 1\) with a sum below 1, got 0\.5 and 0\.6"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.6)


# ---------------------------------------------------------------------------------------------- silent or misleading
def test_loss_that_does_not_use_the_error_point_names_the_modules_it_used():
    from conftest import tiny_gpt2

    model = tiny_gpt2()
    FeedbackEngine().attach(model)  # the error point is lm_head, whose logits this loss ignores
    ids = torch.randint(0, 64, (2, 8))
    hidden = model(ids, output_hidden_states=True).hidden_states[-1]
    loss = F.cross_entropy(nn.Linear(32, 2)(hidden[:, -1]), torch.tensor([0, 1]))
    with pytest.raises(
        RuntimeError,
        match=r"does not use the output of the error point 'lm_head'.*it used "
        r"\['transformer\.ln_f'\].*output='transformer\.ln_f'",
    ):
        loss.backward()


def test_lightning_loss_that_does_not_use_the_error_point_stops_the_run():
    class SkipsHead(MLPClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            self(x)  # the head runs, but the loss below does not use it
            h = x.flatten(1)
            for block in self.blocks:
                h = block(h)
            return F.cross_entropy(self.probe(h), y)

    model = SkipsHead(hidden=8, depth=2)
    model.probe = nn.Linear(8, 10)
    run_ = trainer(strategy=DFAStrategy(blocks="blocks.*", output="head"))
    with pytest.raises(RuntimeError, match=r"does not use the output of the error point 'head'.*\['probe'\]"):
        run_.fit(model, datamodule=DigitsDataModule())


def test_model_compiled_before_attach_is_refused_at_the_first_backward(mlp, batch):
    compiled = torch.compile(mlp, backend="eager")
    step(compiled, batch)  # compiled without the hooks
    FeedbackEngine(blocks="blocks.*", output="head").attach(mlp)
    with pytest.raises(
        RuntimeError,
        match=r"no forward pass since dfa.attach\(\) ran the DFA hooks.*Attach first, "
        r"then compile",
    ):
        step(compiled, batch)


def test_second_dfa_on_an_attached_model_asks_to_detach_the_first(mlp):
    FeedbackEngine(blocks="blocks.*", output="head").attach(mlp)
    with pytest.raises(RuntimeError, match=r"already attached to another DFA.*Detach that one first"):
        FeedbackEngine(blocks="blocks.0", output="head").attach(mlp)


def test_block_returning_an_integer_tensor_names_its_dtype(batch):
    class Rounding(nn.Linear):
        def forward(self, x):
            return super().forward(x).long()

    class FloatHead(nn.Linear):
        def forward(self, x):
            return super().forward(x.float())

    model = nn.Sequential(Rounding(5, 6), FloatHead(6, 3))
    FeedbackEngine(blocks=["0"], output="1").attach(model)
    with pytest.raises(
        TypeError,
        match=r"'0' has trainable parameters but returns a torch.int64 tensor, which cannot "
        r"carry a gradient\. Select as point the module whose output is the floating-point",
    ):
        model(batch[0])


def test_output_point_called_twice_says_so(mlp, batch):
    class TwoHeads(nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            for block in self.mlp.blocks:
                x = block(x)
            return self.mlp.head(x) + self.mlp.head(x * 0.5)

    model = TwoHeads(mlp)
    FeedbackEngine(blocks="mlp.blocks.*", output="mlp.head").attach(model)
    with pytest.raises(RuntimeError, match=r"'mlp.head' ran twice in one forward pass.*Call it once per forward pass"):
        model(batch[0])


def test_dense_projector_larger_than_memory_names_the_memory_free_projectors():
    with pytest.raises(
        MemoryError,
        match=r"1000000 x 1000000 needs 3725\.3 GiB, more than the .* GiB of memory "
        r"available on cpu\. Use a projector that stores no matrix: projector='seeded'.*'structured'",
    ):
        build_projector("gaussian", 10**6, 10**6, seed=0)


def test_misspelt_dfa_setting_of_a_strategy_suggests_the_setting(capsys):
    err = cli_error(capsys, "--trainer.strategy.backprop_tpo=1")
    assert "'backprop_tpo' is not an option of lightning_dfa.DFAStrategy; did you mean 'backprop_top'?" in err


def test_projector_short_name_as_class_path_in_yaml_builds_that_projector():
    from lightning_dfa.cli import _CLI_OPTIONS, DFACLI, resolve_recipe

    projector = "--trainer.strategy.projector={class_path: seeded, init_args: {tile: 1024}}"
    cli = DFACLI(cli_args=["--config", resolve_recipe("digits-mlp"), projector], run=False, **_CLI_OPTIONS)
    built = build_projector(cli.trainer.strategy._dfa_settings["projector"], 3, 14, seed=0)
    assert type(built).__name__ == "SeededGaussian" and built.tile == 1024


# ---------------------------------------------------------------------------------------------- the catalogue
def test_every_catalogue_entry_is_documented():
    documented = DOCS.read_text()
    entries = [
        name for name in globals() if name.startswith("test_") and name != "test_every_catalogue_entry_is_documented"
    ]
    assert len(entries) >= 15
    missing = [name for name in entries if f"`{name}`" not in documented]
    assert not missing, f"add these to docs/errors.md: {missing}"
