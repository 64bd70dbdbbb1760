"""The `runops` command. Human output by default, --json for scripts.

Exit codes: 0 ok; 1 an unexpected failure; 2 bad usage; 3 a store is behind its migrations
(`migrate --check`); 4 a benchmark missed a target; 5 `migrate` found a precondition missing
(nothing changed); 10 + n for an RO00n error (11 unclassifiable id, 12 wrong store,
13 illegal transition, 14 not found, 15 environment unusable, 16 invalid input,
17 split refused, 18 retryable conflict, 19 store unavailable). `doctor` exits by its worst
check instead: 0 all ok, 1 a warning, 2 a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import click
import psycopg

from runops import ids
from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.dev_stores import default_home
from runops.errors import NotFound, RunOpsError, StoreUnavailable, is_connection_failure
from runops.models import FINAL_STATUSES, BulkAction, Run

from . import migrate as migrations
from .local_cluster import ClusterError, LocalStores, find_bindir
from .output import emit_json, fields, plain, table
from .schema import ALEMBIC_INI, DOCS, ROOT

F = TypeVar("F", bound=Callable[..., Any])


def exit_code(err: RunOpsError) -> int:
    if isinstance(err, migrations.PreconditionFailed):
        return 5
    if err.sqlstate and err.sqlstate.startswith("RO"):
        return 10 + int(err.sqlstate[2:])
    return 1


def report_error(message: str, code: int, sqlstate: str | None = None, *, as_json: bool | None = None) -> NoReturn:
    """The one way the CLI fails: one line on stderr — `error: ...`, or with --json a JSON object
    {"error": {"message", "sqlstate", "exit_code"}} — and the exit code."""
    if as_json is None:
        ctx = click.get_current_context(silent=True)
        found = ctx.find_object(Ctx) if ctx is not None else None
        as_json = bool(found and found.as_json)
    if as_json:
        click.echo(json.dumps({"error": {"message": message, "sqlstate": sqlstate, "exit_code": code}}), err=True)
    else:
        click.echo(f"error: {sqlstate + ' ' if sqlstate else ''}{message}", err=True)
    sys.exit(code)


def reports_errors(fn: F) -> F:
    """One readable line on stderr and a meaningful exit code instead of a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RunOpsError as err:
            report_error(err.message, exit_code(err), err.sqlstate)
        except psycopg.Error as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            # A store that cannot be reached is "unavailable" (19, as RO009), whichever command
            # met it, never a generic failure: scripts retry on 19.
            report_error(first, 19 if is_connection_failure(err) else 1)

    return cast(F, wrapper)


class RunOpsGroup(click.Group):
    """Usage errors (bad options, bad arguments, a bad batch line) as one line too, or as JSON
    with --json, instead of click's usage block."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            result = super().main(argv, prog_name, complete_var, standalone_mode=False,
                                  windows_expand_args=windows_expand_args, **extra)
        except click.ClickException as err:
            ctx = getattr(err, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if isinstance(err, click.UsageError) and ctx else ""
            report_error(err.format_message() + hint, err.exit_code, as_json="--json" in argv)
        except click.Abort:
            report_error("aborted", 1, as_json="--json" in argv)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)


class Ctx:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self._client: RunOps | None = None

    def client(self) -> RunOps:
        """The command's client (:func:`connect`), made once."""
        if self._client is None:
            self._client = connect()
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


pass_ctx = click.make_pass_decorator(Ctx)


def connect(**kwargs: Any) -> RunOps:
    """The stores RUNOPS_CONTROL_PLANE_URL / RUNOPS_RUN_OPS_URL name; when neither is set, the
    local stores of `runops dev up` found from the current directory up (SPEC §7), as `migrate`
    and `doctor` fall back to them."""
    configured = os.environ.get("RUNOPS_CONTROL_PLANE_URL") or os.environ.get("RUNOPS_RUN_OPS_URL")
    return RunOps.connect(**kwargs) if configured else RunOps.local(**kwargs)


@click.group(cls=RunOpsGroup)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (errors too, as JSON on stderr).")
@click.version_option(package_name="runops", prog_name="runops")
@click.pass_context
def main(ctx: click.Context, as_json: bool) -> None:
    """runops: run operations across a control-plane and a run-ops PostgreSQL store."""
    ctx.obj = Ctx(as_json)
    ctx.call_on_close(ctx.obj.close)


# -- dev ------------------------------------------------------------------------------------

@main.group()
def dev() -> None:
    """Embedded local stores under .runops/ (two PostgreSQL clusters on loopback)."""


@dev.command("up")
@click.option("--shards", type=click.IntRange(1, 16), default=None,
              help="Run-ops shards (clusters) behind a PL/Proxy router database (docs/scale-out.md); default 1, "
                   "or what these stores were made with.")
@pass_ctx
@reports_errors
def dev_up(ctx: Ctx, shards: int | None) -> None:
    """Initialise (once), start, migrate and wire both local stores, and enable the split."""
    home = default_home()
    try:
        stores = LocalStores.from_cwd(home)
    except ClusterError:
        stores, note = LocalStores.create(home, shards=shards or 1)
        stores.save()
        if note:
            click.echo(f"note: {note}", err=True)
    else:
        if shards is not None and shards != stores.shards:
            raise click.UsageError(f"these local stores have {stores.shards} run-ops shard(s); to change that, "
                                   f"`runops dev down`, remove {home}, then `runops dev up --shards {shards}`")
        if os.environ.get("RUNOPS_PG_BINDIR") and str(find_bindir()) != stores.bindir:
            # A cluster's data belongs to the major version that made it: the stores keep theirs.
            click.echo(f"note: these stores run on {stores.bindir}, chosen when they were made; RUNOPS_PG_BINDIR "
                       f"applies to new stores (`runops dev down`, remove {home}, `runops dev up`)", err=True)
    with click.progressbar(length=4, label="starting the local stores", file=sys.stderr) as bar:
        stores.start()
        bar.update(1)
        admin = stores.admin_urls()
        report = migrations.migrate_shards(admin[CONTROL_PLANE], stores.shard_admin_urls(),
                                           router_url=stores.router_url(admin=True))
        bar.update(1)
        for url in admin.values():
            migrations.set_app_password(url, stores.app_password)
        bar.update(1)
        urls = stores.app_urls()
        with RunOps(urls[CONTROL_PLANE], urls[RUN_OPS]) as client:
            status = client.enable_split()
            client.wait_for_mirror()
            _wait_for_mirror_worker(admin[RUN_OPS])
            # Time-driven work runs here as in a deployment (docs/decisions.md): a first pass
            # now, so the stores are fresh before this command returns, then the background loop.
            client.tick()
        ticker = stores.start_ticker()
        bar.update(1)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    if ctx.as_json:
        emit_json({"urls": urls, "admin_urls": admin, "router_url": stores.router_url(admin=False),
                   "mirror": report.mirror, "split": status,
                   "ticker_pid": ticker, "home": str(home), "bindir": stores.bindir})
        return
    rows = [(CONTROL_PLANE, stores.clusters[CONTROL_PLANE].port, urls[CONTROL_PLANE]),
            (RUN_OPS, stores.clusters[RUN_OPS].port, urls[RUN_OPS])]
    rows += [(f"{RUN_OPS} shard {k}", stores.clusters[f"RUN_OPS_{k}"].port, urls[f"RUN_OPS_{k}"])
             for k in range(1, stores.shards)]
    if (router := stores.router_url(admin=False)) is not None:
        rows.append(("router", stores.clusters[CONTROL_PLANE].port, router))
    table(rows, ["store", "port", "url"], title="local stores are up")
    found_from = "RUNOPS_HOME" if os.environ.get("RUNOPS_HOME") else f"any folder below {home.parent}"
    click.echo(f"state: {home} (found from {found_from}); server binaries: {stores.bindir}")
    click.echo(f"split enabled: {status['enabled']} ({status['reason']}); tenant mirror: {report.mirror}")
    click.echo(f"tick: `runops tick --loop` runs in the background (pid {ticker}, log {stores.ticker_log}); "
               "`runops dev down` stops it")


def _wait_for_mirror_worker(run_ops_url: str, timeout: float = 15.0) -> None:
    """After a restart the subscription's apply worker starts some seconds after the server:
    wait for it (bounded), so `dev up` returns a pair `doctor` finds fully up."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(run_ops_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT runops.mirror_status() ->> 'state'").fetchone()
            if row is None or row[0] != "not_running":
                return
            time.sleep(0.2)


@dev.command("down")
@pass_ctx
@reports_errors
def dev_down(ctx: Ctx) -> None:
    """Stop both local stores and their background tick (their data stays)."""
    stores = LocalStores.from_cwd()
    stores.stop()
    if ctx.as_json:
        emit_json({"stopped": True})
    else:
        click.echo("local stores stopped; `runops dev up` starts them again with their data")


@dev.command("status")
@pass_ctx
@reports_errors
def dev_status(ctx: Ctx) -> None:
    """Whether the local stores run, where, and the split's state."""
    stores = LocalStores.from_cwd()
    running = stores.running()
    urls = stores.app_urls()
    ticking = stores.ticker_running()
    if ctx.as_json:
        emit_json({"running": running, "urls": urls, "data_root": stores.data_root,
                   "ticker_pid": stores.ticker_pid if ticking else None})
    else:
        table([(s, "running" if running[s] else "stopped", c.port, c.datadir) for s, c in stores.clusters.items()],
              ["store", "state", "port", "data"])
        click.echo(f"tick: {f'running (pid {stores.ticker_pid})' if ticking else 'not running'}")
    if not all(running.values()):
        sys.exit(1)


# -- migrate --------------------------------------------------------------------------------

@main.command()
@click.option("--control-plane-url", help="Admin (superuser) URL of the control plane; default "
              "RUNOPS_CONTROL_PLANE_ADMIN_URL, then RUNOPS_CONTROL_PLANE_URL, then the local dev store.")
@click.option("--run-ops-url", "run_ops_urls", multiple=True,
              help="Admin URL of the run-ops store, once per shard in shard order (docs/scale-out.md); default "
              "RUNOPS_RUN_OPS_ADMIN_URL, then RUNOPS_RUN_OPS_URL (comma-separated for shards), then the local dev "
              "store (only when no URL at all is set).")
@click.option("--router-url", help="Admin URL of the PL/Proxy router database to (re)write for the shards; default "
              "RUNOPS_ROUTER_ADMIN_URL, then RUNOPS_ROUTER_URL; none: no router.")
@click.option("--peer-host", "peer_hosts", multiple=True, metavar="STORE=HOST[:PORT]",
              help="How the other store's server reaches STORE (control_plane or run_ops), when that differs "
                   "from the URL's host: used by the FDW and the mirror's subscription. Repeatable.")
@click.option("--check", is_flag=True, help="Only report; exit 3 when a store is behind (its revision, or its "
              "functions' checksum).")
@click.option("--print-alembic-ini", is_flag=True,
              help="Print the path of the alembic.ini for plain `alembic -c` and exit.")
@pass_ctx
@reports_errors
def migrate(ctx: Ctx, control_plane_url: str | None, run_ops_urls: tuple[str, ...], router_url: str | None,
            peer_hosts: tuple[str, ...], check: bool, print_alembic_ini: bool) -> None:
    """Check the preconditions (exit 5, nothing changed, when one is missing), upgrade both stores
    to head, then (re)wire the FDW both ways and the tenant mirror."""
    if print_alembic_ini:
        click.echo(str(ALEMBIC_INI))
        return
    found = migrations.resolve_targets(control_plane_url, ",".join(run_ops_urls) or None)
    peers = migrations.parse_peer_hosts(peer_hosts)
    router_url = router_url or os.environ.get("RUNOPS_ROUTER_ADMIN_URL") or os.environ.get("RUNOPS_ROUTER_URL")
    if router_url is None and found[CONTROL_PLANE].source.startswith("the local dev stores"):
        router_url = LocalStores.from_cwd().router_url(admin=True)
    cp = found[CONTROL_PLANE].url
    shards = migrations.split_urls(found[RUN_OPS].url) if RUN_OPS in found else []
    click.echo(f"using {found[CONTROL_PLANE].describe()}", err=True)
    for number, url in enumerate(shards):
        shard = f" (shard {number})" if len(shards) > 1 else ""
        click.echo(f"using {migrations.Target(RUN_OPS, url, found[RUN_OPS].source).describe()}{shard}", err=True)
    ro = shards[0] if shards else None
    targets = [(CONTROL_PLANE, cp)] + [(RUN_OPS, url) for url in shards if url != cp]
    if check:
        rows = []
        for store, url in targets:
            current, head = migrations.current_revision(store, url), migrations.head_revision(store, url)
            state = ("behind" if current != head
                     else "current" if migrations.functions_current(store, url) else "functions behind")
            rows.append((store, current, head, state))
        if ctx.as_json:
            emit_json([{"store": s, "current": c, "head": h, "state": state} for s, c, h, state in rows])
        else:
            table([(s, c or "(none)", h, state) for s, c, h, state in rows], ["store", "current", "head", "state"])
        if any(state != "current" for *_, state in rows):
            sys.exit(3)
        return
    if len(shards) > 1 or router_url:
        report = migrations.migrate_shards(cp, shards, peers, router_url)
    else:
        report = migrations.migrate(cp, ro, peers)
    if ctx.as_json:
        emit_json(report)
        return
    click.echo(f"upgraded: {', '.join(report.upgraded)}; wired: {'yes' if report.wired else 'no'}; "
               f"tenant mirror: {report.mirror}")
    for note in report.notes:
        click.echo(f"note: {note}")


# -- doctor ---------------------------------------------------------------------------------

@main.command()
@click.option("--control-plane-url", help="URL of the control plane (an admin URL sees everything); default as "
              "for migrate: RUNOPS_CONTROL_PLANE_ADMIN_URL, then RUNOPS_CONTROL_PLANE_URL, then the local dev store.")
@click.option("--run-ops-url", help="URL of the run-ops store (comma-separated: every shard, shard 0 first); "
              "default RUNOPS_RUN_OPS_ADMIN_URL, then "
              "RUNOPS_RUN_OPS_URL, then the local dev store (only when no URL at all is set).")
@click.option("--deep", is_flag=True, help="Also check the invariants the functions keep instead of foreign keys "
              "(every run's batch exists, every batch item names a batch and a run, ...): reads whole tables.")
@pass_ctx
def doctor(ctx: Ctx, control_plane_url: str | None, run_ops_url: str | None, deep: bool) -> None:
    """Check both stores and say what to fix: identities and versions, the topology the sentinel
    sees, migrations, function drift against sql/functions, the FDW both ways, the tenant mirror
    and its replication slot, tick freshness, and stuck work (docs/operations.md, "doctor");
    with --deep also the invariants the functions keep instead of foreign keys. Changes nothing.

    One line per check: `ok|warn|fail  CHECK  DETAIL` (--json: the checks with their figures).
    Exit code by the worst check: 0 all ok, 1 a warning, 2 a failure (a store that does not
    answer is a failure naming it).
    """
    from . import doctor as doctoring

    try:
        targets = migrations.resolve_targets(control_plane_url, run_ops_url)
    except RunOpsError as err:
        # Nothing to examine is itself the finding, reported like any other check.
        report = doctoring.Report([], [doctoring.Check("targets", "fail", err.message)])
    else:
        if not ctx.as_json:
            for target, shard in doctoring.store_targets(targets).values():
                click.echo(f"examining {target.describe()}" + ("" if shard is None else f" (shard {shard})"))
        report = doctoring.examine(targets, deep=deep)
    if ctx.as_json:
        emit_json(report.as_json())
    else:
        width = max(len(c.name) for c in report.checks)
        for check in report.checks:
            colour = {"ok": "green", "warn": "yellow", "fail": "red"}[check.severity]
            click.echo(click.style(f"{check.severity:<4}", fg=colour) + f"  {check.name.ljust(width)}  {check.detail}")
    sys.exit(report.exit_code)


# -- split ----------------------------------------------------------------------------------

@main.group()
def split() -> None:
    """Inspect and switch the run-ops split (control plane)."""


def _show_split(ctx: Ctx, status: dict[str, Any]) -> None:
    if ctx.as_json:
        emit_json(status)
        return
    fields({"enabled": status["enabled"], "distinct": status["distinct"], "reason": status["reason"],
            "default mint kind": status["default_mint_kind"],
            "organization overrides": status["org_mint_kinds"] or "-",
            "control plane": _ident(status.get("control_plane")), "run-ops": _ident(status.get("run_ops"))})


def _ident(i: dict[str, Any] | None) -> str:
    return "-" if not i else f"{i['database_name']} (system {i['system_identifier']}, oid {i['database_oid']})"


@split.command("status")
@pass_ctx
@reports_errors
def split_status(ctx: Ctx) -> None:
    """Whether the split is enabled, the two stores' identities and the mint kinds."""
    _show_split(ctx, ctx.client().split_status())


@split.command("enable")
@pass_ctx
@reports_errors
def split_enable(ctx: Ctx) -> None:
    """Enable the split; refused (exit 17) unless the run-ops store is a distinct database.
    Returns once the run-ops mirror has the change (exit 19 if it has not within 10 s)."""
    client = ctx.client()
    status = client.enable_split()
    _require_mirrored(client)
    _show_split(ctx, status)


@split.command("disable")
@pass_ctx
@reports_errors
def split_disable(ctx: Ctx) -> None:
    """Disable the split: new root runs mint cuids on the control plane again. Returns once the
    run-ops mirror has the change (exit 19 if it has not within 10 s)."""
    client = ctx.client()
    status = client.disable_split()
    _require_mirrored(client)
    _show_split(ctx, status)


def _require_mirrored(client: RunOps) -> None:
    """Operator changes to the split settings are made on the control plane; the run-ops store
    acts on its mirror of them. A script that changes them and then triggers must see the change
    everywhere, so the command returns only once the mirror has it — or says it has not."""
    if not client.wait_for_mirror():
        report_error("the change is made on the control plane, but the run-ops store's mirror has not "
                     "applied it within 10 s; root runs there may still follow the old settings "
                     "(run `runops doctor`)", 19)


MINT_KINDS = ("cuid", "ksuid", "default")


@main.command("mint-kind")
@click.argument("args", nargs=-1, required=True, metavar="[ORGANIZATION_ID] KIND")
@pass_ctx
@reports_errors
def mint_kind(ctx: Ctx, args: tuple[str, ...]) -> None:
    """Set ORGANIZATION_ID's mint kind (cuid, ksuid, or default: follow the default), or with no
    organization the default mint kind (cuid or ksuid)."""
    if len(args) > 2:
        raise click.UsageError("expected [ORGANIZATION_ID] KIND")
    organization_id, kind = (None, args[0]) if len(args) == 1 else args
    if kind not in MINT_KINDS:
        raise click.BadParameter(f"{kind!r} is not one of {', '.join(MINT_KINDS)}", param_hint="KIND")
    client = ctx.client()
    if organization_id:
        client.set_mint_kind(organization_id, kind)
    else:
        if kind == "default":
            raise click.UsageError("the default mint kind must be cuid or ksuid")
        client.set_default_mint_kind(kind)
    _require_mirrored(client)
    _show_split(ctx, client.split_status())


# -- tenants --------------------------------------------------------------------------------

@main.group("env")
def env_group() -> None:
    """Runtime environments (control plane)."""


@env_group.command("create")
@click.argument("organization")
@click.argument("project")
@click.argument("env_slug")
@click.option("--type", "env_type", default="DEVELOPMENT",
              type=click.Choice(["DEVELOPMENT", "STAGING", "PREVIEW", "PRODUCTION"]), help="The environment's type.")
@click.option("--mint-kind", type=click.Choice(["cuid", "ksuid"]),
              help="A new organization's mint kind (an existing one's: `runops mint-kind`).")
@pass_ctx
@reports_errors
def env_create(ctx: Ctx, organization: str, project: str, env_slug: str, env_type: str,
               mint_kind: str | None) -> None:
    """Create environment ENV_SLUG in PROJECT of ORGANIZATION. ORGANIZATION and PROJECT are an
    existing one's id or slug, or the slug of one to create: `env create acme web prod` makes all
    three, then `env create acme web staging` adds an environment to them."""
    client = ctx.client()
    found = _existing_tenant(client, organization, project)
    org_id, project_id = found["organization_id"], found["project_id"]
    if mint_kind and org_id is not None and found.get("mint_kind") != mint_kind:
        raise click.BadParameter(f"sets a new organization's kind, and {organization} exists (mint kind "
                                 f"{found.get('mint_kind') or 'unknown'}): change it with "
                                 f"`runops mint-kind {org_id} {mint_kind}`", param_hint="--mint-kind")
    created: list[str] = []
    try:
        if org_id is None:
            org_id = client.create_organization(organization, mint_kind=mint_kind)
            created.append(f"organization {org_id}")
        if project_id is None:
            project_id = client.create_project(org_id, project)
            created.append(f"project {project_id}")
        env = client.create_environment(project_id, env_slug, env_type)
    except RunOpsError as err:
        if created:  # say what exists now, so the next attempt can name it
            err.message += f" (created meanwhile: {', '.join(created)})"
        raise
    result = {"organization_id": org_id, "project_id": project_id, "environment_id": env,
              "created": [c.split()[0] for c in created] + ["environment"]}
    if ctx.as_json:
        emit_json(result)
    else:
        fields({**result, "created": ", ".join(result["created"])})


def _looks_like_id(name: str) -> bool:
    """Tenant ids are bare cuids; slugs are lower-case letters, digits and dashes, so only a
    25-character slug starting with c can look like one."""
    return re.fullmatch(r"c[0-9a-z]{24}", name) is not None


def _existing_tenant(client: RunOps, organization: str, project: str) -> dict[str, str | None]:
    """The organization and project `env create` names, when they exist: by id, else by slug,
    among those with an environment (list_environments is how the app role sees tenants). An
    id-shaped name that is not listed is taken as an id (an organization or project with no
    environment yet; create_project / create_environment say RO004 if there is none)."""
    envs = client.list_environments()
    org = next((e for e in envs if e.organization_id == organization), None) \
        or next((e for e in envs if e.organization_slug == organization), None)
    if org is None:
        org_id = organization if _looks_like_id(organization) else None
        return {"organization_id": org_id, "project_id": project if org_id and _looks_like_id(project) else None}
    mine = [e for e in envs if e.organization_id == org.organization_id]
    proj = next((e for e in mine if e.project_id == project), None) \
        or next((e for e in mine if e.project_slug == project), None)
    if proj is None and _looks_like_id(project):
        elsewhere = next((e for e in envs if e.project_id == project), None)
        if elsewhere is not None:
            raise click.BadParameter(f"project {project} belongs to organization {elsewhere.organization_slug} "
                                     f"({elsewhere.organization_id}), not {organization}", param_hint="PROJECT")
        return {"organization_id": org.organization_id, "project_id": project, "mint_kind": org.mint_kind}
    return {"organization_id": org.organization_id, "project_id": proj.project_id if proj else None,
            "mint_kind": org.mint_kind}


@env_group.command("list")
@click.option("--org", "organization_id", help="Only this organization's environments (its id).")
@pass_ctx
@reports_errors
def env_list(ctx: Ctx, organization_id: str | None) -> None:
    """List environments with their project, organization and the mint kind their roots follow."""
    envs = ctx.client().list_environments(organization_id)
    if ctx.as_json:
        emit_json(envs)
        return
    table([(e.environment_id, f"{e.organization_slug}/{e.project_slug}/{e.environment_slug}", e.type, e.mint_kind,
            "paused" if e.paused else ("archived" if e.archived else "")) for e in envs],
          ["environment", "org/project/env", "type", "mint kind", "state"])


# -- runs -----------------------------------------------------------------------------------

def _json_arg(value: str | None, what: str) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{what} is not valid JSON: {exc}") from exc


@main.command()
@click.argument("environment_id")
@click.argument("task")
@click.option("--payload", help="JSON payload.")
@click.option("--key", "idempotency_key", help="Idempotency key.")
@click.option("--scope", "idempotency_key_scope", type=click.Choice(["run", "attempt", "global"]),
              help="Idempotency key scope (default run).")
@click.option("--key-ttl", "idempotency_key_ttl", help="Idempotency key TTL, e.g. 1h.")
@click.option("--parent", "parent_run_id", help="Parent run id.")
@click.option("--delay", help="Delay (10m) or timestamp with offset.")
@click.option("--ttl", help="Expire if not started within this duration.")
@click.option("--tag", "tags", multiple=True, help="A tag for the run (repeatable).")
@click.option("--options", "raw_options", help="Any other trigger options, as a JSON object.")
@pass_ctx
@reports_errors
def trigger(ctx: Ctx, /, environment_id: str, task: str, payload: str | None, raw_options: str | None,
            tags: tuple[str, ...], **options: Any) -> None:
    """Trigger TASK in ENVIRONMENT_ID."""
    opts = dict(_json_arg(raw_options, "--options") or {})
    opts.update({k: v for k, v in options.items() if v is not None})
    if tags:
        opts["tags"] = list(tags)
    result = ctx.client().trigger_run(environment_id, task, _json_arg(payload, "--payload"), **opts)
    if ctx.as_json:
        emit_json(result)
    else:
        table([(result.run_id, result.status, result.residency, result.is_cached)],
              ["run", "status", "residency", "cached"])


@main.group()
def runs() -> None:
    """Inspect runs."""


def _require_store_of(client: RunOps, run_id: str) -> str:
    """The store that owns ``run_id``: RO001 for an id of neither shape; RO009 — never "not found"
    — when that store is not configured here."""
    store = ids.store_for(ids.classify_residency(run_id))
    if store == RUN_OPS and not client.split_wired:
        raise StoreUnavailable(f"run {run_id} belongs to the run-ops store, which is not configured here: "
                               "set RUNOPS_RUN_OPS_URL")
    return store


def _require_run(client: RunOps, run_id: str, environment_id: str | None = None) -> Run:
    """The run, or the error `runs cancel` gives for the same id (RO001, RO009, RO004)."""
    _require_store_of(client, run_id)
    run = client.get_run(run_id, environment_id)
    if run is None:
        raise NotFound(f"run {run_id} not found")
    return run


def _require_environment(client: RunOps, environment_id: str) -> None:
    """NotFound (RO004, exit 14) for an environment that does not exist. Listing and metrics are
    reads, and reads never refuse (SPEC §3): for an unknown environment they answer nothing, as
    for an empty one. So when they answered nothing, the command asks where a trigger in that
    environment would go: ``trigger_route`` loads it as a trigger does (on the control plane, or
    the run-ops store's mirror when the control plane is down) and is RO004 for an unknown one.
    One more call, and only then (docs/decisions.md)."""
    client.trigger_route(environment_id)


def run_filter_options(command: F) -> F:
    """list_runs' filters as options: `runs ls`, and the bulk forms of `runs cancel` (one set,
    so a listing and the action it previews select the same runs)."""
    for option in reversed([
        click.option("--status", "statuses", multiple=True, help="Only runs in this status (repeatable: any of)."),
        click.option("--task", "task_identifiers", multiple=True,
                     help="Only runs of this task (repeatable: any of)."),
        click.option("--tag", "tags", multiple=True, help="Only runs carrying this tag (repeatable: all of)."),
        click.option("--created-after", help="Only runs created after this timestamp (with an offset)."),
        click.option("--created-before", help="Only runs created before this timestamp (with an offset)."),
        click.option("--batch", "batch_id", help="Only runs this batch created."),
    ]):
        command = option(command)
    return command


def _run_filters(statuses: tuple[str, ...], task_identifiers: tuple[str, ...], tags: tuple[str, ...],
                 created_after: str | None, created_before: str | None, batch_id: str | None) -> dict[str, Any]:
    """The list_runs filter object the options of run_filter_options name."""
    many = {"statuses": statuses, "task_identifiers": task_identifiers, "tags": tags}
    filters: dict[str, Any] = {k: list(v) for k, v in many.items() if v}
    filters.update({k: v for k, v in {"created_after": created_after, "created_before": created_before,
                                      "batch_id": batch_id}.items() if v})
    return filters


@runs.command("ls")
@click.option("--env", "environment_id", required=True, help="The environment whose runs to list.")
@click.option("--limit", "page_size", type=click.IntRange(1, 200), default=25, show_default=True,
              help="Runs per page.")
@click.option("--cursor", help="Resume after the run this cursor names (printed after each page).")
@run_filter_options
@pass_ctx
@reports_errors
def runs_ls(ctx: Ctx, environment_id: str, page_size: int, cursor: str | None, statuses: tuple[str, ...],
            task_identifiers: tuple[str, ...], tags: tuple[str, ...], created_after: str | None,
            created_before: str | None, batch_id: str | None) -> None:
    """List an environment's runs across both stores, newest first, one page at a time."""
    filters = _run_filters(statuses, task_identifiers, tags, created_after, created_before, batch_id)
    client = ctx.client()
    page = client.list_runs(environment_id, page_size, cursor, **filters)
    if not page.runs:
        _require_environment(client, environment_id)
    if ctx.as_json:
        emit_json({"runs": page.runs, "next_cursor": page.next_cursor})
        return
    table([(r.run_id, r.task_identifier, r.status, r.residency, r.created_at) for r in page.runs],
          ["run", "task", "status", "residency", "created"])
    if page.next_cursor:
        click.echo(f"next page: runops runs ls --env {environment_id} --cursor {page.next_cursor}")


@runs.command("show")
@click.argument("run_id")
@click.option("--env", "environment_id", help="Only if the run belongs to this environment.")
@pass_ctx
@reports_errors
def runs_show(ctx: Ctx, run_id: str, environment_id: str | None) -> None:
    """Show a run (exit 14 if there is none, 11 for an id of neither shape)."""
    run = _require_run(ctx.client(), run_id, environment_id)
    if ctx.as_json:
        emit_json(run)
    else:
        fields({k: v for k, v in vars(run).items() if k != "id"})


def bulk_options(command: F) -> F:
    """The bulk form of a `runs` command: the environment, list_runs' filters (--status, --task,
    --tag, --created-after, --created-before, --batch, or --filter with the JSON object), the
    action's idempotency key, its chunk size, and --no-wait."""
    for option in reversed([
        click.option("--env", "environment_id", help="Bulk form: the environment whose matching runs to act on."),
        click.option("--filter", "raw_filter", metavar="JSON",
                     help="Bulk form: list_runs' filter object (merged with the filter options)."),
        click.option("--key", "idempotency_key", help="Bulk form: the action's idempotency key (a retry answers "
                                                      "the first action)."),
        click.option("--chunk-size", type=int, help="Bulk form: runs per chunk (default 5000)."),
        click.option("--no-wait", is_flag=True, help="Bulk form: print the action and return at once."),
    ]):
        command = option(command)
    return run_filter_options(command)


def _refuse_bulk_options(environment_id: str | None, raw_filter: str | None, idempotency_key: str | None,
                         chunk_size: int | None, no_wait: bool, **filters: Any) -> None:
    if environment_id or raw_filter or idempotency_key or chunk_size or no_wait or any(filters.values()):
        raise click.UsageError("give RUN_ID, or --env with filters for a bulk action, not both")


def _show_bulk_action(ctx: Ctx, action: BulkAction) -> None:
    if ctx.as_json:
        emit_json(action)
    else:
        fields(vars(action))


def _bulk(ctx: Ctx, kind: str, environment_id: str | None, *, raw_filter: str | None,
          idempotency_key: str | None, chunk_size: int | None, no_wait: bool, reason: str | None = None,
          **options: Any) -> None:
    """Creates a bulk action, then — unless --no-wait — drives it (advance_bulk_actions, beside
    any worker or tick doing the same) with a progress bar until it is over."""
    if not environment_id:
        raise click.UsageError("give RUN_ID, or --env (and filters) for a bulk action")
    filters = dict(_json_arg(raw_filter, "--filter") or {}) if raw_filter else {}
    filters.update(_run_filters(**options))
    client = ctx.client()
    created = client.create_bulk_action(environment_id, kind, filters, idempotency_key=idempotency_key,
                                        reason=reason, chunk_size=chunk_size)
    action = client.get_bulk_action(created.bulk_action_id)
    if action is None:
        raise NotFound(f"bulk action {created.bulk_action_id} not found")
    if not no_wait and not action.is_over:
        with click.progressbar(length=action.matched_count, label=f"{kind.lower()} {action.bulk_action_id}",
                               file=sys.stderr, show_pos=True) as bar:
            shown = 0
            while True:
                client.advance_bulk_actions()
                current = client.get_bulk_action(created.bulk_action_id)
                if current is None:
                    raise NotFound(f"bulk action {created.bulk_action_id} not found")
                action = current
                bar.update(action.processed_count - shown)
                shown = action.processed_count
                if action.is_over:
                    break
                time.sleep(0.2)
    if ctx.as_json:
        emit_json({**plain(action), "is_cached": created.is_cached})
    else:
        fields({**vars(action), "is_cached": created.is_cached})


@runs.command("cancel")
@click.argument("run_id", required=False)
@click.option("--reason", help="Recorded in the run's error.")
@bulk_options
@pass_ctx
@reports_errors
def runs_cancel(ctx: Ctx, /, run_id: str | None, reason: str | None, environment_id: str | None, **bulk: Any) -> None:
    """Cancel a run and its live children (a final run is left as it is); or, with --env and
    filters instead of RUN_ID, every matching run of both stores created until now (a bulk
    action: a progress bar until it completes, unless --no-wait)."""
    client = ctx.client()
    if run_id is None:
        _bulk(ctx, "CANCEL", environment_id, reason=reason, **bulk)
        return
    _refuse_bulk_options(environment_id, **bulk)
    _require_store_of(client, run_id)
    run = client.cancel_run(run_id, reason)
    if ctx.as_json:
        emit_json(run)
    else:
        table([(run.run_id, run.status, (run.error or {}).get("message") if isinstance(run.error, dict) else None)],
              ["run", "status", "reason"])


@runs.command("replay")
@click.argument("run_id", required=False)
@click.option("--payload", help="JSON payload (default: the original's).")
@click.option("--key", "idempotency_key", help="Idempotency key of the replay (the original's is never copied).")
@click.option("--queue", help="Queue (default: the original's).")
@click.option("--max-attempts", type=int, help="Max attempts (default: the original's).")
@click.option("--metadata", help="JSON object replacing the original's metadata.")
@click.option("--delay", help="Delay (10m) or timestamp with offset.")
@click.option("--tag", "tags", multiple=True, help="A tag replacing the original's tags (repeatable).")
@click.option("--env", "environment_id", help="Only if the run belongs to this environment; bulk form: the "
                                                  "environment whose matching runs to replay.")
@click.option("--status", "statuses", multiple=True, help="Bulk form: runs in this status (repeatable: any of).")
@click.option("--task", "task_identifiers", multiple=True, help="Bulk form: runs of this task (repeatable: any of).")
@click.option("--created-after", help="Bulk form: runs created after this timestamp (with an offset).")
@click.option("--created-before", help="Bulk form: runs created before this timestamp (with an offset).")
@click.option("--batch", "batch_id", help="Bulk form: runs this batch created.")
@click.option("--filter", "raw_filter", metavar="JSON",
              help="Bulk form: list_runs' filter object (tags: {\"tags\": [...]}), merged with the options above.")
@click.option("--chunk-size", type=int, help="Bulk form: runs per chunk (default 5000).")
@click.option("--no-wait", is_flag=True, help="Bulk form: print the action and return at once.")
@pass_ctx
@reports_errors
def runs_replay(ctx: Ctx, /, run_id: str | None, payload: str | None, metadata: str | None, tags: tuple[str, ...],
                environment_id: str | None, statuses: tuple[str, ...], task_identifiers: tuple[str, ...],
                created_after: str | None, created_before: str | None, batch_id: str | None,
                raw_filter: str | None, chunk_size: int | None, no_wait: bool, **overrides: Any) -> None:
    """Trigger a new run from RUN_ID: its task, payload, tags, queue and settings, with overrides.
    Or, with --env and filters instead of RUN_ID, replay every matching run of both stores
    created until now (a bulk action, each run replayed once: a progress bar until it completes,
    unless --no-wait; --key is then the action's key). The overrides are for one run only."""
    if run_id is None:
        if payload or metadata or tags or any(v is not None for k, v in overrides.items() if k != "idempotency_key"):
            raise click.UsageError("the overrides (--payload, --queue, --max-attempts, --metadata, --delay, --tag) "
                                   "are for one RUN_ID; a bulk replay copies each original")
        _bulk(ctx, "REPLAY", environment_id, raw_filter=raw_filter, idempotency_key=overrides["idempotency_key"],
              chunk_size=chunk_size, no_wait=no_wait, statuses=statuses, task_identifiers=task_identifiers, tags=(),
              created_after=created_after, created_before=created_before, batch_id=batch_id)
        return
    if statuses or task_identifiers or created_after or created_before or batch_id or raw_filter or chunk_size \
            or no_wait:
        raise click.UsageError("give RUN_ID, or --env with filters for a bulk replay, not both")
    client = ctx.client()
    _require_store_of(client, run_id)
    given = {k: v for k, v in overrides.items() if v is not None}
    if metadata is not None:
        given["metadata"] = _json_arg(metadata, "--metadata")
    if tags:
        given["tags"] = list(tags)
    result = client.replay_run(run_id, environment_id=environment_id, payload=_json_arg(payload, "--payload"),
                               **given)
    if ctx.as_json:
        emit_json(result)
    else:
        table([(result.run_id, result.status, result.residency, result.is_cached)],
              ["run", "status", "residency", "cached"])


@runs.command("watch")
@click.argument("run_id")
@click.option("--timeout", type=float, default=0, help="Give up after this many seconds (0: never).")
@pass_ctx
@reports_errors
def runs_watch(ctx: Ctx, run_id: str, timeout: float) -> None:
    """Print each status change of a run as it happens; exit when it is final."""
    client = ctx.client()
    run = _require_run(client, run_id)
    store = CONTROL_PLANE if run.residency == "LEGACY" else RUN_OPS
    deadline = time.monotonic() + timeout if timeout else None

    def show(old: str | None, new: str) -> None:
        if ctx.as_json:
            click.echo(json.dumps({"run_id": run.run_id, "old_status": old, "new_status": new}))
        else:
            click.echo(f"{time.strftime('%H:%M:%S')}  {run.run_id}  {old + ' -> ' if old else ''}{new}")

    # LISTEN before reading the status, so no change can slip between the two. Final statuses are
    # always notified, intermediate ones only where the environment asks (notifications 'all'):
    # the rest are seen by reading the run twice a second. Behind PgBouncer (transaction pooling)
    # a LISTEN would be lost with its server connection, so there the watch only reads.
    listening = contextlib.nullcontext(None) if client.behind_pgbouncer else client.listen(run.environment_id, store)
    with listening as conn:
        current = client.get_run(run_id)
        assert current is not None
        show(None, current.status)
        status = current.status
        while status not in FINAL_STATUSES:
            for note in conn.notifies(timeout=0.5) if conn is not None else ():
                event = json.loads(note.payload)
                if event["run_id"] == run.run_id and event["new_status"] != status:
                    show(status, event["new_status"])
                    status = event["new_status"]
                    if status in FINAL_STATUSES:
                        return
            if conn is None:
                time.sleep(0.5)
            if deadline and time.monotonic() > deadline:
                click.echo(f"error: still {status} after {timeout:g}s", err=True)
                sys.exit(1)
            current = client.get_run(run_id) or current  # a notification can be missed; the row cannot
            if current.status != status:
                show(status, current.status)
                status = current.status


@main.command()
@click.option("--older-than", required=True, help="Purge final runs that turned final longer ago than this (e.g. 30d).")
@click.option("--batch-size", type=click.IntRange(1, 100000), default=10000, show_default=True,
              help="Runs per call and store; calls repeat until nothing is left.")
@pass_ctx
@reports_errors
def purge(ctx: Ctx, older_than: str, batch_size: int) -> None:
    """Delete old final runs and their subgraphs from both stores, in bounded batches (a
    progress line per batch on stderr)."""
    client = ctx.client()
    total: dict[str, int] = {}
    while True:
        counts = client.purge_runs(older_than, batch_size)
        for store, n in counts.items():
            total[store] = total.get(store, 0) + n
        if sum(counts.values()) == 0:
            break
        click.echo("purged so far: " + ", ".join(f"{store} {n}" for store, n in sorted(total.items())), err=True)
    if ctx.as_json:
        emit_json({"purged": total})
    else:
        table(sorted(total.items()), ["store", "purged"])


def _store_metrics(client: RunOps, environment_id: str | None) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Each store's figures, asked one store at a time: what answered, and why the others did not."""
    figures: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    for store in (CONTROL_PLANE, *client.run_ops_stores):  # with shards, each shard
        try:
            figures.update(client.metrics(environment_id, store=store))
        except RunOpsError as err:
            if err.sqlstate == "RO006":
                raise  # bad input is the caller's, not the store's
            failures[store] = err.message
        except psycopg.Error as err:
            failures[store] = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return figures, failures


def _serve_metrics(listen: str, environment_id: str | None, timeout: float) -> None:
    """Serves both stores' figures at http://HOST:PORT/metrics in the Prometheus text format,
    read fresh on every scrape; a store that does not answer is runops_store_up 0."""
    import signal
    import threading
    from collections.abc import Iterator

    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise click.BadParameter(f"expected HOST:PORT or :PORT, got {listen!r}", param_hint="--listen")
    host = host.strip("[]") or "0.0.0.0"
    client = connect(timeout=timeout)
    _store_metrics(client, environment_id)  # bad input (RO006) fails here, not on every scrape
    if environment_id is not None:
        _require_environment(client, environment_id)  # and an unknown environment (RO004)

    class StoreCollector(Collector):
        def collect(self) -> Iterator[GaugeMetricFamily]:
            figures, failures = _store_metrics(client, environment_id)
            for store, why in failures.items():
                click.echo(f"{time.strftime('%H:%M:%S')}  {store} did not answer: {why}", err=True)
            up = GaugeMetricFamily("runops_store_up", "1 when the store answered this scrape, else 0.",
                                   labels=["store"])
            runs = GaugeMetricFamily("runops_runs", "Runs in this store, per environment and status.",
                                     labels=["store", "environment", "status"])
            depth = GaugeMetricFamily("runops_queue_depth", "PENDING runs waiting to be dequeued, per environment.",
                                      labels=["store", "environment"])
            oldest = GaugeMetricFamily("runops_oldest_pending_seconds",
                                       "Age of the oldest PENDING run (since it was queued), per environment.",
                                       labels=["store", "environment"])
            lapsed = GaugeMetricFamily("runops_lapsed_leases",
                                       "DEQUEUED/EXECUTING runs whose lease ran out (tick puts them back to PENDING).",
                                       labels=["store"])
            batches = GaugeMetricFamily("runops_open_batches", "Batches still PENDING (open) or PROCESSING (sealed).",
                                        labels=["store"])
            claims = GaugeMetricFamily("runops_claims", "Rows in the idempotency claim ledger (run-ops store).",
                                       labels=["store"])
            lag = GaugeMetricFamily("runops_mirror_lag_seconds",
                                    "Seconds since the control plane last confirmed a WAL position to the tenant "
                                    "mirror's subscription (absent under the pull engine).", labels=["store"])
            streaming = GaugeMetricFamily("runops_mirror_streaming",
                                          "1 when the tenant mirror's subscription worker is running, else 0.",
                                          labels=["store"])
            age = GaugeMetricFamily("runops_mirror_age_seconds",
                                    "Age of the tenant mirror on the run-ops store: since the newer of the "
                                    "control plane's replicated tick heartbeat and the last pull.", labels=["store"])
            fresh = GaugeMetricFamily("runops_mirror_fresh",
                                      "1 while the tenant mirror is within its freshness bound (new work is "
                                      "admitted from it), else 0 (new work reads the control plane, or is RO009).",
                                      labels=["store"])
            alerts_pending = GaugeMetricFamily("runops_alerts_pending",
                                               "Alerts not yet delivered (due, awaiting a retry, or in delivery).",
                                               labels=["store"])
            alerts_failed = GaugeMetricFamily("runops_alerts_failed",
                                              "Alerts given up after their last attempt.", labels=["store"])
            alerts_oldest = GaugeMetricFamily("runops_alerts_oldest_pending_seconds",
                                              "Age of the oldest undelivered alert (since its run turned final).",
                                              labels=["store"])
            for store in failures:
                up.add_metric([store], 0)
            for store, f in figures.items():
                up.add_metric([store], 1)
                for env, statuses in (f.get("runs") or {}).items():
                    for status, n in statuses.items():
                        runs.add_metric([store, env, status], n)
                for env, q in (f.get("queues") or {}).items():
                    depth.add_metric([store, env], q["depth"])
                    if q.get("oldest_pending_seconds") is not None:
                        oldest.add_metric([store, env], float(q["oldest_pending_seconds"]))
                lapsed.add_metric([store], f["lapsed_leases"])
                batches.add_metric([store], f["open_batches"])
                if f.get("claims") is not None:
                    claims.add_metric([store], f["claims"])
                mirror = f.get("mirror") or {}
                if mirror.get("lag_seconds") is not None:
                    lag.add_metric([store], float(mirror["lag_seconds"]))
                if mirror.get("engine") == "subscription":
                    streaming.add_metric([store], 1 if mirror.get("streaming") else 0)
                if mirror.get("engine") in ("subscription", "pull"):
                    if mirror.get("age_seconds") is not None:
                        age.add_metric([store], float(mirror["age_seconds"]))
                    fresh.add_metric([store], 1 if mirror.get("fresh") else 0)
                alerts = f.get("alerts") or {}  # absent from a store before r0006
                if alerts:
                    alerts_pending.add_metric([store], alerts["pending"])
                    alerts_failed.add_metric([store], alerts["failed"])
                    if alerts.get("oldest_pending_seconds") is not None:
                        alerts_oldest.add_metric([store], float(alerts["oldest_pending_seconds"]))
            yield from (up, runs, depth, oldest, lapsed, batches, claims, lag, streaming, age, fresh,
                        alerts_pending, alerts_failed, alerts_oldest)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector())
    server, thread = start_http_server(int(port_text), addr=host, registry=registry)
    click.echo(f"serving metrics at http://{listen if host != '0.0.0.0' else host + ':' + port_text}/metrics",
               err=True)
    stopping = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping.wait(1.0):
            pass
    finally:
        server.shutdown()
        thread.join(timeout=5)
        client.close()


@main.command()
@click.option("--env", "environment_id", help="Only this environment's figures.")
@click.option("--listen", metavar="HOST:PORT",
              help="Serve the figures at http://HOST:PORT/metrics in the Prometheus text format (e.g. :9187) "
                   "until SIGTERM/SIGINT, instead of printing them once.")
@click.option("--timeout", type=click.FloatRange(0.1, 60), default=5.0, show_default=True,
              help="With --listen: seconds a store may take to hand out a connection before a scrape "
                   "reports it down.")
@pass_ctx
@reports_errors
def metrics(ctx: Ctx, environment_id: str | None, listen: str | None, timeout: float) -> None:
    """Both stores' operational figures: runs per status per environment, queue depth and the
    oldest pending age, lapsed leases, open batches, the claim ledger and the mirror's lag
    (docs/operations.md). Exits 19 when a store did not answer (after printing the other's)."""
    if listen is not None:
        _serve_metrics(listen, environment_id, timeout)
        return
    client = ctx.client()
    figures, failures = _store_metrics(client, environment_id)
    if environment_id is not None and not any(environment_id in f.get("runs", {}) for f in figures.values()):
        try:
            _require_environment(client, environment_id)
        except StoreUnavailable:
            pass  # no store can say; the figures (and the failures) are printed as they are
    if ctx.as_json:
        emit_json({**figures, **{store: {"error": why} for store, why in failures.items()}})
    else:
        table([(store, env, status, n) for store, f in figures.items()
               for env, statuses in sorted(f["runs"].items()) for status, n in sorted(statuses.items())],
              ["store", "environment", "status", "runs"], title="Runs")
        click.echo()
        table([(store, env, q["depth"], q["oldest_pending_seconds"]) for store, f in figures.items()
               for env, q in sorted(f["queues"].items())],
              ["store", "environment", "queue depth", "oldest pending (s)"], title="Queues")
        click.echo()
        rows: list[tuple[Any, ...]] = []
        for store, f in figures.items():
            mirror = f.get("mirror") or {}
            alerts = f.get("alerts") or {}
            rows.append((store, "up", f["lapsed_leases"], f["open_batches"], f.get("claims"),
                         mirror.get("engine"), mirror.get("lag_seconds"), alerts.get("pending"), alerts.get("failed"),
                         alerts.get("oldest_pending_seconds")))
        rows += [(store, f"down: {why}", None, None, None, None, None, None, None, None)
                 for store, why in failures.items()]
        table(rows, ["store", "state", "lapsed leases", "open batches", "claims", "mirror", "mirror lag (s)",
                     "alerts pending", "alerts failed", "oldest alert (s)"], title="Stores")
    if failures:
        store, why = next(iter(failures.items()))
        raise StoreUnavailable(f"the {store} store did not answer: {why}")


@main.command()
@click.option("--loop", is_flag=True, help="Keep ticking until interrupted; print only the passes that did something.")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between ticks.")
@click.option("--max-rows", type=int, default=1000, show_default=True,
              help="Most rows each kind of work handles per pass.")
@click.option("--dev-home", hidden=True, help="Set by `dev up`: the local stores this loop ticks for.")
@click.option("--dev-token", hidden=True, help="Set by `dev up`: stop once the stores name another ticker.")
@pass_ctx
@reports_errors
def tick(ctx: Ctx, loop: bool, interval: float, max_rows: int, dev_home: str | None, dev_token: str | None) -> None:
    """Run one pass of all time-driven work on every store (or keep doing it with --loop).
    One pass prints what each store did (--json: one object). With --loop only a pass that did
    something is printed (--json: one object per line), so an idle loop is silent; a store
    outage is waited out with backoff; SIGTERM/SIGINT end it (exit 0)."""
    import signal
    import threading

    from runops.retry import run_loop

    client = ctx.client()

    def one_pass() -> float | None:
        counts = client.tick(max_rows)
        done = {store: {k: v for k, v in c.items() if v} for store, c in counts.items()}
        if loop and not any(done.values()):
            return interval  # idle: a line a second per store would bury the passes that matter
        if ctx.as_json:
            click.echo(json.dumps(counts, sort_keys=True))
        else:
            for store, did in done.items():
                if did or not loop:
                    click.echo(f"{time.strftime('%H:%M:%S')}  {store:<13}  "
                               + (", ".join(f"{k} {v}" for k, v in sorted(did.items())) or "nothing due"))
        return interval if loop else None

    if not loop:
        one_pass()
        return
    if not ctx.as_json:
        click.echo(f"ticking every {interval:g}s; a line for each pass that does something (Ctrl-C stops)",
                   err=True)
    stopping, wake = threading.Event(), threading.Event()

    def stop(signum: int, frame: Any) -> None:
        stopping.set()
        wake.set()

    def should_stop() -> bool:
        # The ticker `dev up` started ends with its stores (removed, stopped, or handed to a
        # newer ticker), even if nobody signals it.
        if dev_home is not None and dev_token is not None and not LocalStores.wants_ticker(dev_home, dev_token):
            return True
        return stopping.is_set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _log_to_stderr()
    run_loop(one_pass, wake=wake, should_stop=should_stop, what="tick")


def _log_to_stderr() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")


def _load_app(spec: str) -> Any:
    """``module:attribute`` (dotted attribute path allowed), imported with the current directory
    on sys.path, as uvicorn and celery do."""
    import importlib

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise click.BadParameter("expected module:object, e.g. myapp.tasks:ro", param_hint="--app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name}: {exc}", param_hint="--app") from exc
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise click.BadParameter(f"{module_name} has no {attribute}", param_hint="--app") from exc
    return obj


@main.command()
@click.option("--env", "environment_id", required=True, help="The environment to work for.")
@click.option("--app", "app", help="module:object holding the tasks: a RunOps client (its @ro.task tasks, its "
                                   "connection) or a runops.tasks.TaskRegistry. Default: the reference tasks.")
@click.option("--id", "worker_id", help="This worker's id (default host-pid).")
@click.option("--concurrency", "--max-runs", "concurrency", type=int, default=4, show_default=True,
              help="Runs worked at once.")
@click.option("--queue", "queues", multiple=True, help="Only these queues (repeatable).")
@click.option("--grace", type=float, default=30.0, show_default=True,
              help="On SIGTERM/SIGINT, seconds running attempts get to finish before they are handed back.")
@click.option("--lease", type=float, default=60.0, show_default=True, help="Lease seconds (heartbeat every third).")
@click.option("--once", is_flag=True, help="Stop when the queue is empty and nothing runs.")
@click.option("--all-tasks", is_flag=True,
              help="Take every run of the environment, failing those of tasks this worker does not know "
                   "(UnknownTask). Default: only runs of its own tasks.")
@click.option("--tick-every", "tick_every", type=click.IntRange(1, 3600), default=1, show_default=True,
              help="Seconds between this worker's turns at the stores' time-driven work (retries, delays, "
                   "leases, waits); however many workers run, a store makes about one pass per interval.")
@click.option("--no-tick", is_flag=True,
              help="Do no time-driven work here (another process runs `runops tick --loop` or pg_cron).")
@pass_ctx
@reports_errors
def worker(ctx: Ctx, environment_id: str, app: str | None, worker_id: str | None, concurrency: int,
           queues: tuple[str, ...], grace: float, lease: float, once: bool, all_tasks: bool, tick_every: int,
           no_tick: bool) -> None:
    """Work an environment's runs of your tasks (--app) or the reference ones (echo, sleep, fail,
    wait-for-child, fan-out); runs of other tasks are left to workers that know them. Also runs
    the stores' time-driven work and delivers the environment's alert webhooks (unless --no-tick
    or --once), so no separate ticker is needed.
    Drains on SIGTERM/SIGINT and exits 0; waits out store outages."""
    from runops.tasks import TaskRegistry
    from runops.worker import Outcome, Worker, default_worker_id

    client: RunOps | None = None
    tasks: TaskRegistry | None = None
    if app:
        loaded = _load_app(app)
        if isinstance(loaded, RunOps):
            client, tasks = loaded, loaded.tasks
        elif isinstance(loaded, TaskRegistry):
            tasks = loaded
        else:
            raise click.BadParameter(f"{app} is a {type(loaded).__name__}, not a RunOps client or a TaskRegistry",
                                     param_hint="--app")
    if tasks is None:
        from .reference_tasks import REFERENCE_TASKS

        tasks = REFERENCE_TASKS
    if not tasks and not all_tasks:
        raise click.BadParameter(f"{app} registers no task, so the worker would take no run", param_hint="--app")
    worker_id = worker_id or default_worker_id()

    def report(o: Outcome) -> None:
        if ctx.as_json:
            click.echo(json.dumps(plain(o), sort_keys=True))  # JSON Lines: one outcome a line, as it happens
        else:
            click.echo(f"{time.strftime('%H:%M:%S')}  {o.run_id}  {o.task:<16} attempt {o.attempt}  {o.result}")

    _log_to_stderr()
    handled = Worker(client or ctx.client(), environment_id, tasks, worker_id=worker_id, concurrency=concurrency,
                     queues=list(queues) or None, grace=grace, lease=lease, once=once, all_tasks=all_tasks,
                     tick=None if no_tick else float(tick_every), on_outcome=report).run()
    if not ctx.as_json:
        click.echo(f"{worker_id}: {handled} runs handled")


# -- alerts ----------------------------------------------------------------------------------

@main.group("alerts")
def alerts_group() -> None:
    """Alert webhooks (docs/operations-bulk-and-alerts.md, "Alerts")."""


@alerts_group.command("deliver")
@click.option("--loop", is_flag=True, help="Keep delivering until SIGTERM/SIGINT; otherwise one pass.")
@click.option("--env", "environment_id", help="Only this environment's alerts (default: every environment's).")
@click.option("--id", "worker_id", help="This deliverer's id (default host-pid).")
@click.option("--batch", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Alerts claimed per pass.")
@click.option("--concurrency", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Webhook requests in flight at once.")
@click.option("--timeout", type=click.FloatRange(0.1, 300), default=10.0, show_default=True,
              help="Seconds a receiver may take to answer; longer is a failed attempt (retried).")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=1.0, show_default=True,
              help="With --loop: seconds between passes that found nothing to do.")
@pass_ctx
@reports_errors
def alerts_deliver(ctx: Ctx, loop: bool, environment_id: str | None, worker_id: str | None, batch: int,
                   concurrency: int, timeout: float, interval: float) -> None:
    """Claim due alerts on every store and POST them to their webhooks: one line per attempt
    (--json: one object per line). A failed attempt is retried by the stores' schedule (5 s,
    doubling, up to an hour, then FAILED); `runops worker` delivers its environment's alerts too."""
    import signal
    import threading

    from runops.alerts import Deliverer, Delivery
    from runops.retry import run_loop
    from runops.worker import default_worker_id

    client = ctx.client()
    deliverer = Deliverer(client, worker_id or default_worker_id(), environment_id=environment_id, batch=batch,
                          concurrency=concurrency, timeout=timeout)

    def show(d: Delivery) -> None:
        if ctx.as_json:
            click.echo(json.dumps(plain(d), sort_keys=True))
        else:
            why = f"  ({d.error})" if d.error else ""
            click.echo(f"{time.strftime('%H:%M:%S')}  {d.alert_id}  {d.run_id}  attempt {d.attempt}  {d.result}{why}")

    def one_pass() -> float | None:
        done = deliverer.deliver_due()
        for d in done:
            show(d)
        if not loop:
            if not done and not ctx.as_json:
                click.echo("no alert is due")
            return None
        return 0.0 if len(done) == batch else interval

    with deliverer:
        if not loop:
            one_pass()
            return
        stopping, wake = threading.Event(), threading.Event()

        def stop(signum: int, frame: Any) -> None:
            stopping.set()
            wake.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        _log_to_stderr()
        run_loop(one_pass, wake=wake, should_stop=stopping.is_set, what="alerts deliver")


BATCH_ITEM_KEYS = {"task", "payload", "options"}


def _batch_item(item: Any, number: int) -> dict[str, Any]:
    """Checks one line's shape before anything is created (the store checks the values)."""
    def bad(why: str) -> click.BadParameter:
        return click.BadParameter(f"line {number}: {why}", param_hint="FILE")

    if not isinstance(item, dict):
        raise bad(f"expected a JSON object like {{\"task\": \"echo\", \"payload\": {{}}}}, got {json.dumps(item)[:60]}")
    if not isinstance(item.get("task"), str):
        raise bad("\"task\" must be a string")
    if unknown := sorted(set(item) - BATCH_ITEM_KEYS):
        raise bad(f"unknown keys {', '.join(unknown)} (expected task, payload, options)")
    if "options" in item and not isinstance(item["options"], dict):
        raise bad("\"options\" must be a JSON object")
    return item


@main.command()
@click.argument("file", type=click.File("r"))
@click.option("--env", "environment_id", required=True, help="The environment to trigger in.")
@click.option("--key", "idempotency_key", help="Batch idempotency key (items without a key use KEY-index).")
@click.option("--chunk-size", type=int, default=1000, show_default=True, help="Items sent per call.")
@click.option("--wait", is_flag=True, help="Wait until every run is final (run a worker meanwhile).")
@click.option("--timeout", type=float, default=0, help="With --wait: give up after this many seconds.")
@pass_ctx
@reports_errors
def batch(ctx: Ctx, file: Any, environment_id: str, idempotency_key: str | None, chunk_size: int, wait: bool,
          timeout: float) -> None:
    """Trigger a batch from FILE (JSON lines of {task, payload, options}; - for stdin)."""
    items: list[dict[str, Any]] = []
    for number, line in enumerate(file, start=1):
        if line.strip():
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise click.BadParameter(f"line {number} is not JSON: {exc}", param_hint="FILE") from exc
            items.append(_batch_item(item, number))
    if not items:
        raise click.BadParameter("no items", param_hint="FILE")
    client = ctx.client()
    with click.progressbar(length=len(items), label="appending items", file=sys.stderr) as bar:
        created = client.stream_batch(environment_id, items, len(items), chunk_size=chunk_size,
                                      on_chunk=lambda appended: bar.update(len(appended.run_ids)),
                                      idempotency_key=idempotency_key)
    got = client.get_batch(created.batch_id)
    deadline = time.monotonic() + timeout if timeout else None
    while wait and got is not None and got.status not in ("COMPLETED", "ABORTED"):
        if deadline and time.monotonic() > deadline:
            click.echo(f"error: batch {created.batch_id} still {got.status} after {timeout:g}s", err=True)
            sys.exit(1)
        time.sleep(0.5)
        got = client.get_batch(created.batch_id)
    assert got is not None
    statuses: dict[str, int] = {}
    if got.status == "COMPLETED":
        waitpoint = client.get_waitpoint(got.batch_id.replace("batch_", "waitpoint_", 1))
        for item in (waitpoint.output if waitpoint else None) or []:
            statuses[item["status"]] = statuses.get(item["status"], 0) + 1
    if ctx.as_json:
        emit_json({"batch": got, "cached": created.is_cached, "statuses": statuses})
        return
    table([(got.batch_id, got.item_count, got.status, created.is_cached)], ["batch", "items", "status", "cached"])
    if statuses:
        table(sorted(statuses.items()), ["run status", "items"])


@main.command()
@click.option("--seconds", type=int, default=10, show_default=True, help="Length of each pgbench phase.")
@click.option("--chart", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to draw the chart (default: beside the results' JSON in bench/results/); "
                   "docs/benchmarks.png refreshes the chart the docs show.")
@reports_errors
def bench(seconds: int, chart: Path | None) -> None:
    """Measure trigger and batch throughput against a plain INSERT baseline (fresh clusters) and
    the peers (installed on first use into ~/.cache/runops/bench-peers). Runs bench/harness.py of
    a runops checkout (this one, or the current directory's); results go to its bench/results/."""
    sys.exit(_bench_harness().main(seconds, chart=chart))


def _bench_harness() -> Any:
    """bench/harness.py, the benchmarks' one home (docs/decisions.md): it needs the checkout's
    pgbench scripts, so `runops bench` runs from a checkout, the editable install's or the
    current directory's."""
    import importlib

    for home in (ROOT / "bench", Path.cwd() / "bench"):
        if (home / "harness.py").exists():
            sys.path.insert(0, str(home))
            return importlib.import_module("harness")
    raise RunOpsError("`runops bench` runs from a checkout of the runops repository: bench/harness.py and "
                      "bench/pgbench/ were not found here")


@main.command()
@click.argument("page", required=False)
@reports_errors
def docs(page: str | None) -> None:
    """The documentation installed with runops: the pages and where they are, or one PAGE's text
    (e.g. `runops docs sql-api`, the SQL API reference)."""
    pages = {p.stem: p for p in sorted(DOCS.glob("*.md"))}
    if page is None:
        for name, path in pages.items():
            title = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.strip()), "")
            click.echo(f"{name:<30}  {title}")
        click.echo(f"(in {DOCS})")
        return
    found = pages.get(page.removesuffix(".md"))
    if found is None:
        raise click.BadParameter(f"no page {page!r}; the pages: {', '.join(pages)}", param_hint="PAGE")
    click.echo(found.read_text(), nl=False)


@main.command()
@pass_ctx
@reports_errors
def demo(ctx: Ctx) -> None:
    """Show the mission on the local stores: minting, inheritance, idempotency, read-through, the sentinel."""
    from .demo import run_demo

    run_demo(ctx.client())


@main.group()
def bulk() -> None:
    """Bulk actions: `runops runs cancel --env ENV [filters]` creates one; show or abort it here."""


@bulk.command("show")
@click.argument("bulk_action_id")
@pass_ctx
@reports_errors
def bulk_show(ctx: Ctx, bulk_action_id: str) -> None:
    """Show a bulk action and its counts over both stores (exit 14 if there is none)."""
    action = ctx.client().get_bulk_action(bulk_action_id)
    if action is None:
        raise NotFound(f"bulk action {bulk_action_id} not found")
    _show_bulk_action(ctx, action)


@bulk.command("abort")
@click.argument("bulk_action_id")
@pass_ctx
@reports_errors
def bulk_abort(ctx: Ctx, bulk_action_id: str) -> None:
    """Stop a bulk action: no further chunk starts; what was done stays."""
    _show_bulk_action(ctx, ctx.client().abort_bulk_action(bulk_action_id))


if __name__ == "__main__":
    main()
