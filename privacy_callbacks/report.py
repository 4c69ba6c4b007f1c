"""The privacy report: one self-contained HTML page per session, from its audit records. They
hold only data-independent settings, the accountant's epsilon (post-processing of what DP
released) and accounted releases (the one-run audit's bound, attack scores)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["render", "render_trail"]


def _session(records: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records of the last session in ``records`` (a trail may hold several)."""
    sessions = [r.get("data", {}).get("session_id") for r in records]
    last = next((s for s in reversed(sessions) if s is not None), None)
    return [r for r, s in zip(records, sessions) if s == last]


def _chart(fits: list[dict[str, Any]], target: float | None, resumes: list[int]) -> str:
    """Epsilon over steps (exact values solid, upper bounds dotted), the target, the forecast
    to the planned end, and where sigma or q changed and where the run resumed."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3.6), dpi=100)
    axes = figure.add_subplot()
    for i, fit in enumerate(fits):
        series = fit["end"].get("series") or []
        exact = [(s, e) for s, e, x in series if x]
        if exact:
            axes.plot(*zip(*exact), color="#1f5fa8", marker="." if len(exact) < 50 else None,
                      label="epsilon (accountant's exact value)" if i == 0 else None)
        bounds = [(s, e) for s, e, x in series if not x]
        if bounds:
            axes.plot(*zip(*bounds), linestyle="none", marker="x", color="#999999",
                      label="upper bound (published before the exact value)" if i == 0
                      else None)
        forecast, planned = fit["end"].get("epsilon_forecast"), fit["start"].get("planned_steps")
        if forecast is not None and planned and series and planned > series[-1][0]:
            axes.plot([series[-1][0], planned], [series[-1][1], forecast], linestyle="--",
                      color="#1f5fa8", alpha=0.6, label="forecast to the planned end"
                      if i == 0 else None)
        for step, _, _ in (fit["end"].get("changes") or [])[1:]:
            axes.axvline(step, color="#d08000", linewidth=0.8, linestyle=":")
    for step in resumes:
        axes.axvline(step, color="#7a3fb0", linewidth=1.0, label="resumed here")
    if target is not None:
        axes.axhline(target, color="#b22222", linewidth=1.2, label=f"target {target:g}")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("epsilon")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    svg = io.StringIO()
    figure.savefig(svg, format="svg")
    text = svg.getvalue()
    return text[text.index("<svg"):]  # inline: no XML prologue inside HTML


def render(records: Iterable[Mapping[str, Any]], *, verified: Any = None) -> str:
    """The page of the last session in ``records`` (``{"event", "ts", "data"}``, oldest first,
    as :class:`~privacy_callbacks.compliance.AuditTrail` writes them); ``verified``: the trail's
    :class:`~privacy_callbacks.compliance.VerifyResult`, ``None`` for records from no trail."""
    import jinja2

    records = _session(list(records))
    fits: list[dict[str, Any]] = []
    for record in records:
        data, event = record.get("data", {}), record.get("event")
        if event == "fit_start":
            fits.append({"start": data, "started": record.get("ts"), "end": {}, "ended": None,
                         "stop": None, "violations": []})
        elif fits and event == "fit_end":
            fits[-1].update(end=data, ended=record.get("ts"))
        elif fits and event == "budget_guard_stop":
            fits[-1]["stop"] = data
        elif fits and event == "policy_violation":
            fits[-1]["violations"].append(data)
    if not fits:
        raise ValueError("no fit_start record: the records hold no fit to report on")
    first, last = fits[0]["start"], fits[-1]
    end, dp = last["end"], last["start"].get("dp") or {}
    changes = end.get("changes") or []
    sigma, q = (changes[-1][1], changes[-1][2]) if changes else (dp.get("noise_multiplier"), None)
    target = end.get("target_epsilon", first.get("target_epsilon"))
    epsilon = end.get("epsilon")
    resumes = [r["data"].get("global_step") for r in records if r.get("event") == "resume"]

    def when(ts: str | None) -> str:  # the trail's ISO 8601 UTC time, to the second
        return "-" if ts is None else ts[:19].replace("T", " ") + " UTC"

    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    page = environment.from_string(Path(__file__).with_name("report.html.j2").read_text())
    return page.render(
        session=first.get("session_id"), model=first.get("model_name"),
        accountant=end.get("accountant", first.get("accountant")), epsilon=epsilon,
        exact=bool(end.get("epsilon_exact")), delta=end.get("delta", first.get("delta")),
        target=target, left=None if target is None or epsilon is None else target - epsilon,
        sigma=sigma, q=q, clip=dp.get("max_grad_norm"), steps=end.get("steps_accounted"),
        fits=len(fits), started=when(fits[0]["started"]), ended=when(last["ended"]),
        chart=_chart([f for f in fits if f["end"]], target, resumes),
        stops=[f["stop"] for f in fits if f["stop"]],
        violations=[v for f in fits for v in f["violations"]],
        reported=end.get("reported") or {}, risk=end.get("membership_inference_risk"),
        errors=end.get("accounting_errors"), verified=verified,
        versions=last["start"].get("versions") or {}, resumes=resumes)


def render_trail(path: str | os.PathLike[str]) -> tuple[str, bool]:
    """The report of a trail's last session, and whether the trail verified."""
    import json

    from .compliance.audit import verify

    result = verify(path)
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a damaged line: verify() says where; the rest is still shown
    return render(records, verified=result), result.ok
