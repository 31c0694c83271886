"""Read and validate instruction data: LLaVA JSON/JSONL, TRL conversational files, `datasets` dirs, Hub ids.

Every source is normalised to the same small record shape, so the mixing code never looks at a file format:

    {"id": "42", "images": ["coco/42.jpg"], "turns": [("user", "What is this?", 1), ("assistant", "A cat.", 0)]}

Each turn is `(role, text, n_images)`: `text` has its image placeholders removed and `n_images` says how many
images that turn carried (LLaVA's training code moves them to the start of the turn; so do we).

Large JSON files are scanned in chunks and each record is kept as its raw text until it is chosen, so a
665k-record mix665k file costs about its own size in memory rather than several times that as Python objects.

Example:
    >>> src = open_source("llava_med.json")          # doctest: +SKIP
    >>> len(src.ids), next(src.records([0]))["turns"][0][0]  # doctest: +SKIP
    (2000, 'user')
"""

from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_CHUNK_BYTES = 16 << 20

Record = dict[str, Any]


class MixDataError(ValueError):
    """A bad input record or argument: names the file, the record id and the field, and says how to fix it.

    Example:
        >>> str(MixDataError("a.json", "7", "conversations", "is missing", "add a conversations list"))
        "a.json: record '7', field 'conversations': is missing. Fix: add a conversations list."
    """

    def __init__(self, file: str, record_id: str | None, field: str | None, problem: str, fix: str):
        self.file, self.record_id, self.field = str(file), record_id, field
        where = [f"record {record_id!r}"] * (record_id is not None) + [f"field {field!r}"] * (field is not None)
        fix += "" if fix.endswith(".") else "."  # a fix may end in "..." or "e.g."
        super().__init__(f"{file}{': ' + ', '.join(where) if where else ''}: {problem}. Fix: {fix}")


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
        if not (isinstance(im, str) and im) and not isinstance(im, dict):
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


def _llava_turns(conv: Any) -> list[tuple[str, str, int]]:
    if not isinstance(conv, list) or not conv:
        raise _Bad("conversations", "is missing, empty or not a list", "give a list of {from, value} turns")
    turns = []
    for i, turn in enumerate(conv):
        role = LLAVA_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
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


def _scan_json(path: Path) -> Iterator[tuple[int, str, Any]]:
    """Yield (index, raw text, parsed object) for each record of a JSON array or JSONL file, in chunks."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"Reading {path.name}",
                                     disable=size < (64 << 20)) as bar:
        buf, pos, eof, index, kind = "", 0, False, 0, None
        while True:
            if not eof:
                chunk = f.read(_CHUNK_BYTES)
                bar.update(len(chunk))
                eof = not chunk
                buf = buf[pos:] + utf8.decode(chunk, final=eof)
                pos = 0
            n = len(buf)
            while True:
                while pos < n and buf[pos] in " \t\r\n,":
                    pos += 1
                if kind is None and pos < n:
                    kind = "array" if buf[pos] == "[" else "lines"
                    pos += kind == "array"
                    continue
                if pos >= n or buf[pos] == "]":
                    break
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    # A record cut by the chunk end fails at the end of the buffer (or in a string running into it):
                    # read more. A failure anywhere else is malformed JSON.
                    if not eof and (e.msg.startswith("Unterminated string") or e.pos >= n - 8):
                        break
                    line = buf.count("\n", 0, e.pos) + 1
                    raise MixDataError(str(path), None, None,
                                       f"malformed JSON in record #{index} ({e.msg}, line {line} of that part)",
                                       f"repair the file (check it with `python -m json.tool {path}`)") from None
                yield index, buf[pos:end], obj
                index += 1
                pos = end
            if eof and (pos >= n or buf[pos] == "]"):
                if kind is None:
                    raise MixDataError(str(path), None, None, "the file holds no records",
                                       "give a JSON list of records or one JSON record per line")
                return


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
    check = normalize_record if validate == "all" else None
    for index, raw, obj in _scan_json(path):
        ids.append(record_id(obj, index))
        if check:
            check(obj, str(path), index)
        raws.append(raw)
    ids = _check_unique(ids, str(path), duplicate_ids)

    decode = json.JSONDecoder().raw_decode  # each raw text is exactly one JSON value: skip json.loads' checks

    def load(i: int) -> Record:
        rec = normalize_record(decode(raws[i])[0], str(path), i)
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

    if os.path.isdir(location):
        ds = datasets.load_from_disk(location)
    else:
        ds = datasets.load_dataset(location, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise MixDataError(location, None, None, f"has no split {split!r} (it has {list(ds)})",
                               "choose one of the splits")
        ds = ds[split]
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
    """Open any supported source: .json/.jsonl file, `save_to_disk` directory, or Hub dataset id."""
    if os.path.isfile(location):
        return open_json_source(location, name, image_root, duplicate_ids, validate)
    if os.path.isdir(location) or ("/" in location and not location.startswith((".", "/"))
                                   and not location.endswith((".json", ".jsonl"))):
        return open_arrow_source(location, name, image_root, split, duplicate_ids, validate)
    raise MixDataError(location, None, None, "no such file or directory",
                       "give a .json/.jsonl file, a save_to_disk directory, or a Hub dataset id 'org/name'")
