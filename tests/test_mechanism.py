"""Mechanism metrics (clipping, noise, signal, overhead) in real CPU Lightning fits."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dp_models import DPModel, PlainModel, make_data
from privacy_callbacks import MechanismMetrics, PrivacyMonitor, PrometheusExporter

BASE = {"session_id": "t", "model_name": "DPModel"}


@pytest.fixture(autouse=True)
def own_random_state():
    """These tests seed torch: give later tests the random state they would have had."""
    with torch.random.fork_rng():
        yield


@pytest.fixture(autouse=True)
def every_step_measured(request, monkeypatch):
    """These tests check each step's values: on a CPU the default metrics are measured every
    k-th step, k following their cost (test_cpu_stride_* checks that); here every step."""
    if "stride" not in request.node.name:
        monkeypatch.setattr(MechanismMetrics, "STATS_SHARE", 1.0)

D = 8 * 16 + 16 + 16 * 2 + 2  # parameters of DPModel


def raw(**kwargs):
    """Mechanism metrics with raw per-sample statistics (outside epsilon: tests only)."""
    return MechanismMetrics(raw_private_statistics=True, **kwargs)


def fit(model, *callbacks, ckpt_path=None, **trainer_kwargs):
    kwargs = dict(max_epochs=1, enable_progress_bar=False, logger=False,
                  enable_checkpointing=False, enable_model_summary=False)
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=list(callbacks), **kwargs)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


class Steps(pl.Callback):
    """Each step's snapshot, as the monitor published it (the final one at the end of the fit
    carries no step values)."""

    def __init__(self, monitor):
        self.monitor, self.snapshots = monitor, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        assert self.monitor.flush(60)
        self.snapshots.append(self.monitor.last_snapshot)


class Reference(pl.Callback):
    """Per step: what the monitor reported, and the truth from Opacus' own per-sample grads."""

    def __init__(self, monitor):
        self.monitor = monitor
        self.rows = []
        self._ref = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        opt = trainer.optimizers[0]
        grads = opt.grad_samples
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grads], 1).norm(2, 1)
        clip = float(opt.max_grad_norm)
        factor = (clip / (norms + 1e-6)).clamp(max=1.0)
        summed = [torch.einsum("i,i...", factor, g) for g in grads]
        self._ref = dict(norms=norms.detach().clone(), clip=clip, summed=summed,
                         clipped=float((norms + 1e-6 > clip).float().mean()),
                         signal=float(torch.stack([s.norm() for s in summed]).norm()))

    def on_train_batch_end(self, trainer, pl_module, *args):
        opt = trainer.optimizers[0]
        scale = opt.expected_batch_size * opt.accumulated_iterations  # p.grad was averaged
        noise = [p.grad * scale - s for p, s in zip(opt.params, self._ref["summed"])]
        self._ref["noise"] = float(torch.stack([n.norm() for n in noise]).norm())
        self._ref["noised"] = float(torch.stack([(p.grad * scale).norm()
                                                 for p in opt.params]).norm())
        self._ref["sigma"] = float(opt.noise_multiplier)
        if self.monitor is not None:
            assert self.monitor.flush(60)
        self.rows.append((self.monitor and self.monitor.last_snapshot, self._ref))
        self._ref = None


@pytest.mark.parametrize("clip, expected", [(1e-6, 1.0), (1e6, 0.0)])
def test_clipped_fraction_extremes(clip, expected):
    monitor = PrivacyMonitor(delta=1e-5, session_id="t")
    ref = Reference(monitor)
    fit(DPModel(max_grad_norm=clip), monitor, raw(), ref)
    assert [snap.get("clipped_fraction") for snap, _ in ref.rows] == [expected] * 8


def test_clipped_fraction_norms_signal_noise_match_opacus_and_reach_prometheus():
    torch.manual_seed(0)
    exporter = PrometheusExporter(port=0, serve=False)
    monitor = PrivacyMonitor(delta=1e-5, exporters=[exporter], session_id="t")
    ref = Reference(monitor)
    fit(DPModel(max_grad_norm=1.6), monitor, raw(overhead_every=3), ref)  # ~ the median norm
    fractions = []
    for snap, truth in ref.rows:
        assert snap.get("clipped_fraction") == truth["clipped"]
        fractions.append(snap.get("clipped_fraction"))
        assert torch.allclose(torch.tensor(snap.get("per_sample_grad_norms")), truth["norms"],
                              rtol=1e-5, atol=1e-6)
        assert snap.get("noise_magnitude") == pytest.approx(truth["noise"], rel=1e-4)
        # The signal is estimated from the noised update alone: its energy minus sigma^2 C^2 d.
        expected_noise = (1.0 * 1.6) ** 2 * D
        assert snap.get("signal_energy") == pytest.approx(truth["noised"] ** 2 - expected_noise,
                                                   rel=1e-3, abs=1e-3 * expected_noise)
        assert snap.get("signal_to_noise_ratio") == pytest.approx(
            snap.get("signal_magnitude") / math.sqrt(expected_noise))
    assert any(0 < f < 1 for f in fractions), fractions  # a genuinely intermediate case

    reg = exporter.registry
    last, last_truth = ref.rows[-1]
    assert reg.get_sample_value("privacy_clipped_fraction", BASE) == last.get("clipped_fraction")
    assert reg.get_sample_value("privacy_per_sample_grad_norm_count", BASE) == 8 * 32
    all_norms = torch.cat([truth["norms"] for _, truth in ref.rows])
    assert reg.get_sample_value("privacy_per_sample_grad_norm_sum", BASE) == pytest.approx(
        float(all_norms.sum()), rel=1e-4)
    assert reg.get_sample_value("privacy_per_sample_grad_norm_bucket", {**BASE, "le": "2.0"}) \
        == int((all_norms <= 2.0).sum())
    assert reg.get_sample_value("privacy_noise_magnitude_count", BASE) == 8
    assert reg.get_sample_value("privacy_signal_magnitude", BASE) == last.get("signal_magnitude")
    assert reg.get_sample_value("privacy_signal_to_noise_ratio", BASE) == \
        last.get("signal_to_noise_ratio")
    parts = {op: reg.get_sample_value("privacy_overhead_ratio", {**BASE, "operation": op})
             for op in ("per_sample_gradients", "clipping", "noise", "accounting", "total")}
    # The gauges carry the last step's ratios, each under its own operation, and the total is the
    # plain step plus the parts (so it moves with them). Whether the total matches the cost DP
    # really adds is checked against a plain and a DP fit timed side by side, which no relation
    # among the ratios can show: test_bench_mechanism.py.
    assert parts == last.get("overhead")
    assert all(math.isfinite(v) for v in parts.values()), parts
    assert parts["total"] == pytest.approx(1 + sum(v for k, v in parts.items() if k != "total"))


def test_signal_estimate_is_unbiased_and_exact_without_noise():
    torch.manual_seed(2)
    monitor = PrivacyMonitor(delta=1e-5, session_id="t")
    ref = Reference(monitor)
    fit(DPModel(noise_multiplier=0.0, max_grad_norm=0.5), monitor, MechanismMetrics(), ref)
    for snap, truth in ref.rows:
        assert snap.get("signal_magnitude") == pytest.approx(truth["signal"], rel=1e-4)
    torch.manual_seed(2)
    monitor = PrivacyMonitor(delta=1e-5, session_id="t")
    ref = Reference(monitor)
    fit(DPModel(noise_multiplier=0.5, max_grad_norm=0.5), monitor, MechanismMetrics(), ref,
        max_epochs=4)
    errors = torch.tensor([snap.get("signal_energy") - truth["signal"] ** 2
                           for snap, truth in ref.rows])
    # The estimate's sd per step is about sigma^2 C^2 sqrt(2d) + 2 sigma C |s|.
    spread = 0.25 ** 2 * math.sqrt(2 * D) + 2 * 0.25 * max(t["signal"] for _, t in ref.rows)
    assert abs(float(errors.mean())) < 3 * spread / math.sqrt(len(errors))
    assert float(errors.std()) < 2 * spread


@pytest.mark.parametrize("raw", [False, True])
def test_noise_magnitude_is_sigma_c_sqrt_d(raw):
    torch.manual_seed(1)
    monitor = PrivacyMonitor(delta=1e-5, session_id="t")
    ref = Reference(monitor)
    fit(DPModel(noise_multiplier=2.0, max_grad_norm=0.5), monitor,
        MechanismMetrics(raw_private_statistics=raw), ref, max_epochs=4)
    realised = torch.tensor([truth["noise"] for _, truth in ref.rows])
    expected = 2.0 * 0.5 * math.sqrt(D)
    # The norm of a d-dimensional Gaussian: mean ~ sigma*C*sqrt(d), sd ~ sigma*C/sqrt(2).
    assert float(realised.mean()) == pytest.approx(expected, rel=0.05)
    assert float(realised.std()) == pytest.approx(2.0 * 0.5 / math.sqrt(2), rel=0.5)
    published = [snap.get("noise_magnitude") for snap, _ in ref.rows]
    if raw:
        assert published == pytest.approx(realised.tolist(), rel=1e-4)
    else:
        # The exact norm next to the noised update would tell the update's distance to each
        # neighbouring sum: by default the checked expected norm, the same every step.
        assert published == pytest.approx([expected] * len(published), rel=1e-6)


class DropoutModel(DPModel):
    """Dropout makes the calibration pass draw random numbers: they must be given back."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))


def test_parameters_are_bit_identical_with_and_without_the_mechanism_metrics():
    torch.manual_seed(0)
    plain = DropoutModel(max_grad_norm=0.3)
    fit(plain, max_epochs=2)
    hooks = {}

    class Keep(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            hooks["before"] = trainer.optimizers[0].step_hook

        def on_fit_end(self, trainer, pl_module):
            hooks["after"] = trainer.optimizers[0].step_hook
            hooks["patched"] = set(vars(trainer.optimizers[0])) & {"add_noise",
                                                                     "clip_and_accumulate"}

    monitor = PrivacyMonitor(delta=1e-5)
    steps = Steps(monitor)
    torch.manual_seed(0)
    watched = DropoutModel(max_grad_norm=0.3)
    fit(watched, monitor, raw(overhead_every=1), Keep(), steps, max_epochs=2)  # calibrating
    for (name, a), b in zip(plain.named_parameters(), watched.parameters()):
        assert torch.equal(a, b), name
    # The accountant's hook was never replaced and still accounted every step.
    assert hooks["before"] is not None and hooks["after"] is hooks["before"]
    assert hooks["patched"] == {"add_noise", "clip_and_accumulate"}
    accountant = watched.privacy_engine.accountant
    assert accountant.history == [(1.0, 0.125, 16)]
    assert monitor.last_snapshot.epsilon == accountant.get_epsilon(1e-5)
    assert steps.snapshots[-1].get("overhead") is not None


def test_methods_and_hooks_are_restored_after_fit():
    trainer = fit(DPModel(), PrivacyMonitor(delta=1e-5), raw())
    opt = trainer.optimizers[0]
    assert not set(vars(opt)) & {"add_noise", "clip_and_accumulate"}
    assert not opt.original_optimizer._optimizer_step_pre_hooks


def test_calibration_pass_adds_no_full_backward_hook_warnings():
    # Opacus' hooks make PyTorch warn on every DP backward whose module inputs need no
    # gradient (the user's own fit, not ours); a plain pass run with them would add one each.
    def warned(*callbacks):
        monitor = PrivacyMonitor(delta=1e-5)
        steps = Steps(monitor)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(DPModel(), monitor, *callbacks, steps)
        return steps, sum("Full backward hook is firing" in str(w.message) for w in caught)

    _, baseline = warned()
    steps, calibrated = warned(MechanismMetrics(overhead_every=1))
    assert steps.snapshots[-1].get("overhead") is not None  # the pass ran (steps 3 to 8)
    assert baseline > 0 and calibrated == baseline


class AdaClipModel(DPModel):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        dp_module, optimizer, _ = self.privacy_engine.make_private(
            module=self, optimizer=optimizer, data_loader=self.train_dataloader(),
            noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            poisson_sampling=False, clipping="adaptive", target_unclipped_quantile=0.5,
            clipbound_learning_rate=0.5, max_clipbound=10.0, min_clipbound=0.01,
            unclipped_num_std=1.0)
        self.dp = {"module": dp_module}
        return optimizer


def test_adaptive_clipping_is_measured_against_each_steps_bound():
    torch.manual_seed(0)
    monitor = PrivacyMonitor(delta=1e-5, session_id="t")
    ref = Reference(monitor)
    model = AdaClipModel(max_grad_norm=0.3)
    fit(model, monitor, raw(), ref)
    bounds = {truth["clip"] for _, truth in ref.rows}
    assert len(bounds) > 1  # the bound moved: later steps divide by a tensor bound
    for snap, truth in ref.rows:
        assert snap.get("clipped_fraction") == truth["clipped"]
        assert torch.allclose(torch.tensor(snap.get("per_sample_grad_norms")), truth["norms"],
                              rtol=1e-5, atol=1e-6)
        # Adaptive clipping adds less noise to the gradient than sigma: its count takes a share.
        sigma_g = (1.0 - (2 * 1.0) ** -2) ** -0.5
        expected_noise = (sigma_g * truth["clip"]) ** 2 * D
        assert snap.get("signal_energy") == pytest.approx(truth["noised"] ** 2 - expected_noise,
                                                   rel=1e-3, abs=1e-3 * expected_noise)
    assert monitor.last_snapshot.epsilon == model.privacy_engine.accountant.get_epsilon(1e-5)

    torch.manual_seed(0)
    bare = AdaClipModel(max_grad_norm=0.3)
    fit(bare)
    for a, b in zip(model.parameters(), bare.parameters()):
        assert torch.equal(a, b)


class GhostModel(DPModel):
    """Ghost clipping, wired as Opacus documents it: the criterion wrapper, manual steps."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        loss = self.dp["criterion"](self(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        dp_module, optimizer, criterion, _ = self.privacy_engine.make_private(
            module=self, optimizer=optimizer, data_loader=self.train_dataloader(),
            noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            poisson_sampling=False, grad_sample_mode="ghost", criterion=nn.CrossEntropyLoss())
        self.dp = {"module": dp_module, "criterion": criterion}
        return optimizer


def test_ghost_clipping_reuses_its_norms_and_warns_about_overhead():
    torch.manual_seed(0)
    monitor = PrivacyMonitor(delta=1e-5, session_id="t")
    seen = []

    class Norms(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            assert monitor.flush(60)
            norms = pl_module.dp["module"].per_sample_gradient_norms.detach().clone()
            seen.append((monitor.last_snapshot, norms))

    model = GhostModel(max_grad_norm=0.3)
    with pytest.warns(UserWarning, match=r"privacy_overhead_ratio \(ghost clipping") as record:
        fit(model, monitor, raw(), Norms())
    assert sum("MechanismMetrics cannot measure" in str(w.message) for w in record) == 1
    assert len(seen) == 8
    for snap, norms in seen:
        assert snap.get("clipped_fraction") == float((norms + 1e-6 > 0.3).float().mean())
        assert torch.allclose(torch.tensor(snap.get("per_sample_grad_norms")), norms, rtol=1e-6)
        assert snap.get("noise_magnitude") > 0 and snap.get("signal_energy") is not None
        assert snap.get("overhead") is None
    assert monitor.last_snapshot.epsilon == model.privacy_engine.accountant.get_epsilon(1e-5)


class PerLayerModel(DPModel):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        dp_module, optimizer, _ = self.privacy_engine.make_private(
            module=self, optimizer=optimizer, data_loader=self.train_dataloader(),
            noise_multiplier=self.noise_multiplier, max_grad_norm=[1.0] * 4,
            poisson_sampling=False, clipping="per_layer")
        self.dp = {"module": dp_module}
        return optimizer


def test_uninstrumentable_clipping_keeps_core_metrics_and_warns_once():
    exporter = PrometheusExporter(port=0, serve=False)
    monitor = PrivacyMonitor(delta=1e-5, exporters=[exporter], session_id="t")
    model = PerLayerModel()
    with pytest.warns(UserWarning, match="privacy_clipped_fraction .*DPPerLayerOptimizer.*"
                                         "privacy_per_sample_grad_norm") as record:
        fit(model, monitor, raw())
    assert sum("MechanismMetrics cannot measure" in str(w.message) for w in record) == 1
    assert monitor.flush(60)
    final = model.privacy_engine.accountant.get_epsilon(1e-5)
    reg = exporter.registry
    assert reg.get_sample_value("privacy_epsilon_consumed", {**BASE, "model_name":
                                "PerLayerModel", "accountant": "rdp"}) == final
    labels = {**BASE, "model_name": "PerLayerModel"}
    assert reg.get_sample_value("privacy_clipped_fraction", labels) is None
    assert reg.get_sample_value("privacy_noise_magnitude_count", labels) == 8


def test_without_mechanism_metrics_the_optimizer_is_left_alone():
    monitor = PrivacyMonitor(delta=1e-5)
    patched = []

    class Look(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            patched.append(set(vars(trainer.optimizers[0])) & {"add_noise", "clip_and_accumulate"})

    fit(DPModel(), monitor, Look())
    assert patched == [set()] * 8
    assert monitor.last_snapshot.get("clipped_fraction") is None


@pytest.mark.parametrize("value", [0, -3, 1.5, True, "10"])
def test_bad_overhead_every_names_the_value(value):
    with pytest.raises(ValueError, match=f"overhead_every: {value!r}"):
        MechanismMetrics(overhead_every=value)


def test_mechanism_metrics_without_a_monitor_names_the_fix():
    with pytest.raises(RuntimeError, match=r"add PrivacyMonitor\(delta=\.\.\.\)"):
        fit(DPModel(), MechanismMetrics())


def test_module_made_private_by_the_callback_gets_every_mechanism_metric():
    from privacy_callbacks import DifferentialPrivacy

    monitor = PrivacyMonitor(delta=1e-5)
    steps = Steps(monitor)
    fit(PlainModel(), DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=0.5,
                                          statistics_noise_multiplier=10.0), monitor,
        MechanismMetrics(overhead_every=2), steps)
    snap = steps.snapshots[-1]
    assert snap.get("clipped_fraction") is not None and snap.get("noise_magnitude") > 0
    assert snap.get("overhead") is not None and set(snap.get("overhead")) == {
        "per_sample_gradients", "clipping", "noise", "accounting", "total"}


@pytest.mark.servers
def test_mechanism_fields_reach_a_real_influxdb():
    from privacy_callbacks import InfluxDBExporter
    from servers import influxdb1, influxdb1_query

    server = influxdb1().start()
    try:
        influxdb1_query(server, "", 'CREATE DATABASE "privacy"')
        exporter = InfluxDBExporter(server.url, api="v1", database="privacy")
        monitor = PrivacyMonitor(delta=1e-5, exporters=[exporter], session_id="mech")
        ref = Reference(monitor)
        fit(DPModel(max_grad_norm=1.6), monitor, raw(), ref)
        rows = influxdb1_query(
            server, "privacy", "SELECT step, clipped_fraction, noise_magnitude, signal_magnitude, "
            "signal_to_noise_ratio FROM privacy_training WHERE session_id = 'mech'")[0]["values"]
        assert [row[1] for row in rows] == list(range(1, 9))
        for row, (snap, truth) in zip(rows, ref.rows):
            assert row[2:] == [snap.get("clipped_fraction"), snap.get("noise_magnitude"),
                               snap.get("signal_magnitude"), snap.get("signal_to_noise_ratio")]
            assert row[2] == truth["clipped"]
        assert exporter.dropped == 0
    finally:
        server.stop()


# -- what the mechanism metrics release ---------------------------------------------------------

CANARY = 1e3  # the canary's features: its per-sample gradient norm is far above every other


class CanaryModule(PlainModel):
    """A plain module made private by the callback; record 0 of the data is a canary."""

    def __init__(self):
        x, y = make_data(256).tensors
        x = x.clone()
        x[0] = CANARY
        super().__init__(dataset=TensorDataset(x, y), lr=0.05)


class Releases(pl.Callback):
    """Per step: whether the canary was in the batch, and everything the monitor published."""

    def __init__(self, monitor, exporter):
        self.monitor, self.exporter = monitor, exporter
        self.rows, self._canary = [], False
        self._top = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._canary = bool((batch[0] == CANARY).all(dim=1).any())

    def on_train_batch_end(self, trainer, pl_module, *args):
        assert self.monitor.flush(60)
        reg = self.exporter.registry
        # Observations above 100 (every norm but the canary's is far below) so far.
        count = reg.get_sample_value("privacy_per_sample_grad_norm_count", CANARY_LABELS)
        below = reg.get_sample_value("privacy_per_sample_grad_norm_bucket",
                                     {**CANARY_LABELS, "le": "100.0"})
        top = None if count is None else count - below
        step_top = None if top is None else top - self._top
        self._top = top or 0.0
        self.rows.append((self._canary, self.monitor.last_snapshot, step_top))


CANARY_LABELS = {"session_id": "c", "model_name": "CanaryModule"}


def _canary_fit(mechanism_kwargs=None, dp_kwargs=None, epochs=2, extra=()):
    from privacy_callbacks import DifferentialPrivacy

    torch.manual_seed(3)
    exporter = PrometheusExporter(port=0, serve=False)
    monitor = PrivacyMonitor(delta=1e-5, exporters=[exporter], session_id="c")
    releases = Releases(monitor, exporter)
    dp = DifferentialPrivacy(**{"noise_multiplier": 1.0, "max_grad_norm": 1.0, "seed": 5,
                                **(dp_kwargs or {})})
    fit(CanaryModule(), dp, monitor, MechanismMetrics(**(mechanism_kwargs or {})), releases,
        *extra, max_epochs=epochs)
    present = [row[0] for row in releases.rows]
    assert 0 < sum(present) < len(present)  # the canary is in some steps' batches, not all
    return releases.rows, dp, exporter


def test_raw_statistics_are_a_perfect_membership_test_and_need_opting_in():
    with pytest.warns(UserWarning, match="outside.*epsilon"):
        rows, _, _ = _canary_fit({"raw_private_statistics": True})
    # What a scrape sees: the top bucket grows exactly when the canary is in the batch.
    assert [present for present, _, _ in rows] == [top == 1 for _, _, top in rows]


def test_by_default_nothing_published_reveals_the_canary():
    rows, _, exporter = _canary_fit()
    reg = exporter.registry
    assert not reg.get_sample_value("privacy_per_sample_grad_norm_count", CANARY_LABELS)
    assert reg.get_sample_value("privacy_clipped_fraction", CANARY_LABELS) is None
    for _, snap, top in rows:
        assert not top and snap.get("per_sample_grad_norms") is None
        assert snap.get("clipped_fraction") is None
        # Throughput counts the expected batch (32 here), not the Poisson batch's real size.
        assert snap.throughput * snap.step_seconds == pytest.approx(32)
    # The mechanism metrics that stay are data-independent or computed from the noised update.
    assert all(snap.get("noise_magnitude") > 0 and snap.get("signal_to_noise_ratio") is not None
               for _, snap, _ in rows)


class TrueCounts(pl.Callback):
    """Per step: the exact counts of the released histogram, from Opacus' per-sample grads."""

    def __init__(self, clip):
        from privacy_callbacks.catalog import by_name

        shown = by_name("privacy_per_sample_grad_norm").buckets
        self.edges = torch.tensor(sorted({b + 1e-6 for b in shown} | {clip}))
        self.counts = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = trainer.optimizers[0].grad_samples
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grads], 1).norm(2, 1)
        idx = torch.bucketize((norms + 1e-6).float(), self.edges.float())
        self.counts.append(torch.bincount(idx, minlength=len(self.edges) + 1).float())


def test_noised_histogram_hides_the_canary_and_carries_the_configured_noise():
    truth = TrueCounts(clip=1.0)
    sigma_s = 8.0
    rows, dp, _ = _canary_fit(dp_kwargs={"statistics_noise_multiplier": sigma_s},
                              extra=[truth])
    released = torch.tensor([snap.get("noised_counts") for _, snap, _ in rows])
    exact = torch.stack(truth.counts)
    residual = released - exact
    # Every count carries its own N(0, sigma_s^2) noise, nothing else.
    assert float(residual.std()) == pytest.approx(sigma_s, rel=0.15)
    assert abs(float(residual.mean())) < 4 * sigma_s / math.sqrt(residual.numel())
    # The perfect membership test of raw statistics is gone.
    hits = [present == (top == 1) for present, _, top in rows]
    assert sum(hits) < len(hits)
    # The clipped fraction is read from the noised buckets above C, over the expected batch.
    clipped_from = int((truth.edges <= 1.0).sum())  # buckets above C
    for (_, snap, _), counts in zip(rows, released):
        assert snap.get("clipped_fraction") == pytest.approx(
            min(1.0, max(0.0, float(counts[clipped_from:].sum()) / 32)), rel=1e-5, abs=1e-6)


def test_histogram_noise_is_accounted_with_the_gradient_noise():
    sigma, sigma_s, clip = 1.0, 1.5, 1.0
    sigma_g = (sigma ** -2 - sigma_s ** -2) ** -0.5  # 1.34: the gradient takes more noise
    truth = Reference(None)
    rows, dp, exporter = _canary_fit(dp_kwargs={"statistics_noise_multiplier": sigma_s},
                                     extra=[truth])
    # The accountant records the one Gaussian mechanism both releases make together.
    assert dp.privacy_engine.accountant.history == [(sigma, 1 / 8, len(rows))]
    # The optimizer adds sigma_g: the realised noise norm concentrates at sigma_g * C * sqrt(d).
    noise = torch.tensor([ref["noise"] for _, ref in truth.rows])
    assert float(noise.mean()) == pytest.approx(sigma_g * clip * math.sqrt(D), rel=0.04)
    assert float(noise.mean()) > 1.2 * sigma * clip * math.sqrt(D)
    assert rows[-1][1].get("noise_magnitude") == pytest.approx(sigma_g * clip * math.sqrt(D))
    assert rows[-1][1].noise_std == pytest.approx(sigma_g * clip / 32)
    assert rows[-1][1].noise_multiplier == sigma
    reg = exporter.registry
    assert reg.get_sample_value("privacy_per_sample_grad_norm_count", CANARY_LABELS) > 0
    assert reg.get_sample_value("privacy_noise_multiplier", CANARY_LABELS) == sigma


@pytest.mark.parametrize("sigma_s", [1.0, 0.5])
def test_statistics_noise_not_above_sigma_is_refused(sigma_s):
    from privacy_callbacks import DifferentialPrivacy

    with pytest.raises(ValueError, match=f"statistics_noise_multiplier: {sigma_s!r}"):
        DifferentialPrivacy(noise_multiplier=1.0, statistics_noise_multiplier=sigma_s)


def test_make_private_wiring_keeps_per_sample_statistics_off_and_says_why_in_one_line(caplog):
    exporter = PrometheusExporter(port=0, serve=False)
    monitor = PrivacyMonitor(delta=1e-5, exporters=[exporter], session_id="t")
    steps = Steps(monitor)
    with caplog.at_level("INFO", logger="privacy_callbacks"):
        fit(DPModel(), monitor, MechanismMetrics(), steps)
    why = [r.getMessage() for r in caplog.records if "statistics are off" in r.getMessage()]
    assert len(why) == 1 and "statistics_noise_multiplier" in why[0] and len(why[0]) <= 120
    assert not exporter.registry.get_sample_value("privacy_per_sample_grad_norm_count", BASE)
    assert steps.snapshots[-1].get("signal_to_noise_ratio") is not None


def test_noise_std_follows_the_batches_a_window_really_accumulated():
    import ddp_fit

    # 3 batches per optimizer step, but the epoch stops after 4: the second window holds one.
    run = ddp_fit.run(devices=1, batch_size=32, accumulate_grad_batches=3, limit_train_batches=4)
    reported = [m["noise_std"] for m in run["mechanism"]]
    sigma_c = ddp_fit.SIGMA * ddp_fit.CLIP
    assert reported == pytest.approx([sigma_c / (32 * 3), sigma_c / 32])
    assert run["step_noise_std"] == pytest.approx(reported, rel=0.05)  # measured on the update


@pytest.mark.parametrize("share", [1e-9, 1.0])
def test_cpu_stride_measures_every_kth_step_by_cost_and_keeps_the_gauges(share, monkeypatch):
    # On a CPU the statistics are work inside the step: without per-sample statistics they
    # are measured every k-th step, k = their time over STATS_SHARE of the step's (at most
    # MAX_STRIDE), the calibration step always. A share of 1e-9 makes k the maximum, 100.
    monkeypatch.setattr(MechanismMetrics, "STATS_SHARE", share)
    exporter = PrometheusExporter(serve=False)
    monitor = PrivacyMonitor(delta=1e-5, session_id="t", exporters=[exporter])
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snap = monitor.last_snapshot
            seen.append((snap.step, snap.get("noise_magnitude") is not None))

    fit(DPModel(n=8 * 12, batch_size=8), monitor, MechanismMetrics(), Spy())
    assert [step for step, _ in seen] == list(range(1, 13))
    measured = [step for step, has in seen if has]
    if share == 1.0:
        assert measured == list(range(1, 13))
    else:
        # The first step, then the calibration step (the third); the next would be step 103.
        assert measured == [1, 3]
    # The gauges read the newest measured step's values; the histogram counted each one.
    assert exporter.registry.get_sample_value("privacy_signal_to_noise_ratio", BASE) is not None
    assert exporter.registry.get_sample_value("privacy_noise_magnitude_count", BASE) == len(
        measured)


def test_cpu_stride_of_a_resumed_fit_counts_from_its_own_first_step(tmp_path, monkeypatch):
    # The stride and the calibration follow the trainer's step count: a fit resumed at step 5
    # measures its own first step (6) and its own calibration step (its third, 8), then none
    # until the stride's end -- not steps 1 and 3 of a count that restarted.
    monkeypatch.setattr(MechanismMetrics, "STATS_SHARE", 1e-9)
    first = fit(DPModel(n=8 * 12, batch_size=8), PrivacyMonitor(delta=1e-5, session_id="t"),
                MechanismMetrics(), max_steps=5)
    path = tmp_path / "part1.ckpt"
    first.save_checkpoint(path)
    monitor = PrivacyMonitor(delta=1e-5, session_id="t",
                             exporters=[PrometheusExporter(serve=False)])
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snap = monitor.last_snapshot
            seen.append((snap.step, snap.get("noise_magnitude") is not None))

    fit(DPModel(n=8 * 12, batch_size=8), monitor, MechanismMetrics(), Spy(), max_steps=16,
        max_epochs=3, ckpt_path=str(path))
    assert [step for step, _ in seen] == list(range(6, 17))
    assert [step for step, has in seen if has] == [6, 8]


def test_a_skipped_step_never_reaches_a_later_release():
    # The guard stops at the edge, min_steps forces two skipped steps, then a raised sigma lets
    # one more step fit: its per-sample norms are exactly those of its own batch.
    from privacy_callbacks import DifferentialPrivacy
    from test_soundness import DELTA, CanaryPlain, RaiseNoise, opacus_epsilon

    target = opacus_epsilon([(1.0, 1 / 8, 9), (4.0, 1 / 8, 1)]) + 1e-9
    monitor = PrivacyMonitor(delta=DELTA, target_epsilon=target)
    released = []

    class Releases(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert monitor.flush(60)
            norms = monitor.last_snapshot.get("per_sample_grad_norms")
            if norms is not None:
                released.append((len(norms), len(batch[0])))

    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1e6)
    fit(CanaryPlain(), dp, monitor, raw(), RaiseNoise(4.0, after=2), Releases(), min_steps=16,
        max_epochs=2)
    history = dp.privacy_engine.accountant.history
    assert history[-1] == (4.0, 1 / 8, 1) and len(released) == sum(s for _, _, s in history)
    assert all(norms == samples for norms, samples in released), released
