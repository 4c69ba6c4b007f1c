"""A scrape of the PrometheusExporter is one snapshot's record, read while snapshots arrive."""

from __future__ import annotations

import dataclasses
import threading

from privacy_callbacks import PrivacySnapshot, PrometheusExporter
from privacy_callbacks.exporters.base import RunInfo

BASE = {"session_id": "s", "model_name": "m"}
ACC = {**BASE, "accountant": "rdp"}


def snapshot(step: int) -> PrivacySnapshot:
    return PrivacySnapshot(
        step=step, timestamp_ns=step, accountant="rdp", delta=1e-5, epsilon=0.01 * step,
        epsilon_step=step, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1,
        noise_std=0.1, throughput=100.0 + step, step_seconds=0.01, accounting_errors=0,
        session_steps=step, session_epsilon=0.01 * step,
        epsilon_exact=1, target_epsilon=1e6, budget_remaining=1e6 - 0.01 * step)


def values(exporter: PrometheusExporter) -> dict[str, float]:
    out = {}
    for family in exporter.registry.collect():
        for sample in family.samples:
            if sample.labels in (BASE, ACC):
                out[sample.name] = sample.value
    return out


def test_every_scrape_reads_counters_and_gauges_of_one_snapshot():
    exporter = PrometheusExporter(port=0, serve=False)
    exporter.open(RunInfo(session_id="s", model_name="m", accountant="rdp",
                          exporters=(exporter,)))
    steps = 3000
    done = threading.Event()

    def publish() -> None:
        for step in range(1, steps + 1):
            exporter.export(snapshot(step))
        done.set()

    thread = threading.Thread(target=publish, name="privacy-test-publisher")
    thread.start()
    scrapes = torn = 0
    try:
        while not done.is_set():
            seen = values(exporter)
            if "privacy_epsilon_step" not in seen:
                continue
            scrapes += 1
            step = seen["privacy_epsilon_step"]
            if not (seen["training_steps_with_privacy_total"] == step
                    and seen["privacy_epsilon_consumed"] == 0.01 * step
                    # The counter adds up differences: equal up to rounding, 0.01 off if torn.
                    and abs(seen["privacy_budget_consumed_total"] - 0.01 * step) < 1e-6):
                torn += 1
    finally:
        thread.join()
    assert scrapes > 0
    assert torn == 0, f"{torn} of {scrapes} scrapes mixed values of different snapshots"
    exporter.close()


def test_gauges_keep_the_step_time_a_later_snapshot_lacks_and_drop_other_missing_values():
    exporter = PrometheusExporter(port=0, serve=False)
    exporter.open(RunInfo(session_id="s", model_name="m", accountant="rdp"))
    exporter.export(snapshot(1))
    # The final snapshot of a fit: a newer epsilon, no step time; a target no longer set.
    exporter.export(dataclasses.replace(snapshot(1), epsilon=0.005, throughput=None,
                                        step_seconds=None, target_epsilon=None))
    reg = exporter.registry
    assert reg.get_sample_value("privacy_epsilon_consumed", ACC) == 0.005
    assert reg.get_sample_value("training_throughput_private", {**BASE, "rank": "0"}) == 101.0
    assert reg.get_sample_value("privacy_epsilon_target", ACC) is None
    exporter.close()


def test_a_step_with_a_newer_one_queued_feeds_histograms_only():
    exporter = PrometheusExporter(port=0, serve=False)
    exporter.open(RunInfo(session_id="s", model_name="m", accountant="rdp"))
    exporter.export(dataclasses.replace(snapshot(1), epsilon_forecast=2.5,
                                        budget_exhaustion_steps=70, membership_inference_risk=0.2))
    # A step built in the same publisher batch as a newer one: those three are not computed,
    # and its gauges and counters are not served (the newer step's will be); a histogram
    # counts its observation.
    stats = {"noise_magnitude": 3.0, "signal_magnitude": 4.0}
    exporter.export(dataclasses.replace(snapshot(2), assessed=False, extra=stats))
    reg = exporter.registry
    assert reg.get_sample_value("privacy_noise_magnitude_count", BASE) == 1
    # Device statistics come from the newest step that has them, assessed or not (on a CPU
    # only every k-th step is measured).
    assert reg.get_sample_value("privacy_signal_magnitude", BASE) == 4.0
    assert reg.get_sample_value("privacy_epsilon_consumed", ACC) == 0.01
    assert reg.get_sample_value("training_steps_with_privacy_total", BASE) == 1
    assert reg.get_sample_value("privacy_epsilon_forecast", ACC) == 2.5
    assert reg.get_sample_value("privacy_budget_exhaustion_steps", ACC) == 70
    assert reg.get_sample_value("membership_inference_risk_score", BASE) == 0.2
    # A newer step that computed them, and found no forecast (no planned end), replaces them.
    exporter.export(dataclasses.replace(snapshot(3), budget_exhaustion_steps=68,
                                        membership_inference_risk=0.21))
    assert reg.get_sample_value("privacy_epsilon_forecast", ACC) is None
    assert reg.get_sample_value("privacy_budget_exhaustion_steps", ACC) == 68
    assert reg.get_sample_value("membership_inference_risk_score", BASE) == 0.21
    exporter.close()


def test_consumed_counter_counts_exact_epsilon_only():
    """An upper bound is published until the exact epsilon is known (PRV, GDP, a noise
    schedule); a counter cannot go down, so the bound must never reach it."""
    exporter = PrometheusExporter(port=0, serve=False)
    exporter.open(RunInfo(session_id="s", model_name="m", accountant="rdp"))

    def consumed() -> float | None:
        return exporter.registry.get_sample_value("privacy_budget_consumed_total", ACC)

    def bound(step: int, epsilon: float) -> PrivacySnapshot:
        return dataclasses.replace(snapshot(step), epsilon=epsilon, epsilon_exact=0,
                                   session_epsilon=None)

    exporter.export(bound(1, 0.5))
    assert consumed() == 0.0  # the series exists from the first snapshot, at nothing counted
    exporter.export(snapshot(1))  # the exact value for step 1, below its bound
    assert consumed() == 0.01
    exporter.export(bound(2, 0.5))
    assert consumed() == 0.01
    exporter.export(bound(3, 0.04))
    assert consumed() == 0.01
    exporter.export(snapshot(3))
    assert consumed() == 0.03
    # The gauges still show what was published, bound or not.
    exporter.export(bound(5, 0.5))
    assert exporter.registry.get_sample_value("privacy_epsilon_consumed", ACC) == 0.5
    assert exporter.registry.get_sample_value("privacy_epsilon_exact", ACC) == 0.0
    assert consumed() == 0.03
    exporter.close()
