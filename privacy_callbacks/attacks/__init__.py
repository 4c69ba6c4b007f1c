"""Attacks on the trained model: the loss-threshold membership attack and the one-run audit.

Optional: the core never imports this package. Each attack is a callback beside the
:class:`~privacy_callbacks.PrivacyMonitor` that publishes its results through
``privacy_values()`` (:class:`~privacy_callbacks.snapshot.Reporter`).
"""

from .membership import MembershipInferenceProbe
from .one_run import OneRunAudit

__all__ = ["MembershipInferenceProbe", "OneRunAudit"]
