"""DP policy checks in real fits: counted, logged and audited."""

from __future__ import annotations

import json
import logging
import warnings

import lightning.pytorch as pl
import pytest

from dp_models import DPModel
from privacy_callbacks import DPPolicy, PrivacyMonitor, PrometheusExporter

BASE = {"session_id": "pol", "model_name": "DPModel"}


def run(policy, tmp_path, target=8.0, delta=1e-5, stop_at_target=True, **model_kwargs):
    exporter = PrometheusExporter(serve=False)
    monitor = PrivacyMonitor(delta=delta, target_epsilon=target, exporters=[exporter],
                             session_id="pol", policy=policy, audit=tmp_path / "audit.jsonl",
                             progress_bar=False, stop_at_target=stop_at_target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(max_epochs=1, callbacks=[monitor], logger=False, enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False).fit(
            DPModel(**model_kwargs))
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    return exporter.registry, audit


def violations(registry, policy):
    out = {}
    for metric in registry.collect():
        if metric.name == "privacy_compliance_violations":
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels["policy"] == policy:
                    assert {k: sample.labels[k] for k in BASE} == BASE
                    out[sample.labels["violation_type"]] = sample.value
    return out


def test_default_policy_flags_large_delta_and_non_poisson_sampling(tmp_path, caplog):
    # DPModel samples without Poisson; 256 examples make delta=0.01 >= 1/N.
    with caplog.at_level(logging.WARNING, logger="privacy_callbacks"):
        registry, audit = run("default", tmp_path, delta=0.01)
    assert violations(registry, "default") == {"delta_not_below_inverse_n": 1.0,
                                               "non_poisson_sampling": 1.0}
    logged = [r.getMessage() for r in caplog.records if "DP policy" in r.getMessage()]
    assert any("delta=0.01 is not below 1/N=0.00390625 (N=256" in m for m in logged)
    assert any("non_poisson_sampling" in m for m in logged)
    kinds = [r["data"]["violation_type"] for r in audit if r["event"] == "policy_violation"]
    assert kinds == ["delta_not_below_inverse_n", "non_poisson_sampling"]


def test_strict_policy_flags_secure_mode_target_and_running_past_it(tmp_path):
    policy = DPPolicy.preset("strict", name="hipaa", max_epsilon=3.0,
                             require_poisson_sampling=False)
    # Target 10 > 3; epsilon reaches ~3.3 after 8 steps: past the policy max, not the target.
    registry, audit = run(policy, tmp_path, target=10.0)
    assert violations(registry, "hipaa") == {"secure_mode_off": 1.0,
                                             "target_above_policy_max": 1.0,
                                             "epsilon_above_policy_max": 1.0}
    start = next(r for r in audit if r["event"] == "fit_start")
    assert start["data"]["policy"]["name"] == "hipaa"


def test_training_past_the_target_is_a_violation(tmp_path):
    # Report only: with the budget guard on, the run could not pass its target.
    registry, audit = run(DPPolicy(require_poisson_sampling=False), tmp_path, target=1.0,
                          stop_at_target=False)
    assert violations(registry, "default") == {"training_past_target": 1.0}
    record = next(r for r in audit if r["event"] == "policy_violation")
    assert record["data"]["epsilon"] > 1.0 and record["data"]["step"] == 1


def test_clean_run_has_no_violation(tmp_path):
    registry, audit = run(DPPolicy(require_poisson_sampling=False), tmp_path)
    assert violations(registry, "default") == {}
    assert not [r for r in audit if r["event"] == "policy_violation"]


def test_policy_from_file_and_bad_input(tmp_path):
    toml = tmp_path / "policy.toml"
    toml.write_text('preset = "strict"\nname = "acme-dp"\nmax_epsilon = 4.0\n')
    assert DPPolicy.from_file(toml) == DPPolicy(name="acme-dp", max_epsilon=4.0,
                                                require_secure_mode=True)
    js = tmp_path / "policy.json"
    js.write_text(json.dumps({"max_epsilon": 2, "bogus": 1}))
    with pytest.raises(ValueError, match="unknown policy keys \\['bogus'\\]"):
        DPPolicy.from_file(js)
    with pytest.raises(ValueError, match="max_epsilon: -1"):
        DPPolicy(max_epsilon=-1)
    with pytest.raises(ValueError, match="Unknown policy preset 'lax'"):
        DPPolicy.preset("lax")
