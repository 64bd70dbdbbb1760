"""The local stores of ``runops dev up`` as a client sees them: the state file it writes
(``.runops/state.json``) and the application URLs that file names.

Read only when asked — :meth:`runops.RunOps.local`, or the CLI when no URL is configured —
never as a fallback of :meth:`runops.RunOps.connect`. Starting, stopping and creating the stores
is tooling (:mod:`runops.ops.local_cluster`), which writes this file and reads it through here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import RunOpsError

DATABASE = "runops"
APP_ROLE = "runops_app"
NO_LOCAL_STORES = ("no local stores here: run `runops dev up` (or set RUNOPS_CONTROL_PLANE_URL "
                   "and RUNOPS_RUN_OPS_URL)")


def default_home() -> Path:
    """Where ``runops dev up`` keeps its stores: ``.runops/`` in the current directory."""
    return Path.cwd() / ".runops"


def state_file(home: Path) -> Path:
    return home / "state.json"


def read_state(home: Path | None = None) -> dict[str, Any] | None:
    """The state ``runops dev up`` wrote under ``home`` (default :func:`default_home`), or None
    when there is none."""
    state = state_file(home or default_home())
    if not state.exists():
        return None
    if state.stat().st_mode & 0o077:
        state.chmod(0o600)  # written by an older runops: it holds the application password
    raw: dict[str, Any] = json.loads(state.read_text())
    return raw


def app_url(password: str, port: int) -> str:
    """The application login's URL of a local store listening on ``port``."""
    return f"postgresql://{APP_ROLE}:{password}@127.0.0.1:{port}/{DATABASE}"


def app_urls(home: Path | None = None) -> dict[str, str]:
    """Each local store's application URL, by store; RunOpsError when there are no local stores."""
    raw = read_state(home)
    if raw is None:
        raise RunOpsError(NO_LOCAL_STORES)
    return {store: app_url(raw["app_password"], cluster["port"]) for store, cluster in raw["clusters"].items()}
