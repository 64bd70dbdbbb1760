"""Writes ``runops/client.py`` (the blocking client) from ``runops/aio.py`` (the asyncio client).

    python -m runops._codegen.async_to_sync           # rewrite client.py
    python -m runops._codegen.async_to_sync --check   # exit 1 when client.py is stale

psycopg generates its blocking classes from its async ones in the same spirit (its
``tools/async_to_sync.py``, an AST transform); this one edits tokens instead, so the comments and
the layout of aio.py survive:

* ``async def``/``async with``/``async for`` lose ``async``; ``await`` goes; ``Awaitable[X]`` is ``X``;
* the names in RENAMES are renamed, in code, comments and strings alike, and ``asyncio.sleep`` is
  ``time.sleep``;
* ``if True:  # ASYNC`` keeps only its ``else:`` branch, dedented (or nothing);
* a line that ends in ``# NOSYNC`` is left out, with the block it opens;
* a continuation line aligned under a bracket moves with the bracket; imports that are no longer
  used go, and the names of each ``from`` import are sorted as ruff's isort sorts them;
* the module docstring is SYNC_DOCSTRING, under a "generated" line.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import sys
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
SOURCE = PACKAGE / "aio.py"
TARGET = PACKAGE / "client.py"

GENERATED = "# Generated from aio.py by `python -m runops._codegen.async_to_sync`: edit aio.py, not this file.\n"

SYNC_DOCSTRING = '''"""The blocking client, :class:`RunOps`: every call of the SQL API on psycopg ``ConnectionPool`` s,
one pool per store.

    with RunOps.connect() as ro:
        run = ro.trigger_run(env_id, "send-email", {"to": "a@example.com"}, idempotency_key="order-42")
        done = ro.wait_for_run(run.run_id, timeout=60)

Generated from runops/aio.py, the one source of both clients; a test fails when this file is
stale. What decides anything without I/O lives in runops._client_base; every statement is one of
runops.queries.
"""'''

RENAMES = {
    "AsyncRunOps": "RunOps",
    "AsyncConnectionPool": "ConnectionPool",
    "AsyncConnection": "Connection",
    "AsyncIterator": "Iterator",
    "asynccontextmanager": "contextmanager",
    "call_with_retry_async": "call_with_retry",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
}
DOTTED_RENAMES = {("asyncio", "sleep"): "time"}
_WORDS = re.compile(r"\b(" + "|".join(map(re.escape, RENAMES)) + r")\b")
_TEXT_ASYNC = re.compile(r"\bawait |\basync (?=with\b|for\b|def\b)")

ASYNC_BLOCK = re.compile(r"if True:\s+# ASYNC")
NOSYNC = "# NOSYNC"
INDENT = "    "


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _block_end(lines: list[str], start: int) -> int:
    """The index after the block that ``lines[start]`` opens (its more-indented lines); the
    trailing blank lines stay outside."""
    base = _indent(lines[start])
    end = start + 1
    last = start
    while end < len(lines):
        if lines[end].strip():
            if _indent(lines[end]) <= base:
                break
            last = end
        end += 1
    return last + 1


def drop_async_blocks(lines: list[str]) -> list[str]:
    """``# NOSYNC`` lines (with their blocks) and ``if True:  # ASYNC`` branches out."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith(NOSYNC):
            end = _block_end(lines, i)
            if end > i + 1:  # a definition: its blank lines after it go too
                while end < len(lines) and not lines[end].strip():
                    end += 1
            i = end
            continue
        if ASYNC_BLOCK.fullmatch(line.strip()):
            end = _block_end(lines, i)
            follow = end
            while follow < len(lines) and not lines[follow].strip():
                follow += 1
            if follow < len(lines) and lines[follow].strip() == "else:" and _indent(lines[follow]) == _indent(line):
                stop = _block_end(lines, follow)
                out += [body.removeprefix(INDENT) for body in lines[follow + 1:stop]]
                i = stop
            else:
                i = end
            continue
        out.append(line)
        i += 1
    return out


def rename_text(text: str) -> str:
    """A comment's or a string's words, as the blocking client says them."""
    return _TEXT_ASYNC.sub("", _WORDS.sub(lambda m: RENAMES[m.group(1)], text))


Edit = tuple[tuple[int, int], tuple[int, int], str]  # start (row, col), end (row, col), new text


def _string_spans(tokens: list[tokenize.TokenInfo]) -> list[tuple[int, int]]:
    """Index ranges of the tokens that make one string literal each (on Python >= 3.12 an
    f-string is several tokens, FSTRING_START ... FSTRING_END)."""
    start_type = getattr(tokenize, "FSTRING_START", None)
    end_type = getattr(tokenize, "FSTRING_END", None)
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(tokens):
        if tokens[i].type == tokenize.STRING:
            spans.append((i, i))
        elif start_type is not None and tokens[i].type == start_type:
            depth, j = 0, i
            while True:
                if tokens[j].type == start_type:
                    depth += 1
                elif tokens[j].type == end_type:
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            spans.append((i, j))
            i = j
        i += 1
    return spans


def token_edits(source: str) -> list[Edit]:
    lines = source.splitlines(keepends=True)
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    significant = [t for t in tokens if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT,
                                                       tokenize.INDENT, tokenize.DEDENT)]
    edits: list[Edit] = []
    in_string: set[int] = set()

    def text_of(start: tuple[int, int], end: tuple[int, int]) -> str:
        if start[0] == end[0]:
            return lines[start[0] - 1][start[1]:end[1]]
        middle = "".join(lines[start[0]:end[0] - 1])
        return lines[start[0] - 1][start[1]:] + middle + lines[end[0] - 1][:end[1]]

    for first, last in _string_spans(tokens):
        start, end = tokens[first].start, tokens[last].end
        in_string.update(range(first, last + 1))
        old = text_of(start, end)
        new = rename_text(old)
        if new != old:
            edits.append((start, end, new))
    for tok in tokens:
        if tok.type == tokenize.COMMENT and rename_text(tok.string) != tok.string:
            edits.append((tok.start, tok.end, rename_text(tok.string)))

    index = {id(t): n for n, t in enumerate(significant)}
    order = {id(t): n for n, t in enumerate(tokens)}
    for n, tok in enumerate(significant):
        if tok.type != tokenize.NAME or order[id(tok)] in in_string:
            continue
        after = significant[n + 1] if n + 1 < len(significant) else None
        if tok.string == "async" and after is not None and after.string in ("def", "with", "for"):
            edits.append((tok.start, after.start, ""))
        elif tok.string == "await" and after is not None:
            edits.append((tok.start, after.start, ""))
        elif tok.string == "Awaitable" and after is not None and after.string == "[":
            edits.append((tok.start, after.end, ""))
            depth = 0
            for closing in significant[index[id(after)]:]:
                depth += closing.string == "["
                depth -= closing.string == "]"
                if depth == 0:
                    edits.append((closing.start, closing.end, ""))
                    break
        elif (after is not None and after.string == "." and n + 2 < len(significant)
              and (tok.string, significant[n + 2].string) in DOTTED_RENAMES):
            edits.append((tok.start, tok.end, DOTTED_RENAMES[(tok.string, significant[n + 2].string)]))
        elif tok.string in RENAMES:
            edits.append((tok.start, tok.end, RENAMES[tok.string]))
    return edits


def continuation_shifts(source: str, edits: list[Edit]) -> dict[int, int]:
    """How far each continuation line aligned under an open bracket moves left: as far as the
    bracket moved (the edits before it on its line, plus its own line's move)."""
    removed: dict[int, list[tuple[int, int]]] = {}
    for (srow, scol), (erow, ecol), new in edits:
        if srow == erow:
            removed.setdefault(srow, []).append((ecol, (ecol - scol) - len(new)))
    shifts: dict[int, int] = {}
    stack: list[tuple[int, int]] = []
    row_seen = 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            continue
        row, col = tok.start
        if row != row_seen and tok.type != tokenize.NL:
            row_seen = row
            if stack:
                brow, bcol = stack[-1]
                if col > bcol:
                    moved = shifts.get(brow, 0) + sum(d for end, d in removed.get(brow, []) if end <= bcol)
                    if moved:
                        shifts[row] = moved
        if tok.type == tokenize.OP and tok.string in "([{":
            stack.append(tok.start)
        elif tok.type == tokenize.OP and tok.string in ")]}":
            stack.pop()
        if tok.end[0] > row:  # a multi-line string: the rows inside it are text, not code
            row_seen = tok.end[0]
    return shifts


def apply(source: str, edits: list[Edit], shifts: dict[int, int]) -> str:
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    text = source
    for (srow, scol), (erow, ecol), new in sorted(edits, reverse=True):
        a, b = starts[srow - 1] + scol, starts[erow - 1] + ecol
        text = text[:a] + new + text[b:]
    out = text.splitlines(keepends=True)
    for row, shift in shifts.items():
        line = out[row - 1]
        take = min(shift, _indent(line))
        out[row - 1] = line[take:]
    return "".join(out)


def _sort_key(name: str) -> tuple[int, str, str]:
    """ruff's isort order within a ``from`` import: constants, classes, the rest; each
    case-insensitively."""
    kind = 0 if len(name) > 1 and name.isupper() else 1 if name[:1].isupper() else 2
    return kind, name.lower(), name


def tidy_imports(source: str, line_length: int = 120) -> str:
    """Drops imported names the module no longer uses and re-sorts what is left."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    spans = {row for node in imports for row in range(node.lineno, (node.end_lineno or node.lineno) + 1)}
    used = {tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.NAME and tok.start[0] not in spans}
    for node in tree.body:  # __all__ names what the module exports
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            used |= {str(e.value) for e in getattr(node.value, "elts", []) if isinstance(e, ast.Constant)}
    for node in reversed(imports):
        first, last = node.lineno - 1, (node.end_lineno or node.lineno)
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        kept = [a for a in node.names if (a.asname or a.name).split(".")[0] in used]
        if len(kept) == len(node.names) and isinstance(node, ast.Import):
            continue
        rendered: list[str] = []
        if kept and isinstance(node, ast.Import):
            rendered = [f"import {a.name}" + (f" as {a.asname}" if a.asname else "") + "\n" for a in kept]
        elif kept and isinstance(node, ast.ImportFrom):
            names = sorted((a.name + (f" as {a.asname}" if a.asname else "") for a in kept), key=_sort_key)
            head = f"from {'.' * node.level}{node.module or ''} import "
            one_line = head + ", ".join(names)
            if last - first == 1 and len(one_line) <= line_length:
                rendered = [one_line + "\n"]
            else:
                rendered = [head + "(\n", *(f"{INDENT}{name},\n" for name in names), ")\n"]
        lines[first:last] = rendered
    return "".join(lines)


def replace_docstring(source: str) -> str:
    tree = ast.parse(source)
    doc = tree.body[0]
    if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
        raise SystemExit("aio.py must start with its module docstring")
    lines = source.splitlines(keepends=True)
    return GENERATED + "".join(lines[:doc.lineno - 1]) + SYNC_DOCSTRING + "\n" + "".join(lines[doc.end_lineno or 0:])


def generate(source: str) -> str:
    """client.py's text for aio.py's ``source``."""
    text = "".join(drop_async_blocks(source.splitlines(keepends=True)))
    edits = token_edits(text)
    text = apply(text, edits, continuation_shifts(text, edits))
    return replace_docstring(tidy_imports(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if client.py is not what aio.py generates")
    args = parser.parse_args(argv)
    wanted = generate(SOURCE.read_text())
    if args.check:
        if TARGET.read_text() != wanted:
            print(f"{TARGET} is stale: run `python -m runops._codegen.async_to_sync`", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
