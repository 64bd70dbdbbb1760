"""Adds a shared run-graph revision: both histories' version files for ``sql/upgrades/<name>/``.

    make revision NAME=r0005_hardening [MESSAGE="Hardening: what it does"]
    python -m runops.ops.revision r0005_hardening ["Hardening: what it does"]

A revision is its hand-written DDL delta, ``sql/upgrades/<name>/*.sql``, applied in file-name
order and written so it upgrades a store with data in place (what changed in ``sql/schema/``;
a ``-- lock: runops.a, runops.b`` line names the tables it locks, which the upgrade takes all at
once, with retry, before any revision runs). Function bodies are not copied into revisions: the
upgrade re-applies the live ``sql/functions/`` at head (docs/decisions.md). A delta drops what
CREATE OR REPLACE cannot change (a function whose signature or result changes) and defines any
function its own DDL needs.

The version files (one per history) call the one runner, ``migrations/runops_revisions``; they
are the only thing this tool writes, besides the release list.

Released revisions never change. A revision is released once a later one exists: making a new
revision records the files of every older one in ``sql/upgrades/released.sha256`` (sha256sum's
format; tests/test_schema.py checks the tree against it). This tool refuses a released name, and
refuses to go on when a released delta changed.
"""

from __future__ import annotations

import hashlib
import re
import sys

from .schema import MIGRATIONS, ROOT, UPGRADES, revision_names, revision_number, upgrade_files

RELEASED = UPGRADES / "released.sha256"

VERSION = '''"""{message} ({title}).

Revision ID: {number}
Revises:{down}
"""
from runops_revisions import steps

revision = "{number}"
down_revision = {down_repr}
upgrade, downgrade = steps("{name}", "{store}")
'''

HISTORIES = {"CONTROL_PLANE": ("control_plane", "control plane"), "RUN_OPS": ("run_ops", "run-ops store")}


def released() -> dict[str, str]:
    """The release list: ``revision/file`` -> sha256."""
    if not RELEASED.exists():
        return {}
    return {path: digest for digest, path in (line.split(maxsplit=1) for line in RELEASED.read_text().splitlines())}


def file_digests(name: str) -> dict[str, str]:
    return {f"{name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in upgrade_files(name)}


def released_changes(name: str, listed: dict[str, str]) -> list[str]:
    """How the files of released revision ``name`` differ from the release list (empty: unchanged)."""
    mine = {k: v for k, v in listed.items() if k.startswith(f"{name}/")}
    now = file_digests(name)
    return ([f"{p} changed" for p in sorted(mine) if p in now and now[p] != mine[p]]
            + [f"{p} is missing" for p in sorted(mine) if p not in now]
            + [f"{p} was added" for p in sorted(now) if p not in mine])


def version_message(name: str) -> str | None:
    """The message of an existing version file (its docstring's first line), if any."""
    path = MIGRATIONS / "control_plane" / "versions" / f"{revision_number(name)}_{name.split('_', 1)[1]}.py"
    if not path.exists():
        return None
    first = path.read_text().splitlines()[0].removeprefix('"""')
    return first.removesuffix(" (control plane).")


def write_versions(name: str, message: str) -> None:
    number = revision_number(name)
    previous = [n for n in revision_names() if n < name]
    down = revision_number(previous[-1]) if previous else None
    for store, (section, title) in HISTORIES.items():
        path = MIGRATIONS / section / "versions" / f"{number}_{name.split('_', 1)[1]}.py"
        path.write_text(VERSION.format(message=message, title=title, number=number, down=f" {down}" if down else "",
                                       down_repr=f'"{down}"' if down else "None", name=name, store=store))
        print(f"wrote {path.relative_to(ROOT)}")


def main(name: str, message: str | None = None) -> None:
    if not re.fullmatch(r"r\d{4}_[a-z0-9_]+", name):
        raise SystemExit("revision names look like r0005_what_it_does")
    listed = released()
    if any(path.startswith(f"{name}/") for path in listed):
        raise SystemExit(f"{name} is released (sql/upgrades/released.sha256): put the change in a new revision")
    if not upgrade_files(name):
        raise SystemExit(f"write the DDL delta first: sql/upgrades/{name}/*.sql")
    # Every older revision is released now that a later one exists: recorded if it is not yet,
    # and checked if it is.
    for older in (n for n in revision_names() if n < name):
        if not any(path.startswith(f"{older}/") for path in listed):
            listed.update(file_digests(older))
        elif problems := released_changes(older, listed):
            raise SystemExit(f"{older} is released and its delta changed ({'; '.join(problems)}): restore it "
                             "(git checkout) and put the change in a new revision")
    RELEASED.write_text("".join(f"{digest}  {path}\n" for path, digest in sorted(listed.items())))
    write_versions(name, message or version_message(name) or name.split("_", 1)[1].replace("_", " ").capitalize())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
