"""runops: a PostgreSQL-native run-operations backend. See README.md and SPEC.md."""

from .client import CONTROL_PLANE, RUN_OPS, RunOps
from .errors import (
    EnvironmentUnusable,
    IllegalTransition,
    InvalidInput,
    NotFound,
    RetryableConflict,
    RunOpsError,
    SplitRefused,
    StoreUnavailable,
    UnclassifiableId,
    WrongStore,
)
from .ids import classify_residency, try_classify_residency
from .models import Run, StoreIdentity, TriggerResult

__all__ = [
    "CONTROL_PLANE", "RUN_OPS", "RunOps", "Run", "StoreIdentity", "TriggerResult",
    "classify_residency", "try_classify_residency",
    "RunOpsError", "UnclassifiableId", "WrongStore", "IllegalTransition", "NotFound",
    "EnvironmentUnusable", "InvalidInput", "SplitRefused", "RetryableConflict", "StoreUnavailable",
]
