"""Alertmanager configuration: who hears about which privacy alert, and when.

Routing (first match wins unless a route continues):

- ``critical`` + ``privacy_violation`` -> ``privacy-pager`` and ``privacy-chat``;
- ``regulatory`` -> ``compliance``; ``security`` -> ``soc``;
- ``warning`` -> ``warnings-business-hours`` in business hours, ``warnings-after-hours`` outside;
- anything else -> ``privacy-chat``.

Receivers are filled from environment variables (``PRIVACY_ALERTS_PAGER`` ...) or a small YAML
file; an unset receiver is kept without integrations, so routing still validates and nothing is
sent there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from .rules import ALERTS

__all__ = ["BUSINESS_HOURS", "RECEIVERS", "Receivers", "alertmanager_config"]

# Receiver name -> environment variable that fills it.
RECEIVERS: dict[str, str] = {
    "privacy-pager": "PRIVACY_ALERTS_PAGER",
    "privacy-chat": "PRIVACY_ALERTS_CHAT",
    "compliance": "PRIVACY_ALERTS_COMPLIANCE",
    "soc": "PRIVACY_ALERTS_SOC",
    "warnings-business-hours": "PRIVACY_ALERTS_WARNINGS_BUSINESS_HOURS",
    "warnings-after-hours": "PRIVACY_ALERTS_WARNINGS_AFTER_HOURS",
}

BUSINESS_HOURS = "business-hours"

_FORMS = ("'https://...' (webhook), 'slack:https://hooks.slack.com/...' or "
          "'pagerduty:<routing key>'")


def _integration(name: str, value: str) -> dict:
    """The Alertmanager integration block for one receiver value."""
    if value.startswith("slack:"):
        url = value[len("slack:"):]
        if url.startswith(("https://", "http://")):
            return {"slack_configs": [{"api_url": url, "send_resolved": True}]}
    elif value.startswith("pagerduty:"):
        if value[len("pagerduty:"):]:
            return {"pagerduty_configs": [{"routing_key": value[len("pagerduty:"):]}]}
    elif value.startswith(("https://", "http://")):
        return {"webhook_configs": [{"url": value, "send_resolved": True}]}
    # The value may hold a secret: name the receiver and the accepted forms, never the value.
    raise ValueError(f"Unexpected value for receiver {name!r}: use {_FORMS}")


@dataclass(frozen=True)
class Receivers:
    """Where each receiver sends: receiver name -> value (see :data:`RECEIVERS`).

    A value is a webhook URL, ``slack:<incoming webhook URL>`` or ``pagerduty:<routing key>``.
    Values can be secrets: ``repr`` shows only which receivers are set.
    """

    values: Mapping[str, str]

    def __post_init__(self) -> None:
        for name, value in self.values.items():
            if name not in RECEIVERS:
                raise ValueError(f"Unknown receiver {name!r}: use one of {sorted(RECEIVERS)}")
            _integration(name, value)

    def __repr__(self) -> str:
        return f"Receivers(set={sorted(self.values)})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Receivers:
        """Receivers from ``PRIVACY_ALERTS_*`` variables (see :data:`RECEIVERS`)."""
        env = os.environ if env is None else env
        return cls({name: env[var] for name, var in RECEIVERS.items() if env.get(var)})

    @classmethod
    def from_file(cls, path: str | Path, env: Mapping[str, str] | None = None) -> Receivers:
        """Receivers from a YAML mapping ``receiver: value``; environment variables win."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{path}: expected a mapping of receiver name to a string value")
        return cls({**data, **cls.from_env(env).values})

    @property
    def unset(self) -> list[str]:
        """Receivers that send nowhere."""
        return [name for name in RECEIVERS if name not in self.values]


def _route(receiver: str, *matchers: str, **extra: object) -> dict:
    return {"receiver": receiver, "matchers": list(matchers), **extra}


def alertmanager_config(receivers: Receivers | None = None, *, group_wait: str = "30s",
                        group_interval: str = "5m", repeat_interval: str = "4h",
                        business_hours: tuple[str, str] = ("09:00", "17:00"),
                        business_days: str = "monday:friday", location: str = "Local") -> str:
    """The Alertmanager config (YAML) routing the privacy alerts.

    Args:
        receivers: Where each receiver sends; from the environment if ``None``.
        group_wait: How long to wait to group a new alert with others of its session.
        group_interval: Wait before notifying about new alerts of an existing group.
        repeat_interval: Resend a still-firing alert after this long.
        business_hours: Start and end (``HH:MM``) of business hours.
        business_days: Weekday range of business hours, e.g. ``monday:friday``.
        location: IANA time zone business hours are in (``Local``: the Alertmanager host's).
    """
    receivers = Receivers.from_env() if receivers is None else receivers
    critical_privacy = ('severity="critical"', 'category="privacy_violation"')
    route = {
        "receiver": "privacy-chat",
        "group_by": ["alertname", "session_id"],
        "group_wait": group_wait, "group_interval": group_interval,
        "repeat_interval": repeat_interval,
        "routes": [
            _route("privacy-pager", *critical_privacy, **{"continue": True}),
            _route("privacy-chat", *critical_privacy),
            _route("compliance", 'category="regulatory"'),
            _route("soc", 'category="security"'),
            _route("warnings-business-hours", 'severity="warning"',
                   active_time_intervals=[BUSINESS_HOURS], **{"continue": True}),
            _route("warnings-after-hours", 'severity="warning"',
                   mute_time_intervals=[BUSINESS_HOURS]),
        ],
    }
    names = {a.name for a in ALERTS}
    # The critical alert already says the budget is gone; the warning would only repeat it.
    exhausted, low = "PrivacyBudgetExhausted", "PrivacyBudgetLow"
    if not {exhausted, low} <= names:
        raise RuntimeError(f"Alert rules lost {exhausted} or {low}: update the inhibit rule")
    config = {
        "route": route,
        "inhibit_rules": [{"source_matchers": [f'alertname="{exhausted}"'],
                           "target_matchers": [f'alertname="{low}"'],
                           "equal": ["session_id", "model_name"]}],
        "receivers": [{"name": name, **(_integration(name, receivers.values[name])
                                        if name in receivers.values else {})}
                      for name in RECEIVERS],
        "time_intervals": [{"name": BUSINESS_HOURS, "time_intervals": [{
            "weekdays": [business_days],
            "times": [{"start_time": business_hours[0], "end_time": business_hours[1]}],
            "location": location}]}],
    }
    return yaml.safe_dump(config, sort_keys=False, width=100)
