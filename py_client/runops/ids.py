"""Residency by id shape — the Python twin of runops.classify_residency (tested against it)."""

from __future__ import annotations

import re
from typing import Literal

Residency = Literal["LEGACY", "NEW"]

_PREFIX = re.compile(r"[a-z]+_")
_CUID = re.compile(r"c[0-9a-z]{24}")
_KSUID = re.compile(r"[0-9A-Za-z]{27}")
KSUID_MAX = "aWgEPTl1tmebfsQzFP4bxwgy80V"


def strip_prefix(id_: str) -> str:
    """Drop one friendly prefix (``run_``, ``batch_`` …) if there is one."""
    m = _PREFIX.match(id_)
    return id_[m.end() :] if m else id_


def try_classify_residency(id_: str | None) -> Residency | None:
    if id_ is None:
        return None
    bare = strip_prefix(id_)
    # fullmatch, not match + "$": Python's "$" also matches before a trailing newline.
    if _CUID.fullmatch(bare):
        return "LEGACY"
    if _KSUID.fullmatch(bare) and bare <= KSUID_MAX:  # str comparison is byte order for ASCII
        return "NEW"
    return None


def classify_residency(id_: str | None) -> Residency:
    from .errors import UnclassifiableId

    residency = try_classify_residency(id_)
    if residency is None:
        raise UnclassifiableId(f"unclassifiable id {id_!r}: expected a 25-character cuid or a 27-character KSUID")
    return residency


def store_for(residency: Residency) -> str:
    return "CONTROL_PLANE" if residency == "LEGACY" else "RUN_OPS"


def generate_ksuid() -> str:
    """A Segment-compatible KSUID, minted client-side (about 2 µs, against ~15 µs in PL/pgSQL).
    Tests and tools only: cyksuid comes with the ``test`` extra, not with the runtime."""
    from cyksuid.v2 import ksuid

    return str(ksuid())


# -- shards: the Python twin of runops.shard_of_id (sql/functions/shards.sql, tested against it) --

_BASE62 = {ch: i for i, ch in enumerate("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")}
_62_18 = 62**18


def ksuid_top40(bare: str) -> int:
    """The top 40 bits (seconds and shard byte) of a bare KSUID minted with a shard byte: fixed by
    its first 9 base62 characters (docs/scale-out.md, "Ids name their shard")."""
    value = 0
    for ch in bare[:9]:
        value = value * 62 + _BASE62[ch]
    return (value * _62_18) >> 120


def shard_of(id_: str | None, ids_since: int) -> int | None:
    """The run-ops shard a NEW id names (byte 4 of its raw bytes), given the deployment's
    cut-over second (an id minted before it lives on shard 0); None for a LEGACY or
    unclassifiable id. No lookup, no round trip."""
    if try_classify_residency(id_) != "NEW":
        return None
    assert id_ is not None
    top40 = ksuid_top40(strip_prefix(id_))
    return 0 if top40 >> 8 < ids_since else top40 & 0xFF


def shard_store(shard: int) -> str:
    """The client's name for run-ops shard ``shard``: RUN_OPS for shard 0 (the single run-ops
    store of a deployment without shards), RUN_OPS_<k> for the others, as `runops dev up --shards`
    names their clusters."""
    return "RUN_OPS" if shard == 0 else f"RUN_OPS_{shard}"


def store_shard(store: str) -> int | None:
    """The shard number of a store name of :func:`shard_store`, None for the control plane."""
    if store == "RUN_OPS":
        return 0
    if store.startswith("RUN_OPS_") and store[8:].isdigit():
        return int(store[8:])
    return None
