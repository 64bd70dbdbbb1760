"""SPEC §7 [1.2]: ``AsyncRunOps`` has the same methods as ``RunOps``, tested the same way. Every
scenario here runs twice — once on the sync client, once on the async one through
:class:`tests.client_flavours.Blocking` — with the same body.
"""

from __future__ import annotations

import datetime as dt
import inspect
import secrets
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from runops import (
    AsyncRunOps,
    IllegalTransition,
    InvalidInput,
    NotFound,
    RunOps,
    UnclassifiableId,
    WrongStore,
)
from runops.client import CONTROL_PLANE, RUN_OPS
from tests.client_flavours import Blocking, public_methods
from tests.conftest import Env, Stores

# -- the API is the same ------------------------------------------------------------------------------


def parameters(member: Any) -> list[tuple[str, Any, Any]]:
    """Name, kind and default of each parameter (a default function compared by name)."""
    target = member.fget if isinstance(member, property) else member
    return [(p.name, p.kind, getattr(p.default, "__name__", p.default))
            for p in inspect.signature(target).parameters.values()]


def test_the_async_client_has_every_public_method_of_the_sync_client_with_the_same_parameters() -> None:
    sync, asynchronous = public_methods(RunOps), public_methods(AsyncRunOps)
    assert set(sync) <= set(asynchronous), f"missing on AsyncRunOps: {sorted(set(sync) - set(asynchronous))}"
    assert set(asynchronous) - set(sync) == {"open"}  # the async pools open inside a running loop
    assert {name: parameters(member) for name, member in sync.items()} == \
        {name: parameters(asynchronous[name]) for name in sync}
    assert parameters(RunOps.__init__) == parameters(AsyncRunOps.__init__)


def test_every_call_that_does_io_is_a_coroutine_on_the_async_client() -> None:
    no_io = {"classify_residency", "try_classify_residency", "split_wired", "run_ops_stores", "behind_pgbouncer",
             "tasks", "task", "listen"}
    for name, member in public_methods(AsyncRunOps).items():
        if name not in no_io:
            assert inspect.iscoroutinefunction(member), name
    assert inspect.isasyncgenfunction(inspect.unwrap(AsyncRunOps.listen))  # an async context manager


@pytest.mark.parametrize("cls", [RunOps, AsyncRunOps])
def test_every_public_method_has_a_docstring(cls: type) -> None:
    undocumented = [name for name, member in public_methods(cls).items()
                    if not inspect.getdoc(member.fget if isinstance(member, property) else member)]
    assert undocumented == []


def test_unknown_trigger_options_are_refused_before_any_round_trip() -> None:
    # Nothing listens on this port: a round trip would be StoreUnavailable, not InvalidInput.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"postgresql://nobody@127.0.0.1:{probe.getsockname()[1]}/none"
    for flavour in (RunOps, Blocking):
        with flavour(dead, timeout=0.5) as nowhere:
            with pytest.raises(InvalidInput, match="unknown trigger option idempotency_kye") as refused:
                nowhere.trigger_run("env_x", "t", idempotency_kye="k")
            assert refused.value.hint is not None and "idempotency_key" in refused.value.hint


# -- the same scenarios on both ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def async_client(stores: Stores) -> Iterator[Blocking]:
    with Blocking(stores.app[CONTROL_PLANE], stores.app[RUN_OPS], max_pool_size=8) as c:
        yield c


@pytest.fixture(params=["sync", "async"])
def ro(request: pytest.FixtureRequest, client: RunOps) -> Any:
    """The client under test: the session's RunOps, or an AsyncRunOps driven through Blocking."""
    return client if request.param == "sync" else request.getfixturevalue("async_client")


@pytest.fixture(params=["cuid", "ksuid"])
def kind_env(request: pytest.FixtureRequest, make_env: Callable[..., Env]) -> Env:
    """An environment whose roots live in the control plane (cuid) or the run-ops store (ksuid)."""
    return make_env(request.param)


def residency_of(env: Env, client: RunOps) -> str:
    return "NEW" if client.trigger_route(env.environment_id) == RUN_OPS else "LEGACY"


def test_trigger_without_a_key_creates_a_pending_run_in_the_environments_store(ro: Any, client: RunOps,
                                                                                kind_env: Env) -> None:
    env = kind_env.environment_id
    made = ro.trigger_run(env, "t", {"n": 1}, tags=["a"])
    assert (made.status, made.is_cached, made.residency) == ("PENDING", False, residency_of(kind_env, client))
    run = ro.get_run(made.run_id)
    assert run is not None and (run.payload, run.tags, run.residency) == ({"n": 1}, ["a"], made.residency)
    assert ro.trigger_run(env, "t").run_id != made.run_id


def test_a_keyed_trigger_returns_the_cached_run(ro: Any, kind_env: Env) -> None:
    env = kind_env.environment_id
    first = ro.trigger_run(env, "t", {"n": 1}, idempotency_key="order-1")
    again = ro.trigger_run(env, "t", {"n": 2}, idempotency_key="order-1")
    assert (again.run_id, again.is_cached, first.is_cached) == (first.run_id, True, False)
    assert ro.reset_idempotency_key(env, "t", "order-1") == 1
    assert ro.trigger_run(env, "t", idempotency_key="order-1").run_id != first.run_id


def test_batches_one_call_and_streamed(ro: Any, kind_env: Env) -> None:
    env = kind_env.environment_id
    made = ro.batch_trigger(env, [{"task": "t", "payload": {"i": i}} for i in range(3)])
    batch = ro.get_batch(made.batch_id)
    assert batch is not None and (batch.run_ids, batch.is_sealed, batch.item_count) == (made.run_ids, True, 3)
    chunks: list[Any] = []
    streamed = ro.stream_batch(env, ({"task": "t", "payload": {"i": i}} for i in range(5)), 5, chunk_size=2,
                               on_chunk=chunks.append)
    assert [c.first_index for c in chunks] == [0, 2, 4]
    sealed = ro.get_batch(streamed.batch_id)
    assert sealed is not None and sealed.is_sealed and len(sealed.run_ids) == 5


def test_dequeue_start_complete_and_wait(ro: Any, kind_env: Env) -> None:
    env, queue = kind_env.environment_id, f"q-{secrets.token_hex(3)}"
    made = ro.trigger_run(env, "t", queue=queue)
    [taken] = ro.dequeue_runs(env, "w", 5, queues=[queue])
    assert (taken.run_id, taken.status) == (made.run_id, "DEQUEUED")
    assert ro.heartbeat_run(made.run_id, "w").lease_expires_at is not None
    started = ro.start_attempt(made.run_id, "w")
    assert (started.status, started.attempt_number) == ("EXECUTING", 1)
    assert ro.complete_attempt(made.run_id, 1, {"ok": True}).status == "COMPLETED_SUCCESSFULLY"
    done = ro.wait_for_run(made.run_id, timeout=5)
    assert (done.status, done.output) == ("COMPLETED_SUCCESSFULLY", {"ok": True})


def test_a_failed_attempt_is_retried_and_a_final_run_cannot_change(ro: Any, kind_env: Env) -> None:
    env, queue = kind_env.environment_id, f"q-{secrets.token_hex(3)}"
    made = ro.trigger_run(env, "t", queue=queue, max_attempts=2)
    ro.dequeue_runs(env, "w", 1, queues=[queue])
    ro.start_attempt(made.run_id, "w")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    failed = ro.fail_attempt(made.run_id, 1, {"message": "boom"}, retry_at=later)
    assert (failed.status, failed.retry_at) == ("RETRYING_AFTER_FAILURE", later)
    assert ro.cancel_run(made.run_id, "enough").status == "CANCELED"
    with pytest.raises(IllegalTransition):
        ro.start_attempt(made.run_id, "w")


def test_a_waitpoint_blocks_and_resumes_a_run(ro: Any, kind_env: Env) -> None:
    env, queue = kind_env.environment_id, f"q-{secrets.token_hex(3)}"
    made = ro.trigger_run(env, "t", queue=queue)
    ro.dequeue_runs(env, "w", 1, queues=[queue])
    ro.start_attempt(made.run_id, "w")
    token = ro.create_waitpoint(env, "MANUAL", idempotency_key=f"wp-{secrets.token_hex(3)}")
    ro.block_run(made.run_id, [token.waitpoint_id])
    assert ro.create_checkpoint(made.run_id, 1, "WAIT_FOR_TASK", "loc").status == "WAITING_TO_RESUME"
    done = ro.complete_waitpoint(token.waitpoint_id, {"approved": True})
    assert done.completed_now and done.unblocked_run_ids + done.remote_run_ids == [made.run_id]
    waitpoint = ro.get_waitpoint(token.waitpoint_id)
    assert waitpoint is not None and (waitpoint.status, waitpoint.output) == ("COMPLETED", {"approved": True})
    assert ro.get_run(made.run_id).status == "PENDING"


def test_list_runs_merges_both_stores_and_its_cursor_pages_through_every_run_once(
        ro: Any, client: RunOps, make_env: Callable[..., Env]) -> None:
    env = make_env("cuid")
    made = [client.trigger_run(env.environment_id, "t").run_id for _ in range(3)]
    client.set_mint_kind(env.organization_id, "ksuid")
    assert client.wait_for_mirror()
    made += [client.trigger_run(env.environment_id, "t").run_id for _ in range(3)]
    residencies = {client.classify_residency(r) for r in made}
    assert residencies == {"LEGACY", "NEW"}

    seen: list[Any] = []
    cursor = None
    while True:
        page = ro.list_runs(env.environment_id, 4, cursor)
        seen += page.runs
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert sorted(r.run_id for r in seen) == sorted(made)
    keys = [(r.created_at, r.id) for r in seen]
    assert keys == sorted(keys, reverse=True)
    only = ro.list_runs(env.environment_id, 10, statuses=["PENDING"], created_after=seen[-1].created_at)
    assert {r.run_id for r in only.runs} <= set(made)


def test_reads_route_by_id_shape(ro: Any, kind_env: Env) -> None:
    made = ro.trigger_run(kind_env.environment_id, "t")
    owner = RUN_OPS if ro.classify_residency(made.run_id) == "NEW" else CONTROL_PLANE
    other = CONTROL_PLANE if owner == RUN_OPS else RUN_OPS
    assert ro.get_run(made.run_id).run_id == made.run_id
    through = ro.get_run(made.run_id, through=other)  # the other store reads through its FDW
    assert through is not None and through.run_id == made.run_id
    assert ro.get_run("not-an-id") is None
    assert ro.get_run(made.run_id, "env_" + "0" * 25) is None  # another environment's guard
    assert ro.try_classify_residency("not-an-id") is None


def test_errors_are_the_named_exceptions(ro: Any, kind_env: Env) -> None:
    env = kind_env.environment_id
    with pytest.raises(InvalidInput):
        ro.trigger_run(env, "t", max_attempts=0)
    with pytest.raises(InvalidInput):
        ro.dequeue_runs(env, "w", 1, lease="forever")
    with pytest.raises(UnclassifiableId):
        ro.cancel_run("run_bogus")
    real = ro.trigger_run(env, "t").run_id
    # A run id of the same shape that no run has. Not simply the last character changed: ids are
    # minted from a per-session counter, so a neighbour of a fresh id may be a real run.
    missing = next(i for i in (real[:-3] + tail for tail in ("zzz", "yyy", "xxx")) if ro.get_run(i) is None)
    with pytest.raises(NotFound):
        ro.wait_for_run(missing, timeout=1)
    with pytest.raises((NotFound, WrongStore)):
        ro.trigger_run("env_" + "0" * 25, "t")


def test_wait_for_run_times_out_on_a_live_run_and_tick_runs_on_every_store(ro: Any, kind_env: Env) -> None:
    made = ro.trigger_run(kind_env.environment_id, "t", delay="1h")
    with pytest.raises(TimeoutError, match="still DELAYED"):
        ro.wait_for_run(made.run_id, timeout=0.3)
    assert set(ro.tick()) == {CONTROL_PLANE, RUN_OPS}
    assert ro.enqueue_delayed_runs() >= 0 and ro.expire_enqueued_runs() >= 0
