"""DifferentialPrivacy and PrivacyMonitor under Lightning DDP (2 CPU processes, gloo).

The DDP fit runs once, as a script in its own process group (Lightning's launcher re-executes
``sys.argv``, which must not be pytest), under a wall-clock timeout so a hang fails the test.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

import ddp_fit
from servers import (free_port, prometheus, prometheus_query, pushgateway, run_bounded,
                     pushgateway_scrape_config, wait_for)

pytestmark = pytest.mark.servers

SCRIPT = Path(__file__).with_name("ddp_fit.py")
WORLD = 2


@pytest.fixture(scope="module")
def ddp_run():
    """Fits on 2 processes (global batch 2 x 16) and on 1 process (batch 32), same seed."""
    gateway = pushgateway().start()
    prom = prometheus(pushgateway_scrape_config(gateway.port)).start()
    try:
        out = Path(tempfile.mkdtemp(prefix="pc-ddp-"))
        port = free_port()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(SCRIPT.parent.parent), os.environ.get("PYTHONPATH", "")])}
        returncode, log = run_bounded(
            [sys.executable, str(SCRIPT), str(out), "--devices", str(WORLD), "--batch-size", "16",
             "--port", str(port), "--pushgateway", f"127.0.0.1:{gateway.port}",
             "--session-id", "ddp"], 600, env=env)
        assert returncode == 0, log[-3000:]
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
        single = ddp_fit.run(devices=1, batch_size=32)
        yield {"ranks": ranks, "single": single, "port": port, "prometheus": prom,
               "gateway": gateway}
    finally:
        prom.stop()
        gateway.stop()


def test_epsilon_equals_one_process_run(ddp_run):
    single = ddp_run["single"]
    planned = RDPAccountant()
    planned.history = [(ddp_fit.SIGMA, 1 / 8, 8)]
    assert single["history"] == [[ddp_fit.SIGMA, 1 / 8, 8]]
    for rank in ddp_run["ranks"]:
        assert rank["world_size"] == WORLD
        assert rank["history"] == single["history"]  # global sample rate, one step per batch
        assert rank["epsilon"] == single["epsilon"] == planned.get_epsilon(ddp_fit.DELTA)
    assert ddp_run["ranks"][0]["monitor_epsilon"] == single["epsilon"]


def test_noise_added_once_for_the_global_batch(ddp_run):
    expected = ddp_fit.SIGMA * ddp_fit.CLIP / 32  # sigma * C / global expected batch
    single = ddp_run["single"]
    assert single["noise_std"] == pytest.approx(expected, rel=0.05)
    for rank in ddp_run["ranks"]:
        # Noise on every rank would give sqrt(2) times this; no reduction, 2 times.
        assert rank["noise_std"] == pytest.approx(expected, rel=0.05)
        assert rank["expected_batch_size"] == 32 / WORLD
    checksums = {rank["checksum"] for rank in ddp_run["ranks"]}
    assert len(checksums) == 1, "ranks diverged: the noised gradient was not shared"


def test_mechanism_metrics_describe_the_global_averaged_update(ddp_run):
    expected = ddp_fit.SIGMA * ddp_fit.CLIP / 32  # the noise on the averaged gradient
    sizes = [len(batch) for batch in ddp_run["single"]["batches"]]
    for run in (ddp_run["ranks"][0], ddp_run["single"]):
        d = run["entries"]
        noise_energy = (ddp_fit.SIGMA * ddp_fit.CLIP) ** 2 * d
        assert len(run["mechanism"]) == len(run["update_sq"]) == 8
        for reported, measured in zip(run["mechanism"], run["step_noise_std"]):
            assert reported["noise_std"] == pytest.approx(expected)
            assert measured == pytest.approx(expected, rel=0.05)
        # The signal is computed from the update every rank applies: the global noised sum
        # (lr=1, averaged over the global expected batch of 32), minus the noise's energy.
        for reported, update_sq in zip(run["mechanism"], run["update_sq"]):
            assert reported["signal_energy"] == pytest.approx(
                update_sq * 32 ** 2 - noise_energy, abs=1e-4 * noise_energy)
        # ... and estimates the global signal, |batch| * C (each sample adds C): unbiased, with an
        # sd of about sigma^2 C^2 sqrt(2d) + 2 sigma C |s| per step.
        errors = [r["signal_energy"] - (size * ddp_fit.CLIP) ** 2
                  for r, size in zip(run["mechanism"], sizes)]
        spread = noise_energy * (2 / d) ** 0.5 + 2 * ddp_fit.CLIP * max(sizes)
        assert abs(sum(errors) / len(errors)) < 4 * spread / len(errors) ** 0.5
    assert [r["signal_energy"] for r in ddp_run["ranks"][0]["mechanism"]] == pytest.approx(
        [r["signal_energy"] for r in ddp_run["single"]["mechanism"]], abs=4 * spread)
    assert ddp_run["ranks"][1]["mechanism"] == []  # other ranks publish no privacy values


def test_ranks_split_the_one_process_poisson_batch(ddp_run):
    single = ddp_run["single"]["batches"]
    local = [rank["batches"] for rank in ddp_run["ranks"]]
    assert all(len(batches) == len(single) == 8 for batches in local)
    for step, batch in enumerate(single):
        parts = [set(batches[step]) for batches in local]
        assert not parts[0] & parts[1]
        assert sorted(parts[0] | parts[1]) == batch
        assert abs(len(parts[0]) - len(parts[1])) <= 1


def test_one_endpoint_per_rank_privacy_only_on_rank_zero(ddp_run):
    port = ddp_run["port"]
    for rank in ddp_run["ranks"]:
        r = rank["rank"]
        assert rank["url"] == f"http://127.0.0.1:{port + r}/metrics"
        assert f'training_throughput_private{{model_name="zero",rank="{r}",session_id="ddp"}}' \
            in rank["served"]
        assert ("privacy_epsilon_consumed{" in rank["served"]) == (r == 0)


def test_pushgateway_groups_per_rank_reach_prometheus(ddp_run):
    prom = ddp_run["prometheus"]

    def throughput_ranks():
        result = prometheus_query(
            prom, 'training_throughput_private{job="dp_training",session_id="ddp"}')
        return len(result) == WORLD and result

    result = wait_for(throughput_ranks, 60, what="per-rank throughput in Prometheus")
    assert sorted(s["metric"]["rank"] for s in result) == ["0", "1"]
    eps = prometheus_query(prom, 'privacy_epsilon_consumed{job="dp_training",session_id="ddp"}')
    assert [s["metric"]["rank"] for s in eps] == ["0"]
    assert float(eps[0]["value"][1]) == ddp_run["single"]["epsilon"]
