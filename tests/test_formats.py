"""Reading sources safely: the chunked JSON/JSONL scanner reads exactly what `json.load` / per-line `json.loads` read
and refuses the rest in one line; encodings; local paths vs Hub ids; and a fuzz test of corrupted sources."""

from __future__ import annotations

import copy
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from trl_rejection.data import MixConfig, MixDataError, build_mix, open_source
from trl_rejection.data import formats, jsonscan
from trl_rejection.data.records import normalize_record, record_id
from trl_rejection.errors import UserError

R = json.dumps({"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]})
S = R.replace('"a"', '"b"')

# name -> (file text, record count or a pattern of the one-line error)
SCANS = {
    "array.json": (f" \n[ {R} ,\n {S} ] \n", 2),
    "empty array.json": ("[]", 0),
    "jsonl with blank and CRLF lines.jsonl": (f"\n{R}\r\n\n  \n{S}", 2),
    "unclosed array.json": (f"[{R}, {S}", r"the JSON array is not closed: the file ends after record #1 without ']' "
                                           r"\(is it truncated\?\)"),
    "unclosed after a comma.json": (f"[{R},", r"ends after a ',' after record #0 without ']'"),
    "only an opening bracket.json": ("[", r"ends after the opening '\[' without ']'"),
    "two arrays.json": (f"[{R}][{S}]", r"text after the closing ']' of the JSON array at line 1, column 97 "
                                       r"\(found '\["),
    "text after the array.json": (f"[{R}]\nnotes: done\n", r"text after the closing ']'.*line 2, column 1"),
    "records without commas.json": (f"[{R}\n {S}]", r"expected ',' or ']' after record #0 at line 2, column 2, found "
                                                    r"'\{"),
    "trailing comma.json": (f"[{R},\n]", r"a ',' after record #0 is followed by ']' at line 2, column 1 \(a trailing "
                                         "comma\\)"),
    "double comma.json": (f"[{R},,{S}]", r"malformed JSON in record #1 \(Expecting value: line 1, column 97\)"),
    "] line inside jsonl.jsonl": (f"{R}\n]\n{S}", r"malformed JSON in record #1 \(Expecting value: line 2, column 1\)"),
    "jsonl with commas.jsonl": (f"{R},\n{S}", r"record #0 at line 1, column 1 is followed by more text on its line"),
    "two records on a line.jsonl": (f"{R} {S}\n", r"record #0 at line 1, column 1 is followed by more text"),
    "pretty-printed jsonl.jsonl": (json.dumps(json.loads(R), indent=1) + "\n", r"record #0 at line 1, column 1 runs "
                                                                              "on over several lines"),
    "truncated jsonl.jsonl": (f"{R}\n{S[:30]}", r"malformed JSON in record #1 .*line 2, column 31; the file ends "
                                                r"inside it: is it truncated\?"),
    "truncated array.json": (f"[{R}, {S[:40]}", r"malformed JSON in record #1 \(Unterminated string.*truncated\?"),
    "whitespace only.json": (" \n ", "the file holds no records"),
    "deep nesting.json": ("[" + "[" * 100_000 + "]" * 100_001, r"record #0 cannot be read \(RecursionError"),
}


@pytest.mark.parametrize("chunk", [3, 1 << 20])
@pytest.mark.parametrize("case", sorted(SCANS))
def test_scanner_reads_what_json_reads_and_refuses_the_rest(case, chunk, tmp_path, monkeypatch):
    """Counts equal `json.load` (arrays) / per-line `json.loads` (JSONL); whatever those reject is one line naming
    the file, the place and the fix, at any chunk size."""
    monkeypatch.setattr(jsonscan, "_CHUNK_BYTES", chunk)
    text, expected = SCANS[case]
    path = tmp_path / case.replace(" ", "_")
    path.write_text(text, encoding="utf-8")
    if isinstance(expected, int):
        assert _reference(path.read_bytes()) is not None and len(_reference(path.read_bytes())) == expected
        assert len(formats.open_json_source(path).ids) == expected
        return
    assert _reference(path.read_bytes()) is None  # json.load / json.loads reject it too
    with pytest.raises(MixDataError) as info:
        formats.open_json_source(path)
    _assert_one_line(str(info.value), path)
    assert __import__("re").search(expected, str(info.value)), str(info.value)


def test_utf8_bom_is_read(tmp_path):
    for name, text in (("bom.json", f"[{R}, {S}]"), ("bom.jsonl", f"{R}\n{S}\n")):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert formats.open_json_source(path).ids == ["a", "b"]


@pytest.mark.parametrize(("encoding", "pattern"), [
    ("latin-1", r"is not UTF-8 at byte offset 157 \(line 3, record #1\): invalid continuation byte e9 "),
    ("utf-16", r"is UTF-16 or UTF-32 text \(it starts with b'\\xff\\xfe\\n\\x00'\), not UTF-8"),
    ("utf-16-le", r"is UTF-16 or UTF-32 text"), ("utf-32", r"is UTF-16 or UTF-32 text")])
def test_other_encodings_are_refused_naming_file_place_and_fix(encoding, pattern, tmp_path):
    path = tmp_path / "enc.jsonl"
    path.write_bytes(f"\n{R}\n{S.replace('q', 'café')}\n".encode(encoding))
    with pytest.raises(MixDataError, match=pattern) as info:
        formats.open_json_source(path)
    _assert_one_line(str(info.value), path)
    assert "re-encode" in str(info.value) and "UTF-8" in str(info.value)


def test_lone_surrogate_is_refused_naming_record_and_field_and_pairs_are_kept(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    normal = tmp_path / "normal.json"
    normal.write_text(json.dumps([json.loads(R.replace('"a"', '"n"'))]))
    path = tmp_path / "surrogate.json"
    pair, lone = R.replace('"q"', r'"q \ud83d\ude00"'), S.replace('"r"', r'"r \ud800"')
    path.write_text(f"[{pair}, {lone}]")
    with pytest.raises(MixDataError) as info:
        build_mix(MixConfig(str(path), str(normal), n_refusal=2, n_normal=1), tmp_path / "out")
    _assert_one_line(str(info.value), path)
    assert "record 'b', field 'conversations[1].value': holds a lone UTF-16 surrogate escape" in str(info.value)
    assert not (tmp_path / "out").exists()
    path.write_text(f"[{pair}]")  # a valid pair: one character
    ds = build_mix(MixConfig(str(path), str(normal), n_refusal=1, n_normal=1, validate="all"), tmp_path / "out")
    assert any("q 😀" in part["text"] for row in ds for msg in row["messages"] for part in msg["content"]
               if part["text"])


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if anything is loaded as a dataset (from disk or the Hub)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to load {args}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(datasets, "load_from_disk", refuse)


@pytest.mark.parametrize("location", ["data/typo_dir", "./x", "x.json", "x", "data/sub/missing.jsonl", "org/name.jsonl",
                                      "/nonexistent-folder/x", "~/nonexistent-trl-rejection.json", "a/b/c",
                                      "data/name", "has space/x", "C:\\data\\x.json"])
def test_missing_local_path_is_not_found_and_never_the_hub(location, tmp_path, monkeypatch, no_loading):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "typo_dirs").mkdir(parents=True)
    with pytest.raises(MixDataError, match=r"not found: no such file or folder") as info:
        open_source(location)
    message = str(info.value)
    _assert_one_line(message, location)
    if location == "data/typo_dir":
        assert "(did you mean 'data/typo_dirs'?)" in message and "because 'data' exists here" in message


def test_unreadable_file_and_special_file_are_refused_in_one_line(tmp_path, monkeypatch):
    path = tmp_path / "locked.json"
    path.write_text(f"[{R}]")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(jsonscan, "open", denied, raising=False)  # the scanner's open(); root ignores chmod 000
    with pytest.raises(MixDataError, match=r"locked.json: cannot be read \(PermissionError: .*Permission denied"):
        open_source(str(path))
    if os.path.exists("/dev/null"):
        with pytest.raises(MixDataError, match=r"^/dev/null: is neither a regular file nor a folder"):
            open_source("/dev/null")


def test_folder_that_is_not_a_dataset_is_refused_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(MixDataError, match=r"is a folder but not a readable save_to_disk dataset") as info:
        open_source(str(tmp_path))
    _assert_one_line(str(info.value), str(tmp_path))


def test_hub_id_offline_fails_fast_in_one_line(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(MixDataError, match=r"not found: there is no such local file or folder, and as a Hub "
                                           r"dataset id it is not in the local datasets cache \(offline mode is on "
                                           r"\(HF_HUB_OFFLINE=1\)\)") as info:
        open_source("trl-rejection-test/no-such-dataset")
    assert time.monotonic() - start < 2
    _assert_one_line(str(info.value), "trl-rejection-test/no-such-dataset")


def test_hub_id_with_an_unanswering_hub_fails_in_under_two_seconds(monkeypatch):
    """The Hub endpoint accepts connections but never answers (a hung proxy or captive network)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        before = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
        start = time.monotonic()
        with pytest.raises(MixDataError, match=r"not found: .* not in the local datasets cache \(the Hub "
                                               r"\(http://127.0.0.1:\d+\) cannot be reached\)") as info:
            open_source("trl-rejection-test/no-such-dataset")
        assert time.monotonic() - start < 2
    _assert_one_line(str(info.value), "trl-rejection-test/no-such-dataset")
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == before  # restored


# ---------------------------------------------------------------------------------------------------------------------
# Fuzz: corrupt a valid source at random; it is either refused in one line or built with the reference's rows.

def _record(i: int) -> dict[str, Any]:
    conv = [{"from": "human", "value": f"<image>\nWhat is in café {i}?"}, {"from": "gpt", "value": f"A cat {i}."},
            {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "Nothing."}]
    if i % 3 == 0:  # text-only
        return {"id": f"r{i}", "conversations": [{"from": "human", "value": f"Text only {i}?"},
                                                 {"from": "gpt", "value": "Ok."}]}
    return {"id": f"r{i}", "image": "img/x.png", "conversations": conv}


RECORDS = [_record(i) for i in range(6)]
PATHS = [("id",), ("image",), ("conversations",), ("conversations", 0), ("conversations", 0, "from"),
         ("conversations", 1, "value"), ("conversations", 0, "value"), ("messages",)]
VALUES = [None, 0, 2.5, True, "", "gpt", "human", "img/x.png", "img/missing.png", "../x.png", "<image> <image>", [],
          ["img/x.png"], [1], {}, {"path": "img/x.png"}, {"bytes": "abc"}, {"path": [1]}, "\ud800", "r0"]
GARBAGE = [b"]", b",", b"\n", b"[", b"{", b"}", b'"', b"\x00", b"\xff", b"\xe9", b"\xef\xbb\xbf", b" x", b"]\n",
           b"\\ud800", b"\\ud83d\\ude00", b"\xed\xa0\x80", b"null", b"42"]
_at = st.floats(0, 1)
EDITS = st.lists(st.tuples(st.integers(0, 5), st.sampled_from(PATHS), st.sampled_from(VALUES)), max_size=2)
OPS = st.lists(st.one_of(
    st.tuples(st.just("truncate"), _at), st.tuples(st.just("delete"), _at, st.integers(1, 60)),
    st.tuples(st.just("duplicate"), _at, st.integers(1, 300), _at), st.tuples(st.just("double")),
    st.tuples(st.just("insert"), _at, st.one_of(st.sampled_from(GARBAGE), st.binary(min_size=1, max_size=4))),
    st.tuples(st.just("encode"), st.sampled_from(["latin-1", "utf-16", "utf-16-le", "utf-8-sig", "utf-32"]))),
    max_size=2)


def _edit(records: list[Any], index: int, path: tuple, value: Any) -> None:
    """Set `records[index]` at `path` to `value` (skipped where the path does not exist)."""
    def settable(target: Any, key: Any) -> bool:
        return isinstance(target, dict) and isinstance(key, str) or (
            isinstance(target, list) and isinstance(key, int) and key < len(target))

    target = records[index]
    for key in path[:-1]:
        if not settable(target, key) or (isinstance(target, dict) and key not in target):
            return
        target = target[key]
    if settable(target, path[-1]):
        target[path[-1]] = copy.deepcopy(value)  # VALUES' lists and dicts are shared: a later edit must not change them


def _corrupt(data: bytes, op: tuple) -> bytes:
    at = round(op[1] * len(data)) if len(op) > 1 and isinstance(op[1], float) else 0
    if op[0] == "truncate":
        return data[:at]
    if op[0] == "delete":
        return data[:at] + data[at + op[2]:]
    if op[0] == "duplicate":
        piece, to = data[at:at + op[2]], round(op[3] * len(data))
        return data[:to] + piece + data[to:]
    if op[0] == "double":
        return data + data
    if op[0] == "insert":
        return data[:at] + op[2] + data[at:]
    try:
        return data.decode("utf-8").encode(op[1])
    except UnicodeError:
        return data


def _reference(data: bytes) -> list[Any] | None:
    """The records `json.load` (text starting with '[') or per-line `json.loads` reads, None where they fail (and
    for a file without any JSON, which `json.load` refuses)."""
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
        if not text.strip(" \t\n\r"):
            return None
        if text.lstrip(" \t\n\r").startswith("["):
            records = json.loads(text)
            return records if isinstance(records, list) else None
        return [json.loads(line) for line in text.split("\n") if line.strip(" \t\n\r")]
    except (ValueError, RecursionError):
        return None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [s for item in items for s in _strings(item)]


def _expected_ids(data: bytes, root: Path) -> list[str] | None:
    """The ids a build must draw from `data`, or None where it must refuse: reference parse, record validation,
    valid Unicode, unique ids, images that exist under the root."""
    records = _reference(data)
    if not records:
        return None
    ids = []
    for i, rec in enumerate(records):
        try:
            norm = normalize_record(rec, "source", i)
        except MixDataError:
            return None
        if any(s.encode("utf-8", "surrogatepass") != s.encode("utf-8", "ignore") for s in _strings(rec)):
            return None  # a lone surrogate
        for image in norm["images"]:
            image = image.get("path") if isinstance(image, dict) else image
            full = (root / image).resolve()
            if not (full.is_relative_to(root.resolve()) and full.is_file()):
                return None
        ids.append(record_id(rec, i))
    return ids if len(set(ids)) == len(ids) else None


def _files(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if skip not in p.parents and p != skip}


def _assert_one_line(message: str, file: str | Path) -> None:
    assert "\n" not in message and message.startswith(str(file)) and "Fix: " in message, message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=EDITS, ops=OPS, jsonl=st.booleans(), ascii_only=st.booleans())
def test_corrupted_source_is_refused_in_one_line_or_built_with_the_reference_rows(edits, ops, jsonl, ascii_only,
                                                                                  tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "img").mkdir()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(root / "img" / "x.png")
    normal = root / "normal.json"
    normal.write_text(json.dumps([{**_record(i), "id": f"n{i}"} for i in range(3)]))
    records = json.loads(json.dumps(RECORDS))
    for edit in edits:
        _edit(records, *edit)
    dump = (lambda r: json.dumps(r, ensure_ascii=ascii_only))  # noqa: E731
    text = "\n".join(map(dump, records)) + "\n" if jsonl else dump(records)
    data = text.encode("utf-8", "surrogatepass")  # a raw lone surrogate (ascii_only=False) is not UTF-8
    for op in ops:
        data = _corrupt(data, op)
    source = root / ("source.jsonl" if jsonl else "source.json")
    source.write_bytes(data)
    expected = _expected_ids(data, root)
    out = root / "out"
    before = _files(root, out)
    try:
        ds = build_mix(MixConfig(str(source), str(normal), n_refusal=len(expected or RECORDS), n_normal=2,
                                 validate="all"), out)
    except UserError as e:
        event("refused")
        _assert_one_line(str(e), source)
        assert expected is None, f"refused, but the reference reads {expected}: {e}"
        assert not out.exists()
    else:
        event("built")
        assert expected is not None, "built, but json.load / json.loads or the record checks refuse it"
        assert sorted(r["id"] for r in ds if r["is_refusal"]) == sorted(expected) and len(ds) == len(expected) + 2
        assert f"| rows in source | {len(expected)} | 3 |" in (out / "README.md").read_text()
    assert _files(root, out) == before  # inputs untouched, nothing written beside the output folder
    assert os.listdir(root / "img") == ["x.png"]
