"""Read and validate instruction data: LLaVA JSON/JSONL, TRL conversational files, `datasets` dirs, Hub ids.

Every source is normalised to the same small record shape, so the mixing code never looks at a file format:

    {"id": "42", "images": ["coco/42.jpg"], "turns": [("user", "What is this?", 1), ("assistant", "A cat.", 0)]}

Each turn is `(role, text, n_images)`: `text` has its image placeholders removed and `n_images` says how many
images that turn carried (LLaVA's training code moves them to the start of the turn; so do we).

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

IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

Record = dict[str, Any]


class _Bad(Exception):
    """Raised inside record validation; `normalize_record` adds the file and record id."""

    def __init__(self, field: str | None, problem: str, fix: str):
        super().__init__(field, problem, fix)


def _check_turns(turns: list[tuple[str, str, int]]) -> None:
    """Turns must be: optional system, then user/assistant alternating, ending with a non-empty reply."""
    offset = 1 if turns and turns[0][0] == "system" else 0
    if len(turns) == offset:
        raise _Bad("conversations", "has no user/assistant turns", "give at least one human turn and one gpt reply")
    for i in range(offset, len(turns)):
        role, text, _ = turns[i]
        expected = "user" if (i - offset) % 2 == 0 else "assistant"
        if role != expected:
            raise _Bad(f"conversations[{i}]", f"turn {i} is {role!r} where {expected!r} was expected (turns out of "
                       "order)", "order the turns human, gpt, human, gpt, ... starting with a human turn")
        if role == "assistant" and not text.strip():
            raise _Bad(f"conversations[{i}]", "the reply is empty", "give every gpt turn a non-empty reply or drop "
                       "the record")
    if turns[-1][0] != "assistant":
        raise _Bad("conversations", "ends with a human turn that has no reply",
                   "end every conversation with a gpt reply or drop the unanswered last turn")


def _split_placeholders(text: str) -> tuple[str, int]:
    n = text.count(IMAGE_PLACEHOLDER)
    return (text.replace(IMAGE_PLACEHOLDER, "").strip() if n else text), n


def record_id(obj: Any, index: int) -> str:
    """The record's `id` as a string, or its position in the source when it has none."""
    rid = obj.get("id") if isinstance(obj, dict) else None
    return str(index) if rid is None else str(rid)


def normalize_record(obj: Any, file: str, index: int) -> Record:
    """Validate one LLaVA (`conversations`) or TRL (`messages`) record and return the normalised form."""
    try:
        return _normalize(obj, index)
    except _Bad as bad:
        raise MixDataError(file, record_id(obj, index), *bad.args) from None


def _normalize(obj: Any, index: int) -> Record:
    if not isinstance(obj, dict):
        raise _Bad(None, f"record #{index} is a {type(obj).__name__}, not an object",
                   "make every record a JSON object with 'conversations' (LLaVA) or 'messages' (TRL)")
    if "conversations" in obj:
        turns = _llava_turns(obj["conversations"])
        images, fld = obj.get("image", obj.get("images")), "image"
    elif "messages" in obj:
        turns = _trl_turns(obj["messages"])
        images, fld = obj.get("images", obj.get("image")), "images"
    else:
        raise _Bad("conversations", "the record has no 'conversations' (LLaVA) or 'messages' (TRL) list",
                   "add the conversation, or drop the record")
    if images is None:
        images = []
    elif not isinstance(images, list):
        images = [images]
    for k, im in enumerate(images):
        if not _is_image(im):
            raise _Bad(f"{fld}[{k}]" if len(images) > 1 else fld, f"expected an image path, got {im!r}",
                       "give image paths as non-empty strings relative to the image root")
    n_placeholders = sum(t[2] for t in turns)
    if n_placeholders and n_placeholders != len(images):
        raise _Bad(fld, f"the text has {n_placeholders} image placeholder(s) but the record has {len(images)} "
                   "image(s)", "give one image per <image> placeholder")
    _check_turns(turns)
    if images and not n_placeholders:  # LLaVA attaches an unplaced image to the first user turn
        first = next(i for i, t in enumerate(turns) if t[0] == "user")
        turns[first] = (turns[first][0], turns[first][1], len(images))
    return {"id": record_id(obj, index), "images": images, "turns": turns}


def _is_image(image: Any) -> bool:
    """A non-empty path, or `datasets.Image` storage: {"bytes": bytes or None, "path": str or None}, not both None."""
    if isinstance(image, dict):
        data, path = image.get("bytes"), image.get("path")
        return isinstance(data, (bytes, type(None))) and isinstance(path, (str, type(None))) and bool(data or path)
    return isinstance(image, str) and bool(image)


def _llava_turns(conv: Any) -> list[tuple[str, str, int]]:
    if not isinstance(conv, list) or not conv:
        raise _Bad("conversations", "is missing, empty or not a list", "give a list of {from, value} turns")
    turns = []
    for i, turn in enumerate(conv):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        role = LLAVA_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise _Bad(f"conversations[{i}].from", f"unknown speaker in {turn!r}",
                       "use 'from': 'human' or 'gpt' (or 'system' first)")
        value = turn.get("value")
        if not isinstance(value, str):
            raise _Bad(f"conversations[{i}].value", f"expected a string, got {type(value).__name__}",
                       "give every turn a text 'value'")
        n = value.count(IMAGE_PLACEHOLDER)  # inlined `_split_placeholders`: this loop runs for every turn
        turns.append((role, value.replace(IMAGE_PLACEHOLDER, "").strip() if n else value, n))
    return turns


def _trl_turns(messages: Any) -> list[tuple[str, str, int]]:
    if not isinstance(messages, list) or not messages:
        raise _Bad("messages", "is missing, empty or not a list", "give a list of {role, content} messages")
    turns = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise _Bad(f"messages[{i}].role", f"unknown role in {msg!r}", "use 'system', 'user' or 'assistant'")
        content = msg.get("content")
        if isinstance(content, str):
            turns.append((msg["role"], *_split_placeholders(content)))
            continue
        if not isinstance(content, list):
            raise _Bad(f"messages[{i}].content", f"expected a string or a list of parts, got "
                       f"{type(content).__name__}", "give content as a string or [{'type': 'text', 'text': ...}, "
                       "{'type': 'image'}]")
        texts, n_images = [], 0
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                n_images += 1
            elif kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise _Bad(f"messages[{i}].content", f"unsupported content part {part!r}",
                           "use {'type': 'text', 'text': str} or {'type': 'image'} parts")
        text, n_inline = _split_placeholders("".join(texts))
        turns.append((msg["role"], text, n_images + n_inline))
    return turns


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
