"""The generic benchmark layout: any JSONL / JSON / CSV file or `datasets.save_to_disk` folder with a `prompt`
column, read into `EvalRecord`s.

Example:
    >>> load_generic("my_attacks.jsonl")[0].benchmark  # doctest: +SKIP
    'my_attacks'
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

from trl_rejection.eval.records import BenchmarkError, EvalRecord, existing_image, read_csv, read_json, require_file

_TRUE, _FALSE = {"true", "1", "yes", "unsafe", "harmful"}, {"false", "0", "no", "safe", "benign"}


def _as_bool(value: Any, file: Path, record: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise BenchmarkError(file, record, f"'harmful' must be a boolean (true/false), got {value!r}")


def _generic_rows(path: Path) -> tuple[list[dict[str, Any]], Callable[[Any], str | None]]:
    """Rows of a generic file or `save_to_disk` folder, and a function that turns an `image` value into a path."""
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise BenchmarkError(path, None, "is not a datasets.save_to_disk folder") from err
        if "image" in ds.column_names and isinstance(ds.features["image"], datasets.Image):
            ds = ds.cast_column("image", datasets.Image(decode=False))
        cache = Path(tempfile.gettempdir()) / "trl_rejection_images"  # files named by their content's hash

        def image(value: Any) -> str | None:
            if not value:
                return None
            if isinstance(value, str):
                return str(path / value)
            if value.get("path") and Path(value["path"]).is_file():
                return value["path"]
            target = cache / f"{hashlib.sha1(value['bytes']).hexdigest()}.png"
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(value["bytes"])
            return str(target)

        return list(ds), image
    if path.suffix == ".csv":
        rows: list[dict[str, Any]] = read_csv(path, ("prompt",))
    elif path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise BenchmarkError(path, f"line {i}", f"is not valid JSON ({err})") from err
    elif path.suffix == ".json":
        rows = read_json(path)
        if not isinstance(rows, list):
            raise BenchmarkError(path, None, "expected a JSON list of records")
    else:
        raise BenchmarkError(path, None, "use a .jsonl, .json or .csv file or a datasets.save_to_disk folder")
    return rows, lambda value: str(path.parent / value) if value else None


def load_generic(path: str | Path, benchmark: str | None = None) -> list[EvalRecord]:
    """Any suite in the generic layout: `prompt` (required), `id`, `image` (path relative to the file, or a
    `datasets.Image` column), `category` (default "all"), `harmful` (bool, default true) and, for short-answer
    utility sets, `answers` (list of strings). `benchmark` defaults to the file or folder name.

    Example:
        >>> load_generic("my_attacks.jsonl")[0].benchmark  # doctest: +SKIP
        'my_attacks'
    """
    path = Path(path)
    require_file(path, "Benchmark file", "Pass a .jsonl/.json/.csv file or a datasets.save_to_disk folder")
    rows, image_of = _generic_rows(path)
    name = benchmark or path.stem
    records = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BenchmarkError(path, f"record {n}", "is not an object with a 'prompt'")
        rid = str(row["id"] if row.get("id") is not None else n)
        if not str(row.get("prompt") or "").strip():
            raise BenchmarkError(path, f"record {rid!r}", "needs a non-empty 'prompt'")
        image = image_of(row.get("image"))
        if image is not None:
            existing_image(Path(image), path, f"record {rid!r}")
        answers = row.get("answers")
        if isinstance(answers, str):
            answers = [answers]
        records.append(EvalRecord(rid, name, str(row.get("category") or "all"), row["prompt"], image,
                                  harmful=_as_bool(row.get("harmful", not answers), path, f"record {rid!r}"),
                                  task="short_answer" if answers else "safety", answers=tuple(answers or ())))
    return records
