"""The chunked JSON / JSONL scanner behind `open_json_source`: records as raw text, read exactly as `json.load` (a
file starting with `[`) or `json.loads` of each line (JSONL) would read them; anything else is a `MixDataError`
naming the file, line, column and record.

Large files are read in chunks of `_CHUNK_BYTES` and each record is kept as its raw text, so a 665k-record
mix665k file costs about its own size in memory.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Any, Iterator

from tqdm.auto import tqdm

from ..errors import MixDataError

_CHUNK_BYTES = 16 << 20
_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace
_WS_CHARS = " \t\n\r"
_LINE_WS = re.compile(r"[ \t\r]*")  # JSON whitespace within a line


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
