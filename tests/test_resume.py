"""Resuming a fit continues epsilon; it never silently restarts it."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from dp_models import DPModel
from privacy_callbacks import PrivacyMonitor
from test_budget_guard import DELTA, assert_stopped_at_the_edge, opacus_epsilon
from test_monitor import fit


def first_part(tmp_path, steps: int, monitor: pl.Callback | None = None, **model_kwargs):
    """Fit ``steps`` steps and save a Lightning checkpoint; returns its path."""
    model = DPModel(**model_kwargs)
    callbacks = [monitor] if monitor is not None else []
    trainer = fit(model, *callbacks, max_steps=steps)
    path = tmp_path / "part1.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def test_resume_continues_epsilon_as_if_uninterrupted(tmp_path):
    path = first_part(tmp_path, 3, PrivacyMonitor(delta=DELTA, session_id="run"))
    monitor = PrivacyMonitor(delta=DELTA)
    model = DPModel()
    trainer = fit(model, monitor, max_steps=11, max_epochs=5, ckpt_path=path)
    assert trainer.global_step == 11
    assert model.privacy_engine.accountant.history == [(1.0, 0.125, 11)]
    assert monitor.last_snapshot.epsilon == opacus_epsilon([(1.0, 0.125, 11)])
    assert monitor.session_id == "run"  # one series across the restart


def test_guard_counts_the_steps_before_the_restart(tmp_path):
    path = first_part(tmp_path, 3, PrivacyMonitor(delta=DELTA, target_epsilon=4.0))
    model = DPModel()
    trainer = fit(model, PrivacyMonitor(delta=DELTA, target_epsilon=4.0), max_epochs=2,
                  ckpt_path=path)
    history = model.privacy_engine.accountant.history
    assert trainer.global_step == 9 and history == [(1.0, 0.125, 9)]  # as without the restart
    assert_stopped_at_the_edge(history, 4.0, 1.0, 0.125)


def test_prv_resume_matches_uninterrupted(tmp_path):
    path = first_part(tmp_path, 3, PrivacyMonitor(delta=DELTA), accountant="prv")
    monitor = PrivacyMonitor(delta=DELTA)
    model = DPModel(accountant="prv")
    fit(model, monitor, max_steps=11, max_epochs=5, ckpt_path=path)
    straight = DPModel(accountant="prv")
    fit(straight, PrivacyMonitor(delta=DELTA), max_steps=11, max_epochs=5)
    expected = straight.privacy_engine.accountant.get_epsilon(DELTA)
    assert model.privacy_engine.accountant.history == [(1.0, 0.125, 11)]
    assert monitor.last_snapshot.epsilon == pytest.approx(expected, abs=0.01)  # PRV eps_error


def test_checkpoint_without_privacy_state_is_an_error(tmp_path):
    path = first_part(tmp_path, 3)  # saved without PrivacyMonitor
    with pytest.raises(RuntimeError, match="no privacy accounting state.*allow_privacy_reset=True"):
        fit(DPModel(), PrivacyMonitor(delta=DELTA), max_steps=6, max_epochs=5, ckpt_path=path)


def test_opting_in_restarts_epsilon(tmp_path):
    path = first_part(tmp_path, 3)
    model = DPModel()
    fit(model, PrivacyMonitor(delta=DELTA, allow_privacy_reset=True), max_steps=6, max_epochs=5,
        ckpt_path=path)
    assert model.privacy_engine.accountant.history == [(1.0, 0.125, 3)]


@pytest.mark.parametrize("changed, match", [
    ({"delta": 1e-6}, "delta 1e-05 in the checkpoint, 1e-06 now"),
    ({"accountant": "gdp"}, "accountant 'rdp' in the checkpoint, 'gdp' now"),
])
def test_changed_delta_or_accountant_is_an_error(tmp_path, changed, match):
    path = first_part(tmp_path, 3, PrivacyMonitor(delta=DELTA))
    delta = changed.get("delta", DELTA)
    model_kwargs = {"accountant": changed["accountant"]} if "accountant" in changed else {}
    with pytest.raises(RuntimeError, match=f"{match}.*allow_privacy_reset=True"):
        fit(DPModel(**model_kwargs), PrivacyMonitor(delta=delta), max_steps=6, max_epochs=5,
            ckpt_path=path)
    # Opted in, the saved history is carried over, not dropped.
    model = DPModel(**model_kwargs)
    fit(model, PrivacyMonitor(delta=delta, allow_privacy_reset=True), max_steps=6, max_epochs=5,
        ckpt_path=path)
    assert model.privacy_engine.accountant.history == [(1.0, 0.125, 6)]


class OpacusCheckpointModel(DPModel):
    """Restores the accountant with Opacus' own PrivacyEngine.load_checkpoint."""

    def __init__(self, opacus_ckpt: str) -> None:
        super().__init__()
        self.opacus_ckpt = opacus_ckpt

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        self.privacy_engine.load_checkpoint(path=self.opacus_ckpt, module=self.dp["module"],
                                            optimizer=optimizer)
        return optimizer


def test_opacus_save_checkpoint_users_keep_working(tmp_path):
    model = DPModel()
    trainer = fit(model, PrivacyMonitor(delta=DELTA), max_steps=3)
    opacus_ckpt = str(tmp_path / "opacus.pt")
    model.privacy_engine.save_checkpoint(path=opacus_ckpt, module=model.dp["module"],
                                         optimizer=trainer.optimizers[0])
    lightning_ckpt = str(tmp_path / "part1.ckpt")
    trainer.save_checkpoint(lightning_ckpt)

    # Opacus' checkpoint alone, in a fresh fit.
    resumed = OpacusCheckpointModel(opacus_ckpt)
    monitor = PrivacyMonitor(delta=DELTA)
    fit(resumed, monitor, max_steps=5)
    assert resumed.privacy_engine.accountant.history == [(1.0, 0.125, 8)]
    assert monitor.last_snapshot.epsilon == opacus_epsilon([(1.0, 0.125, 8)])

    # Both checkpoints, agreeing on the history: no error, no double counting.
    both = OpacusCheckpointModel(opacus_ckpt)
    fit(both, PrivacyMonitor(delta=DELTA), max_steps=6, max_epochs=5, ckpt_path=lightning_ckpt)
    assert both.privacy_engine.accountant.history == [(1.0, 0.125, 6)]
