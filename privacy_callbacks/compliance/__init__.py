"""Compliance (optional): the audit trail, DP policy checks, log scrubbing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .audit import AuditTrail, VerifyResult, verify
from .pii import JsonFormatter, PIIFilter, scrub

if TYPE_CHECKING:
    from .callback import ComplianceAudit as ComplianceAudit
    from .callback import DPPolicy as DPPolicy

__all__ = ["AuditTrail", "ComplianceAudit", "DPPolicy", "JsonFormatter", "PIIFilter",
           "VerifyResult", "scrub", "verify"]


def __getattr__(name: str) -> Any:
    # The callback needs Lightning and Opacus: `audit verify` starts without them.
    if name not in ("ComplianceAudit", "DPPolicy"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import callback
    return getattr(callback, name)
