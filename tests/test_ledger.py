"""The optical cost ledger: per-step entries logged, totals that add up, a summary at the end of fit."""

from __future__ import annotations

import pytest
import torch
from conftest import fit_digits, quiet_trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_dfa import DFA
from lightning_dfa.callbacks import OpticalLedger
from lightning_dfa.data import DigitsDataModule
from lightning_dfa.models import MLPClassifier
from lightning_dfa.projectors import OPU, frames_per_vector, optical_cost
from lightning_dfa.projectors.encoding import DEFAULT_BITS, DEFAULT_ENCODING


def fit(tmp_path, projector, ledger, batches=6):
    dfa = DFA(blocks="blocks.*", output="head", projector=projector)
    trainer = fit_digits(
        steps=batches, batch_size=32, logger=CSVLogger(tmp_path), log_every_n_steps=1, callbacks=[dfa, ledger]
    )
    return trainer, dfa.engine


def test_ledger_logs_each_step_and_sums_them_for_an_electronic_projector(tmp_path, capsys):
    ledger = OpticalLedger()
    trainer, dfa = fit(tmp_path, "gaussian", ledger)
    d_e, d_fb = dfa.projector.in_features, dfa.projector.out_features
    total = ledger.summary()
    assert total["steps"] == 6 and total["vectors"] == 6 * 32
    expected = optical_cost(6 * 32, d_e, d_fb)
    assert total["frames"] == expected.frames == 6 * 32 * 4
    assert total["optical_time_s"] == pytest.approx(expected.time_s)
    assert total["electronic_time_s"] > 0
    assert total["electronic_energy_j"] == pytest.approx(total["electronic_time_s"] * 65.0)
    logged = trainer.logged_metrics
    assert logged["ledger/frames"] == 32 * 4 and logged["ledger/total_frames"] == 6 * 32 * 4
    assert "Optical cost ledger" in capsys.readouterr().out


def test_ledger_uses_the_emulators_own_frames_and_a_timed_electronic_reference(tmp_path):
    ledger = OpticalLedger(verbose=False)
    fit(tmp_path, {"class_path": "opu", "init_args": {"encoding": "bitplanes", "bits": 2}}, ledger, batches=3)
    total = ledger.summary()
    calibration = 64 + 2 * 4096  # the first step's anchor reading and blank frames (x, x + r)
    assert total["frames"] == 3 * 32 * 2 * 2 * 2 + calibration
    assert total["optical_energy_j"] == pytest.approx(total["frames"] * 0.5e-3 * 30)
    assert ledger._reference_s_per_vector > 0
    assert total["electronic_time_s"] == pytest.approx(ledger._reference_s_per_vector * 96)


def test_ledger_prices_only_the_vectors_an_opu_sends_and_the_electronic_side_for_all_rows(tmp_path):
    ledger = OpticalLedger(verbose=False)
    fit(tmp_path, {"class_path": "opu", "init_args": {"sample_rows": 0.25}}, ledger, batches=3)
    total = ledger.summary()
    assert total["vectors"] == 3 * 8  # 8 of 32 rows a step, 4 frames each, and the one-off calibration
    assert total["frames"] == 3 * 8 * 4 + 64 + 2 * 4096
    assert total["electronic_time_s"] == pytest.approx(ledger._reference_s_per_vector * 3 * 32)


def test_ledger_without_dfa_says_what_is_missing(tmp_path):
    trainer = quiet_trainer(max_steps=1, callbacks=[OpticalLedger()])
    with pytest.raises(RuntimeError, match="OpticalLedger needs DFA"):
        trainer.fit(MLPClassifier(hidden=8, depth=1), datamodule=DigitsDataModule())


def test_step_cost_for_a_hand_computed_case():
    ledger = OpticalLedger(encoding="ternary", electronic_power_w=100.0)
    projector = torch.nn.Linear(10, 20)
    entry = ledger.step_cost(projector, vectors=5, seconds=0.01, frames=0, device=torch.device("cpu"))
    assert entry == {
        "vectors": 5,
        "frames": 20,
        "optical_time_s": pytest.approx(0.01),
        "optical_energy_j": pytest.approx(0.3),
        "electronic_time_s": 0.01,
        "electronic_energy_j": pytest.approx(1.0),
    }


def test_ledger_cost_model_and_emulator_share_one_default_encoding():
    opu, ledger = OPU(16, 32), OpticalLedger(verbose=False)
    assert (opu.encoding, opu.bits) == (ledger.encoding, ledger.bits) == (DEFAULT_ENCODING, DEFAULT_BITS)
    assert optical_cost(5, 16, 32).frames_per_vector == opu.frames_per_vector() == frames_per_vector()
