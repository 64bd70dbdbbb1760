"""The PL/Proxy router database in front of N run-ops shards (SPEC §9 [1.3], docs/scale-out.md).

`install_router` (run by `runops migrate --router-url`) applies ``sql/router/00_router.sql``, the
shard-id decoding it shares with the stores, the cluster definition (one login per router on
every store) and one wrapper per public function of the run-ops SQL API, generated from shard 0's
catalog so the router has exactly the shards' names, arguments, defaults and result shapes.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .schema import SQL

# Per-store calls: every shard answers, and the router adds the answers up.
ON_EVERY_SHARD = frozenset({"tick", "enqueue_delayed_runs", "expire_enqueued_runs", "purge_runs"})
# Computed on the router itself (installed from the stores' files), never routed.
LOCAL = frozenset({"shard_of", "shard_of_id", "base62_digit", "ksuid_top40", "shard_of_top40",
                   "try_classify_residency"})
# The id arguments a call may be routed by, and what the refusal calls the id.
ID_ARGUMENTS = {"run_id": "run", "batch_id": "batch", "waitpoint_id": "waitpoint",
                "bulk_action_id": "bulk action", "alert_id": "alert", "channel_id": "alert channel"}


@dataclass(frozen=True)
class ApiFunction:
    name: str
    arguments: str            # with names and defaults, as the shard declares them
    argument_types: list[str]
    argument_names: list[str]
    result: str               # pg_get_function_result
    returns_set: bool
    proxy_result: str         # the same, with OUT parameters spelled as TABLE (PL/Proxy needs the columns)

    @property
    def route(self) -> str:
        """The SQL expression choosing the shard of a call."""
        first = self.argument_names[0] if self.argument_names else ""
        if first == "environment_id":
            return "runops.route_environment($1)"
        if first in ID_ARGUMENTS:
            is_write = "false" if self.name.startswith("get_") else "true"
            return f"runops.route_id($1, {is_write}, {sql.quote(ID_ARGUMENTS[first])})"
        return "0"


def api_functions(shard: psycopg.Connection[Any]) -> list[ApiFunction]:
    """The functions of schema runops the application role may call on a shard."""
    rows = shard.execute("""
        SELECT p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid), p.proretset,
               ARRAY(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) AS t),
               coalesce(p.proargnames[1:p.pronargs], '{}'),
               (SELECT string_agg(format('%I %s', a.name, format_type(a.type, NULL)), ', ' ORDER BY a.n)
                FROM unnest(p.proallargtypes, p.proargmodes, p.proargnames) WITH ORDINALITY AS a(type, mode, name, n)
                WHERE a.mode = 'o')
        FROM pg_proc AS p
        WHERE p.pronamespace = 'runops'::regnamespace AND p.prokind = 'f'
          AND has_function_privilege('runops_api', p.oid, 'EXECUTE')
        ORDER BY p.proname, p.oid""").fetchall()
    # A function with OUT parameters returns "record": PL/Proxy needs its columns, as a TABLE.
    return [ApiFunction(name, args, list(types), list(names), result, retset,
                        f"TABLE({outs})" if outs and result in ("record", "SETOF record") else result)
            for name, args, result, retset, types, names, outs in rows if name not in LOCAL]


def composite_types(shard: psycopg.Connection[Any], functions: list[ApiFunction]) -> list[tuple[str, str]]:
    """(name, column list) of every runops row type a function returns (run_view, ...)."""
    names = sorted({m.group(1) for f in functions for m in [re.fullmatch(r"(?:SETOF )?runops\.(\w+)", f.result)]
                    if m})
    out = []
    for name in names:
        columns = shard.execute("""
            SELECT string_agg(format('%%I %%s', a.attname, format_type(a.atttypid, a.atttypmod)), ', '
                              ORDER BY a.attnum)
            FROM pg_attribute AS a JOIN pg_type AS t ON t.typrelid = a.attrelid
            WHERE t.typname = %s AND t.typnamespace = 'runops'::regnamespace AND a.attnum > 0
              AND NOT a.attisdropped""", [name]).fetchone()
        if columns and columns[0]:
            out.append((name, str(columns[0])))
    return out


def _proxy_function(f: ApiFunction) -> str:
    """runops_route.<name>(route_shard, route_clock, the shard's arguments): the PL/Proxy call of
    one shard. ``route_clock`` is the caller's test clock (runops.fake_now, '' for none), set on
    the shard's session in the same statement, before the call: the call's first argument depends
    on the set_config's result, so the shard evaluates that first (a function without arguments
    reads no clock). PL/Proxy substitutes its arguments' names in this text: no alias may be one."""
    types = ", ".join(["route_shard integer", "route_clock text", *f.argument_types])
    args = [f"${i + 3}" for i in range(len(f.argument_types))]
    if args:
        args[0] = f"CASE WHEN c.clock_set IS NULL THEN NULL ELSE {args[0]} END"
    params = ", ".join(args)
    clock = "(SELECT pg_catalog.set_config('runops.fake_now', $2, false) AS clock_set) AS c"
    select = f"SELECT r.* FROM {clock}, LATERAL runops.{f.name}({params}) AS r" if f.returns_set else \
        f"SELECT runops.{f.name}({params}) AS {f.name} FROM {clock}"
    return (f"CREATE FUNCTION runops_route.{f.name}({types})\nRETURNS {f.proxy_result}\nLANGUAGE plproxy\nAS $$\n"
            f"  CLUSTER 'runops';\n  RUN ON route_shard;\n  {select};\n$$;\n")


_HANDLER = """EXCEPTION WHEN OTHERS THEN
  GET STACKED DIAGNOSTICS r_state = RETURNED_SQLSTATE, r_message = MESSAGE_TEXT, r_detail = PG_EXCEPTION_DETAIL,
                          r_hint = PG_EXCEPTION_HINT;
  PERFORM runops.reraise(r_shard, r_state, r_message, r_detail, r_hint);"""


def _wrapper(f: ApiFunction) -> str:
    """runops.<name>: the public function, same arguments and result, routed."""
    params = ", ".join(["r_shard", "runops.router_clock()", *(f"${i + 1}" for i in range(len(f.argument_types)))])
    declare = "DECLARE\n  r_shard integer;\n  r_state text;\n  r_message text;\n  r_detail text;\n  r_hint text;\n"
    if f.name in ON_EVERY_SHARD and not f.returns_set:
        add = "runops.sum_counts(r_total, r_one)" if f.result == "jsonb" else "coalesce(r_total, 0) + r_one"
        body = (f"  r_one {f.result};\n  r_total {f.result};\nBEGIN\n"
                "  FOR r_shard IN 0 .. runops.router_shard_count() - 1 LOOP\n"
                f"    r_one := runops_route.{f.name}({params});\n"
                f"    r_total := {add};\n  END LOOP;\n  RETURN r_total;\n")
    elif f.returns_set:
        body = (f"BEGIN\n  r_shard := {f.route};\n"
                f"  RETURN QUERY SELECT * FROM runops_route.{f.name}({params});\n  RETURN;\n")
    elif f.result == "void":
        body = f"BEGIN\n  r_shard := {f.route};\n  PERFORM runops_route.{f.name}({params});\n  RETURN;\n"
    else:
        body = f"BEGIN\n  r_shard := {f.route};\n  RETURN runops_route.{f.name}({params});\n"
    return (f"CREATE FUNCTION runops.{f.name}({f.arguments})\nRETURNS {f.result}\nLANGUAGE plpgsql VOLATILE "
            "SECURITY DEFINER\nSET search_path = runops, pg_catalog, pg_temp\nAS $$\n"
            f"{declare}{body}{_HANDLER}\nEND\n$$;\n")


def _function_block(path: str, name: str) -> str:
    """One CREATE OR REPLACE FUNCTION runops.<name> statement out of a file of sql/functions/."""
    text = (SQL / "functions" / path).read_text()
    m = re.search(rf"^CREATE OR REPLACE FUNCTION runops\.{name}\(.*?^\$\$;$", text, re.S | re.M)
    assert m, f"{name} not found in {path}"
    return m.group(0)


def shared_functions() -> str:
    """The pure functions the router shares with the stores: one home for the id rules."""
    return "\n".join([_function_block("residency.sql", "try_classify_residency"),
                      *(_function_block("shards.sql", name)
                        for name in ("base62_digit", "ksuid_top40", "shard_of_top40", "shard_of_id"))])


def router_api_sql(shard: psycopg.Connection[Any]) -> str:
    """Drops the generated functions and types, then creates them from ``shard``'s catalog."""
    functions = api_functions(shard)
    parts = ["DO $$\nDECLARE\n  f regprocedure;\nBEGIN\n"
             "  FOR f IN SELECT p.oid FROM pg_proc AS p WHERE p.pronamespace = 'runops_route'::regnamespace LOOP\n"
             "    EXECUTE format('DROP FUNCTION %s', f);\n  END LOOP;\n"
             "  FOR f IN SELECT p.oid FROM pg_proc AS p WHERE p.pronamespace = 'runops'::regnamespace\n"
             "             AND p.proname = ANY(%(names)s) LOOP\n"
             "    EXECUTE format('DROP FUNCTION %s', f);\n  END LOOP;\nEND\n$$;\n"]
    for name, columns in composite_types(shard, functions):
        parts.append(f"DROP TYPE IF EXISTS runops.{name} CASCADE;\nCREATE TYPE runops.{name} AS ({columns});\n")
    for f in functions:
        parts.append(_proxy_function(f))
        parts.append(_wrapper(f))
    names = "ARRAY[" + ", ".join(sql.quote(f.name) for f in functions) + "]::name[]"
    parts[0] = parts[0].replace("%(names)s", names)
    return "\n".join(parts)


def _login(url: str, role: str, password: str) -> None:
    """The router's login on a store: a member of runops_api, which may only EXECUTE the API."""
    with psycopg.connect(url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(sql.SQL(f"{verb} ROLE {{}} LOGIN PASSWORD {{}}").format(sql.Identifier(role),
                                                                          sql.Literal(password)))
        conn.execute(sql.SQL("GRANT runops_api TO {}").format(sql.Identifier(role)))


def _connstr(url: str, role: str, password: str, override: dict[str, str] | None = None) -> str:
    info = conninfo_to_dict(url)
    target = {"host": str(info.get("host") or "127.0.0.1"), "port": str(info.get("port") or "5432"),
              "dbname": str(info.get("dbname") or "postgres"), "connect_timeout": "5"}
    if info.get("sslmode"):
        target["sslmode"] = str(info["sslmode"])
    target.update(override or {})
    return make_conninfo("", **target, user=role, password=password)


def install_router(router_url: str, control_plane_url: str, shard_urls: list[str],
                   peers: dict[str, dict[str, str]] | None = None) -> int:
    """(Re)installs the router and writes its cluster definition; returns the definition's
    version. The shards must be migrated and numbered first (migrate.configure_shards)."""
    peers = peers or {}
    with psycopg.connect(router_url, autocommit=True) as router:
        row = router.execute("SELECT current_database()").fetchone()
        assert row is not None
        role = f"runops_router_{row[0]}"[:63]
        password = secrets.token_urlsafe(24)
        for url in [control_plane_url, *shard_urls]:
            _login(url, role, password)
        with psycopg.connect(shard_urls[0], autocommit=True) as shard0:
            since = shard0.execute("SELECT shard_ids_since FROM runops.store_config").fetchone()
            api = router_api_sql(shard0)
        assert since is not None
        with router.transaction():
            # Bodies refer to each other in any order; PL/Proxy checks its own at first call.
            router.execute("SET LOCAL check_function_bodies = off")
            router.execute((SQL / "router" / "00_router.sql").read_text())
            router.execute(shared_functions())
            router.execute("DELETE FROM runops.router_shards")
            router.execute("INSERT INTO runops.router_shards VALUES (-1, %s)",
                           [_connstr(control_plane_url, role, password, peers.get("CONTROL_PLANE"))])
            for number, url in enumerate(shard_urls):
                router.execute("INSERT INTO runops.router_shards VALUES (%s, %s)",
                               [number, _connstr(url, role, password, peers.get(f"SHARD_{number}"))])
            version = router.execute("""
                INSERT INTO runops.router_config (shard_count, shard_ids_since) VALUES (%s, %s)
                ON CONFLICT (singleton) DO UPDATE SET shard_count = excluded.shard_count,
                  shard_ids_since = excluded.shard_ids_since, version = router_config.version + 1
                RETURNING version""", [len(shard_urls), since[0]]).fetchone()
            router.execute("TRUNCATE runops.router_environment_cache")
            router.execute(api)
            router.execute(_GRANTS)
        assert version is not None
        return int(version[0])


# Every function of the router is the owner's; the application may call the public wrappers only.
_GRANTS = """
DO $$
DECLARE
  f regprocedure;
BEGIN
  FOR f IN SELECT p.oid FROM pg_proc AS p
           WHERE p.pronamespace IN ('runops'::regnamespace, 'runops_route'::regnamespace) LOOP
    EXECUTE format('ALTER FUNCTION %s OWNER TO runops_owner', f);
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
  END LOOP;
  FOR f IN SELECT p.oid FROM pg_proc AS p JOIN pg_language AS l ON l.oid = p.prolang
           WHERE p.pronamespace = 'runops'::regnamespace AND p.prosecdef LOOP
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO runops_api', f);
  END LOOP;
END
$$;
GRANT EXECUTE ON FUNCTION runops.shard_of(text), runops.shard_of_id(text, integer), runops.base62_digit(text),
  runops.ksuid_top40(text), runops.shard_of_top40(bigint, integer), runops.try_classify_residency(text)
  TO runops_api;
GRANT USAGE ON SCHEMA plproxy TO runops_owner;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA plproxy FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA plproxy TO runops_owner;
"""
