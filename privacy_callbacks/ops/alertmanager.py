"""Alertmanager routing: critical privacy violations page and reach the chat, ``regulatory``
goes to ``compliance``, ``security`` to ``soc``, warnings by business hours, the rest to the chat.
An unset receiver stays without integrations: routing still validates, nothing is sent there."""

from __future__ import annotations

import os
from collections.abc import Mapping

from .rules import _dump

# Receiver name -> environment variable that fills it.
RECEIVERS: dict[str, str] = {
    "privacy-pager": "PRIVACY_ALERTS_PAGER", "privacy-chat": "PRIVACY_ALERTS_CHAT",
    "compliance": "PRIVACY_ALERTS_COMPLIANCE", "soc": "PRIVACY_ALERTS_SOC",
    "warnings-business-hours": "PRIVACY_ALERTS_WARNINGS_BUSINESS_HOURS",
    "warnings-after-hours": "PRIVACY_ALERTS_WARNINGS_AFTER_HOURS",
}
HOURS = "business-hours"  # 09:00-17:00 Monday to Friday, the host's time zone


def _integration(name: str, value: str) -> dict:
    if name not in RECEIVERS:
        raise ValueError(f"Unknown receiver {name!r}: use one of {sorted(RECEIVERS)}")
    kind, _, rest = value.partition(":")
    if kind == "slack" and rest.startswith(("https://", "http://")):
        return {"slack_configs": [{"api_url": rest, "send_resolved": True}]}
    if kind == "pagerduty" and rest:
        return {"pagerduty_configs": [{"routing_key": rest}]}
    if value.startswith(("https://", "http://")):
        return {"webhook_configs": [{"url": value, "send_resolved": True}]}
    # The value may hold a secret: name the receiver and the accepted forms, never the value.
    raise ValueError(f"Unexpected value for receiver {name!r}: use 'https://...' (webhook), "
                     "'slack:https://hooks.slack.com/...' or 'pagerduty:<routing key>'")


def alertmanager_config(receivers: Mapping[str, str] | None = None, *, group_wait: str = "30s",
                        group_interval: str = "5m") -> str:
    """The Alertmanager config (YAML), grouped per alert and session. ``receivers``: name -> a
    webhook URL, ``slack:<webhook URL>`` or ``pagerduty:<routing key>`` (``None``: from the
    ``PRIVACY_ALERTS_*`` variables of :data:`RECEIVERS`)."""
    values = receivers if receivers is not None else {
        name: os.environ[var] for name, var in RECEIVERS.items() if os.environ.get(var)}
    integrations = {name: _integration(name, value) for name, value in values.items()}
    critical = ['severity="critical"', 'category="privacy_violation"']
    warning = ['severity="warning"']
    routes = [{"receiver": r, "matchers": m, **extra} for r, m, extra in (
        ("privacy-pager", critical, {"continue": True}), ("privacy-chat", critical, {}),
        ("compliance", ['category="regulatory"'], {}), ("soc", ['category="security"'], {}),
        ("warnings-business-hours", warning, {"active_time_intervals": [HOURS], "continue": True}),
        ("warnings-after-hours", warning, {"mute_time_intervals": [HOURS]}))]
    return _dump({
        "route": {"receiver": "privacy-chat", "group_by": ["alertname", "session_id"],
                  "group_wait": group_wait, "group_interval": group_interval,
                  "repeat_interval": "4h", "routes": routes},
        # The critical alert already says the budget is gone; the warning would only repeat it.
        "inhibit_rules": [{"source_matchers": ['alertname="PrivacyBudgetExhausted"'],
                           "target_matchers": ['alertname="PrivacyBudgetLow"'],
                           "equal": ["session_id", "model_name"]}],
        "receivers": [{"name": name, **integrations.get(name, {})} for name in RECEIVERS],
        "time_intervals": [{"name": HOURS, "time_intervals": [{"weekdays": ["monday:friday"],
            "times": [{"start_time": "09:00", "end_time": "17:00"}], "location": "Local"}]}],
    })
