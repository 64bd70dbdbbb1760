"""The local stores of ``runops dev up`` as a client sees them: where they are (the nearest
``.runops/`` up from the current directory), the state file ``dev up`` writes there
(``.runops/state.json``) and the application URLs that file names.

Read when no URL is configured — :meth:`runops.RunOps.local`, the CLI, ``migrate``, ``doctor``.
Starting, stopping and creating the stores is tooling (:mod:`runops.ops.local_cluster`), which
writes this file and finds it through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import RunOpsError

DATABASE = "runops"
APP_ROLE = "runops_app"
HOME_DIR = ".runops"
# Names the local stores' directory (the `.runops/` itself) and turns the search off.
HOME_VARIABLE = "RUNOPS_HOME"


def no_local_stores() -> str:
    """What to say when :func:`read_state` finds nothing where :func:`default_home` looked."""
    where = (f"in {HOME_VARIABLE}={os.environ[HOME_VARIABLE]}" if os.environ.get(HOME_VARIABLE)
             else "in this directory or its parents")
    return (f"no local stores {where}: run `runops dev up` (or set RUNOPS_CONTROL_PLANE_URL and "
            "RUNOPS_RUN_OPS_URL)")


def find_home(start: Path | None = None) -> Path | None:
    """The nearest ``.runops/`` holding a state file in ``start`` (default the current directory)
    or one of its parents, up to the filesystem root, as git finds ``.git``; None when there is
    none. A state file another user owns is passed over: it names servers and a password that
    user chose, and a process must not send its runs to them because it runs below their folder."""
    here = (start or Path.cwd()).absolute()
    for directory in (here, *here.parents):
        state = state_file(directory / HOME_DIR)
        try:
            owner = state.stat().st_uid
        except OSError:
            continue
        if owner == os.geteuid():
            return directory / HOME_DIR
    return None


def default_home() -> Path:
    """Where the local stores of ``runops dev up`` are, or would be created: ``RUNOPS_HOME`` when
    set; else the nearest ``.runops/`` up from the current directory (:func:`find_home`); else
    ``.runops/`` in the current directory."""
    explicit = os.environ.get(HOME_VARIABLE)
    if explicit:
        return Path(explicit).absolute()
    return find_home() or Path.cwd() / HOME_DIR


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
        raise RunOpsError(no_local_stores())
    return {store: app_url(raw["app_password"], cluster["port"]) for store, cluster in raw["clusters"].items()}
