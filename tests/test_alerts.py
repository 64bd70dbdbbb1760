"""Alerts (SPEC §9 [1.3]): channels mirrored with the tenants, the outbox written with the run's
final status, leases and backoff, and webhook delivery to a real HTTP server in the test.

The receiver is http.server in a thread: it verifies each request's signature with the channel's
secret, records what it got, and deduplicates by Idempotency-Key as a receiver should. Tests
reach behind the API (as the superuser) only to read the outbox and to make a retry due now
instead of waiting out its backoff.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from runops.alerts import Deliverer, Delivery, encode_body, signature
from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.errors import IllegalTransition, InvalidInput, NotFound

from .conftest import Env, Stores, sqlstate_of

RUNOPS = Path(sys.executable).parent / "runops"
SECRET = "s3cret-for-tests"


# -- the receiver -------------------------------------------------------------------------------

@dataclass
class Received:
    key: str
    body: bytes
    signature: str | None
    attempt: str | None


@dataclass
class Receiver:
    """What the test's webhook got. ``plan[key]``: how to answer the n-th request for an alert
    (an HTTP status, or ("sleep", seconds) before a 200); 200 once the plan runs out."""

    url: str
    secret: str | None = SECRET
    plan: dict[str, list[Any]] = field(default_factory=dict)
    default_plan: list[Any] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    bad_signatures: list[str] = field(default_factory=list)
    processed: dict[str, dict[str, Any]] = field(default_factory=dict)  # deduplicated by Idempotency-Key
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, key: str) -> Any:
        with self.lock:
            n = sum(1 for r in self.requests if r.key == key) - 1
        plan = self.plan.get(key, self.default_plan)
        return plan[n] if n < len(plan) else 200

    def keys(self) -> list[str]:
        with self.lock:
            return [r.key for r in self.requests]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state: list[Receiver] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            rec = state[0]
            body = self.rfile.read(int(self.headers["Content-Length"]))
            key = self.headers["Idempotency-Key"]
            got = Received(key, body, self.headers.get("X-Runops-Signature"),
                           self.headers.get("X-Runops-Alert-Attempt"))
            with rec.lock:
                rec.requests.append(got)
            # A receiver verifies the signature over the exact bytes, then deduplicates by key.
            if rec.secret is not None:
                expected = "sha256=" + hmac.new(rec.secret.encode(), body, hashlib.sha256).hexdigest()
                if not hmac.compare_digest(expected, got.signature or ""):
                    with rec.lock:
                        rec.bad_signatures.append(key)
                    self._reply(401)
                    return
            what = rec.answer(key)
            if isinstance(what, tuple):
                time.sleep(what[1])
                what = 200
            if 200 <= what < 300:
                with rec.lock:
                    rec.processed.setdefault(key, json.loads(body))
            self._reply(what)

        def _reply(self, status: int) -> None:
            payload = b'{"ok": true}' if status < 300 else b'{"error": "try later"}'
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the deliverer gave up waiting (a timeout test)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.append(Receiver(f"http://127.0.0.1:{server.server_address[1]}/hooks/runops"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state[0]
    server.shutdown()
    server.server_close()
    thread.join(5)


# -- helpers ------------------------------------------------------------------------------------

def outbox(stores: Stores, store: str, run_id: str) -> list[dict[str, Any]]:
    """The alert rows of a run on ``store``, as the superuser sees them."""
    with psycopg.connect(stores.admin[store], autocommit=True) as conn, conn.cursor(
            row_factory=psycopg.rows.dict_row) as cur:
        cur.execute("SELECT * FROM runops.alerts WHERE run_id = %s ORDER BY channel_id",
                    [run_id.removeprefix("run_")])
        return cur.fetchall()


def alert_row(stores: Stores, store: str, alert_id: str) -> dict[str, Any]:
    with psycopg.connect(stores.admin[store], autocommit=True) as conn, conn.cursor(
            row_factory=psycopg.rows.dict_row) as cur:
        cur.execute("SELECT * FROM runops.alerts WHERE id = %s", [alert_id.removeprefix("alert_")])
        row = cur.fetchone()
        assert row is not None
        return row


def make_due(stores: Stores, *run_ids: str) -> None:
    """Skips the backoff: the runs' pending alerts are due now (a lapsed lease, too)."""
    bare = [r.removeprefix("run_") for r in run_ids]
    for store in (CONTROL_PLANE, RUN_OPS):
        with psycopg.connect(stores.admin[store], autocommit=True) as conn:
            conn.execute("UPDATE runops.alerts SET next_attempt_at = now() - interval '1 second' "
                         "WHERE run_id = ANY(%s) AND status = 'PENDING'", [bare])


def failed_run(client: RunOps, env: str, status: str = "COMPLETED_WITH_ERRORS", task: str = "t") -> str:
    run = client.trigger_run(env, task, {"n": 1})
    client.finalize_run(run.run_id, status, error={"name": "Boom", "message": "it broke"})
    return run.run_id


def channel(client: RunOps, env: str, target: str, **options: Any) -> str:
    options.setdefault("secret", SECRET)
    made = client.create_alert_channel(env, "WEBHOOK", target, **options)
    assert client.wait_for_mirror()
    return made


def deliver_until_quiet(deliverer: Deliverer, rounds: int = 5) -> list[Delivery]:
    done: list[Delivery] = []
    for _ in range(rounds):
        step = deliverer.deliver_due()
        if not step:
            break
        done += step
    return done


# -- channels and bad input -----------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "target", "options", "code"), [
    ("EMAIL", "http://127.0.0.1:9/h", {}, "RO006"),
    ("webhook", "http://127.0.0.1:9/h", {}, "RO006"),
    ("WEBHOOK", "ftp://example.com/h", {}, "RO006"),
    ("WEBHOOK", "example.com/h", {}, "RO006"),
    ("WEBHOOK", "https://", {}, "RO006"),
    ("WEBHOOK", "https://exa mple.com/", {}, "RO006"),
    ("WEBHOOK", "http://127.0.0.1:9/" + "x" * 3000, {}, "RO006"),
    ("WEBHOOK", "http://127.0.0.1:9/h", {"severity": "high"}, "RO006"),
    ("WEBHOOK", "http://127.0.0.1:9/h", {"events": ["PENDING"]}, "RO006"),
    ("WEBHOOK", "http://127.0.0.1:9/h", {"events": []}, "RO006"),
    ("WEBHOOK", "http://127.0.0.1:9/h", {"events": "CRASHED"}, "RO006"),
    ("WEBHOOK", "http://127.0.0.1:9/h", {"secret": ""}, "RO006"),
    ("WEBHOOK", "http://127.0.0.1:9/h", {"secret": 42}, "RO006"),
    ("WEBHOOK", "http://127.0.0.1:9/h", {"enabled": "yes"}, "RO006"),
    ("WEBHOOK", "http://127.0.0.1:9/h", [], "RO006"),
])
def test_a_bad_channel_is_refused_and_nothing_is_created(stores: Stores, cp: psycopg.Connection[Any], new_env: Env,
                                                         kind: str, target: str, options: Any, code: str) -> None:
    with pytest.raises(psycopg.Error) as err:
        cp.execute("SELECT runops.create_alert_channel(%s, %s, %s, %s)",
                   [new_env.environment_id, kind, target, Jsonb(options)])
    assert sqlstate_of(err.value) == code
    assert len(str(err.value).splitlines()[0]) < 400
    with psycopg.connect(stores.admin[CONTROL_PLANE]) as admin:
        assert admin.execute("SELECT count(*) FROM runops.alert_channels WHERE environment_id = %s",
                             [new_env.environment_id]).fetchone() == (0,)


def test_channel_calls_refuse_unknown_things_and_the_wrong_store(client: RunOps, ro: psycopg.Connection[Any],
                                                                 new_env: Env) -> None:
    with pytest.raises(NotFound):
        client.create_alert_channel("cnosuchenvironment00000000", "WEBHOOK", "http://127.0.0.1:9/h")
    with pytest.raises(NotFound):
        client.delete_alert_channel("alertchannel_c" + "0" * 24)
    with pytest.raises(InvalidInput):
        client.delete_alert_channel("run_c" + "0" * 24)
    with pytest.raises(psycopg.Error) as err:  # tenant writes are the control plane's
        ro.execute("SELECT runops.create_alert_channel(%s, 'WEBHOOK', 'http://127.0.0.1:9/h')",
                   [new_env.environment_id])
    assert sqlstate_of(err.value) == "RO002"
    made = client.create_alert_channel(new_env.environment_id, "WEBHOOK", "http://127.0.0.1:9/h")
    assert made.startswith("alertchannel_")
    gone = client.delete_alert_channel(made)
    assert gone.channel_id == made and gone.deleted_at is not None
    assert gone.events == ["COMPLETED_WITH_ERRORS", "CRASHED", "EXPIRED", "INTERRUPTED", "SYSTEM_FAILURE", "TIMED_OUT"]
    with pytest.raises(NotFound):  # once
        client.delete_alert_channel(made)


def test_the_deliverers_calls_refuse_bad_input(client: RunOps, cp: psycopg.Connection[Any]) -> None:
    for sql, args in [("SELECT * FROM runops.claim_alerts(%s, %s)", ["w", 0]),
                      ("SELECT * FROM runops.claim_alerts(%s, %s)", ["w", 1001]),
                      ("SELECT * FROM runops.claim_alerts(%s, %s)", ["", 1]),
                      ("SELECT * FROM runops.claim_alerts(%s, %s, %s)", ["w", 1, Jsonb({"lease": "forever"})]),
                      ("SELECT * FROM runops.claim_alerts(%s, %s, %s)", ["w", 1, Jsonb({"lease": "0s"})]),
                      ("SELECT * FROM runops.claim_alerts(%s, %s, %s)", ["w", 1, Jsonb({"max": 1})]),
                      ("SELECT * FROM runops.complete_alert(%s, %s)", ["run_c" + "0" * 24, "w"]),
                      ("SELECT * FROM runops.fail_alert(%s, %s, %s)", ["alert_c" + "0" * 24, "w", ""]),
                      ("SELECT * FROM runops.fail_alert(%s, %s, %s)", ["alert_c" + "0" * 24, "w", None])]:
        with pytest.raises(psycopg.Error) as err:
            cp.execute(sql, args)
        assert sqlstate_of(err.value) == "RO006", (sql, args)
    with pytest.raises(psycopg.Error) as err:
        cp.execute("SELECT * FROM runops.complete_alert(%s, 'w')", ["alert_garbage"])
    assert sqlstate_of(err.value) == "RO001"
    with pytest.raises(NotFound):
        client.complete_alert("alert_c" + "0" * 24, "w")
    with pytest.raises(NotFound):
        client.fail_alert("alert_" + "2" * 27, "w", "HTTP 500")
    with pytest.raises(psycopg.Error) as err:  # a NEW alert id asked of the control plane
        cp.execute("SELECT * FROM runops.complete_alert(%s, 'w')", ["alert_" + "2" * 27])
    assert sqlstate_of(err.value) == "RO002"


# -- the outbox ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("store", [CONTROL_PLANE, RUN_OPS])
def test_the_outbox_writes_one_alert_per_enabled_channel_only_when_the_final_status_commits(
        stores: Stores, client: RunOps, store_conn: Callable[[str], psycopg.Connection[Any]],
        make_env: Callable[..., Env], store: str) -> None:
    env = make_env("cuid" if store == CONTROL_PLANE else "ksuid").environment_id
    first = channel(client, env, "http://127.0.0.1:9/a")
    second = channel(client, env, "http://127.0.0.1:9/b", events=["COMPLETED_WITH_ERRORS", "CANCELED"])
    channel(client, env, "http://127.0.0.1:9/off", enabled=False)
    channel(client, env, "http://127.0.0.1:9/crashes-only", events=["CRASHED"])
    client.delete_alert_channel(channel(client, env, "http://127.0.0.1:9/gone"))
    assert client.wait_for_mirror()

    run = client.trigger_run(env, "t")
    assert run.residency == ("LEGACY" if store == CONTROL_PLANE else "NEW")
    with psycopg.connect(stores.admin[store], autocommit=True) as conn:
        with conn.transaction():  # an alerting status, rolled back: the alerts go with it
            conn.execute("SELECT * FROM runops.finalize_run(%s, 'COMPLETED_WITH_ERRORS', %s)",
                         [run.run_id, Jsonb({"message": "x"})])
            written = conn.execute("SELECT count(*) FROM runops.alerts WHERE run_id = %s",
                                   [run.run_id.removeprefix("run_")]).fetchone()
            assert written == (2,)  # in the same transaction as the status
            raise psycopg.Rollback
    assert outbox(stores, store, run.run_id) == []
    assert client.get_run(run.run_id).status == "PENDING"  # type: ignore[union-attr]
    client.finalize_run(run.run_id, "COMPLETED_WITH_ERRORS", error={"message": "x"})
    rows = outbox(stores, store, run.run_id)
    assert sorted("alertchannel_" + r["channel_id"] for r in rows) == sorted([first, second])
    assert {(r["status"], r["run_status"], r["attempt"], r["environment_id"]) for r in rows} == {
        ("PENDING", "COMPLETED_WITH_ERRORS", 0, env)}
    # Alert ids are minted in the store's shape, so they route like run ids.
    assert {len(r["id"]) for r in rows} == {25 if store == CONTROL_PLANE else 27}

    # Not alerting by default: a success; a cancel only where the channel asked for CANCELED.
    done = client.trigger_run(env, "t")
    client.finalize_run(done.run_id, "COMPLETED_SUCCESSFULLY")
    assert outbox(stores, store, done.run_id) == []
    canceled = client.trigger_run(env, "t")
    client.cancel_run(canceled.run_id)
    assert ["alertchannel_" + r["channel_id"] for r in outbox(stores, store, canceled.run_id)] == [second]
    # A run born final (a task that failed before it could be triggered) alerts too.
    born = client.trigger_failed_task(env, "t", {}, {"message": "no such task version"})
    assert ["alertchannel_" + r["channel_id"] for r in outbox(stores, store, born.run_id)] == [first]


def test_an_environment_without_channels_gets_no_alert(
        stores: Stores, client: RunOps, new_env: Env, legacy_env: Env) -> None:
    for env in (new_env, legacy_env):
        run = client.trigger_run(env.environment_id, "t")
        client.finalize_run(run.run_id, "CRASHED")
        assert outbox(stores, CONTROL_PLANE if env is legacy_env else RUN_OPS, run.run_id) == []


def test_the_tenant_mirror_carries_channels_by_replication_and_by_the_pull(
        stores: Stores, client: RunOps, new_env: Env) -> None:
    made = channel(client, new_env.environment_id, "http://127.0.0.1:9/m")
    bare = made.removeprefix("alertchannel_")
    with psycopg.connect(stores.admin[RUN_OPS], autocommit=True) as ro:
        assert ro.execute("SELECT target, enabled FROM runops.alert_channels WHERE id = %s",
                          [bare]).fetchone() == ("http://127.0.0.1:9/m", True)
        # Where replication has not applied a change, tick's pull through the FDW does.
        with ro.transaction():
            ro.execute("UPDATE runops.alert_channels SET enabled = false, updated_at = '2000-01-01Z' WHERE id = %s",
                       [bare])
            ro.execute("SELECT runops.pull_tenant_mirror()")
            assert ro.execute("SELECT enabled FROM runops.alert_channels WHERE id = %s", [bare]).fetchone() == (True,)
            raise psycopg.Rollback
        # ... and, with no subscription at all, it inserts what the mirror lacks.
        with ro.transaction():
            ro.execute("ALTER SUBSCRIPTION runops_mirror RENAME TO runops_mirror_elsewhere")
            ro.execute("DELETE FROM runops.alert_channels WHERE id = %s", [bare])
            ro.execute("SELECT runops.pull_tenant_mirror()")
            assert ro.execute("SELECT target FROM runops.alert_channels WHERE id = %s",
                              [bare]).fetchone() == ("http://127.0.0.1:9/m",)
            raise psycopg.Rollback
    client.delete_alert_channel(made)
    assert client.wait_for_mirror()
    with psycopg.connect(stores.admin[RUN_OPS], autocommit=True) as ro:
        row = ro.execute("SELECT deleted_at IS NOT NULL FROM runops.alert_channels WHERE id = %s", [bare]).fetchone()
        assert row == (True,)


# -- delivery -----------------------------------------------------------------------------------------

def test_webhooks_are_signed_retried_after_a_500_and_a_timeout_and_processed_once(
        stores: Stores, client: RunOps, make_env: Callable[..., Env], receiver: Receiver) -> None:
    made = make_env("cuid")
    env = made.environment_id
    channel(client, env, receiver.url)
    legacy_run = failed_run(client, env, task="nightly-report")
    client.set_mint_kind(made.organization_id, "ksuid")  # the environment's next runs are NEW
    assert client.wait_for_mirror()
    runs = {CONTROL_PLANE: legacy_run, RUN_OPS: failed_run(client, env, status="CRASHED")}
    alerts = {store: outbox(stores, store, run_id)[0] for store, run_id in runs.items()}
    keys = {store: "alert_" + row["id"] for store, row in alerts.items()}
    # The first attempt at each gets a 500, the second outlasts the deliverer's timeout, the third a 200.
    for key in keys.values():
        receiver.plan[key] = [500, ("sleep", 3.0)]

    with Deliverer(client, "deliverer-1", environment_id=env, timeout=1.0) as deliverer:
        first = {d.alert_id: d for d in deliverer.deliver_due() if d.alert_id in keys.values()}
        assert {d.result for d in first.values()} == {"retrying"} and len(first) == 2
        assert {d.http_status for d in first.values()} == {500}
        for store, key in keys.items():
            row = alert_row(stores, store, key)
            assert row["status"] == "PENDING" and row["attempt"] == 1 and "HTTP 500" in row["last_error"]
            assert dt.timedelta(0) < row["next_attempt_at"] - row["updated_at"] <= dt.timedelta(seconds=10)
        assert [d for d in deliverer.deliver_due() if d.alert_id in keys.values()] == []  # not due yet

        make_due(stores, *runs.values())
        second = {d.alert_id: d for d in deliverer.deliver_due() if d.alert_id in keys.values()}
        assert {d.result for d in second.values()} == {"retrying"} and len(second) == 2
        assert all("timed out" in (d.error or "") for d in second.values())
        for store, key in keys.items():
            row = alert_row(stores, store, key)
            # The backoff grows: 5 s after the first failure, 10 s after the second.
            assert dt.timedelta(seconds=5) < row["next_attempt_at"] - row["updated_at"] <= dt.timedelta(seconds=10)

        make_due(stores, *runs.values())
        third = {d.alert_id: d for d in deliverer.deliver_due() if d.alert_id in keys.values()}
        assert {(d.result, d.http_status, d.attempt) for d in third.values()} == {("delivered", 200, 3)}
        make_due(stores, *runs.values())
        assert [d for d in deliverer.deliver_due() if d.alert_id in keys.values()] == []

    for store, key in keys.items():
        row = alert_row(stores, store, key)
        assert (row["status"], row["attempt"]) == ("DELIVERED", 3) and row["completed_at"] is not None
    time.sleep(2.5)  # the timed-out requests finish on the receiver's side too
    # The receiver saw each alert three times (the timed-out one was processed as well), every
    # request correctly signed, and after deduplication by Idempotency-Key processed it once.
    seen = [k for k in receiver.keys() if k in keys.values()]
    assert sorted(seen) == sorted([*keys.values()] * 3)
    assert receiver.bad_signatures == []
    assert set(receiver.processed) >= set(keys.values())
    body = receiver.processed[keys[CONTROL_PLANE]]
    assert body["alert_id"] == keys[CONTROL_PLANE]
    assert body["run"]["id"] == runs[CONTROL_PLANE] and body["run"]["status"] == "COMPLETED_WITH_ERRORS"
    assert body["run"]["task_identifier"] == "nightly-report"
    assert body["run"]["error"] == {"name": "Boom", "message": "it broke"}
    assert body["environment"]["id"] == env and body["environment"]["type"] == "PRODUCTION"
    assert receiver.processed[keys[RUN_OPS]]["run"]["status"] == "CRASHED"
    # What was signed is exactly what was sent.
    sent = next(r for r in receiver.requests if r.key == keys[RUN_OPS])
    assert sent.signature == signature(SECRET, sent.body) and sent.body == encode_body(json.loads(sent.body))


def test_a_channel_without_a_secret_sends_no_signature(client: RunOps, new_env: Env, receiver: Receiver) -> None:
    receiver.secret = None
    client.create_alert_channel(new_env.environment_id, "WEBHOOK", receiver.url)
    assert client.wait_for_mirror()
    run_id = failed_run(client, new_env.environment_id)
    with Deliverer(client, "deliverer-plain", environment_id=new_env.environment_id) as deliverer:
        assert [d.result for d in deliverer.deliver_due()] == ["delivered"]
    assert [(r.signature, json.loads(r.body)["run"]["id"]) for r in receiver.requests] == [(None, run_id)]


def test_a_failing_receiver_exhausts_the_attempts_and_the_alert_is_failed(
        stores: Stores, client: RunOps, new_env: Env, receiver: Receiver) -> None:
    receiver.default_plan = [503] * 20
    channel(client, new_env.environment_id, receiver.url)
    run_id = failed_run(client, new_env.environment_id)
    results = []
    with Deliverer(client, "deliverer-503", environment_id=new_env.environment_id) as deliverer:
        for _ in range(12):
            make_due(stores, run_id)
            results += [d.result for d in deliverer.deliver_due()]
    assert results == ["retrying"] * 9 + ["failed"]
    row = outbox(stores, RUN_OPS, run_id)[0]
    assert (row["status"], row["attempt"]) == ("FAILED", 10) and "HTTP 503" in row["last_error"]
    assert receiver.processed == {}


def test_two_deliverers_never_both_complete_one_alert(stores: Stores, client: RunOps, new_env: Env,
                                                      receiver: Receiver) -> None:
    env = new_env.environment_id
    channel(client, env, receiver.url)
    run_ids = [failed_run(client, env) for _ in range(30)]
    results: dict[str, list[Delivery]] = {}

    def deliver(worker: str) -> None:
        with Deliverer(client, worker, environment_id=env, batch=3, concurrency=2) as d:
            results[worker] = deliver_until_quiet(d, rounds=30)

    threads = [threading.Thread(target=deliver, args=(f"deliverer-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    delivered = [d.alert_id for done in results.values() for d in done if d.result == "delivered"]
    assert len(delivered) == len(set(delivered)) == 30
    assert all(results.values()), "both deliverers took a share"
    assert sorted(receiver.keys()) == sorted(delivered)  # each posted once
    assert {outbox(stores, RUN_OPS, r)[0]["status"] for r in run_ids} == {"DELIVERED"}


def test_a_lapsed_lease_is_claimed_again_and_only_the_new_holder_may_report(
        stores: Stores, client: RunOps, legacy_env: Env, receiver: Receiver) -> None:
    env = legacy_env.environment_id
    channel(client, env, receiver.url)
    run_id = failed_run(client, env)
    [first] = client.claim_alerts("slow-deliverer", 5, lease="1s", environment_id=env)
    assert first.attempt == 1 and first.run_id == run_id and first.secret == SECRET
    assert client.claim_alerts("other", 5, environment_id=env) == []  # leased
    time.sleep(1.2)
    [again] = client.claim_alerts("quick-deliverer", 5, environment_id=env)
    assert (again.alert_id, again.attempt) == (first.alert_id, 2)
    with pytest.raises(IllegalTransition):
        client.complete_alert(first.alert_id, "slow-deliverer")
    with pytest.raises(IllegalTransition):
        client.fail_alert(first.alert_id, "slow-deliverer", "too late")
    done = client.complete_alert(again.alert_id, "quick-deliverer")
    assert (done.status, done.attempt) == ("DELIVERED", 2)
    assert client.complete_alert(again.alert_id, "quick-deliverer") == done  # a retried report
    with pytest.raises(IllegalTransition):
        client.complete_alert(again.alert_id, "slow-deliverer")


def test_an_alert_whose_channel_or_environment_cannot_be_read_is_retried_never_delivered(
        stores: Stores, client: RunOps, new_env: Env, receiver: Receiver) -> None:
    env = new_env.environment_id
    gone = channel(client, env, receiver.url)
    kept = channel(client, env, receiver.url + "/kept")
    run_id = failed_run(client, env)
    client.delete_alert_channel(gone)
    assert client.wait_for_mirror()
    # The environment is missing from the run-ops store's mirror (as before replication applies it).
    with psycopg.connect(stores.admin[RUN_OPS], autocommit=True) as ro:
        saved = ro.execute("SELECT * FROM runops.runtime_environments WHERE id = %s", [env]).fetchone()
        columns = [c.name for c in ro.execute("SELECT * FROM runops.runtime_environments LIMIT 0").description or []]
        with ro.transaction():
            ro.execute("SET LOCAL session_replication_role = replica")  # as the mirror's apply worker would
            ro.execute("DELETE FROM runops.runtime_environments WHERE id = %s", [env])
    try:
        with Deliverer(client, "deliverer-blind", environment_id=env) as deliverer:
            assert deliverer.deliver_due() == []
            for row in outbox(stores, RUN_OPS, run_id):
                assert (row["status"], row["attempt"]) == ("PENDING", 1)
                assert "cannot be read" in row["last_error"] or "deleted" in row["last_error"]
                assert row["next_attempt_at"] > row["updated_at"]
    finally:
        with psycopg.connect(stores.admin[RUN_OPS], autocommit=True) as ro, ro.transaction():
            ro.execute("SET LOCAL session_replication_role = replica")
            ro.execute(f"INSERT INTO runops.runtime_environments ({', '.join(columns)}) "
                       f"VALUES ({', '.join(['%s'] * len(columns))})", list(saved or []))
    # Readable again: the kept channel's alert is delivered; the deleted channel's never is.
    with Deliverer(client, "deliverer-blind", environment_id=env) as deliverer:
        make_due(stores, run_id)
        assert [(d.result, d.target) for d in deliverer.deliver_due()] == [("delivered", receiver.url + "/kept")]
        for _ in range(12):
            make_due(stores, run_id)
            assert deliverer.deliver_due() == []
    by_channel = {"alertchannel_" + r["channel_id"]: r for r in outbox(stores, RUN_OPS, run_id)}
    assert by_channel[kept]["status"] == "DELIVERED"
    assert by_channel[gone]["status"] == "FAILED" and "deleted" in by_channel[gone]["last_error"]
    assert len(receiver.requests) == 1


def test_the_worker_delivers_its_environments_alerts(client: RunOps, new_env: Env, receiver: Receiver,
                                                     tmp_path: Path, stores: Stores) -> None:
    env = new_env.environment_id
    channel(client, env, receiver.url)
    run = client.trigger_run(env, "refuse", {})
    proc_env = {**os.environ, "RUNOPS_CONTROL_PLANE_URL": stores.app[CONTROL_PLANE],
                "RUNOPS_RUN_OPS_URL": stores.app[RUN_OPS]}
    root = Path(__file__).resolve().parent.parent
    with (tmp_path / "worker.log").open("w") as log:
        proc = subprocess.Popen([str(RUNOPS), "worker", "--app", "tests.worker_app:ro", "--env", env],
                                cwd=root, env=proc_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not receiver.processed and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(30)
    assert [b["run"]["id"] for b in receiver.processed.values()] == [run.run_id], (tmp_path / "worker.log").read_text()


def test_runops_alerts_deliver_in_a_subprocess(client: RunOps, new_env: Env, receiver: Receiver,
                                               stores: Stores) -> None:
    env = new_env.environment_id
    channel(client, env, receiver.url)
    run_id = failed_run(client, env)
    proc_env = {**os.environ, "RUNOPS_CONTROL_PLANE_URL": stores.app[CONTROL_PLANE],
                "RUNOPS_RUN_OPS_URL": stores.app[RUN_OPS]}

    def runops(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(RUNOPS), *args], capture_output=True, text=True, env=proc_env, timeout=120,
                              check=False)

    done = runops("--json", "alerts", "deliver", "--env", env)
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    assert json.loads(line)["result"] == "delivered" and json.loads(line)["run_id"] == run_id
    assert [b["run"]["id"] for b in receiver.processed.values()] == [run_id]
    done = runops("alerts", "deliver", "--env", env)
    assert (done.returncode, done.stdout.strip()) == (0, "no alert is due")
    done = runops("alerts", "deliver", "--batch", "0")
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    # --loop runs until SIGTERM, and exits 0.
    with contextlib.ExitStack() as stack:
        proc = subprocess.Popen([str(RUNOPS), "alerts", "deliver", "--loop", "--env", env], env=proc_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stack.callback(proc.kill)
        second = failed_run(client, env)
        deadline = time.monotonic() + 20
        while second not in [b["run"]["id"] for b in receiver.processed.values()] and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.terminate()
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "delivered" in out and second in out


# -- metrics and doctor ----------------------------------------------------------------------------------

def test_metrics_count_the_outbox_and_doctor_warns_on_a_backlog(stores: Stores, client: RunOps,
                                                                new_env: Env) -> None:
    env = new_env.environment_id
    channel(client, env, "http://127.0.0.1:9/nobody-listens")
    run_ids = [failed_run(client, env) for _ in range(3)]
    figures = client.metrics(env)
    assert figures[RUN_OPS]["alerts"]["pending"] == 3 and figures[RUN_OPS]["alerts"]["failed"] == 0
    assert figures[CONTROL_PLANE]["alerts"] == {"pending": 0, "failed": 0, "oldest_pending_seconds": None}
    admin_env = {**os.environ, "RUNOPS_CONTROL_PLANE_ADMIN_URL": stores.admin[CONTROL_PLANE],
                 "RUNOPS_RUN_OPS_ADMIN_URL": stores.admin[RUN_OPS]}

    def doctor() -> dict[str, Any]:
        done = subprocess.run([str(RUNOPS), "--json", "doctor"], capture_output=True, text=True, env=admin_env,
                              timeout=120, check=False)
        return {c["name"]: c for c in json.loads(done.stdout)["checks"]}

    mine = [r.removeprefix("run_") for r in run_ids]
    for store in (CONTROL_PLANE, RUN_OPS):  # what earlier tests left undelivered is no backlog of this one
        with psycopg.connect(stores.admin[store], autocommit=True) as conn:
            conn.execute("UPDATE runops.alerts SET status = 'FAILED', completed_at = now() "
                         "WHERE status = 'PENDING' AND run_id <> ALL(%s)", [mine])
    with psycopg.connect(stores.admin[RUN_OPS], autocommit=True) as ro:
        try:
            assert doctor()["alerts.run_ops"]["severity"] == "ok"
            ro.execute("UPDATE runops.alerts SET created_at = now() - interval '10 minutes' WHERE run_id = ANY(%s)",
                       [[r.removeprefix("run_") for r in run_ids]])
            figures = client.metrics(env)
            assert figures[RUN_OPS]["alerts"]["oldest_pending_seconds"] >= 600
            check = doctor()["alerts.run_ops"]
            assert check["severity"] == "warn" and "3 alerts undelivered" in check["detail"]
            assert check["data"]["pending"] >= 3
        finally:  # leave no backlog for the other tests
            ro.execute("UPDATE runops.alerts SET status = 'FAILED', completed_at = now() WHERE run_id = ANY(%s)",
                       [[r.removeprefix("run_") for r in run_ids]])
    assert client.metrics(env)[RUN_OPS]["alerts"]["failed"] == 3
