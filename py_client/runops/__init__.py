"""runops: a PostgreSQL-native run-operations backend. See README.md and SPEC.md."""

from .aio import AsyncRunOps
from .client import CONTROL_PLANE, RUN_OPS, RunOps
from .errors import (
    EnvironmentUnusable,
    IllegalTransition,
    InvalidInput,
    NotFound,
    RetryableConflict,
    RunOpsError,
    SplitRefused,
    StoreMisconfigured,
    StoreUnavailable,
    UnclassifiableId,
    WrongStore,
)
from .ids import classify_residency, try_classify_residency
from .models import (
    FINAL_STATUSES,
    RUN_STATUSES,
    Batch,
    BatchAppended,
    BatchCreated,
    BatchSealed,
    BatchStatus,
    BatchTriggered,
    ChildTriggerOptions,
    EnvironmentInfo,
    ListedRun,
    Run,
    RunPage,
    RunStatus,
    StoreIdentity,
    TriggerOptions,
    TriggerResult,
    Waitpoint,
    WaitpointCompletion,
    WaitpointCreated,
    WaitpointStatus,
)
from .retry import Backoff, call_with_retry
from .tasks import RunLost, Task, TaskContext, TaskError, TaskRegistry, TokenFailed
from .worker import Outcome, Worker

__all__ = [
    "CONTROL_PLANE", "RUN_OPS", "RunOps", "AsyncRunOps", "Run", "Batch", "Waitpoint", "StoreIdentity", "TriggerResult",
    "ListedRun", "RunPage", "EnvironmentInfo", "BatchTriggered", "BatchCreated", "BatchAppended", "BatchSealed",
    "WaitpointCreated", "WaitpointCompletion",
    "RunStatus", "BatchStatus", "WaitpointStatus", "RUN_STATUSES", "FINAL_STATUSES",
    "TriggerOptions", "ChildTriggerOptions",
    "classify_residency", "try_classify_residency",
    "Backoff", "call_with_retry", "Task", "TaskContext", "TaskError", "TaskRegistry", "TokenFailed", "RunLost",
    "Worker", "Outcome",
    "RunOpsError", "UnclassifiableId", "WrongStore", "IllegalTransition", "NotFound",
    "EnvironmentUnusable", "InvalidInput", "SplitRefused", "RetryableConflict", "StoreUnavailable",
    "StoreMisconfigured",
]
