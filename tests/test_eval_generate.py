"""The generation harness on the tiny random LLaVA (saved and reloaded from a local folder): batching, resume after an
interruption, bad images, plain tokenizers, LoRA adapters."""

import json
from dataclasses import fields

import pytest
from peft import LoraConfig, get_peft_model
from PIL import Image

from trl_rejection.eval.generate import generate
from trl_rejection.eval.generations import ROW_FIELDS, read_generations
from trl_rejection.eval.records import BenchmarkError, EvalRecord
from trl_rejection.eval.report import report_run
from trl_rejection.eval.safety_benchmarks import load_figstep
from trl_rejection.generation import load_model_and_processor
from trl_rejection.testing.tiny import make_model, make_processor

FIELDS = {f.name for f in fields(EvalRecord)} | {"completion"}  # what `generate` writes per line


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llava")
    processor = make_processor("llava-1.5")
    processor.save_pretrained(path)
    make_model("llava-1.5", processor).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model_and_processor(str(tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rows = []
    for i in range(5):
        path = folder / f"{i}.png"
        Image.new("RGB", (20 + i, 30), (40 * i, 0, 0)).save(path)
        rows.append(EvalRecord(f"img{i}", "typo", "weapons", f"What does image {i} say?", str(path), harmful=True))
    rows += [EvalRecord(f"txt{i}", "xstest", "homonyms", f"How do I kill process {i}?", None, harmful=False)
             for i in range(4)]
    return rows


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generate_writes_one_valid_line_per_record(tiny, records, tmp_path):
    model, processor = tiny
    out = generate(model, processor, records, tmp_path / "gen.jsonl", batch_size=3, max_new_tokens=4, progress=False)
    rows = _lines(out)
    assert sorted(r["id"] for r in rows) == sorted(r.id for r in records)
    assert all(set(r) == FIELDS and isinstance(r["completion"], str) for r in rows)
    by_id = {r["id"]: r for r in rows}
    assert by_id["img0"]["image"] == records[0].image and by_id["txt0"]["image"] is None
    assert by_id["txt1"]["harmful"] is False and by_id["img1"]["category"] == "weapons"


@pytest.mark.parametrize("family", ["llava-1.5", "qwen2.5-text"])
def test_a_batch_generates_what_each_record_generates_alone(family, records, tmp_path):
    """Greedy generation in left-padded batches of mixed prompt lengths gives each record the text it gets alone."""
    processor = make_processor(family)
    model = make_model(family, processor)
    rows = records if family == "llava-1.5" else [r for r in records if r.image is None]
    rows = [*rows, EvalRecord("long", "xstest", "homonyms", "Tell me " + "more and more " * 6 + "about it.", None,
                              harmful=False)]
    texts = {}
    for batch_size in (len(rows), 1):
        out = generate(model, processor, rows, tmp_path / f"gen{batch_size}.jsonl", batch_size=batch_size,
                       max_new_tokens=6, progress=False)
        texts[batch_size] = {r["id"]: r["completion"] for r in _lines(out)}
    assert texts[len(rows)] == texts[1] and len(texts[1]) == len(rows)
    assert len(set(texts[1].values())) > 1  # the prompts lead to different texts: a mix-up would show


def test_resume_after_an_interruption(tiny, records, tmp_path):
    model, processor = tiny
    out = tmp_path / "gen.jsonl"

    def stop_after_first_batch(written):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(model, processor, records, out, batch_size=2, max_new_tokens=3, progress=False,
                 on_batch=stop_after_first_batch)
    first = _lines(out)  # the partial file is valid JSONL
    assert len(first) == 2
    calls = []
    generate(model, processor, records, out, batch_size=2, max_new_tokens=3, progress=False, on_batch=calls.append)
    rows = _lines(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == len(records) and set(ids) == {r.id for r in records}
    assert rows[:2] == first  # finished rows are kept, not regenerated
    assert calls[-1] == len(records) - 2
    generate(model, processor, records, out, batch_size=2, max_new_tokens=3, progress=False, on_batch=calls.append)
    assert len(_lines(out)) == len(records) and calls[-1] == len(records) - 2  # nothing left to do


def test_half_written_last_line_is_dropped_on_resume(tiny, records, tmp_path):
    model, processor = tiny
    out = tmp_path / "gen.jsonl"
    generate(model, processor, records[:2], out, batch_size=2, max_new_tokens=2, progress=False)
    with out.open("a") as f:
        f.write('{"id": "img2", "benchmark": "ty')  # a kill in the middle of a write
    assert len(read_generations(out)) == 2
    generate(model, processor, records, out, batch_size=4, max_new_tokens=2, progress=False)
    assert sorted(r["id"] for r in _lines(out)) == sorted(r.id for r in records)


def _row(rid="a", bench="b", **changes):
    """One generations.jsonl row as `generate` writes it."""
    row = {"id": rid, "benchmark": bench, "category": "c", "prompt": "p", "image": None, "harmful": True,
           "task": "safety", "answers": [], "completion": "Sorry."}
    return {**row, **changes}


def test_rows_written_by_generate_have_every_field_read_generations_requires():
    assert set(ROW_FIELDS) <= FIELDS


def test_cut_inside_a_character_or_missing_newline_is_repaired(tmp_path):
    out = tmp_path / "gen.jsonl"
    row = json.dumps(_row(completion="日本"), ensure_ascii=False).encode()
    out.write_bytes(row + b"\n" + row[:-6])  # the kill landed inside a 3-byte character
    assert [r["id"] for r in read_generations(out)] == ["a"] and out.read_bytes() == row + b"\n"
    out.write_bytes(row)  # a complete row without its newline
    assert len(read_generations(out)) == 1 and out.read_bytes() == row + b"\n"


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    out = tmp_path / "gen.jsonl"
    out.write_text(f"{json.dumps(_row('a'))}\nnot json\n{json.dumps(_row('c'))}\n")
    with pytest.raises(BenchmarkError, match=r"gen.jsonl: line 2: is not valid JSON"):
        read_generations(out)


@pytest.mark.parametrize(("line", "problem"), [
    ("42", r"is a JSON number \(42\), not a generation row"), ("[]", r"is a JSON array \(\[\]\), not a generation row"),
    ('"text"', "is a JSON string"), ("null", "is a JSON null"),
    (json.dumps({k: v for k, v in _row("x").items() if k != "completion"}), "has no field 'completion'"),
    (json.dumps(_row(5)), r"field 'id' is 5, not a string"), (json.dumps(_row("x", harmful="yes")), "field 'harmful'"),
    (json.dumps(_row("x", image=3)), r"field 'image' is 3, not a string or null"),
    (json.dumps(_row("x", task="qa")), r"field 'task' is 'qa', not one of \('safety', "),
    (json.dumps(_row("x", answers=["a", 1])), r"field 'answers' is \[\"a\", 1\], not a list of strings")])
@pytest.mark.parametrize("last", [False, True])
def test_structurally_wrong_line_is_an_error_naming_file_and_line(line, problem, last, tmp_path):
    """A line that parses but is not a row fails like a corrupt one, also as the last line (a kill cannot leave a
    complete JSON value that is not a row), and the file is left as it was."""
    out = tmp_path / "gen.jsonl"
    good = json.dumps(_row("a"))
    content = f"{good}\n{line}" if last else f"{good}\n{line}\n{json.dumps(_row('c'))}\n"
    out.write_text(content)
    with pytest.raises(BenchmarkError, match=rf"gen.jsonl: line 2: {problem}.*; fix or delete the line"):
        read_generations(out)
    assert out.read_text() == content


def test_repeated_lines_are_counted_once_and_differences_warned(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    out = run / "generations.jsonl"
    comply = "Sure, here are the steps."
    rows = [_row("1", "xs", completion=comply), _row("2", "xs"), _row("1", "xs", completion=comply), _row("1", "xs"),
            _row("1", "other")]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING"):
        got = read_generations(out)
    assert got == [rows[0], rows[1], rows[4]]  # first of each (benchmark, id), in file order
    assert "2 line(s) repeat a (benchmark, id)" in caplog.text and "line 4 (xs/1) differs from line 1" in caplog.text
    assert "line 3" not in caplog.text  # an identical repeat is counted, not listed
    metrics = report_run(run)
    assert metrics["xs"]["attack_success_rate"]["total"] == 2 and metrics["other"]["attack_success_rate"]["total"] == 1
    assert metrics["xs"]["attack_success_rate"]["attack_success_rate"] == 0.5  # the kept first line of xs/1 complies


def test_unreadable_image_names_file_and_record_and_keeps_the_jsonl_valid(tiny, records, tmp_path):
    model, processor = tiny
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    rows = records[:2] + [EvalRecord("bad", "typo", "weapons", "Read it.", str(broken), harmful=True)]
    out = tmp_path / "gen.jsonl"
    with pytest.raises(BenchmarkError, match=r"broken.png: record typo/bad: the image cannot be opened"):
        generate(model, processor, rows, out, batch_size=2, max_new_tokens=2, progress=False)
    assert [r["id"] for r in _lines(out)] == ["img0", "img1"]


def test_duplicate_ids_are_rejected(tiny, records, tmp_path):
    model, processor = tiny
    with pytest.raises(ValueError, match="repeated: \\['typo/img0'\\]"):
        generate(model, processor, [records[0], records[0]], tmp_path / "gen.jsonl", progress=False)


def test_plain_tokenizer_text_model(tmp_path, records):
    tokenizer = make_processor("qwen2.5-text")
    model = make_model("qwen2.5-text", tokenizer)
    text_rows = [r for r in records if r.image is None]
    out = generate(model, tokenizer, text_rows, tmp_path / "gen.jsonl", batch_size=3, max_new_tokens=3,
                   progress=False)
    assert len(_lines(out)) == len(text_rows) and tokenizer.padding_side == "left"
    with pytest.raises(ValueError, match="has an image but the model has no image processor"):
        generate(model, tokenizer, records[:1], tmp_path / "img.jsonl", progress=False)


def test_lora_adapter_is_loaded(tiny_dir, tmp_path, records):
    """The adapter (random, non-zero B: a fresh LoRA would change nothing) is merged: the loaded model computes what
    the base with the adapter computes, and not what the base alone computes."""
    import torch

    base = make_model("llava-1.5", make_processor("llava-1.5"))
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    model, processor = load_model_and_processor(str(tiny_dir), adapter_path=str(tmp_path / "adapter"), device="cpu")
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged into the base weights
    inputs = processor.tokenizer(["USER: Hello there ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        merged, adapted = model(**inputs).logits, peft_model.eval()(**inputs).logits
        with peft_model.disable_adapter():
            plain = peft_model(**inputs).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(merged, plain, atol=1e-3)
    out = generate(model, processor, records[:2], tmp_path / "gen.jsonl", max_new_tokens=2, progress=False)
    assert len(_lines(out)) == 2


@pytest.mark.parametrize("family", ["qwen2-vl", "idefics3", "gemma3"])
def test_other_vlm_processors(family, records, tmp_path):
    processor = make_processor(family)
    model = make_model(family, processor)
    rows = records[:3] + records[-2:]  # image and text-only rows
    out = generate(model, processor, rows, tmp_path / "gen.jsonl", batch_size=2, max_new_tokens=2, progress=False)
    assert sorted(r["id"] for r in _lines(out)) == sorted(r.id for r in rows)


def test_variants_sharing_raw_ids_are_never_reused(tiny, tmp_path):
    """FigStep SafeBench and SafeBench-Tiny share their dataset/category/task names: generating Tiny first, then the
    full set into the same file, generates every full-set row (nothing of Tiny's is taken as done)."""
    data = tmp_path / "data"
    (data / "question").mkdir(parents=True)
    for subset, name in (("SafeBench", "safebench.csv"), ("SafeBench-Tiny", "SafeBench-Tiny.csv")):
        (data / "question" / name).write_text("dataset,category_id,task_id,category_name\n"
                                              "ForbidQI,1,1,Illegal\nForbidQI,1,2,Illegal\n")
        (data / "images" / subset).mkdir(parents=True)
        for t in (1, 2):
            Image.new("RGB", (8, 8), "white").save(data / "images" / subset / f"query_ForbidQI_1_{t}_6.png")
    model, processor = tiny
    out = tmp_path / "gen.jsonl"
    generate(model, processor, load_figstep(data, "SafeBench-Tiny"), out, max_new_tokens=2, progress=False)
    written = []
    generate(model, processor, load_figstep(data, "SafeBench"), out, max_new_tokens=2, progress=False,
             on_batch=written.append)
    assert written[-1] == 2
    assert [(r["id"], r["variant"]) for r in _lines(out)] == [
        ("SafeBench-Tiny/ForbidQI_1_1", "SafeBench-Tiny"), ("SafeBench-Tiny/ForbidQI_1_2", "SafeBench-Tiny"),
        ("SafeBench/ForbidQI_1_1", "SafeBench"), ("SafeBench/ForbidQI_1_2", "SafeBench")]
