"""``lr_scale``: the feedback points learn at ``lr_scale`` x the optimizer's rate, for any optimizer and schedule.

The reference everywhere is what a user would write by hand: the points in their own parameter group at the
scaled learning rate, with ``lr_scale=1.0`` (the optimizer untouched). The ``lr_scale`` tests keep the head at the
optimizer's own rate (``head_lr_scale=1.0``); the ``head_lr_scale`` tests at the end scale both.
"""

from __future__ import annotations

import copy
import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyMLP, quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_dfa import DFA, DFADDPStrategy, DFAFSDPStrategy, DFAStrategy
from lightning_dfa.feedback import FeedbackEngine
from lightning_dfa.feedback.points import point_parameters
from lightning_dfa.feedback.update_scale import ScaledUpdates

SCALE = 0.1
LR = 0.05


def points_and_rest(model):
    points = [p for block in model.blocks for p in block.parameters()]
    return points, list(model.head.parameters())


def explicit_groups(model, lr=LR, scale=SCALE):
    points, rest = points_and_rest(model)
    return [{"params": rest, "lr": lr}, {"params": points, "lr": lr * scale}]


def warmup(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))


def cosine(optimizer):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6)


def one_cycle(optimizer):
    lrs = [group["lr"] for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lrs, total_steps=8)


OPTIMIZERS = {
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=LR, weight_decay=0.1),
    "adam-foreach": lambda groups: torch.optim.Adam(groups, lr=LR, foreach=True),
    "adam-fused": lambda groups: torch.optim.Adam(groups, lr=LR, fused=True),
    "sgd-momentum": lambda groups: torch.optim.SGD(groups, lr=LR, momentum=0.9, nesterov=True, weight_decay=0.01),
    "rmsprop": lambda groups: torch.optim.RMSprop(groups, lr=LR, momentum=0.5),
}


def batches(steps=6):
    generator = torch.Generator().manual_seed(3)
    return [
        (torch.randn(8, 5, generator=generator), torch.randint(0, 3, (8,), generator=generator)) for _ in range(steps)
    ]


def train_plain(model, optimizer, scheduler, scale):
    with FeedbackEngine(blocks="blocks.*", output="head", head_lr_scale=1.0, lr_scale=scale).attach(model) as dfa:
        dfa.scale_updates(optimizer)
        for x, y in batches():
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    return model


def assert_same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def two_copies():
    torch.manual_seed(0)
    model = TinyMLP()
    return model, copy.deepcopy(model)


@pytest.mark.parametrize(
    "schedule", [None, warmup, cosine, one_cycle], ids=["constant", "warmup", "cosine", "onecycle"]
)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_points_update_as_an_explicit_group_at_the_scaled_rate(name, schedule):
    scaled, reference = two_copies()
    make = OPTIMIZERS[name]
    opt = make(scaled.parameters())
    ref_opt = make(explicit_groups(reference))
    train_plain(scaled, opt, schedule and schedule(opt), SCALE)
    train_plain(reference, ref_opt, schedule and schedule(ref_opt), 1.0)
    assert_same_weights(scaled, reference)


def test_points_move_less_than_at_the_full_rate():
    scaled, full = two_copies()
    start = [p.detach().clone() for p in scaled.blocks.parameters()]
    train_plain(scaled, torch.optim.Adam(scaled.parameters(), lr=LR), None, SCALE)
    train_plain(full, torch.optim.Adam(full.parameters(), lr=LR), None, 1.0)
    moved = sum((p - s).abs().sum() for p, s in zip(scaled.blocks.parameters(), start))
    moved_full = sum((p - s).abs().sum() for p, s in zip(full.blocks.parameters(), start))
    assert 0 < moved < 0.2 * moved_full


def test_each_of_two_optimizers_scales_its_own_points():
    scaled, reference = two_copies()
    first = torch.optim.Adam([*scaled.blocks[0].parameters(), *scaled.head.parameters()], lr=LR)
    second = torch.optim.SGD(scaled.blocks[1].parameters(), lr=LR, momentum=0.9)
    ref_first = torch.optim.Adam(
        [{"params": reference.blocks[0].parameters(), "lr": LR * SCALE}, {"params": reference.head.parameters()}], lr=LR
    )
    ref_second = torch.optim.SGD(reference.blocks[1].parameters(), lr=LR * SCALE, momentum=0.9)
    for model, optimizers, scale in ((scaled, (first, second), SCALE), (reference, (ref_first, ref_second), 1.0)):
        with FeedbackEngine(blocks="blocks.*", output="head", head_lr_scale=1.0, lr_scale=scale).attach(model) as dfa:
            dfa.scale_updates(*optimizers)
            for x, y in batches():
                F.cross_entropy(model(x), y).backward()
                for optimizer in optimizers:
                    optimizer.step()
                    optimizer.zero_grad()
    assert_same_weights(scaled, reference)


def test_outside_the_step_the_optimizer_keeps_the_users_groups():
    model = TinyMLP()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    scheduler = cosine(optimizer)
    with FeedbackEngine(blocks="blocks.*", output="head", head_lr_scale=1.0, lr_scale=SCALE).attach(model) as dfa:
        dfa.scale_updates(optimizer)
        x, y = batches()[0]
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()
        assert len(optimizer.param_groups) == 1
        assert len(optimizer.param_groups[0]["params"]) == len(list(model.parameters()))
        assert len(optimizer.state_dict()["param_groups"]) == 1
        assert optimizer.param_groups[0]["lr"] == pytest.approx(scheduler.get_last_lr()[0])


def test_a_step_that_raised_leaves_no_split_groups_behind():
    model = TinyMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scaled = ScaledUpdates(optimizer, model.blocks.parameters(), SCALE)

    def failing_closure():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        optimizer.step(failing_closure)
    x, y = batches()[0]
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert len(optimizer.param_groups) == 1
    scaled.remove()
    assert len(optimizer.param_groups[0]["params"]) == len(list(model.parameters()))


def test_detach_restores_plain_optimizer_steps():
    scaled, reference = two_copies()
    optimizer = torch.optim.SGD(scaled.parameters(), lr=LR)
    dfa = FeedbackEngine(blocks="blocks.*", output="head", head_lr_scale=1.0, lr_scale=SCALE).attach(scaled)
    dfa.scale_updates(optimizer)
    dfa.detach()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    for model, opt in ((scaled, optimizer), (reference, ref_optimizer)):
        x, y = batches()[0]
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert_same_weights(scaled, reference)


@pytest.mark.parametrize("mode", ["backprop", "frozen"])
def test_the_baselines_keep_the_plain_rate(mode):
    baseline, reference = two_copies()
    optimizer = torch.optim.SGD(baseline.parameters(), lr=LR)
    engine = FeedbackEngine(blocks="blocks.*", output="head", mode=mode, head_lr_scale=1.0, lr_scale=SCALE)
    with engine.attach(baseline) as dfa:
        dfa.scale_updates(optimizer)
        x, y = batches()[0]
        F.cross_entropy(baseline(x), y).backward()
        optimizer.step()
    with FeedbackEngine(blocks="blocks.*", output="head", mode=mode, head_lr_scale=1.0, lr_scale=1.0).attach(reference):
        F.cross_entropy(reference(x), y).backward()
        torch.optim.SGD(reference.parameters(), lr=LR).step()
    assert_same_weights(baseline, reference)


def test_a_parameter_tied_to_a_module_outside_the_points_keeps_the_full_rate():
    from conftest import tiny_gpt2

    gpt2 = tiny_gpt2()
    owned = list(point_parameters(gpt2, ["transformer.wte", "transformer.h.0"])[0])
    assert gpt2.transformer.wte.weight is gpt2.lm_head.weight
    assert not any(p is gpt2.transformer.wte.weight for p in owned)
    assert {id(p) for p in owned} == {id(p) for p in gpt2.transformer.h[0].parameters()}


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.1", True])
def test_a_scale_outside_0_to_1_is_refused_with_its_meaning(bad):
    with pytest.raises(ValueError, match=r"lr_scale must be .auto. or a number in \[0, 1\].*got"):
        FeedbackEngine(lr_scale=bad)


def test_scale_updates_before_attach_says_to_attach():
    with pytest.raises(RuntimeError, match=r"call attach\(model\) first"):
        FeedbackEngine(head_lr_scale=1.0, lr_scale=SCALE).scale_updates(torch.optim.SGD(TinyMLP().parameters(), lr=LR))


def test_resuming_with_another_scale_warns():
    model = TinyMLP()
    dfa = FeedbackEngine(blocks="blocks.*", output="head", head_lr_scale=1.0, lr_scale=SCALE).attach(model)
    x, y = batches()[0]
    F.cross_entropy(model(x), y).backward()
    state = dfa.state_dict()
    assert state["lr_scale"] == SCALE
    other = FeedbackEngine(blocks="blocks.*", output="head", head_lr_scale=1.0, lr_scale=0.5)
    with pytest.warns(UserWarning, match=r"lr_scale=0.1, this run uses lr_scale=0.5"):
        other.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FeedbackEngine(blocks="blocks.*", output="head", head_lr_scale=1.0, lr_scale=SCALE).load_state_dict(state)


# ---------------------------------------------------------------------- Lightning
class Classifier(pl.LightningModule):
    """A user's module: AdamW over all parameters (or explicit groups, for the reference), warmup schedule."""

    def __init__(self, explicit: bool = False, manual: bool = False, scale: float = SCALE):
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyMLP()
        self.explicit, self.scale = explicit, scale
        self.automatic_optimization = not manual

    def configure_dfa(self):
        return {"blocks": "net.blocks.*", "output": "net.head"}

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.lr_schedulers().step()

    def configure_optimizers(self):
        params = explicit_groups(self.net, scale=self.scale) if self.explicit else self.parameters()
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup(optimizer), "interval": "step"}}


def fit(module, strategy, **trainer_args):
    data = TensorDataset(*map(torch.cat, zip(*batches(8))))
    trainer = quiet_trainer(strategy=strategy, max_steps=4, **trainer_args)
    trainer.fit(module, DataLoader(data, batch_size=8))
    return trainer


@pytest.mark.parametrize(
    "manual, trainer_args",
    [(False, {}), (True, {}), (False, {"accumulate_grad_batches": 2}), (False, {"precision": "bf16-mixed"})],
    ids=["automatic", "manual", "accumulation", "bf16-mixed"],
)
def test_a_lightning_run_scales_the_points_as_an_explicit_group(manual, trainer_args):
    scaled = Classifier(manual=manual)
    reference = Classifier(explicit=True, manual=manual)
    fit(scaled, DFAStrategy(head_lr_scale=1.0, lr_scale=SCALE), **trainer_args)
    fit(reference, DFAStrategy(head_lr_scale=1.0, lr_scale=1.0), **trainer_args)
    assert_same_weights(scaled.net, reference.net)


def test_the_callback_applies_the_scale_under_another_strategy():
    scaled, reference = Classifier(), Classifier(explicit=True)
    fit(scaled, "auto", callbacks=[DFA(blocks="net.blocks.*", output="net.head", head_lr_scale=1.0, lr_scale=SCALE)])
    fit(reference, DFAStrategy(head_lr_scale=1.0, lr_scale=1.0))
    assert_same_weights(scaled.net, reference.net)


@pytest.mark.parametrize("strategy", [DFAStrategy, DFADDPStrategy, DFAFSDPStrategy])
def test_every_strategy_takes_the_scale(strategy):
    assert strategy(lr_scale=0.2)._dfa_settings["lr_scale"] == 0.2  # noqa: SLF001


def test_the_default_scale_is_used_without_settings():
    assert DFAStrategy()._dfa_settings.get("lr_scale") is None  # noqa: SLF001 (the engine's default applies)
    assert FeedbackEngine().lr_scale == FeedbackEngine().lr_scale == "auto"


def test_dfa_ddp_with_a_scale_trains_like_one_process(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the process group's variables leave with the test
    scaled, reference = Classifier(), Classifier(explicit=True)
    fit(
        scaled,
        DFADDPStrategy(head_lr_scale=1.0, lr_scale=SCALE, process_group_backend="gloo"),
        devices=1,
        use_distributed_sampler=False,
    )
    torch.distributed.destroy_process_group()
    fit(reference, DFAStrategy(head_lr_scale=1.0, lr_scale=1.0))
    assert_same_weights(scaled.net, reference.net)


def cli_config(tmp_path, setting: str) -> str:
    """The config.yaml of a 2-step ``lightning-dfa fit`` of digits-mlp with one strategy setting given."""
    from lightning_dfa.cli import main

    main(
        [
            "fit",
            "--config",
            "digits-mlp",
            f"--trainer.strategy.init_args.{setting}",
            "--trainer.max_steps=2",
            "--trainer.logger=false",
            "--trainer.limit_val_batches=0",
            "--trainer.limit_test_batches=0",
            "--trainer.callbacks=[]",
            "--baselines=[]",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    return (tmp_path / "latest" / "config.yaml").read_text()


def test_the_cli_sets_the_scale(tmp_path):
    assert "lr_scale: 0.25" in cli_config(tmp_path, "lr_scale=0.25")


# ---------------------------------------------------------------------- lr_scale="auto"
@pytest.mark.parametrize(
    "error_shape, scale",
    [((4, 16, 4096), 1 / 64), ((4, 256), 1 / 16), ((4, 10), 0.1), ((4, 1, 16, 16), 1 / 16), ((4, 3, 4, 4), 0.1)],
    ids=["tokens-are-rows", "samples-are-rows", "capped", "a-whole-image-is-one-row", "capped-image"],
)
def test_auto_is_the_head_rate_over_the_square_root_of_the_error_width_at_most_a_tenth(error_shape, scale):
    from lightning_dfa.feedback.update_scale import auto_lr_scale

    assert auto_lr_scale(error_shape, head_lr_scale=1.0) == pytest.approx(scale)
    assert auto_lr_scale(error_shape, head_lr_scale=2.0) == pytest.approx(min(0.1, 2 * scale))


def test_auto_follows_the_default_head_lr_scale():
    from lightning_dfa.feedback.update_scale import auto_lr_scale

    assert auto_lr_scale((8, 128, 4096)) == pytest.approx(HEAD / 64)  # the quick start's logits: 0.047


def test_auto_is_the_default_and_is_set_by_the_first_forward():
    model = TinyMLP(classes=3600)  # 3600 classes: 3 / sqrt(3600) = 0.05
    dfa = FeedbackEngine(blocks="blocks.*", output="head").attach(model)
    assert dfa.lr_scale == "auto" and dfa.points_lr_scale is None
    model(torch.randn(2, 5))
    assert dfa.points_lr_scale == pytest.approx(0.05)


def test_auto_sees_the_whole_image_with_spatial_feedback():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                       layers_per_block=1, norm_num_groups=4)  # fmt: skip
    with FeedbackEngine(spatial_feedback=True).attach(
        unet
    ) as dfa:  # rows are pixels for the projection, not for the rule
        unet(torch.zeros(2, 1, 16, 16), torch.tensor([1, 2]))
        assert dfa.points_lr_scale == pytest.approx(0.1)  # 3 / 16, capped: a 16 x 16 image is one row


def test_auto_scales_the_points_as_a_group_at_the_chosen_rate():
    scaled, reference = two_copies()
    opt = torch.optim.AdamW(scaled.parameters(), lr=LR)
    ref_opt = torch.optim.AdamW(explicit_groups(reference, scale=0.1), lr=LR)  # 3 classes: capped at 0.1
    train_plain(scaled, opt, None, "auto")
    train_plain(reference, ref_opt, None, 1.0)
    assert_same_weights(scaled, reference)


def test_auto_in_a_lightning_step_scales_the_very_first_update():
    scaled, reference = Classifier(), Classifier(explicit=True, scale=0.1)  # 3 classes: "auto" gives 0.1
    fit(scaled, DFAStrategy(head_lr_scale=1.0, lr_scale="auto"))  # the first forward runs inside step(closure)
    fit(reference, DFAStrategy(head_lr_scale=1.0, lr_scale=1.0))
    assert_same_weights(scaled.net, reference.net)


# ---------------------------------------------------------------------- lr_scale_ramp
def scaled_rates(scale, ramp, steps=6, engine_state=None):
    """The points' learning rate inside each optimizer step (plain SGD, so nothing else depends on it)."""
    from lightning_dfa.feedback.update_scale import SCALED

    model, seen = TinyMLP(), []
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    dfa = FeedbackEngine(
        blocks="blocks.*", output="head", head_lr_scale=1.0, lr_scale=scale, lr_scale_ramp=ramp
    ).attach(model)
    if engine_state is not None:
        dfa.load_state_dict(engine_state)
    dfa.scale_updates(optimizer)
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append([g["lr"] for g in opt.param_groups if g.get(SCALED)]))
    for x, y in batches(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return [rates[0] for rates in seen], dfa


def test_an_auto_share_rises_linearly_from_zero_over_the_ramp():
    rates, _ = scaled_rates("auto", ramp=4)  # 3 classes: "auto" gives 0.1
    assert rates == pytest.approx([LR * 0.1 * k / 4 for k in (0, 1, 2, 3, 4, 4)])


def test_no_ramp_gives_the_full_share_from_the_first_step():
    rates, _ = scaled_rates("auto", ramp=0)
    assert rates == pytest.approx([LR * 0.1] * 6)


def test_a_number_for_lr_scale_is_not_ramped():
    rates, _ = scaled_rates(0.3, ramp=4)
    assert rates == pytest.approx([LR * 0.3] * 6)


def test_the_steps_taken_are_saved_and_a_resumed_engine_goes_on_from_them():
    _, dfa = scaled_rates("auto", ramp=4, steps=2)
    state = dfa.state_dict()
    assert state["lr_scale_steps"] == 2
    rates, _ = scaled_rates("auto", ramp=4, steps=3, engine_state=state)
    assert rates == pytest.approx([LR * 0.1 * k / 4 for k in (2, 3, 4)])


@pytest.mark.parametrize("ramp", [-1, 1.5, True, "150"])
def test_a_bad_ramp_names_what_is_allowed(ramp):
    with pytest.raises(ValueError, match=r"lr_scale_ramp must be a whole number of optimizer steps >= 0.*got"):
        DFAStrategy(lr_scale_ramp=ramp)


# ---------------------------------------------------------------------- head_lr_scale
HEAD = 3.0


def explicit_head_groups(model, scale=SCALE):
    """What a user would write for head_lr_scale=3: the points at scale x LR, everything else at 3 x LR."""
    points, rest = points_and_rest(model)
    return [{"params": rest, "lr": LR * HEAD}, {"params": points, "lr": LR * scale}]


@pytest.mark.parametrize("name", ["adamw", "sgd-momentum"])
def test_the_rest_learns_at_head_lr_scale_and_the_points_at_lr_scale(name):
    scaled, reference = two_copies()
    opt = OPTIMIZERS[name](scaled.parameters())
    ref_opt = OPTIMIZERS[name](explicit_head_groups(reference))
    with FeedbackEngine(blocks="blocks.*", output="head", head_lr_scale=HEAD, lr_scale=SCALE).attach(scaled) as dfa:
        dfa.scale_updates(opt)
        for x, y in batches():
            opt.zero_grad()
            F.cross_entropy(scaled(x), y).backward()
            opt.step()
    train_plain(reference, ref_opt, None, 1.0)
    assert_same_weights(scaled, reference)


def test_the_frozen_control_trains_the_head_at_head_lr_scale():
    control, reference = two_copies()
    optimizer = torch.optim.SGD(control.parameters(), lr=LR)
    with FeedbackEngine(blocks="blocks.*", output="head", mode="frozen").attach(control) as dfa:  # default: 3
        dfa.scale_updates(optimizer)
        x, y = batches()[0]
        F.cross_entropy(control(x), y).backward()
        optimizer.step()
    with FeedbackEngine(blocks="blocks.*", output="head", mode="frozen", head_lr_scale=1.0).attach(reference):
        F.cross_entropy(reference(x), y).backward()
        torch.optim.SGD(reference.parameters(), lr=LR * HEAD).step()
    assert_same_weights(control, reference)
    assert not torch.equal(control.head.weight, two_copies()[0].head.weight)  # the head did learn


def test_backprop_keeps_the_optimizers_rate_at_the_default_head_lr_scale():
    baseline, reference = two_copies()
    optimizer = torch.optim.SGD(baseline.parameters(), lr=LR)
    with FeedbackEngine(mode="backprop").attach(baseline) as dfa:
        dfa.scale_updates(optimizer)
        x, y = batches()[0]
        F.cross_entropy(baseline(x), y).backward()
        optimizer.step()
    F.cross_entropy(reference(x), y).backward()
    torch.optim.SGD(reference.parameters(), lr=LR).step()
    assert_same_weights(baseline, reference)


def test_outside_the_step_the_users_groups_keep_their_own_rate():
    model = TinyMLP()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    scheduler = warmup(optimizer)
    with FeedbackEngine(blocks="blocks.*", output="head", head_lr_scale=HEAD).attach(model) as dfa:
        dfa.scale_updates(optimizer)
        for x, y in batches(3):
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            scheduler.step()
            assert optimizer.param_groups[0]["lr"] == pytest.approx(scheduler.get_last_lr()[0])
            assert len(optimizer.param_groups) == 1


def test_a_lightning_run_at_the_defaults_is_explicit_groups_at_three_times_the_rate():
    scaled = Classifier()
    reference = Classifier(explicit=True)  # 3 classes: "auto" gives 0.1, the reference's groups at SCALE = 0.1

    def head_groups(module=reference):
        optimizer = torch.optim.AdamW(explicit_head_groups(module.net), lr=LR * HEAD, weight_decay=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup(optimizer), "interval": "step"}}

    reference.configure_optimizers = head_groups
    fit(scaled, DFAStrategy())
    fit(reference, DFAStrategy(head_lr_scale=1.0, lr_scale=1.0))
    assert_same_weights(scaled.net, reference.net)


def test_the_default_head_lr_scale_is_three():
    assert FeedbackEngine().config.head_lr_scale == HEAD
    assert DFAStrategy(head_lr_scale=2.0)._dfa_settings["head_lr_scale"] == 2.0  # noqa: SLF001


@pytest.mark.parametrize("bad", [0, -1.0, 101, "3", True])
def test_a_bad_head_lr_scale_names_what_is_allowed(bad):
    with pytest.raises(ValueError, match=r"head_lr_scale must be a number in \(0, 100\].*got"):
        DFAStrategy(head_lr_scale=bad)


def test_resuming_with_another_head_lr_scale_warns():
    model = TinyMLP()
    dfa = FeedbackEngine(blocks="blocks.*", output="head").attach(model)
    F.cross_entropy(model(batches()[0][0]), batches()[0][1]).backward()
    state = dfa.state_dict()
    assert state["head_lr_scale"] == HEAD
    with pytest.warns(UserWarning, match=r"head_lr_scale=3.0, this run uses head_lr_scale=1.0"):
        FeedbackEngine(blocks="blocks.*", output="head", head_lr_scale=1.0).load_state_dict(state)


def test_a_checkpoint_from_before_head_lr_scale_warns_that_the_rate_changes():
    model = TinyMLP()
    dfa = FeedbackEngine(blocks="blocks.*", output="head").attach(model)
    F.cross_entropy(model(batches()[0][0]), batches()[0][1]).backward()
    state = {k: v for k, v in dfa.state_dict().items() if k != "head_lr_scale"}  # what an older version saved
    with pytest.warns(UserWarning, match=r"trained with head_lr_scale=1.0, this run uses head_lr_scale=3.0"):
        FeedbackEngine(blocks="blocks.*", output="head").load_state_dict(state)


@pytest.mark.parametrize(
    "mode, said",
    [
        ("dfa", "head and embeddings at head_lr_scale=3 x lr, points at lr_scale=auto"),
        ("frozen", "mode frozen, head and embeddings at head_lr_scale=3 x lr"),
    ],
)
def test_the_start_of_fit_names_the_heads_rate(mode, said, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        fit(Classifier(), DFAStrategy(mode=mode))
    assert said in caplog.text


def test_the_cli_sets_the_heads_rate(tmp_path):
    assert "head_lr_scale: 1.5" in cli_config(tmp_path, "head_lr_scale=1.5")


def test_the_frozen_control_does_not_announce_a_rate_for_its_points(caplog):
    import logging

    with caplog.at_level(logging.INFO):
        fit(Classifier(), DFAStrategy(mode="frozen"))
    assert "set the points' learning rate" not in caplog.text
