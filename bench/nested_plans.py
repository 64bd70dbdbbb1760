"""Where a call's time goes statement by statement: auto_explain's plans of every nested statement,
sent back to the session as notices and summed by statement text. Shared by the profiling
scripts (profile_batches.py, profile_dequeue.py). Not a test."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import psycopg


def explain_nested(conn: psycopg.Connection[Any], *, min_ms: int, options: tuple[str, ...]) -> list[str]:
    """Turn auto_explain on for ``conn`` (analyze, no per-node timing, nested statements and
    triggers, plans of ``min_ms`` or more, plus ``options`` such as ``"log_buffers"``) and return
    the list its notices will be appended to."""
    notes: list[str] = []
    conn.add_notice_handler(lambda d: notes.append(d.message_primary or ""))
    conn.execute("LOAD 'auto_explain'")
    for setting in (f"log_min_duration = {min_ms}", "log_analyze = on", "log_timing = off",
                    *(f"{option} = on" for option in options), "log_triggers = on",
                    "log_nested_statements = on", "log_level = 'notice'"):
        conn.execute(f"SET auto_explain.{setting}")
    return notes


def statement_times(notes: list[str], *, width: int, detail: tuple[str, ...],
                    most: int | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """ms spent per statement text (cut to ``width``), and for each its plan's top node followed by
    the plan lines starting with one of ``detail`` (at most ``most`` of them)."""
    spent: dict[str, float] = defaultdict(float)
    details: dict[str, str] = {}
    for note in notes:
        duration = re.match(r"duration: ([0-9.]+) ms", note)
        text = re.search(r"Query Text: (.*?)\n(?=\S)", note, re.S)
        if not duration or not text:
            continue
        key = " ".join(text.group(1).split())[:width]
        spent[key] += float(duration.group(1))
        plan = note[text.end():].splitlines()
        extra = [line.strip() for line in plan if line.strip().startswith(detail)][:most]
        details[key] = "; ".join([plan[0].split("  (")[0].strip(), *extra]) if plan else ""
    return spent, details
