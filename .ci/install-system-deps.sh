#!/usr/bin/env bash
# Installs the system packages the tests need, when they are missing: PostgreSQL 15 server
# binaries and contrib (postgres_fdw), pgTAP, pg_prove, plpgsql_check, pg_cron and PgBouncer (the
# tests start one in front of both stores). Needs root (or sudo) only when something is missing.
# With --run, only what running runops needs (`make run`): the server binaries with contrib
# (postgres_fdw, pgbench) and runuser; the packages only the tests use are left out.
set -euo pipefail
need=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql-15)
[ -f /usr/share/postgresql/15/extension/postgres_fdw.control ] || need+=(postgresql-contrib-15)
[ -f /usr/share/postgresql/15/extension/pgtap.control ] || need+=(postgresql-15-pgtap)
command -v pg_prove >/dev/null || need+=(libtap-parser-sourcehandler-pgtap-perl)
[ -f /usr/share/postgresql/15/extension/plpgsql_check.control ] || need+=(postgresql-15-plpgsql-check)
[ -f /usr/share/postgresql/15/extension/pg_cron.control ] || need+=(postgresql-15-cron)
[ -x /usr/sbin/pgbouncer ] || need+=(pgbouncer)
command -v runuser >/dev/null || need+=(util-linux)
if [ "${1:-}" = "--run" ]; then
  run_need=()
  for package in "${need[@]}"; do
    case "$package" in postgresql-15|postgresql-contrib-15|util-linux) run_need+=("$package") ;; esac
  done
  need=("${run_need[@]}")
fi
[ ${#need[@]} -eq 0 ] && exit 0
echo "installing system packages: ${need[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
