"""recipes/eval_safety.py end to end on the tiny random LLaVA: YAML config + CLI overrides, resume guard, compare."""

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("eval_safety", ROOT / "recipes" / "eval_safety.py")
eval_safety = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval_safety)


def _run(*argv):
    from trl import TrlParser

    (args,) = TrlParser(eval_safety.EvalSafetyArguments).parse_args_and_config(list(argv))
    eval_safety.main(args)
    return args


@pytest.mark.parametrize("config", sorted((ROOT / "recipes" / "configs").glob("eval_*.yaml")))
def test_configs_parse(config):
    from trl import TrlParser

    (args,) = TrlParser(eval_safety.EvalSafetyArguments).parse_args_and_config(["--config", str(config)])
    assert args.model_name_or_path and args.benchmarks


def test_bundled_run_with_tiny_llava_then_compare(tmp_path, capsys):
    config = str(ROOT / "recipes" / "configs" / "eval_bundled.yaml")
    args = _run("--config", config, "--model_name_or_path", "tiny-llava", "--output_dir", str(tmp_path / "base"),
                "--max_new_tokens", "3", "--batch_size", "6")
    assert args.benchmarks == ["bundled"] and args.max_new_tokens == 3  # YAML values with CLI overrides
    run = tmp_path / "base"
    for name in ("generations.jsonl", "scored.jsonl", "metrics.json", "report.md", "asr_by_category.png"):
        assert (run / name).exists(), name
    assert "| bundled | all |" in capsys.readouterr().out
    lines = (run / "generations.jsonl").read_text().splitlines()
    _run("--config", config, "--model_name_or_path", "tiny-llava", "--output_dir", str(run), "--max_new_tokens", "3")
    assert (run / "generations.jsonl").read_text().splitlines() == lines  # resumed: nothing regenerated
    with pytest.raises(ValueError, match="holds generations made with"):
        _run("--config", config, "--model_name_or_path", "other-model", "--output_dir", str(run))
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained" / "metrics.json").write_text((run / "metrics.json").read_text())
    _run("--compare", str(run), str(tmp_path / "trained"), "--output_dir", str(tmp_path / "cmp"))
    assert "ASR ↓ base | ASR ↓ trained" in capsys.readouterr().out
    assert Image.open(tmp_path / "cmp" / "comparison.png").format == "PNG"


def test_bad_arguments_are_explained(tmp_path):
    with pytest.raises(ValueError, match="two run folders"):
        _run("--compare", "a", "b", "c")
    with pytest.raises(ValueError, match="--model_name_or_path"):
        _run("--output_dir", str(tmp_path))
    with pytest.raises(ValueError, match="needs files.*--generic_paths"):
        _run("--model_name_or_path", "tiny-llava", "--benchmarks", "generic", "--output_dir", str(tmp_path / "g"))


def test_run_folder_may_not_be_the_cwd_home_or_hold_the_benchmark(tmp_path, monkeypatch):
    from trl_rejection.io import UnsafePathError

    bench = tmp_path / "data" / "xstest"
    bench.mkdir(parents=True)
    (bench / "xstest_prompts.csv").write_text("id,prompt,type,label\n1,hi,safe,safe\n")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for out, match in ((".", "current folder"), ("..", "current folder or a parent"), ("data", "holds the input")):
        with pytest.raises(UnsafePathError, match=match):
            _run("--model_name_or_path", "tiny-llava", "--benchmarks", "xstest", "--xstest_path",
                 str(bench / "xstest_prompts.csv"), "--output_dir", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and sorted(bench.iterdir()) == [
        bench / "xstest_prompts.csv"]
