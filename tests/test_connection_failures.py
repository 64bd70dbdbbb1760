"""A store the client cannot use as configured, or cannot reach: one line that names the store and
libpq's cause, at once, without the connection pool's retries on stderr; a configuration error
(malformed URL, bad password, unknown database) is never retried; a replica that is down costs
reads nothing.

The console script runs as a user runs it (a subprocess, the URLs in the environment); the
client is asked directly too, sync and async.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from runops import AsyncRunOps, RunOps, StoreMisconfigured, StoreUnavailable
from runops.client import CONTROL_PLANE, RUN_OPS
from runops.ops.local_cluster import free_port
from tests.client_flavours import Blocking
from tests.conftest import Env, Stores

ROOT = Path(__file__).resolve().parent.parent
RUNOPS = Path(sys.executable).parent / "runops"
# What the user waits for refused connections and bad credentials, Python's start included.
PROMPTLY = 2.0
STORES = {CONTROL_PLANE: "control plane", RUN_OPS: "run-ops"}


def _url(good: str, **changes: str) -> str:
    return make_conninfo(good, **changes) if changes else good


# name -> (how the URL goes wrong, libpq's cause as the line says it, a configuration error?)
CASES: dict[str, tuple[Callable[[str], str], str, bool]] = {
    "refused": (lambda good: _url(good, port=str(free_port())), "Connection refused", False),
    "bad password": (lambda good: _url(good, password="not-the-password"),
                     'password authentication failed for user "runops_app"', True),
    "unknown database": (lambda good: _url(good, dbname="no_such_db"), 'database "no_such_db" does not exist', True),
    "unknown host": (lambda good: _url(good, host="no-such-host.invalid"),
                     "(resolve|translate) host( name)? .no-such-host.invalid", False),
    "malformed port": (lambda good: good.replace(f":{conninfo_to_dict(good)['port']}/", ":notaport/"),
                       'invalid integer value "notaport" for connection option "port"', True),
    "malformed option": (lambda good: good + "?bogus=1", 'invalid URI query parameter: "bogus"', True),
}


def runops(*args: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str, str, float]:
    began = time.monotonic()
    done = subprocess.run([str(RUNOPS), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False, cwd=ROOT)
    return done.returncode, done.stdout, done.stderr, time.monotonic() - began


def environment(stores: Stores, **urls: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNOPS_")}
    return {**env, "RUNOPS_CONTROL_PLANE_URL": stores.app[CONTROL_PLANE], "RUNOPS_RUN_OPS_URL": stores.app[RUN_OPS],
            **urls}


def assert_one_line(err: str, store: str, cause: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err  # nothing from the pool, no traceback
    assert re.search(rf"^error: RO009 the {store} store( at \S+| URL)", lines[0]), lines[0]
    assert re.search(cause, lines[0]), lines[0]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("store", STORES)
def test_the_cli_names_the_store_and_the_cause(stores: Stores, make_env: Callable[..., Env],
                                               store: str, case: str) -> None:
    spoil, cause, _ = CASES[case]
    bad = spoil(stores.app[store])
    settings = environment(stores, **{f"RUNOPS_{store}_URL": bad})
    env = make_env("cuid" if store == CONTROL_PLANE else "ksuid").environment_id  # its roots in the bad store
    for args in (["runs", "ls", "--env", env], ["trigger", env, "send-email"]):
        code, _, err, took = runops(*args, env=settings)
        assert code == 19, (args, err)
        assert_one_line(err, store, cause)
        if case in ("refused", "bad password"):
            assert took < PROMPTLY, f"{args}: {took:.2f}s"


@pytest.mark.parametrize("case", ["refused", "unknown host"])
def test_a_trigger_that_needs_no_control_plane_goes_ahead_quietly_without_it(
        stores: Stores, make_env: Callable[..., Env], case: str) -> None:
    """SPEC §7: the NEW hot path never needs the control plane; an outage of it is no error."""
    env = make_env("ksuid").environment_id
    settings = environment(stores, RUNOPS_CONTROL_PLANE_URL=CASES[case][0](stores.app[CONTROL_PLANE]))
    code, out, err, took = runops("--json", "trigger", env, "send-email", env=settings)
    assert (code, err) == (0, ""), err
    assert '"residency": "NEW"' in out and took < PROMPTLY + 1


def test_a_control_plane_that_refuses_the_login_is_never_papered_over(stores: Stores,
                                                                     make_env: Callable[..., Env]) -> None:
    """The run-ops mirror could route this trigger, but a wrong password is a configuration to
    fix, not an outage to ride out."""
    env = make_env("ksuid").environment_id
    spoil, cause, _ = CASES["bad password"]
    settings = environment(stores, RUNOPS_CONTROL_PLANE_URL=spoil(stores.app[CONTROL_PLANE]))
    code, _, err, _ = runops("trigger", env, "send-email", env=settings)
    assert code == 19
    assert_one_line(err, CONTROL_PLANE, cause)


@pytest.mark.parametrize("flavour", [RunOps, Blocking], ids=["sync", "async"])
@pytest.mark.parametrize("case", CASES)
def test_the_client_raises_store_unavailable_with_the_cause(stores: Stores, case: str, flavour: type) -> None:
    spoil, cause, configuration = CASES[case]
    bad = spoil(stores.app[CONTROL_PLANE])
    if case == "malformed option":  # found before any connection: the URL does not parse
        for cls in (RunOps, AsyncRunOps):
            with pytest.raises(StoreMisconfigured, match=f"the CONTROL_PLANE store URL is malformed: {cause}"):
                cls(bad, stores.app[RUN_OPS])
        return
    began = time.monotonic()
    client = flavour(bad, stores.app[RUN_OPS])
    with client:
        with pytest.raises(StoreUnavailable, match=cause) as failed:
            client.list_environments()
        assert isinstance(failed.value, StoreMisconfigured) is configuration
        assert failed.value.message.startswith("the CONTROL_PLANE store at ")
        if case in ("refused", "bad password"):
            assert time.monotonic() - began < PROMPTLY
        # A configuration error is remembered, not retried; an outage is tried again a second later.
        again = time.monotonic()
        with pytest.raises(StoreUnavailable, match=cause):
            client.create_organization("x")
        assert time.monotonic() - again < 0.1


def test_a_worker_stops_on_a_configuration_error_and_rides_out_an_outage(stores: Stores,
                                                                         make_env: Callable[..., Env]) -> None:
    env = make_env("ksuid").environment_id

    def worker(**urls: str) -> subprocess.Popen[str]:
        return subprocess.Popen([str(RUNOPS), "worker", "--app", "tests.worker_app:ro", "--env", env],
                                env=environment(stores, **urls), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    spoil, cause, _ = CASES["bad password"]
    misconfigured = worker(RUNOPS_RUN_OPS_URL=spoil(stores.app[RUN_OPS]))
    try:
        assert misconfigured.wait(timeout=30) == 19
    finally:
        if misconfigured.poll() is None:
            misconfigured.kill()
    assert misconfigured.stderr is not None
    last = misconfigured.stderr.read().splitlines()[-1]
    assert last.startswith("error: RO009 the RUN_OPS store at ") and cause in last, last

    refused = CASES["refused"][0]
    outage = worker(RUNOPS_RUN_OPS_URL=refused(stores.app[RUN_OPS]), RUNOPS_CONTROL_PLANE_URL=refused(
        stores.app[CONTROL_PLANE]))
    try:
        time.sleep(3)
        assert outage.poll() is None, "a worker waits for its stores to come back"
    finally:
        outage.send_signal(signal.SIGTERM)
        assert outage.wait(timeout=30) == 0


@pytest.mark.parametrize("flavour", [RunOps, Blocking], ids=["sync", "async"])
def test_a_replica_that_is_down_costs_reads_nothing(stores: Stores, client: RunOps, make_env: Callable[..., Env],
                                                     flavour: type) -> None:
    made = [client.trigger_run(make_env(kind).environment_id, "t") for kind in ("cuid", "ksuid")]
    down = {f"{name}_replica_url": CASES["refused"][0](stores.app[store])
            for name, store in (("control_plane", CONTROL_PLANE), ("run_ops", RUN_OPS))}
    began = time.monotonic()
    with flavour(stores.app[CONTROL_PLANE], stores.app[RUN_OPS], timeout=10, **down) as reader:
        first = [reader.get_run(m.run_id) for m in made]
        assert [r.run_id for r in first] == [m.run_id for m in made]
        assert time.monotonic() - began < PROMPTLY  # not the 10 s timeout
        began = time.monotonic()
        for _ in range(20):
            for m in made:
                assert reader.get_run(m.run_id) is not None
        assert time.monotonic() - began < 1.0  # not 250 ms a read


def test_the_cli_reads_past_a_replica_that_is_down(stores: Stores, client: RunOps,
                                                   make_env: Callable[..., Env]) -> None:
    made = client.trigger_run(make_env("ksuid").environment_id, "t")
    settings = environment(stores, RUNOPS_RUN_OPS_REPLICA_URL=CASES["refused"][0](stores.app[RUN_OPS]))
    code, out, err, took = runops("runs", "show", made.run_id, env=settings)
    assert (code, err) == (0, "") and made.run_id in out and took < PROMPTLY


def test_nothing_is_connected_before_the_first_call(stores: Stores) -> None:
    """A client made against stores that are not there yet raises nothing, logs nothing."""
    refused = CASES["refused"][0]
    script = ("from runops import RunOps\n"
              f"c = RunOps({refused(stores.app[CONTROL_PLANE])!r}, {refused(stores.app[RUN_OPS])!r})\n"
              "import time; time.sleep(1.5); c.close()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")
