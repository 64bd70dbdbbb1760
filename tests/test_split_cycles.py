"""Split cycles under traffic (SPEC §2 split modes): enable → disable → enable and org-by-org
mint flips while triggers, dequeues and listings run. Afterwards no acknowledged run is lost or
duplicated, every run is readable by id, and the merged listing shows each exactly once."""

from __future__ import annotations

import random
import secrets
import threading
import time
from typing import Any

from runops.client import RunOps
from tests.conftest import Stores
from tests.test_seam_idempotency import key_holders


def all_listed(client: RunOps, env: str) -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        page = client.list_runs(env, 50, cursor)
        seen += [r.run_id for r in page.runs]
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor


def test_split_cycles_and_flips_under_traffic_lose_and_duplicate_nothing(client: RunOps, stores: Stores) -> None:
    envs: dict[str, str] = {}
    for i in range(2):
        org = client.create_organization(f"cycle-{i}-{secrets.token_hex(3)}", mint_kind="ksuid" if i else "cuid")
        envs[org] = client.create_environment(client.create_project(org, "p"), "e", "PRODUCTION")
    assert client.wait_for_mirror()
    stop = threading.Event()
    acked: dict[str, list[str]] = {env: [] for env in envs.values()}
    keyed: dict[tuple[str, str], set[str]] = {}
    completed: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def guarded(body: Any) -> Any:
        def run() -> None:
            try:
                body()
            except BaseException as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)
        return run

    def triggers(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            env = rng.choice(list(envs.values()))
            key = rng.choice([None, None, "a", "b", "c"])
            run = client.trigger_run(env, "t", {"n": seed}, **({"idempotency_key": key} if key else {}))
            with lock:
                if key:
                    keyed.setdefault((env, key), set()).add(run.run_id)
                if not run.is_cached:
                    acked[env].append(run.run_id)

    def worker() -> None:
        while not stop.is_set():
            for env in envs.values():
                for run in client.dequeue_runs(env, "cycle-worker", 5):
                    started = client.start_attempt(run.run_id, "cycle-worker")
                    client.complete_attempt(run.run_id, started.attempt_number, {"ok": True})
                    with lock:
                        completed.append(run.run_id)
            time.sleep(0.01)

    def lister() -> None:
        while not stop.is_set():
            for env in envs.values():
                listed = all_listed(client, env)
                assert len(listed) == len(set(listed)), "a run listed twice"
            time.sleep(0.05)

    threads = [threading.Thread(target=guarded(lambda s=s: triggers(s))) for s in range(4)]
    threads += [threading.Thread(target=guarded(worker)), threading.Thread(target=guarded(lister))]
    for t in threads:
        t.start()
    orgs = list(envs)
    try:
        steps: list[Any] = [client.disable_split, client.enable_split,
                            lambda: client.set_mint_kind(orgs[0], "ksuid"),
                            lambda: client.set_mint_kind(orgs[1], "cuid"),
                            client.disable_split, lambda: client.set_mint_kind(orgs[0], "cuid"),
                            client.enable_split, lambda: client.set_mint_kind(orgs[1], "ksuid")]
        for step in steps:
            time.sleep(0.3)
            step()
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
        client.enable_split()
        assert client.wait_for_mirror()
    assert not errors, errors
    for env, runs in acked.items():
        assert len(runs) == len(set(runs)), "an acknowledged run id came back twice as new"
        assert sorted(all_listed(client, env)) == sorted(runs), "the listing lost or invented a run"
        for run_id in runs:
            assert client.get_run(run_id) is not None, run_id
        residencies = {client.classify_residency(r) for r in runs}
        assert residencies == {"LEGACY", "NEW"}, residencies  # the flips really moved minting
    assert all(len(runs) == 1 for runs in keyed.values()), keyed
    for env in envs.values():
        assert len(key_holders(stores, env)) == len({k for (e, k) in keyed if e == env})
    assert completed, "the worker completed nothing"
