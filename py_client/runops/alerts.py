"""Delivering alerts: claim due alerts from the stores' outboxes, POST each to its webhook, report.

    runops alerts deliver [--loop]     # from the shell
    runops worker ...                  # every long-running worker delivers too

Each alert is claimed with a lease (``claim_alerts``), POSTed as JSON to the channel's URL with
``Idempotency-Key: <alert id>`` and, when the channel has a secret,
``X-Runops-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes>``; a 2xx answer completes
it (``complete_alert``), anything else — another status, a timeout, a refused connection —
fails the attempt (``fail_alert``), and the store schedules the retry (5 s, doubling, at most an
hour, then FAILED). Delivery is at least once: a deliverer that dies between the POST and its
report leaves the lease to lapse, and the alert is posted again; receivers deduplicate by the
key (docs/operations-bulk-and-alerts.md, "Alerts", has the receiver's side).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Literal

from .errors import IllegalTransition, NotFound, RunOpsError
from .models import Alert

if TYPE_CHECKING:
    import httpx

    from .client import RunOps

log = logging.getLogger("runops.alerts")

# What one pass claims, how many POSTs run at once, and how long one may take (seconds).
DEFAULT_BATCH = 10
DEFAULT_CONCURRENCY = 4
DEFAULT_TIMEOUT = 10.0
# The lease outlives the pass's POSTs by this much, so a slow pass still reports in time.
LEASE_MARGIN = 30.0
# How much of a receiver's answer an error report quotes.
QUOTE_CHARS = 200

Result = Literal["delivered", "retrying", "failed", "lost"]


def _user_agent() -> str:
    try:
        return f"runops/{version('runops')}"
    except PackageNotFoundError:
        return "runops"


def encode_body(body: dict[str, Any]) -> bytes:
    """The bytes a receiver gets, and the ones that are signed: compact JSON, keys sorted."""
    return json.dumps(body, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def signature(secret: str, body: bytes) -> str:
    """The ``X-Runops-Signature`` header value: ``sha256=`` and the hex HMAC-SHA256 of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Delivery:
    """What one attempt at one alert came to."""

    alert_id: str
    run_id: str
    target: str
    attempt: int
    result: Result                 # delivered; retrying or failed (fail_alert's verdict); lost (lease gone)
    http_status: int | None = None
    error: str | None = None


class Deliverer:
    """Claims and delivers alerts for one worker id (of one environment, or every one).
    Thread-safe; :meth:`close` when done."""

    def __init__(self, client: RunOps, worker_id: str, *, environment_id: str | None = None,
                 batch: int = DEFAULT_BATCH,
                 concurrency: int = DEFAULT_CONCURRENCY, timeout: float = DEFAULT_TIMEOUT,
                 transport: httpx.BaseTransport | None = None) -> None:
        if not 1 <= batch <= 1000:
            raise ValueError("batch must be 1 to 1000")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not 0 < timeout <= 300:
            raise ValueError("timeout must be more than 0 and at most 300 seconds")
        self.client = client
        self.worker_id = worker_id
        self.environment_id = environment_id
        self.batch = batch
        self.concurrency = concurrency
        self.timeout = timeout
        import httpx  # here, not at the top: httpx imports click, which `import runops` must not load

        # Redirects are not followed: a webhook that moved is a failed delivery the operator sees.
        self._http = httpx.Client(timeout=timeout, follow_redirects=False, transport=transport,
                                  headers={"User-Agent": _user_agent()})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Deliverer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lease(self) -> str:
        """Long enough for a whole pass: every round of ``concurrency`` POSTs may take ``timeout``."""
        rounds = math.ceil(self.batch / self.concurrency)
        return f"{math.ceil(rounds * self.timeout + LEASE_MARGIN)}s"

    def deliver_due(self) -> list[Delivery]:
        """One pass: claims up to ``batch`` due alerts and delivers them; what each came to."""
        alerts = self.client.claim_alerts(self.worker_id, self.batch, lease=self.lease(),
                                          environment_id=self.environment_id)
        if not alerts:
            return []
        if len(alerts) == 1 or self.concurrency == 1:
            return [self.deliver(a) for a in alerts]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(alerts)),
                                thread_name_prefix=f"{self.worker_id}-alerts") as pool:
            return list(pool.map(self.deliver, alerts))

    def deliver(self, alert: Alert) -> Delivery:
        """POSTs one claimed alert and reports the outcome to its store."""
        body = encode_body(alert.body)
        headers = {"Content-Type": "application/json", "Idempotency-Key": alert.alert_id,
                   "X-Runops-Alert-Attempt": str(alert.attempt)}
        if alert.secret:
            headers["X-Runops-Signature"] = signature(alert.secret, body)
        import httpx

        status: int | None = None
        try:
            response = self._http.post(alert.target, content=body, headers=headers)
            status = response.status_code
            problem = None if 200 <= status < 300 else f"HTTP {status}: {response.text[:QUOTE_CHARS]!r}"
        except httpx.TimeoutException as exc:
            problem = f"timed out after {self.timeout:g}s ({type(exc).__name__})"
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {str(exc)[:QUOTE_CHARS]}"
        try:
            if problem is None:
                self.client.complete_alert(alert.alert_id, self.worker_id)
                return Delivery(alert.alert_id, alert.run_id, alert.target, alert.attempt, "delivered", status)
            state = self.client.fail_alert(alert.alert_id, self.worker_id, problem)
        except (IllegalTransition, NotFound):
            # The lease lapsed and another deliverer holds it now (or it is gone): its report is
            # the one that counts.
            return Delivery(alert.alert_id, alert.run_id, alert.target, alert.attempt, "lost", status, problem)
        result: Result = "failed" if state.status == "FAILED" else "retrying"
        log.info("alert %s to %s: attempt %d %s (%s)", alert.alert_id, alert.target, alert.attempt, result, problem)
        return Delivery(alert.alert_id, alert.run_id, alert.target, alert.attempt, result, status, problem)


def deliver_forever(client: RunOps, worker_id: str, stop: threading.Event, *, interval: float = 1.0,
                    **options: Any) -> None:
    """Delivers until ``stop`` is set: a pass every ``interval`` seconds, at once again after a
    full one; a store outage or any other failure is logged and the next pass tries again.
    What a long-running `runops worker` runs in a thread of its own."""
    with Deliverer(client, worker_id, **options) as deliverer:
        while not stop.is_set():
            try:
                done = deliverer.deliver_due()
            except RunOpsError as exc:
                log.debug("%s: alert delivery: %s", worker_id, exc)
                done = []
            except Exception:  # a bug here must not end the worker's other loops
                log.exception("%s: alert delivery failed", worker_id)
                done = []
            if len(done) < deliverer.batch:
                stop.wait(interval)
