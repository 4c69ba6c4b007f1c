"""privacy_callbacks: live differential-privacy metrics for Opacus training under Lightning.

Public names are imported on first use (PEP 562), so the command line and the ops generators,
which need neither torch nor Lightning, start in well under a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .pii import PIIFilter as PIIFilter, protect_loggers

if TYPE_CHECKING:  # `X as X`: an explicit re-export, for type checkers and linters
    from .audit import AuditTrail as AuditTrail
    from .compliance import DPPolicy as DPPolicy
    from .compliance_audit import ComplianceAudit as ComplianceAudit
    from .exporters.base import Exporter as Exporter, RunInfo as RunInfo
    from .exporters.influxdb import InfluxDBExporter as InfluxDBExporter
    from .exporters.prometheus import PrometheusExporter as PrometheusExporter
    from .guard import BudgetGuard as BudgetGuard
    from .ledger import PrivacyLedger as PrivacyLedger
    from .metrics import PrivacyMetrics as PrivacyMetrics
    from .monitor import PrivacyMonitor as PrivacyMonitor
    from .privacy_audit import OneRunAudit as OneRunAudit
    from .security import MembershipInferenceProbe as MembershipInferenceProbe
    from .snapshot import PrivacySnapshot as PrivacySnapshot
    from .wiring import DifferentialPrivacy as DifferentialPrivacy

# Public name -> the module that defines it.
_LAZY = {
    "AuditTrail": ".audit",
    "BudgetGuard": ".guard",
    "ComplianceAudit": ".compliance_audit",
    "DPPolicy": ".compliance",
    "DifferentialPrivacy": ".wiring",
    "Exporter": ".exporters.base",
    "InfluxDBExporter": ".exporters.influxdb",
    "MembershipInferenceProbe": ".security",
    "OneRunAudit": ".privacy_audit",
    "PrivacyLedger": ".ledger",
    "PrivacyMetrics": ".metrics",
    "PrivacyMonitor": ".monitor",
    "PrivacySnapshot": ".snapshot",
    "PrometheusExporter": ".exporters.prometheus",
    "RunInfo": ".exporters.base",
}

__all__ = sorted([*_LAZY, "PIIFilter", "protect_loggers"])
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


# Our own log records never carry personal data (see privacy_callbacks.pii).
protect_loggers()
