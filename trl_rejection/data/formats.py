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
import difflib
import json
import os
import re
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

from ..errors import UserError

IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_CHUNK_BYTES = 16 << 20

Record = dict[str, Any]


class MixDataError(UserError):
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


_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace
_WS_CHARS = " \t\n\r"
_LINE_WS = re.compile(r"[ \t\r]*")  # JSON whitespace within a line
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a \ud800-\udfff escape: half of a pair, or a lone one


class _Text:
    """A JSON file's text, decoded chunk by chunk as UTF-8 (a leading BOM dropped).

    `buf[pos:]` is the unread text and `buf[0]` is character number `start` of the file. Lines and columns for
    messages are counted only when an error is reported (counting them for every chunk costs ~7% of a scan).
    """

    def __init__(self, f: Any, path: Path, bar: Any):
        self.f, self.path, self.bar = f, path, bar
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.eof = "", 0, False
        self.start = 0
        self.offset = 0  # bytes read before the current chunk
        self.index = 0  # records read so far (for messages)
        self._bad: tuple[int, str] | None = None  # (byte offset, problem) of the first bytes that are not UTF-8

    def refill(self) -> None:
        """Drop the read text and append the next chunk; sets `eof` after the last one. Text that is not UTF-8 is
        refused once the valid text before it has been read (so the message can name the record)."""
        if self._bad is not None:
            at, problem = self._bad
            raise self.error(f"is not UTF-8 at byte offset {at} (line {self._count_lines(at) + 1}, record "
                             f"#{self.index}): {problem}", f"re-encode the file as UTF-8, e.g. `iconv -f LATIN1 -t "
                             f"UTF-8 {self.path} > fixed{self.path.suffix}` for Latin-1 text")
        self.start += self.pos
        chunk = self.f.read(_CHUNK_BYTES)
        self.bar.update(len(chunk))
        if self.offset == 0:
            chunk = self._first(chunk)
        try:
            text = self.utf8.decode(chunk, final=not chunk)
            self.eof = not chunk
        except UnicodeDecodeError as e:
            data = e.object  # the decoder's pending bytes + this chunk
            why = "the file ends inside a character: is it truncated?" if not chunk else "Latin-1 or cp1252 text?"
            self._bad = (self.offset - (len(data) - len(chunk)) + e.start,
                         f"{e.reason} {data[e.start:e.end].hex(' ')} ({why})")
            text = data[:e.start].decode("utf-8")
        self.buf, self.pos = self.buf[self.pos:] + text, 0
        self.offset += len(chunk)

    def _first(self, chunk: bytes) -> bytes:
        """The first chunk without its UTF-8 BOM; UTF-16 and UTF-32 text is refused."""
        while 0 < len(chunk) < 4 and (more := self.f.read(4 - len(chunk))):  # tiny test chunks: see the BOM
            chunk += more
        if chunk.startswith(codecs.BOM_UTF8):
            self.offset = len(codecs.BOM_UTF8)
            return chunk[len(codecs.BOM_UTF8):]
        if chunk.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in chunk[:4]:
            raise self.error(f"is UTF-16 or UTF-32 text (it starts with {chunk[:4]!r}), not UTF-8",
                             f"re-encode it as UTF-8, e.g. `iconv -f UTF-16 -t UTF-8 {self.path} > "
                             f"fixed{self.path.suffix}`")
        return chunk

    def _count_lines(self, byte_offset: int) -> int:
        """Newlines in the file before `byte_offset` (read again: this runs only for an error message)."""
        with open(self.path, "rb") as f:
            return sum(f.read(min(_CHUNK_BYTES, byte_offset - k)).count(b"\n")
                       for k in range(0, byte_offset, _CHUNK_BYTES))

    def where(self, p: int) -> str:
        """'line L, column C' (1-based) of `buf[p]`: the file is read again up to there (only for messages; bytes
        after `p` that are not UTF-8 must not fail it)."""
        char, line, col = self.start + p, 1, 1
        with open(self.path, encoding="utf-8-sig", errors="replace", newline="") as f:
            while char > 0:
                part = f.read(min(_CHUNK_BYTES, char))
                char -= len(part)
                newlines = part.count("\n")
                line += newlines
                col = len(part) - part.rfind("\n") if newlines else col + len(part)
        return f"line {line}, column {col}"

    def error(self, problem: str, fix: str) -> MixDataError:
        """A `MixDataError` for this file."""
        return MixDataError(str(self.path), None, None, problem, fix)


def _scan_json(path: Path) -> Iterator[tuple[int, str, Any]]:
    """Yield (index, raw text, parsed object) for each record of a JSON array or JSONL file, reading in chunks.

    Reads exactly what `json.load` reads for a file starting with `[` (after whitespace and an optional UTF-8 BOM),
    and what `json.loads` of each non-blank line reads otherwise; anything either would reject is a `MixDataError`
    naming the file, the line and column, and the record.
    """
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"Reading {path.name}",
                                     disable=size < (64 << 20)) as bar:
        text = _Text(f, path, bar)
        while not text.eof:
            text.refill()
            start = _WS.match(text.buf).end()
            if start < len(text.buf):
                break
        else:
            raise text.error("the file holds no records", "give a JSON list of records or one JSON record per line")
        if text.buf[start] == "[":
            text.pos = start + 1
            yield from _scan_array(text)
        else:
            yield from _scan_lines(text)


def _unreadable(text: _Text, index: int, e: Exception) -> MixDataError:
    """Valid JSON syntax that Python's json cannot read either: an integer of over 4300 digits, deep nesting."""
    return text.error(f"record #{index} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})",
                      "shorten the number or the nesting, or drop the record")


def _scan_array(text: _Text) -> Iterator[tuple[int, str, Any]]:
    """The records of a JSON array; `text.pos` is just after its `[`."""
    decode, ws = json.JSONDecoder().raw_decode, _WS.match
    fix = f"repair the file (check it with `python -m json.tool {text.path}`)"
    expect_value, closed, index = True, False, 0
    while True:
        buf, pos, eof = text.buf, text.pos, text.eof
        n = len(buf)
        while pos < n:
            if expect_value:
                if buf[pos] in _WS_CHARS:
                    pos = ws(buf, pos).end()
                    if pos == n:
                        break
                if buf[pos] == "]":
                    if index:
                        raise text.error(f"a ',' after record #{index - 1} is followed by ']' at "
                                         f"{text.where(pos)} (a trailing comma)", "delete the trailing comma")
                    closed, pos = True, pos + 1
                    break
                try:
                    obj, end = decode(buf, pos)
                except (ValueError, RecursionError) as e:
                    if not isinstance(e, json.JSONDecodeError):
                        raise _unreadable(text, index, e) from None
                    # A record cut by the chunk end fails at the end of the buffer (or in a string running into it):
                    # read more. A failure anywhere else is malformed JSON.
                    if not eof and (e.msg.startswith("Unterminated string") or e.pos >= n - 8):
                        break
                    cut = e.pos >= n - 1 or e.msg.startswith("Unterminated string")
                    cut = "; the file ends inside it: is it truncated?" if cut else ""
                    raise text.error(f"malformed JSON in record #{index} ({e.msg}: {text.where(e.pos)}{cut})",
                                     fix) from None
                if end == n and not eof:  # a number could go on in the next chunk
                    break
                yield index, buf[pos:end], obj
                index += 1
                pos, expect_value = end, False
                if pos == n:
                    break
            c = buf[pos]
            if c in _WS_CHARS:
                pos = ws(buf, pos).end()
                if pos == n:
                    break
                c = buf[pos]
            if c == ",":
                pos, expect_value = pos + 1, True
                continue
            if c == "]":
                closed, pos = True, pos + 1
                break
            raise text.error(f"expected ',' or ']' after record #{index - 1} at {text.where(pos)}, found "
                             f"{buf[pos:pos + 20]!r}", "separate the records of a JSON array with commas (or write "
                             "JSONL: one record per line, without brackets and commas)")
        text.pos = pos
        if closed:
            break
        if eof:
            last = (f"a ',' after record #{index - 1}" if expect_value else f"record #{index - 1}"
                    ) if index else "the opening '['"
            raise text.error(f"the JSON array is not closed: the file ends after {last} without ']' (is it "
                             "truncated?)", "restore the end of the file (export or download it again), or add the "
                             "closing ']'")
        text.index = index
        text.refill()
    while True:  # only whitespace may follow the array
        rest = _WS.match(text.buf, text.pos).end()
        if rest < len(text.buf):
            raise text.error(f"text after the closing ']' of the JSON array at {text.where(rest)} (found "
                             f"{text.buf[rest:rest + 20]!r}): a second array or stray text",
                             "keep one JSON array per file (merge the arrays into one list) or delete the extra text")
        if text.eof:
            return
        text.pos = rest
        text.index = index
        text.refill()


def _scan_lines(text: _Text) -> Iterator[tuple[int, str, Any]]:
    """The records of a JSONL file: exactly one JSON value on each non-blank line."""
    decode, ws = json.JSONDecoder().raw_decode, _WS.match
    fix = "JSONL holds one complete JSON record per line: repair or delete that line (a JSON list starts with '[')"
    index = 0
    while True:
        buf, pos, eof = text.buf, text.pos, text.eof
        n = len(buf)
        while pos < n:
            if buf[pos] in _WS_CHARS:  # blank lines, indentation
                pos = ws(buf, pos).end()
                continue
            nl = buf.find("\n", pos)
            if nl < 0:
                if not eof:  # wait for the rest of the line
                    break
                nl = n
            try:
                obj, end = decode(buf, pos)
            except (ValueError, RecursionError) as e:
                if not isinstance(e, json.JSONDecodeError):
                    raise _unreadable(text, index, e) from None
                if e.pos <= nl:
                    cut = "; the file ends inside it: is it truncated?" if eof and e.pos >= n - 1 else ""
                    raise text.error(f"malformed JSON in record #{index} ({e.msg}: {text.where(e.pos)}{cut})",
                                     fix) from None
                end = e.pos  # the record runs on past its line (and is malformed there too)
            if end != nl and _LINE_WS.match(buf, end).end() != nl:
                what = "runs on over several lines" if end > nl else "is followed by more text on its line"
                raise text.error(f"record #{index} at {text.where(pos)} {what}", "put each record on exactly one "
                                 "line (JSONL), or write a JSON list of records")
            yield index, buf[pos:end], obj
            index += 1
            pos = nl + 1
        text.pos = min(pos, n)
        if eof:
            return
        text.index = index
        text.refill()


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


def load_dataset_location(location: str, split: str = "train", file_fix: str = "give a save_to_disk folder or a "
                          "Hub dataset id") -> Any:
    """The `datasets.Dataset` at a `save_to_disk` folder or a Hub dataset id (see `locate_source`), split chosen;
    a file, a missing path, an unreachable Hub or a missing split is a `MixDataError` (`file_fix` says what to do
    with a file).

    Example:
        >>> load_dataset_location("mixes/paper")  # doctest: +SKIP
    """
    import datasets

    kind, where = locate_source(location)
    if kind == "file":
        raise MixDataError(location, None, None, "is a file, not a save_to_disk folder or a Hub dataset id", file_fix)
    ds = _load_from_disk(where) if kind == "dir" else _load_from_hub(location, split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise MixDataError(location, None, None, f"has no split {split!r} (it has {list(ds)})",
                               "choose one of the splits")
        ds = ds[split]
    return ds


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


_HUB_ID = re.compile(r"[\w][\w.-]*/[\w][\w.-]*")  # namespace/name
_HUB_PROBE_SECONDS = 1.5


def locate_source(location: str) -> tuple[str, str]:
    """Say what `location` names: ("file", path), ("dir", path) or ("hub", dataset id).

    An existing file or folder is local (`~` is expanded). Otherwise `org/name` (one `/`; letters, digits, `_.-`) is
    a Hub dataset id unless it looks local: it ends in .json/.jsonl or its first component (`org`) exists here.
    Anything else (`./x`, `/abs/x`, `~/x`, `x.json`, `a/b/c`, a name without `/`) is a missing local path, refused
    as "not found" (with close names from its folder), never sent to the Hub.

    Example:
        >>> locate_source("HuggingFaceH4/llava-instruct-mix-vsft")
        ('hub', 'HuggingFaceH4/llava-instruct-mix-vsft')
    """
    path = os.path.expanduser(location)
    if os.path.isfile(path):
        return "file", path
    if os.path.isdir(path):
        return "dir", path
    if os.path.exists(path):
        raise MixDataError(location, None, None, "is neither a regular file nor a folder",
                           "give a .json/.jsonl file, a save_to_disk folder, or a Hub dataset id 'org/name'")
    first = location.split("/", 1)[0]
    if (_HUB_ID.fullmatch(location) and not location.lower().endswith((".json", ".jsonl"))
            and not os.path.lexists(first)):
        return "hub", location
    folder, base = os.path.split(os.path.normpath(path))
    folder = folder or "."
    try:
        close = difflib.get_close_matches(base, os.listdir(folder), n=3)
    except OSError:  # the folder is missing or unreadable too
        close = []
    hint = f" (did you mean {' or '.join(repr(os.path.join(folder, c)) for c in close)}?)" if close else ""
    if _HUB_ID.fullmatch(location) and os.path.lexists(first):
        hint += f"; it is read as a local path, not a Hub id, because {first!r} exists here"
    raise MixDataError(location, None, None, f"not found: no such file or folder{hint}",
                       "check the path (a .json/.jsonl file or a save_to_disk folder), or give a Hub dataset id "
                       "'org/name'")


def _load_from_disk(path: str) -> Any:
    """`datasets.load_from_disk`, with a folder that is not a saved dataset refused in one line."""
    import datasets

    try:
        return datasets.load_from_disk(path)
    except (OSError, ValueError, KeyError) as e:
        raise MixDataError(path, None, None, f"is a folder but not a readable save_to_disk dataset "
                           f"({_first_line(e)})", "give a .json/.jsonl file, or a folder written by "
                           "`Dataset.save_to_disk` or `trl-rejection mix`") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _hub_reachable() -> bool:
    """Whether the Hub endpoint answers within `_HUB_PROBE_SECONDS` (any HTTP status counts; proxies are used)."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    answered = threading.Event()

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"),
                                   timeout=_HUB_PROBE_SECONDS)
            answered.set()
        except urllib.error.HTTPError:
            answered.set()
        except urllib.error.URLError as e:  # a TLS error (custom CA bundle, mirror) still means the host answered
            if isinstance(e.reason, ssl.SSLError):
                answered.set()
        except ssl.SSLError:
            answered.set()
        except (OSError, ValueError):
            pass

    threading.Thread(target=probe, daemon=True).start()  # a name lookup can hang past any socket timeout
    return answered.wait(_HUB_PROBE_SECONDS)


def _load_from_hub(repo_id: str, split: str) -> Any:
    """`datasets.load_dataset(repo_id)`; offline (HF_HUB_OFFLINE=1, or the Hub does not answer) only the local cache
    is tried, so a missing dataset fails in about a second with one line instead of retrying for minutes."""
    import datasets
    from huggingface_hub import constants

    offline = datasets.config.HF_HUB_OFFLINE or constants.HF_HUB_OFFLINE
    why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else ""
    if not offline and not _hub_reachable():
        why = f"the Hub ({constants.ENDPOINT}) cannot be reached"
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if why:  # cached datasets still load
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(repo_id, split=split)
    except (OSError, ValueError) as e:
        if why:
            raise MixDataError(repo_id, None, None, f"not found: there is no such local file or folder, and as a Hub "
                               f"dataset id it is not in the local datasets cache ({why})", "check the path (a "
                               "local one may start with './'), or connect to the network for a Hub dataset") from None
        raise MixDataError(repo_id, None, None, f"could not be loaded from the Hub ({_first_line(e)})",
                           "check the dataset id 'org/name' and the split; log in (`hf auth login`) for gated or "
                           "private datasets") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
