"""DP policy checks in real fits: counted, logged and audited."""

from __future__ import annotations

import json
import logging

import pytest
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader

from dp_models import DPModel, fit
from privacy_callbacks import ComplianceAudit, DPPolicy, PrivacyMonitor, PrometheusExporter

BASE = {"session_id": "pol", "model_name": "DPModel"}


def run(policy, tmp_path, target=8.0, delta=1e-5, stop_at_target=True, model=None):
    exporter = PrometheusExporter(serve=False)
    monitor = PrivacyMonitor(delta=delta, target_epsilon=target, exporters=[exporter],
                             session_id="pol", progress_bar=False, stop_at_target=stop_at_target)
    compliance = ComplianceAudit(delta, target, policy=policy, audit=tmp_path / "audit.jsonl")
    fit(model or DPModel(), monitor, compliance)
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
    assert "above the target, 1, at step 1" in record["data"]["detail"]


class PoissonModel(DPModel):
    """Opacus' own Poisson sampling (its DPDataLoader), as make_private does by default."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_sampler=UniformWithReplacementSampler(
            num_samples=len(self.dataset), sample_rate=self.batch_size / len(self.dataset)))


def test_clean_run_has_no_violation(tmp_path):
    registry, audit = run("default", tmp_path, model=PoissonModel())
    assert violations(registry, "default") == {}
    assert not [r for r in audit if r["event"] == "policy_violation"]
    assert next(r for r in audit if r["event"] == "fit_start")["data"]["poisson_sampling"]


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
    with pytest.raises(ValueError, match="require_secure_mode: 'yes'"):
        DPPolicy(require_secure_mode="yes")
    assert ComplianceAudit(1e-5, policy=toml).policy.name == "acme-dp"
    assert ComplianceAudit(1e-5, policy="strict").policy == DPPolicy.preset("strict")


def test_an_upper_bound_above_a_limit_is_no_violation_until_the_exact_value_is(tmp_path):
    from types import SimpleNamespace

    from privacy_callbacks import PrivacySnapshot
    audit = ComplianceAudit(1e-5, 8.0, audit=tmp_path / "audit.jsonl",
                            policy=DPPolicy(max_epsilon=3.0))
    audit.on_train_start(SimpleNamespace(callbacks=[audit], is_global_zero=True), None)

    def observe(step, epsilon, exact):
        audit.privacy_observe(PrivacySnapshot(step=step, timestamp_ns=0, accountant="prv",
                                              epsilon=epsilon, epsilon_exact=exact))

    observe(1, 4.5, 0)  # the RDP bound while PRV's own value is computed
    assert audit.violations == {}
    observe(2, 3.2, 1)
    assert audit.violations == {("default", "epsilon_above_policy_max"): 1}
    observe(3, 4.1, 1)  # a threshold once, a violation once
    kinds = [(r["event"], r["data"].get("step")) for r in
             map(json.loads, (tmp_path / "audit.jsonl").read_text().splitlines())]
    assert kinds == [("policy_violation", 2), ("budget_threshold", 3)]
