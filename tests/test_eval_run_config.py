"""`trl_rejection.eval.run_config`: what run_config.json records, and which reruns it lets resume, re-score or refuses
(the recipe's end-to-end runs are in test_eval_recipe.py)."""

import json

import pytest

from trl_rejection.errors import UserError
from trl_rejection.eval.records import EvalRecord
from trl_rejection.eval.run_config import EvalSafetyArguments, benchmark_inputs, check_run_config, fingerprint, \
    generation_settings, judge_spec, run_config

RECORDS = [EvalRecord(f"q{i}", "xstest", "homonyms" if i % 2 else "figurative", f"prompt {i}", None, harmful=False)
           for i in range(6)]


def _args(tmp_path, **kwargs):
    return EvalSafetyArguments(model_name_or_path="tiny-llava", benchmarks=["xstest"], output_dir=str(tmp_path / "run"),
                               xstest_path=str(tmp_path / "xstest.csv"), **kwargs)


def _written(tmp_path, config):
    """A run folder that holds generations made with `config`."""
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "generations.jsonl").write_text("{}\n")
    (run / "run_config.json").write_text(json.dumps(config))
    return str(run)


def test_generation_settings_name_what_changes_a_generation_and_no_more(tmp_path):
    settings = generation_settings(_args(tmp_path), RECORDS)
    assert settings["records"]["xstest"]["n"] == 6 and len(settings["records"]["xstest"]["sha256"]) == 64
    assert settings["decoding"] == "greedy" and settings["max_new_tokens"] == 256 and settings["sample_seed"] is None
    assert settings["xstest_path"] == str(tmp_path / "xstest.csv") and "figstep_dir" not in settings
    assert not {"judge", "batch_size", "device", "output_dir"} & set(settings)
    edited = [RECORDS[0].__class__(**{**RECORDS[0].__dict__, "prompt": "edited"}), *RECORDS[1:]]
    assert generation_settings(_args(tmp_path), edited)["records"] != settings["records"]
    assert "peft" not in settings["versions"] and "peft" in generation_settings(
        _args(tmp_path, adapter_path="a"), RECORDS)["versions"]


def test_run_config_records_the_sample_and_the_judges(tmp_path):
    config = run_config(_args(tmp_path, max_samples=2, judge="xstest"), RECORDS, RECORDS[:2])
    assert config["sampling"]["benchmarks"] == {"xstest": {"kept": 2, "of": 6}} and config["sampling"]["seed"] == 0
    assert config["scoring"] == {"judge": "xstest", "judges": [], "guard_judge": None}
    assert config["recorded"] == {"batch_size": [8], "device": "auto"}


def test_a_rerun_resumes_rescores_or_is_refused(tmp_path):
    args = _args(tmp_path)
    config = run_config(args, RECORDS, RECORDS)
    assert check_run_config(args.output_dir, json.loads(json.dumps(config))) is None  # new folder: written
    out = _written(tmp_path, config)
    assert check_run_config(out, json.loads(json.dumps(config))) is None  # same settings: resumes
    rejudged = run_config(_args(tmp_path, judge="xstest", batch_size=2), RECORDS, RECORDS)
    note = check_run_config(out, rejudged)
    assert note.startswith("judge settings changed (judge 'paper' -> 'xstest'): re-scoring")
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["recorded"]["batch_size"] == [8, 2]
    longer = run_config(_args(tmp_path, judge="xstest", max_new_tokens=9), RECORDS, RECORDS)
    with pytest.raises(UserError, match=r"other settings \(max_new_tokens 256 -> 9\)\. Fix: pass another --output_dir"):
        check_run_config(out, longer)


def test_judge_spec_and_inputs(tmp_path):
    args = EvalSafetyArguments(benchmarks=["vlguard", "xstest", "figstep"], judge="paper", adapter_path="adapter",
                               judges=["vlguard=vlguard", "xstest=xstest"], guard_judge="/models/guard")
    assert judge_spec(args) == {"*": "paper", "vlguard": "vlguard", "xstest": "xstest"}
    args.judge = "auto"
    assert judge_spec(args)["*"] == "auto"
    for bad, message in (("vlguard", "BENCHMARK=JUDGE"), ("mmsb=paper", "not in --benchmarks"),
                         ("xstest=xtest", "unknown judge 'xtest'")):
        args.judges = [bad]
        with pytest.raises(UserError, match=message):
            judge_spec(args)
    assert benchmark_inputs(args) == [args.vlguard_dir, args.xstest_path, args.figstep_dir, "adapter"]


def test_fingerprint_follows_file_content(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights v1")
    first = fingerprint(str(adapter))
    assert fingerprint(str(adapter)) == first and len(first) == 64
    (adapter / "adapter_model.safetensors").write_bytes(b"weights v2")  # retrained in place: same name and size
    assert fingerprint(str(adapter)) != first
    assert fingerprint("llava-hf/llava-1.5-7b-hf") is None and fingerprint(None) is None


def test_package_versions_and_adapter_are_generation_settings(tmp_path):
    (tmp_path / "generations.jsonl").write_text("{}\n")  # a folder that holds generations
    config = {"generation": {"adapter_path": "/runs/sft/final", "adapter_fingerprint": "a" * 64,
                             "versions": {"torch": "2.5.0", "transformers": "4.57.0", "trl_rejection": "0.1.0"}},
              "scoring": {"judge": "paper"}, "sampling": {"max_samples": None}, "recorded": {"batch_size": [8]}}
    (tmp_path / "run_config.json").write_text(json.dumps(config))
    newer = json.loads(json.dumps(config))
    newer["generation"]["versions"]["transformers"] = "5.0.0"
    with pytest.raises(UserError, match=r"other settings \(versions.transformers '4.57.0' -> '5.0.0'\)"):
        check_run_config(str(tmp_path), newer)
    retrained = json.loads(json.dumps(config))
    retrained["generation"]["adapter_fingerprint"] = "b" * 64
    with pytest.raises(UserError, match=r"adapter_fingerprint 'a{64}' -> 'b{64}'"):
        check_run_config(str(tmp_path), retrained)
    assert check_run_config(str(tmp_path), json.loads(json.dumps(config))) is None  # same: resumes
