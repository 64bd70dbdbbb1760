"""Frozen rows the client returns. Field names are the SQL column names."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, get_args

RunStatus = Literal[
    # live
    "DELAYED",                 # triggered with a delay; tick enqueues it when due
    "PENDING",                 # queued, waiting for a worker
    "PENDING_VERSION",         # waits for a deployed version of its task
    "WAITING_FOR_DEPLOY",      # waits for a deploy of its task
    "DEQUEUED",                # locked to a worker with a lease, not started yet
    "EXECUTING",               # an attempt is running
    "WAITING_TO_RESUME",       # checkpointed, waiting for its waitpoints (or resume_run)
    "RETRYING_AFTER_FAILURE",  # an attempt failed; tick re-queues it at retry_at
    "PAUSED",
    # final: a final run never changes again
    "CANCELED",
    "INTERRUPTED",
    "COMPLETED_SUCCESSFULLY",
    "COMPLETED_WITH_ERRORS",   # the task failed (no attempts or retries left)
    "SYSTEM_FAILURE",          # the platform failed it (e.g. no worker knows its task)
    "CRASHED",                 # all attempts were used up
    "EXPIRED",                 # its ttl ran out before a worker took it
    "TIMED_OUT",               # ran past max_duration
]
"""The SQL status vocabulary (runops.status_transitions); a test keeps the two equal."""

RUN_STATUSES: frozenset[str] = frozenset(get_args(RunStatus))
BatchStatus = Literal["PENDING", "PROCESSING", "COMPLETED", "ABORTED"]
WaitpointStatus = Literal["PENDING", "COMPLETED"]


class ChildTriggerOptions(TypedDict, total=False):
    """Trigger options a task may give a child it waits for (``ctx.trigger_and_wait``): the
    parent, the resume and the idempotency key are the context's to set."""

    delay: str               # a duration (10m) or a timestamp with offset: born DELAYED
    ttl: str                 # expire if no worker took it within this duration
    max_duration: str        # TIMED_OUT past this much execution
    queue: str
    concurrency_key: str
    tags: list[str]
    max_attempts: int        # 1 to 250 (default 3)
    metadata: Any
    idempotency_key_ttl: str


class TriggerOptions(ChildTriggerOptions, total=False):
    """The options of ``trigger_run`` (SPEC §4); a test keeps the names equal to the SQL's."""

    idempotency_key: str
    idempotency_key_scope: Literal["run", "attempt", "global"]
    parent_run_id: str
    parent_attempt_number: int
    resume_parent_on_completion: bool
    run_id: str              # a pre-minted id (a retried trigger keeps it)
    batch_id: str            # fill index batch_index of an open batch
    batch_index: int
    dev_session_id: str


@dataclass(frozen=True)
class Run:
    """A row of runops.run_view."""

    run_id: str
    environment_id: str
    task_identifier: str
    status: RunStatus
    residency: str
    created_at: dt.datetime
    updated_at: dt.datetime
    idempotency_key: str | None
    idempotency_key_scope: str | None
    idempotency_key_expires_at: dt.datetime | None
    parent_run_id: str | None
    root_run_id: str | None
    batch_id: str | None
    attempt_number: int
    max_attempts: int
    payload: Any
    output: Any
    error: Any
    metadata: Any
    tags: list[str]
    queue: str
    concurrency_key: str | None
    delay_until: dt.datetime | None
    ttl: dt.timedelta | None
    queued_at: dt.datetime | None
    started_at: dt.datetime | None
    completed_at: dt.datetime | None
    expired_at: dt.datetime | None
    locked_by: str | None
    lease_expires_at: dt.datetime | None
    max_duration: dt.timedelta | None
    dev_session_id: str | None
    retry_at: dt.datetime | None
    suspended_reason: str | None
    project_id: str
    organization_id: str
    id: str
    replayed_from_run_id: str | None  # r0006: stores older than the client's minimum lack it

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


FINAL_STATUSES = frozenset({
    "CANCELED", "INTERRUPTED", "COMPLETED_SUCCESSFULLY", "COMPLETED_WITH_ERRORS",
    "SYSTEM_FAILURE", "CRASHED", "EXPIRED", "TIMED_OUT",
})


@dataclass(frozen=True)
class TriggerResult:
    run_id: str
    is_cached: bool
    status: RunStatus
    residency: str


@dataclass(frozen=True)
class StoreIdentity:
    system_identifier: str
    database_name: str
    database_oid: int
    store_role: str
    server_version: str


@dataclass(frozen=True)
class Waitpoint:
    waitpoint_id: str
    environment_id: str
    type: str
    status: WaitpointStatus
    output: Any
    output_is_error: bool
    completed_at: dt.datetime | None
    completed_after: dt.datetime | None
    idempotency_key: str | None


@dataclass(frozen=True)
class WaitpointCreated:
    waitpoint_id: str
    is_cached: bool


@dataclass(frozen=True)
class WaitpointCompletion:
    completed_now: bool
    unblocked_run_ids: list[str]
    remote_run_ids: list[str]


@dataclass(frozen=True)
class Batch:
    """A row of get_batch."""

    batch_id: str
    environment_id: str
    status: BatchStatus
    expected_count: int
    item_count: int
    run_ids: list[str]
    is_sealed: bool
    created_at: dt.datetime
    completed_at: dt.datetime | None
    idempotency_key: str | None


@dataclass(frozen=True)
class BatchTriggered:
    batch_id: str
    is_cached: bool
    run_ids: list[str]


@dataclass(frozen=True)
class BatchCreated:
    batch_id: str
    is_cached: bool


@dataclass(frozen=True)
class BatchAppended:
    batch_id: str
    first_index: int
    run_ids: list[str]


@dataclass(frozen=True)
class BatchSealed:
    batch_id: str
    status: str
    item_count: int
    expected_count: int


@dataclass(frozen=True)
class ListedRun(Run):
    """A row of list_runs: a run and the cursor that resumes the listing after it."""

    cursor: str


@dataclass(frozen=True)
class RunPage:
    """One page of list_runs, newest first. ``next_cursor`` is None once the listing is done."""

    runs: list[ListedRun]
    next_cursor: str | None


@dataclass(frozen=True)
class EnvironmentInfo:
    """A row of list_environments: an environment, its project and organization."""

    environment_id: str
    environment_slug: str
    type: str
    project_id: str
    project_slug: str
    organization_id: str
    organization_slug: str
    mint_kind: str
    paused: bool
    archived: bool
    created_at: dt.datetime


BulkActionStatus = Literal["PENDING", "PROCESSING", "COMPLETED", "ABORTED"]


@dataclass(frozen=True)
class BulkActionCreated:
    """A row of create_bulk_action."""

    bulk_action_id: str
    is_cached: bool
    status: BulkActionStatus


@dataclass(frozen=True)
class BulkAction:
    """A row of get_bulk_action / abort_bulk_action: the action and its counts over both stores
    (``processed_count`` reaches ``matched_count`` when it completes; ``affected_count`` counts
    runs cancelled — already final ones are skipped — or replays made)."""

    bulk_action_id: str
    environment_id: str
    kind: str
    status: BulkActionStatus
    filters: dict[str, Any]
    created_at: dt.datetime
    completed_at: dt.datetime | None
    matched_count: int
    processed_count: int
    affected_count: int

    @property
    def is_over(self) -> bool:
        return self.status in ("COMPLETED", "ABORTED")


@dataclass(frozen=True)
class Alert:
    """A row of claim_alerts: one delivery this deliverer now holds the lease of. ``body`` is what
    the receiver gets (serialized by the deliverer, which signs those exact bytes with
    ``secret`` when the channel has one)."""

    alert_id: str
    channel_id: str
    kind: str
    target: str
    environment_id: str
    run_id: str
    run_status: str
    body: dict[str, Any]
    attempt: int
    secret: str | None = None


@dataclass(frozen=True)
class AlertState:
    """What complete_alert / fail_alert leave: PENDING (due again at ``next_attempt_at``),
    DELIVERED or FAILED."""

    alert_id: str
    status: Literal["PENDING", "DELIVERED", "FAILED"]
    attempt: int
    next_attempt_at: dt.datetime
    last_error: str | None
    completed_at: dt.datetime | None


@dataclass(frozen=True)
class AlertChannel:
    """A row of delete_alert_channel."""

    channel_id: str
    environment_id: str
    kind: str
    target: str
    events: list[str]
    enabled: bool
    created_at: dt.datetime
    deleted_at: dt.datetime | None
