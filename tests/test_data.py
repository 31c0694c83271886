"""The refusal-swap builder: formats, sampling, determinism, cards, and every bad input refused cleanly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from trl_rejection.cli import main as cli_main
from trl_rejection.data import (DEFAULT_REFUSAL, MixConfig, MixDataError, RefusalMix, build_mix, open_source,
                                plan_mix, write_sample_data)
from trl_rejection.data.builder import FEATURES, rows_to_table
from trl_rejection.data.mix import RowParts
from trl_rejection.errors import UserError


def _llava(i: int, prefix: str, turns: int = 2, image: bool = True) -> dict:
    conv = []
    for t in range(turns):
        q = f"question {t} of {prefix}{i}?" if t != 1 else f"What about detail {t}?"
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": f"answer {t} of {prefix}{i}."}]
    rec = {"id": f"{prefix}{i}", "conversations": conv}
    if image:
        rec["image"] = f"img/{prefix}{i}.png"
        conv[0]["value"] += "\n<image>"
    return rec


def _write(root: Path, name: str, records: list, images: bool = True) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for r in records:
        if images and isinstance(r, dict) and isinstance(r.get("image"), str):
            Image.new("RGB", (4, 4), (1, 2, 3)).save(root / r["image"])
    path = root / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Path, Path]:
    med = _write(tmp_path, "med.json", [_llava(i, "m", turns=3) for i in range(30)])
    gen = _write(tmp_path, "gen.json", [_llava(i, "g", image=i % 5 != 0) for i in range(60)])
    return med, gen


def _cfg(med: Path, gen: Path, **kw) -> MixConfig:
    return MixConfig(str(med), str(gen), **{"n_refusal": 10, "n_normal": 25, **kw})


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_mix_rows_follow_the_method(sources, tmp_path):
    med, gen = sources
    ds = build_mix(_cfg(med, gen), tmp_path / "out")
    assert ds.column_names == ["id", "source", "is_refusal", "messages", "images"]
    assert sum(ds["is_refusal"]) == 10 and len(ds) == 35
    originals = {r["id"]: r for r in json.loads(gen.read_text())}
    for row in ds:
        if row["is_refusal"]:
            assert row["source"] == "med" and row["id"].startswith("m")
            user, reply = row["messages"]
            assert reply == {"role": "assistant", "content": [{"type": "text", "text": DEFAULT_REFUSAL}]}
            assert user["content"][0] == {"type": "image", "text": None}  # image placeholder first
            assert user["content"][1]["text"] == f"question 0 of {row['id']}?"  # the first turn, placeholder gone
            assert len(row["images"]) == 1
        else:
            src = originals[row["id"]]
            assert [m["content"][-1]["text"] for m in row["messages"]] == \
                [c["value"].replace("\n<image>", "") for c in src["conversations"]]
            assert len(row["images"]) == ("image" in src)
            if "image" in src:
                assert row["messages"][0]["content"][0]["type"] == "image"
    assert len(set(ds["id"])) == len(ds)


def test_same_inputs_give_identical_output_and_card(sources, tmp_path):
    med, gen = sources
    digests = []
    for name in ("a", "b"):
        build_mix(_cfg(med, gen, seed=3), tmp_path / name)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted((tmp_path / name).iterdir()) if p.suffix in (".arrow", ".md")})
    assert digests[0] == digests[1]
    other = build_mix(_cfg(med, gen, seed=4), tmp_path / "c")
    assert other["id"] != datasets.load_from_disk(str(tmp_path / "a"))["id"]
    card = (tmp_path / "a" / "README.md").read_text()
    for fact in (str(med), str(gen), "| rows in the mix | 10 | 25 |", "refusal fraction: 0.2857", "Seed: 3",
                 json.dumps(DEFAULT_REFUSAL)):
        assert fact in card


def test_refusal_ids_are_disjoint_from_normal_ids(tmp_path):
    shared = [_llava(i, "x") for i in range(20)]
    path = _write(tmp_path, "both.json", shared)
    ds = build_mix(MixConfig(str(path), str(path), n_refusal=8, n_normal=12))
    refusal = {r["id"] for r in ds if r["is_refusal"]}
    normal = {r["id"] for r in ds if not r["is_refusal"]}
    assert len(refusal) == 8 and len(normal) == 12 and not refusal & normal
    with pytest.raises(MixDataError, match=r"n_normal.*13 rows were asked for but the source has 12"):
        build_mix(MixConfig(str(path), str(path), n_refusal=8, n_normal=13))


def test_random_turn_skips_follow_ups_and_sentences_vary(sources):
    med, gen = sources
    sentences = ["I'm sorry, I can't help with that.", "I cannot assist with that request."]
    ds = build_mix(_cfg(med, gen, n_refusal=30, turn_choice="random", refusal_sentences=sentences, seed=1))
    refusals = [r for r in ds if r["is_refusal"]]
    kept = {r["messages"][0]["content"][-1]["text"].split()[1] for r in refusals}
    assert kept == {"0", "2"}  # turn 1 is the "What about" follow-up and is never kept
    assert {r["messages"][1]["content"][0]["text"] for r in refusals} == set(sentences)


def test_total_and_fraction(sources):
    med, gen = sources
    ds = build_mix(MixConfig(str(med), str(gen), total=70, refusal_fraction=2 / 7))
    assert len(ds) == 70 and sum(ds["is_refusal"]) == 20


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0)).filter(lambda f: f == f))
def test_fraction_outside_open_interval_is_refused(fraction, sources):
    med, gen = sources
    with pytest.raises(UserError, match=r"refusal_fraction.*outside \(0, 1\)"):
        MixConfig(str(med), str(gen), total=10, refusal_fraction=fraction).counts()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_med=st.integers(1, 30), n_gen=st.integers(0, 60), seed=st.integers(0, 2**32))
def test_plan_is_seeded_disjoint_and_sized(n_med, n_gen, seed, sources):
    med, gen = open_source(str(sources[0])), open_source(str(sources[1]))
    cfg = MixConfig(n_refusal=n_med, n_normal=n_gen, seed=seed)
    plan = plan_mix(cfg, med, gen)
    assert plan.order == plan_mix(cfg, med, gen).order
    assert (plan.n_refusal, plan.n_normal) == (n_med, n_gen)
    assert len({(r, i) for r, i in plan.order}) == len(plan.order)


def test_capping_is_opt_in_and_recorded(sources, tmp_path):
    med, gen = sources
    with pytest.raises(MixDataError, match=r"med.json: field 'n_refusal': 50 rows .* has 30.*allow_capping"):
        build_mix(_cfg(med, gen, n_refusal=50), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    ds = build_mix(_cfg(med, gen, n_refusal=50, allow_capping=True), tmp_path / "out")
    assert sum(ds["is_refusal"]) == 30
    assert "n_refusal capped from 50 to 30" in (tmp_path / "out" / "README.md").read_text()


def test_formats_jsonl_trl_and_dataset_dir(tmp_path, sources):
    med, gen = sources
    jsonl = _write(tmp_path, "med.jsonl", [_llava(i, "j") for i in range(12)])
    trl_records = [{"id": f"t{i}", "images": [f"img/t{i}.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"q{i}"}]},
        {"role": "assistant", "content": [{"type": "text", "text": f"a{i}"}]}]} for i in range(12)]
    for r in trl_records:
        Image.new("RGB", (4, 4)).save(tmp_path / r["images"][0])
    trl = _write(tmp_path, "trl.json", trl_records, images=False)
    first = build_mix(MixConfig(str(jsonl), str(trl), n_refusal=5, n_normal=12), tmp_path / "m1")
    normal = [r for r in first if not r["is_refusal"]]
    assert {r["messages"][1]["content"][0]["text"] for r in normal} == {f"a{i}" for i in range(12)}
    # a built mix (Image features, save_to_disk layout) is itself a valid source
    again = build_mix(MixConfig(str(tmp_path / "m1"), str(gen), n_refusal=17, n_normal=5))
    assert sum(again["is_refusal"]) == 17
    assert all(len(r["images"]) == 1 for r in again if r["is_refusal"])


def test_export_llava_round_trips(sources, tmp_path):
    med, gen = sources
    ds = build_mix(_cfg(med, gen), tmp_path / "out", export_llava=True)
    exported = json.loads((tmp_path / "out" / "llava.json").read_text())
    assert [r["id"] for r in exported] == ds["id"]
    back = build_mix(MixConfig(str(tmp_path / "out" / "llava.json"), str(gen), n_refusal=35, n_normal=0,
                               refusal_image_root="/"))
    assert sorted(back["id"]) == sorted(ds["id"])
    refusal = next(r for r in exported if r["id"] == next(x["id"] for x in ds if x["is_refusal"]))
    assert refusal["conversations"][0]["value"].startswith("<image>\n")
    assert refusal["conversations"][1] == {"from": "gpt", "value": DEFAULT_REFUSAL}


def test_embed_images_makes_the_mix_portable(sources, tmp_path):
    med, gen = sources
    build_mix(_cfg(med, gen), tmp_path / "out", embed_images=True)
    for p in tmp_path.glob("img/*.png"):
        p.unlink()
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert all(im.size == (4, 4) for row in ds for im in row["images"])


BAD = {
    "malformed JSON": (json.dumps([_llava(0, "a", image=False)])[:-1] + ', {"id": "b", "conv', None,
                       r"malformed JSON in record #1"),
    "no conversations": ([{"id": "r1", "image": "img/x.png"}], "r1", r"field 'conversations'.*no 'conversations'"),
    "turns out of order": ([{"id": "r2", "conversations": [{"from": "gpt", "value": "hi"},
                                                           {"from": "human", "value": "q"}]}], "r2",
                           r"conversations\[0\]'.*out of order"),
    "empty reply": ([{"id": "r3", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]}],
                    "r3", r"conversations\[1\]'.*reply is empty"),
    "non-string reply": ([{"id": "r4", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}]}],
                         "r4", r"conversations\[1\].value'.*expected a string"),
    "duplicate ids": ([_llava(0, "d"), _llava(1, "d"), _llava(0, "d")], "d0", r"field 'id'.*records #0 and #2"),
    "missing image": ([{**_llava(0, "i"), "image": "img/nope.png"}], "i0", r"field 'image'.*not found"),
    "image escapes root": ([{**_llava(0, "e"), "image": "../../etc/passwd"}], "e0", r"field 'image'.*escapes"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_naming_file_record_and_field(case, sources, tmp_path):
    med, gen = sources
    content, rid, pattern = BAD[case]
    bad = tmp_path / "bad.json"
    for rec in content if isinstance(content, list) else []:
        if rec.get("image", "").startswith("img/d"):
            Image.new("RGB", (4, 4)).save(tmp_path / rec["image"])
    bad.write_text(content if isinstance(content, str) else json.dumps(content))
    before = _leftovers(tmp_path)
    with pytest.raises(MixDataError) as info:
        build_mix(MixConfig(str(bad), str(gen), n_refusal=len(content) if isinstance(content, list) else 1,
                            n_normal=5, validate="all"), tmp_path / "out")
    message = str(info.value)
    assert message.startswith(str(bad)) and "Fix: " in message
    if rid is not None:
        assert f"record {rid!r}" in message
    assert __import__("re").search(pattern, message), message
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == before


def test_duplicate_ids_can_be_suffixed(tmp_path, sources):
    path = _write(tmp_path, "dup.json", [_llava(0, "d"), _llava(1, "d"), _llava(0, "d")])
    ds = build_mix(MixConfig(str(path), str(sources[1]), n_refusal=3, n_normal=0, duplicate_ids="suffix"))
    assert sorted(ds["id"]) == ["d0", "d0#2", "d1"]


def test_failure_mid_write_leaves_nothing(sources, tmp_path, monkeypatch):
    med, gen = sources

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("trl_rejection.data.builder.dataset_card", boom)
    with pytest.raises(RuntimeError):
        build_mix(_cfg(med, gen), tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_builder_class_and_config(sources, tmp_path):
    med, gen = sources
    builder = RefusalMix(mix=_cfg(med, gen), cache_dir=str(tmp_path / "cache"))
    builder.download_and_prepare()
    ds = builder.as_dataset("train")
    assert len(ds) == 35 and builder.config.mix.n_refusal == 10
    assert ds.features["images"].feature == datasets.Image()


def test_cli_with_yaml_config_and_overrides(sources, tmp_path, capsys):
    med, gen = sources
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"refusal_source": str(med), "normal_source": str(gen), "n_refusal": 4,
                                      "n_normal": 6, "seed": 7}))
    cli_main(["mix", "--config", str(config), "--n_normal", "9", "--output_dir", str(tmp_path / "o")])
    assert "Wrote 13 rows (4 refusal, 9 normal" in capsys.readouterr().out
    assert "Seed: 7" in (tmp_path / "o" / "README.md").read_text()
    with pytest.raises(SystemExit) as e:
        cli_main(["mix", "--config", str(config), "--output_dir", str(tmp_path / "o")])
    assert e.value.code == 2 and "exists. Fix: " in capsys.readouterr().err


def test_default_job_uses_bundled_sample(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRL_REJECTION_CACHE", str(tmp_path / "cache"))
    cli_main(["mix", "--output_dir", str(tmp_path / "o")])
    assert "Wrote 70 rows (20 refusal, 50 normal, fraction 0.2857)" in capsys.readouterr().out
    ds = datasets.load_from_disk(str(tmp_path / "o"))
    assert {r["source"] for r in ds} == {"sample_med", "sample_general"}
    assert any(not r["images"] for r in ds) and all(im.size == (64, 64) for r in ds for im in r["images"])


def test_sample_data_is_deterministic(tmp_path):
    a, b = write_sample_data(tmp_path / "a"), write_sample_data(tmp_path / "b")
    assert a["refusal"].read_bytes() == b["refusal"].read_bytes()
    assert (tmp_path / "a/med/scan_0003.png").read_bytes() == (tmp_path / "b/med/scan_0003.png").read_bytes()


@settings(max_examples=30, deadline=None)
@given(texts=st.lists(st.text(min_size=1).filter(lambda t: "<image>" not in t), min_size=1, max_size=8),
       chunk=st.integers(1, 64), jsonl=st.booleans(), indent=st.sampled_from([None, 1]))
def test_chunked_scan_matches_json_load(texts, chunk, jsonl, indent, tmp_path_factory):
    """Records split across read chunks (and multi-byte characters split across them) parse exactly."""
    from trl_rejection.data import formats, jsonscan
    from trl_rejection.data.records import _split_placeholders

    records = [{"id": f"u{i}", "conversations": [{"from": "human", "value": t}, {"from": "gpt", "value": t + "!"}]}
               for i, t in enumerate(texts)]
    path = tmp_path_factory.mktemp("scan") / ("x.jsonl" if jsonl else "x.json")
    dump = (lambda r: json.dumps(r, ensure_ascii=False, indent=indent))
    lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in records)  # JSONL: one record per line
    path.write_text(lines if jsonl else dump(records), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jsonscan, "_CHUNK_BYTES", chunk)
        src = formats.open_json_source(path, validate="all")
    assert src.ids == [r["id"] for r in records]
    got = list(src.records(range(len(records))))
    assert [g["turns"][1][1] for g in got] == [_split_placeholders(t + "!")[0] for t in texts]


def test_malformed_record_mid_file_is_found_across_chunks(monkeypatch, tmp_path):
    from trl_rejection.data import formats, jsonscan

    monkeypatch.setattr(jsonscan, "_CHUNK_BYTES", 50)
    good = [json.dumps(_llava(i, "c", image=False)) for i in range(6)]
    good[3] = good[3].replace('"from": "gpt"', '"from" "gpt"', 1)
    path = tmp_path / "mid.json"
    path.write_text("[" + ",\n".join(good) + "]")
    with pytest.raises(MixDataError, match=r"mid.json: malformed JSON in record #3 \(Expecting ':' delimiter"):
        formats.open_json_source(path)


_turn = st.tuples(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=30), st.integers(0, 3))
_image = st.one_of(st.builds(lambda p: {"bytes": None, "path": p}, st.text(min_size=1, max_size=20)),
                   st.builds(lambda b: {"bytes": b, "path": None}, st.binary(min_size=1, max_size=20)))
_parts = st.builds(RowParts, st.text(max_size=10), st.sampled_from(["med", "mix665k"]), st.booleans(),
                   st.lists(_turn, max_size=5), st.lists(_image, max_size=3))


@given(rows=st.lists(_parts, min_size=1, max_size=12))
@settings(max_examples=60, deadline=None)
def test_columnar_table_equals_the_row_by_row_conversion(rows):
    expected = pa.Table.from_pylist([r.as_row() for r in rows], schema=FEATURES.arrow_schema)
    table = rows_to_table(rows)
    assert table.schema == expected.schema
    assert table.equals(expected)
    assert table.to_pylist() == [r.as_row() for r in rows]
