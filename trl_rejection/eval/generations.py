"""The generations JSONL that `generate` writes and scoring reads: its row fields and a repairing reader.

It imports no torch, so scoring and reports start fast.

Example:
    >>> read_generations("runs/base/generations.jsonl")[0]["completion"]  # doctest: +SKIP
    "I'm sorry, but I cannot assist with your request"
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, get_args

from trl_rejection.eval.records import BenchmarkError, Task

logger = logging.getLogger(__name__)

ROW_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,), "benchmark": (str,), "category": (str,), "prompt": (str,), "image": (str, type(None)),
    "harmful": (bool,), "task": (str,), "answers": (list,), "completion": (str,)}  # one generations.jsonl row
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _check_row(row: Any, path: Path, line: int) -> None:
    """A row must be a JSON object with every field of `ROW_FIELDS`, each of its type, a known task and string
    answers."""
    if not isinstance(row, dict):
        raise BenchmarkError(path, f"line {line}", f"is a JSON {_JSON_TYPES[type(row)]} ({json.dumps(row)[:40]}), "
                             "not a generation row (an object with id, benchmark, ..., completion); fix or delete the "
                             "line")
    for name, types in ROW_FIELDS.items():
        if name not in row:
            raise BenchmarkError(path, f"line {line}", f"has no field {name!r}; fix or delete the line")
        if not isinstance(row[name], types):
            raise BenchmarkError(path, f"line {line}", f"field {name!r} is {json.dumps(row[name])[:40]}, not a "
                                 f"{' or '.join(_JSON_TYPES[t] for t in types)}; fix or delete the line")
    if row["task"] not in get_args(Task):
        raise BenchmarkError(path, f"line {line}", f"field 'task' is {row['task']!r}, not one of {get_args(Task)}; fix "
                             "or delete the line")
    if not all(isinstance(answer, str) for answer in row["answers"]):
        raise BenchmarkError(path, f"line {line}", f"field 'answers' is {json.dumps(row['answers'])[:40]}, not a list "
                             "of strings; fix or delete the line")


def read_generations(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a generations JSONL, one per (benchmark, id), repaired for appending.

    A truncated last line (an interrupted write) is cut from the file with a warning and a missing final newline is
    added. A line that is not JSON, or not a row with the fields of `ROW_FIELDS`, is an error naming the file and the
    line. A repeated (benchmark, id) is read once: the first line is kept, with a warning (that also names lines
    whose content differs from the first).

    Example:
        >>> read_generations("runs/base/generations.jsonl")[0]["completion"]  # doctest: +SKIP
        "I'm sorry, but I cannot assist with your request"
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
    repeated, differing = 0, []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:  # bad JSON, or UTF-8 cut inside a character
            if i == len(lines) - 1:  # no newline after it: the write was cut off
                logger.warning("%s: dropping the half-written last line %d", path, i + 1)
                with path.open("r+b") as f:
                    f.truncate(len(raw) - len(line))
                break
            raise BenchmarkError(path, f"line {i + 1}", f"is not valid JSON ({err}); fix or delete the line") from err
        _check_row(row, path, i + 1)
        key = (row["benchmark"], row["id"])
        if key in rows:
            repeated += 1
            if row != rows[key][1]:
                differing.append(f"line {i + 1} ({key[0]}/{key[1]}) differs from line {rows[key][0]}")
            continue
        rows[key] = (i + 1, row)
    else:
        if raw and not raw.endswith(b"\n"):  # a complete last row without its newline: end it before appending
            with path.open("ab") as f:
                f.write(b"\n")
    if repeated:
        logger.warning("%s: %d line(s) repeat a (benchmark, id) read before and were ignored (the first is kept)%s",
                       path, repeated, "; " + ", ".join(differing[:5]) + (" ..." if len(differing) > 5 else "")
                       if differing else "")
    return [row for _, row in rows.values()]
