"""Results the store cannot hold, and tasks that exit: a real `runops worker` process runs each
task body exactly once, ends the attempt at once with a named, bounded error, logs boundedly,
and keeps serving. Each body run leaves a line in the file its payload names.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runops import RunOps, TaskContext, TaskRegistry
from runops.client import CONTROL_PLANE, RUN_OPS

if TYPE_CHECKING:
    from .conftest import Stores

ROOT = Path(__file__).resolve().parent.parent
FOUR_MIB = 4 << 20

POISON = TaskRegistry()  # `runops worker --app tests.test_worker_poison:POISON`


def _ran(payload: Any) -> None:
    with open(payload["tally"], "a") as out:
        out.write("ran\n")


@POISON.task("nan-output")
def _nan_output(ctx: TaskContext, payload: Any) -> Any:
    _ran(payload)
    return {"x": float("nan")}


@POISON.task("nul-output")
def _nul_output(ctx: TaskContext, payload: Any) -> Any:
    _ran(payload)
    return {"x": "a\x00b"}


@POISON.task("huge-output")
def _huge_output(ctx: TaskContext, payload: Any) -> Any:
    _ran(payload)
    return {"x": "y" * FOUR_MIB}


@POISON.task("surrogate-output")  # json.dumps writes "\ud800"; jsonb refuses it (22P02)
def _surrogate_output(ctx: TaskContext, payload: Any) -> Any:
    _ran(payload)
    return {"x": "\ud800"}


@POISON.task("huge-error", max_attempts=1)  # an ordinary failure: retried per policy, so one attempt here
def _huge_error(ctx: TaskContext, payload: Any) -> Any:
    _ran(payload)
    raise RuntimeError("z" * FOUR_MIB)


@POISON.task("exit")
def _exit(ctx: TaskContext, payload: Any) -> Any:
    _ran(payload)
    raise SystemExit(3)


@POISON.task("interrupt")
def _interrupt(ctx: TaskContext, payload: Any) -> Any:
    _ran(payload)
    raise KeyboardInterrupt


@POISON.task("nan-child")
def _nan_child(ctx: TaskContext, payload: Any) -> Any:
    _ran(payload)
    return ctx.trigger_and_wait("echo", {"x": float("nan")}).output


@POISON.task("huge-child")
def _huge_child(ctx: TaskContext, payload: Any) -> Any:
    _ran(payload)
    return ctx.trigger_and_wait("echo", {"x": "y" * FOUR_MIB}).output


@POISON.task("echo")
def _echo(ctx: TaskContext, payload: Any) -> Any:
    return payload


# task -> (error name, final status, words the message must hold)
EXPECTED = {
    "nan-output": ("InvalidOutput", "COMPLETED_WITH_ERRORS", "NaN"),
    "nul-output": ("InvalidOutput", "COMPLETED_WITH_ERRORS", "NUL"),
    "huge-output": ("InvalidOutput", "COMPLETED_WITH_ERRORS", "bytes"),
    "surrogate-output": ("InvalidOutput", "COMPLETED_WITH_ERRORS", "22P02"),
    "huge-error": ("RuntimeError", "COMPLETED_WITH_ERRORS", "zzz"),
    "exit": ("SystemExit", "SYSTEM_FAILURE", "3"),
    "interrupt": ("KeyboardInterrupt", "SYSTEM_FAILURE", "KeyboardInterrupt"),
    "nan-child": ("InvalidPayload", "COMPLETED_WITH_ERRORS", "NaN"),
    "huge-child": ("InvalidInput", "COMPLETED_WITH_ERRORS", "bytes"),
}


def test_a_poison_result_runs_its_task_once_and_ends_the_run_with_a_named_bounded_error(
        stores: Stores, client: RunOps, make_env: Any, tmp_path: Path) -> None:
    env = make_env("ksuid").environment_id
    log = tmp_path / "worker.log"
    urls = {"RUNOPS_CONTROL_PLANE_URL": stores.app[CONTROL_PLANE], "RUNOPS_RUN_OPS_URL": stores.app[RUN_OPS]}
    with log.open("w") as out:
        worker = subprocess.Popen([str(Path(sys.executable).parent / "runops"), "worker", "--app",
                                   "tests.test_worker_poison:POISON", "--env", env, "--concurrency", "4",
                                   "--lease", "5"],
                                  cwd=ROOT, env={**os.environ, **urls, "PYTHONUNBUFFERED": "1"}, stdout=out,
                                  stderr=subprocess.STDOUT, text=True)
    try:
        runs = {task: client.trigger_run(env, task, {"tally": str(tmp_path / task)}).run_id for task in EXPECTED}
        got: dict[str, Any] = {}
        for task, run_id in runs.items():
            done = client.wait_for_run(run_id, timeout=60)
            error = done.error or {}
            expected_words = EXPECTED[task][2]
            got[task] = (error.get("name"), done.status, expected_words in error.get("message", ""),
                         done.attempt_number, (tmp_path / task).read_text().count("ran"))
            assert len(json.dumps(error)) < 20_000, (task, len(json.dumps(error)))
        assert got == {task: (name, status, True, 1, 1) for task, (name, status, _) in EXPECTED.items()}
        # The worker lived through all of it and still serves.
        after = client.trigger_run(env, "echo", {"still": "serving"})
        assert client.wait_for_run(after.run_id, timeout=30).output == {"still": "serving"}
        assert worker.poll() is None
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    lines = log.read_text().splitlines()
    assert max(len(line) for line in lines) < 5_000 and log.stat().st_size < 200_000, log.stat().st_size
