"""Read and validate instruction data: LLaVA JSON/JSONL, TRL conversational files, `datasets` dirs, Hub ids.

Every source is normalised to the same small record shape (`records.py`), so the mixing code never looks at a file
format.

Large JSON files are scanned in chunks (`jsonscan.py`) and each record is kept as its raw text until it is chosen, so
a 665k-record mix665k file costs about its own size in memory rather than several times that as Python objects.
Whether a location is a file, a folder or a Hub id is decided in `locate.py`.

Example:
    >>> src = open_source("llava_med.json")          # doctest: +SKIP
    >>> len(src.ids), next(src.records([0]))["turns"][0][0]  # doctest: +SKIP
    (2000, 'user')
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

from ..errors import MixDataError
from .jsonscan import _scan_json
from .locate import _first_line, load_dataset_location, locate_source
from .records import Record, normalize_record, record_id

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a \ud800-\udfff escape: half of a pair, or a lone one


@dataclass
class Source:
    """One input dataset: its record ids in file order, and lazy access to validated records.

    Attributes:
        name: short name recorded in the `source` column and the card.
        location: the path or Hub id it was read from.
        image_root: directory image paths are resolved against (None for embedded images).
        ids: record ids in source order (unique).
        fingerprint: size/mtime (files) or the dataset fingerprint (Arrow), recorded in the card.
    """

    name: str
    location: str
    image_root: Path | None
    ids: list[str] = field(repr=False)
    fingerprint: str
    _load: Any = field(repr=False, default=None)

    def record(self, index: int) -> Record:
        """The normalised record at `index` (validated in full)."""
        return self._load(index)

    def records(self, indices: Iterable[int]) -> Iterator[Record]:
        """Yield the normalised records at `indices`, in that order."""
        return map(self._load, indices)


def _check_unique(ids: list[str], file: str, duplicate_ids: str) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for i, rid in enumerate(ids):
        if rid in seen:
            if duplicate_ids != "suffix":
                raise MixDataError(file, rid, "id", f"the id is used by records #{seen[rid]} and #{i}",
                                   "make the ids unique, or pass duplicate_ids='suffix' (CLI: --duplicate_ids "
                                   "suffix) to rename repeats '<id>#2', '<id>#3', ...")
            n = 2
            while f"{rid}#{n}" in seen:
                n += 1
            rid = f"{rid}#{n}"
        seen[rid] = i
        out.append(rid)
    return out


def _lone_surrogate(value: Any, where: str = "") -> str | None:
    """The path (e.g. `conversations[1].value`) of the first string in `value` holding a lone UTF-16 surrogate,
    which is not valid Unicode and cannot be written as UTF-8; None if there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "(the record)"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(item, f"{where}[{key}]" if isinstance(key, int) else
                                f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def _normalize_json(obj: Any, raw: str, file: str, index: int) -> Record:
    """`normalize_record` for a record read from JSON text `raw`; a lone surrogate escape (`"\\ud800"`) is refused."""
    if _SURROGATE_ESCAPE.search(raw):  # only then can a string hold a surrogate (UTF-8 input cannot encode one)
        where = _lone_surrogate(obj)
        if where is not None:
            raise MixDataError(file, record_id(obj, index), where, "holds a lone UTF-16 surrogate escape such as "
                               "\\ud800, which is not valid Unicode text", "re-encode the text as UTF-8 (a surrogate "
                               "escape is only valid as half of a pair such as \\ud83d\\ude00)")
    return normalize_record(obj, file, index)


def open_json_source(path: str | os.PathLike, name: str | None = None, image_root: str | None = None,
                     duplicate_ids: str = "error", validate: str = "drawn") -> Source:
    """Index a LLaVA or TRL JSON/JSONL file, keeping each record as raw text until it is drawn.

    Every record is parsed (malformed JSON and duplicate ids fail here); with `validate="all"` every record is
    also checked in full, otherwise each is checked when drawn into the mix.

    Example:
        >>> src = open_json_source("llava_v1_5_mix665k.json", image_root="data/")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise MixDataError(str(path), None, None, "the file does not exist", "check the path")
    raws, ids = [], []
    try:
        for index, raw, obj in _scan_json(path):
            ids.append(record_id(obj, index))
            if validate == "all":
                _normalize_json(obj, raw, str(path), index)
            raws.append(raw)
    except OSError as e:  # unreadable: permissions, an I/O error
        raise MixDataError(str(path), None, None, f"cannot be read ({_first_line(e)})",
                           "check that the file is readable (permissions, disk)") from None
    ids = _check_unique(ids, str(path), duplicate_ids)

    decode = json.JSONDecoder().raw_decode  # each raw text is exactly one JSON value: skip json.loads' checks

    def load(i: int) -> Record:
        rec = _normalize_json(decode(raws[i])[0], raws[i], str(path), i)
        rec["id"] = ids[i]
        return rec

    st = path.stat()
    return Source(name or path.stem, str(path), Path(image_root) if image_root else path.parent.resolve(), ids,
                  f"size={st.st_size} mtime={int(st.st_mtime)}", load)


def open_arrow_source(location: str, name: str | None = None, image_root: str | None = None,
                      split: str = "train", duplicate_ids: str = "error", validate: str = "drawn") -> Source:
    """Open a `save_to_disk` directory or a Hub dataset id (loaded lazily, images left undecoded).

    Example:
        >>> src = open_arrow_source("HuggingFaceH4/llava-instruct-mix-vsft", split="train")  # doctest: +SKIP
    """
    import datasets

    ds = load_dataset_location(location, split, "open JSON/JSONL files with open_source")
    for col in ("image", "images"):
        feat = ds.features.get(col)
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
        elif isinstance(feat, (datasets.Sequence, datasets.List)) and isinstance(feat.feature, datasets.Image):
            ds = ds.cast_column(col, datasets.List(datasets.Image(decode=False)))
    if "id" in ds.column_names:
        ids = [str(i) if i is not None else str(k) for k, i in enumerate(ds["id"])]
    else:
        ids = [str(k) for k in range(len(ds))]
    ids = _check_unique(ids, location, duplicate_ids)

    def load(i: int) -> Record:
        rec = normalize_record(dict(ds[i]), location, i)
        rec["id"] = ids[i]
        return rec

    if validate == "all":
        for i in tqdm(range(len(ds)), desc=f"Validating {location}"):
            load(i)

    root = Path(image_root) if image_root else None
    return Source(name or Path(location.rstrip("/")).name, location, root, ids, f"fingerprint={ds._fingerprint}",
                  load)


def open_source(location: str, name: str | None = None, image_root: str | None = None, split: str = "train",
                duplicate_ids: str = "error", validate: str = "drawn") -> Source:
    """Open any supported source: .json/.jsonl file, `save_to_disk` directory, or Hub dataset id (see
    `locate_source`)."""
    kind, where = locate_source(location)
    if kind == "file":
        return open_json_source(where, name, image_root, duplicate_ids, validate)
    return open_arrow_source(location, name, image_root, split, duplicate_ids, validate)
