"""`runops demo`: the mission, step by step, on the local stores."""

from __future__ import annotations

import json
import secrets

import click
import psycopg

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.errors import SplitRefused
from runops.worker import Outcome

from . import migrate as migrations
from .local_cluster import LocalStores
from .output import table
from .reference_tasks import run_worker


def step(title: str) -> None:
    click.echo()
    click.secho(f"== {title}", bold=True, fg="cyan")


def run_demo(client: RunOps) -> None:
    suffix = secrets.token_hex(3)
    step("a tenant: two organizations, one minting cuids (LEGACY) and one minting KSUIDs (NEW)")
    if not client.split_status()["enabled"]:
        client.enable_split()
    legacy_org = client.create_organization(f"legacy-{suffix}", mint_kind="cuid")
    new_org = client.create_organization(f"new-{suffix}", mint_kind="ksuid")
    legacy_env = client.create_environment(client.create_project(legacy_org, "app"), "prod", "PRODUCTION")
    new_env = client.create_environment(client.create_project(new_org, "app"), "prod", "PRODUCTION")
    client.wait_for_mirror()
    table([(legacy_org, "cuid", legacy_env), (new_org, "ksuid", new_env)],
          ["organization", "mint kind", "environment"])

    step("the mint kind decides where a root run lives")
    a = client.trigger_run(legacy_env, "send-email", {"to": "a@example.com"})
    b = client.trigger_run(new_env, "send-email", {"to": "b@example.com"})
    table([(legacy_env, a.run_id, a.residency), (new_env, b.run_id, b.residency)],
          ["environment", "run", "residency"])

    step("a child inherits its parent's store, even after the organization flips back to cuid")
    client.set_mint_kind(new_org, "cuid")
    client.wait_for_mirror()
    child = client.trigger_run(new_env, "resize-image", {}, parent_run_id=b.run_id)
    root = client.trigger_run(new_env, "send-email", {})
    table([("child of " + b.run_id, child.run_id, child.residency),
           ("new root after the flip", root.run_id, root.residency)], ["run", "id", "residency"])
    client.set_mint_kind(new_org, "ksuid")
    client.wait_for_mirror()

    step("a keyed retrigger returns the cached run")
    first = client.trigger_run(new_env, "charge-card", {"cents": 500}, idempotency_key=f"order-{suffix}")
    again = client.trigger_run(new_env, "charge-card", {"cents": 500}, idempotency_key=f"order-{suffix}")
    table([("first", first.run_id, first.is_cached), ("retrigger", again.run_id, again.is_cached)],
          ["trigger", "run", "cached"])

    step("after the keyed run fails, the same key creates a new run")
    client.finalize_run(first.run_id, "CRASHED", error={"message": "out of memory"})
    retry = client.trigger_run(new_env, "charge-card", {"cents": 500}, idempotency_key=f"order-{suffix}")
    table([("failed run", first.run_id, "CRASHED"), ("retrigger", retry.run_id, retry.status)],
          ["trigger", "run", "status"])

    step("read-through: the control plane reads a NEW run through postgres_fdw")
    seen = client.get_run(b.run_id, through=CONTROL_PLANE)
    direct = client.get_run(b.run_id)
    table([("run-ops (owner, direct)", direct.status if direct else "-"),
           ("control plane (through the FDW)", seen.status if seen else "-")], ["asked", "status"])

    step("a parent triggers a child and waits; the worker resumes it with the child's output")
    work_env = client.create_environment(client.create_project(new_org, "jobs"), "prod", "PRODUCTION")
    parent = client.trigger_run(work_env, "wait-for-child", {"task": "echo", "payload": {"greeting": "hello"}})
    outcomes: list[Outcome] = []
    with client.listen(work_env, RUN_OPS) as listener:
        run_worker(client, work_env, "demo-worker", once=True, on_outcome=outcomes.append)
        moves = [json.loads(n.payload) for n in listener.notifies(timeout=0.5)]
    table([(o.run_id, o.task, o.attempt, o.result) for o in outcomes], ["run", "task", "attempt", "worker result"])
    table([(m["run_id"], m["old_status"], m["new_status"]) for m in moves if m["run_id"] == parent.run_id],
          ["parent", "from", "to"], title="the parent's status changes, as notified")
    finished = client.get_run(parent.run_id)
    click.echo(f"parent output: {json.dumps(finished.output if finished else None)}")

    step("a parent fans out a batch, waits for it, and resumes with every item's outcome")
    fan = client.trigger_run(work_env, "fan-out", {"items": [{"task": "echo", "payload": {"n": i}} for i in range(3)]
                                                  + [{"task": "fail", "payload": {"message": "bad"},
                                                      "options": {"max_attempts": 1}}]})
    outcomes = []
    run_worker(client, work_env, "demo-worker", once=True, on_outcome=outcomes.append)
    done = client.get_run(fan.run_id)
    items = (done.output or {}).get("items", []) if done else []
    table([(o.run_id, o.task, o.result) for o in outcomes], ["run", "task", "worker result"])
    table([(i["index"], i["run_id"], i["status"]) for i in items], ["index", "item run", "status"],
          title=f"the parent {fan.run_id} is {done.status if done else '?'}; the batch's output")

    step("the sentinel refuses a split onto the control plane's own database")
    try:
        stores = LocalStores.from_cwd()
    except Exception:  # not on the local stores: nothing to demonstrate safely
        click.echo("(skipped: needs the local stores of `runops dev up`)")
        return
    refused = sentinel_refusal(stores)
    click.echo(f"enable_split() on a store wired to itself -> {refused}")


def sentinel_refusal(stores: LocalStores) -> str:
    """Installs a throwaway control plane whose FDW points at itself, and tries to enable the split."""
    cluster = stores.clusters[CONTROL_PLANE]
    cluster.create_database("runops_sentinel_demo")
    url = cluster.admin_url("runops_sentinel_demo")
    migrations.upgrade(CONTROL_PLANE, url)
    with psycopg.connect(url, autocommit=True) as conn:
        migrations.wire_to_self(conn, url)
    try:
        with RunOps(url) as single:
            single.enable_split()
    except SplitRefused as err:
        return f"RO007 {err.message}"
    finally:
        with psycopg.connect(cluster.admin_url("postgres"), autocommit=True) as conn:
            conn.execute("DROP DATABASE runops_sentinel_demo WITH (FORCE)")
    return "not refused (unexpected)"
