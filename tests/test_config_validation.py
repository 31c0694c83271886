"""Typed configuration: every bad value is refused the same way from YAML (`--config`), flags and Python, with one
line naming the option, the value and the fix; unknown options get the closest name; shipped configs still parse."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trl import ModelConfig

from trl_rejection import RejectionSFTConfig
from trl_rejection.cli import MixScriptArguments
from trl_rejection.data import MixConfig, build_mix, plan_mix, write_sample_data
from trl_rejection.data.formats import open_source
from trl_rejection.parsing import StrictTrlParser
from trl_rejection.validation import ConfigError, matches, own_fields, type_hints

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--bf16", "false", "--use_cpu", "true"]  # no GPU here; TRL defaults to bf16


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SFT, EVAL = _recipe("sft_rejection"), _recipe("eval_safety")


def mix_cli(args: list[str]) -> MixScriptArguments:
    """`trl-rejection mix`'s parser."""
    (parsed,) = StrictTrlParser((MixScriptArguments,)).parse_args_and_config(args)
    return parsed


def sft_recipe(args: list[str], tmp_path: Path) -> tuple:
    """recipes/sft_rejection.py's parser (its `__main__` block builds the same one)."""
    parser = StrictTrlParser((SFT.ScriptArguments, RejectionSFTConfig, ModelConfig), nested={"mix": MixConfig})
    return parser.parse_args_and_config([*args, "--output_dir", str(tmp_path / "out"), *CPU])


def eval_recipe(args: list[str]) -> object:
    (parsed,) = StrictTrlParser(EVAL.EvalSafetyArguments).parse_args_and_config(args)
    return parsed


def write_yaml(tmp_path: Path, values: dict, name: str = "bad.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


def refused(call, option: str, problem: str, fix: str) -> ConfigError:
    """`call()` raises a one-line ConfigError naming `option`, saying `problem` and `Fix: ...fix...`."""
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    assert re.search(rf"(^|[ :.-]){re.escape(option)}: ", message), message
    assert re.search(problem, message), message
    assert re.search(rf"Fix: .*{fix}", message), message
    return info.value


# option, YAML value, flag text (None: no flag spelling gives this value), problem, fix
MIX_CASES = [
    ("refusal_sentences", "Sorry.", None, r"'Sorry\.' is a plain string where a list", r"give a list, e\.g\. "
     r"refusal_sentences: \['Sorry\.'\]"),
    ("followup_markers", "what about", None, "plain string where a list", "give a list"),
    ("turn_choice", "last", "last", "'last'.*'first', 'random'", "one of 'first'"),
    ("validate", "everything", "everything", "'everything'.*'drawn', 'all'", "one of 'drawn', 'all'"),
    ("duplicate_ids", "keep", "keep", "'keep'", "one of 'error', 'suffix'"),
    ("n_refusal", 2.5, "2.5", r"2\.5", "whole number"),
    ("n_refusal", True, "true", "(True|'true')", "whole number"),
    ("seed", 1.5, "1.5", r"1\.5", "whole number"),
    ("seed", -1, "-1", "-1 is not a seed >= 0", "give e.g. 0"),
    ("n_refusal", -3, "-3", "-3 is not a count >= 0", "count >= 0"),
    ("allow_capping", "maybe", "maybe", "maybe", "true or false"),
    ("refusal_fraction", 1.5, "1.5", r"outside \(0, 1\)", "strictly between 0 and 1"),
    ("split", 7, None, r"7 \(int\) is not a string", "a string"),
]


def _mix_yaml(option: str, value) -> dict:
    base = {"n_refusal": 5, "n_normal": 5} if option not in ("n_normal", "total", "refusal_fraction") else {"total": 9}
    if option == "refusal_fraction":
        base["refusal_fraction"] = value
    return {**base, option: value}


@pytest.mark.parametrize("option,value,flag,problem,fix", MIX_CASES)
def test_mix_options_refused_from_yaml_flags_and_python(option, value, flag, problem, fix, tmp_path):
    values = _mix_yaml(option, value)
    config = write_yaml(tmp_path, values)
    error = refused(lambda: mix_cli(["--config", config]), option, problem, fix)
    assert str(error).startswith(config + ": ")  # the file is named
    refused(lambda: MixConfig(**values), option, problem, fix)
    refused(lambda: sft_recipe(["--config", write_yaml(tmp_path, {"mix": values}, "r.yaml")], tmp_path),
            f"mix.{option}", problem, fix)
    refused(lambda: sft_recipe(["--mix", json.dumps(values)], tmp_path), f"mix.{option}", problem, fix)
    if flag is not None:
        counts = [] if option == "refusal_fraction" else ["--n_refusal", "5", "--n_normal", "5"]
        flags = ["--total", "9"] if option == "refusal_fraction" else counts
        refused(lambda: mix_cli([*flags, f"--{option}", flag]), option, problem, "")


# option, YAML value, flag text, problem, fix (RejectionSFTConfig's own fields and max_length)
SFT_CASES = [
    ("truncation_policy", "raise", "raise", "'raise'.*'drop', 'error'", "one of 'drop', 'error'"),
    ("projector_modules", "...", None, r"'\.\.\.' is a plain string where a list", r"give a list, e\.g\. "
     r"projector_modules: \['\.\.\.'\]"),
    ("refusal_sentences", "Sorry.", None, "plain string where a list", "give a list"),
    ("projector_modules", [""], None, "non-blank", "remove the blank entries"),
    ("max_length", 0, "0", "0 is not a number of tokens >= 1", "positive number"),
    ("max_length", -5, "-5", "-5 is not", "positive number"),
    ("refusal_label_tokens", 0, "0", "0 is not a number of tokens >= 1", "positive number"),
    ("refusal_label_tokens", 2.5, "2.5", r"2\.5", "whole number"),
    ("projector_lr", -2e-5, "-0.00002", "not a finite learning rate > 0", r"2\.0e-5"),
    ("projector_lr", "fast", "fast", "'fast'", "a number"),
    ("mask_refusal_eos", "maybe", "maybe", "maybe", "true or false"),
    ("dataloader_num_workers", -1, "-1", "-1 is not a number of processes >= 0", "give e.g. 4"),
    # a mistyped scalar's fix shows the field's own default, not a generic example
    ("checkpoint_memory_fraction", "high", "high", "'high'",
     r"give a number, e\.g\. checkpoint_memory_fraction: 0\.85 in YAML, --checkpoint_memory_fraction 0\.85"),
    ("recompute_lora_dropout", "sometimes", "sometimes", "sometimes", r"e\.g\. recompute_lora_dropout: true in YAML"),
]


@pytest.mark.parametrize("option,value,flag,problem,fix", SFT_CASES)
def test_training_options_refused_from_yaml_flags_and_python(option, value, flag, problem, fix, tmp_path):
    config = write_yaml(tmp_path, {option: value})
    error = refused(lambda: sft_recipe(["--config", config], tmp_path), option, problem, fix)
    assert str(error).startswith(config + ": ")
    refused(lambda: RejectionSFTConfig(str(tmp_path), use_cpu=True, bf16=False, **{option: value}), option,
            problem, fix)
    if flag is not None:
        refused(lambda: sft_recipe([f"--{option}", flag], tmp_path), option, problem, "")


def test_flags_give_lists_and_yaml_text_is_converted_like_flags(tmp_path):
    """The same input means the same in both: a flag with one value is a one-element list; YAML's `2e-5` (a string
    to YAML 1.1) and `"8"` are converted as flags are. TRL's own list options keep TRL's meaning of a string."""
    assert mix_cli(["--refusal_sentences", "Sorry.", "--n_refusal", "1", "--n_normal", "1"]).refusal_sentences \
        == ["Sorry."]
    config = write_yaml(tmp_path, {"projector_lr": "2e-5", "refusal_label_tokens": "8", "learning_rate": "1e-4",
                                   "lora_target_modules": "all-linear", "mix": {"n_refusal": "3", "n_normal": 4}})
    script, args, model = sft_recipe(["--config", config], tmp_path)
    assert args.projector_lr == 2e-5 and args.refusal_label_tokens == 8 and args.learning_rate == 1e-4
    assert model.lora_target_modules == "all-linear"
    assert script.mix == {"n_refusal": 3, "n_normal": 4}


def test_trl_fields_get_the_scalar_checks_their_flags_get(tmp_path):
    refused(lambda: sft_recipe(["--config", write_yaml(tmp_path, {"per_device_train_batch_size": 2.5})], tmp_path),
            "per_device_train_batch_size", r"2\.5", "whole number")
    refused(lambda: sft_recipe(["--config", write_yaml(tmp_path, {"seed": 1.5})], tmp_path), "seed", r"1\.5",
            "whole number")
    refused(lambda: sft_recipe(["--config", write_yaml(tmp_path, {"use_peft": "sometimes"})], tmp_path),
            "use_peft", "sometimes", "true or false")


@pytest.mark.parametrize("args,option,suggestion", [
    (["--lerning_rate", "1e-4"], "--lerning_rate", "--learning_rate"),
    (["--lerning_rate=1e-4"], "--lerning_rate", "--learning_rate"),
    (["--learning", "1e-4"], "--learning", "--learning_rate"),  # abbreviations are not accepted
    (["--projector_module", "x"], "--projector_module", "--projector_modules"),
])
def test_unknown_flags_suggest_the_closest_name(args, option, suggestion, tmp_path):
    refused(lambda: sft_recipe(args, tmp_path), option, "no such option", f"did you mean {re.escape(suggestion)}")


def test_unknown_yaml_keys_and_mix_keys_suggest_the_closest_name(tmp_path):
    config = write_yaml(tmp_path, {"lerning_rate": 1e-4})
    error = refused(lambda: sft_recipe(["--config", config], tmp_path), "lerning_rate", "no such option",
                    "did you mean learning_rate")
    assert str(error).startswith(config)
    refused(lambda: mix_cli(["--config", write_yaml(tmp_path, {"n_refusl": 3})]), "n_refusl", "no such option",
            "did you mean n_refusal")
    refused(lambda: sft_recipe(["--config", write_yaml(tmp_path, {"mix": {"n_refusl": 3, "n_normal": 2}})],
                               tmp_path), "mix.n_refusl", "no such option", "did you mean n_refusal")
    refused(lambda: sft_recipe(["--mix", '{"turn_choise": "random"}'], tmp_path), "mix.turn_choise",
            "no such option", "did you mean turn_choice")
    # a mix field given at the top level points at the block it belongs in
    refused(lambda: sft_recipe(["--n_refusal", "3"], tmp_path), "--n_refusal", "field of the mix block",
            "put it in the mix: block")


def test_bad_blocks_and_files_are_refused(tmp_path):
    refused(lambda: sft_recipe(["--mix", "{n_refusal: 3}"], tmp_path), "mix", "not a JSON object", "JSON object")
    refused(lambda: sft_recipe(["--config", write_yaml(tmp_path, {"mix": [1, 2]})], tmp_path), "mix",
            "not a mapping", "YAML block")
    refused(lambda: mix_cli(["--config", str(tmp_path / "missing.yaml")]), "--config", "cannot read", "YAML file")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    refused(lambda: mix_cli(["--config", str(tmp_path / "list.yaml")]), "--config", "not a mapping", "option: value")
    (tmp_path / "broken.yaml").write_text("n_refusal: [1\n")
    refused(lambda: mix_cli(["--config", str(tmp_path / "broken.yaml")]), "--config", "not valid YAML", "syntax")
    refused(lambda: mix_cli(["--n_refusal", "3", "stray"]), "'stray'", "a value without an option", "--option")


def test_eval_lists_refuse_a_plain_string_in_yaml(tmp_path):
    refused(lambda: eval_recipe(["--config", write_yaml(tmp_path, {"benchmarks": "bundled"})]), "benchmarks",
            "plain string where a list", "give a list")
    assert eval_recipe(["--benchmarks", "bundled"]).benchmarks == ["bundled"]
    refused(lambda: eval_recipe(["--config", write_yaml(tmp_path, {"batch_size": "eight"})]), "batch_size",
            "'eight' is not a whole number", "whole number")


@pytest.mark.parametrize("config", sorted((ROOT / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(config, tmp_path):
    if config.name.startswith("eval_"):
        eval_recipe(["--config", str(config)])
        return
    if config.name.startswith("sweep_"):
        from trl_rejection.sweep import SweepConfig, SweepGrid

        (sweep,) = StrictTrlParser(SweepConfig, nested={"grid": SweepGrid}).parse_args_and_config(
            ["--config", str(config)])
        assert (ROOT / sweep.train_config).is_file() and sweep.grid
        return
    script, args, _ = sft_recipe(["--config", str(config)], tmp_path)
    assert script.mix is None or MixConfig(**script.mix).counts()[0] > 0


def test_counts_rounding_to_zero_refusal_rows_is_refused_with_the_smallest_total(tmp_path):
    error = refused(lambda: mix_cli(["--total", "10", "--refusal_fraction", "0.01"]), "refusal_fraction",
                    r"total=10 x refusal_fraction=0\.01 = 0\.1 rounds to 0 refusal rows", "give total >= 51")
    assert "n_refusal and n_normal" in error.fix
    refused(lambda: MixConfig(total=10, refusal_fraction=0.01), "refusal_fraction", "rounds to 0", "total >= 51")
    assert MixConfig(total=51, refusal_fraction=0.01).counts() == (1, 50)
    refused(lambda: MixConfig(total=50, refusal_fraction=0.01), "refusal_fraction", "rounds to 0", "total >= 51")


@settings(max_examples=60, deadline=None)
@given(total=st.integers(1, 10_000), fraction=st.floats(1e-6, 0.5, exclude_max=True))
def test_smallest_total_said_is_the_smallest_with_a_refusal_row(total, fraction):
    if round(total * fraction) >= 1:
        assert MixConfig(total=total, refusal_fraction=fraction).counts()[0] >= 1
        return
    with pytest.raises(ConfigError) as info:
        MixConfig(total=total, refusal_fraction=fraction)
    smallest = int(re.search(r"total >= (\d+)", str(info.value))[1])
    assert round(smallest * fraction) >= 1 and round((smallest - 1) * fraction) == 0


@pytest.mark.parametrize("kwargs,option,problem", [
    ({"n_refusal": 3, "total": 10, "refusal_fraction": 0.3}, "total", "both counts"),
    ({"n_refusal": 3}, "n_normal", "go together"),
    ({"total": 10}, "refusal_fraction", "go together"),
    ({"n_refusal": 0, "n_normal": 0}, "n_refusal", "would be empty"),
    ({"total": 0, "refusal_fraction": 0.5}, "total", "0 is not a row count >= 1"),
])
def test_inconsistent_counts_are_refused_up_front(kwargs, option, problem, tmp_path):
    refused(lambda: MixConfig(**kwargs), option, problem, "")
    refused(lambda: mix_cli(["--config", write_yaml(tmp_path, kwargs)]), option, problem, "")


def test_a_mix_of_only_refusal_rows_warns_and_the_card_says_so(tmp_path):
    files = write_sample_data(tmp_path / "src", n_refusal=6, n_normal=6)
    refusal, normal = open_source(str(files["refusal"])), open_source(str(files["normal"]))
    with pytest.warns(UserWarning, match="Every row is a refusal row"):
        plan = plan_mix(MixConfig(n_refusal=4, n_normal=0), refusal, normal)
    assert any("Every row is a refusal row" in note for note in plan.notes)
    with pytest.warns(UserWarning, match="Every row is a refusal row"):
        build_mix(MixConfig(str(files["refusal"]), str(files["normal"]), total=5, refusal_fraction=0.95),
                  tmp_path / "mix")
    assert "Every row is a refusal row (n_normal = 0)" in (tmp_path / "mix" / "README.md").read_text()


WRONG = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=8),
                  st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                          max_size=2))
MIX_FIELDS = own_fields(MixConfig)
SFT_FIELDS = own_fields(RejectionSFTConfig)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_wrong_typed_value_is_refused_naming_its_field(data, tmp_path):
    """Python API: for every field of MixConfig and every own field of RejectionSFTConfig, a value of the wrong type
    is a ConfigError naming the field and the fix. From YAML the same (non-text) value is refused for the mix."""
    cls, names = data.draw(st.sampled_from([(MixConfig, MIX_FIELDS), (RejectionSFTConfig, SFT_FIELDS)]))
    name = data.draw(st.sampled_from(names))
    hint = type_hints(cls)[name]
    value = data.draw(WRONG.filter(lambda v: not matches(v, hint)))
    extra = {"output_dir": str(tmp_path), "use_cpu": True, "bf16": False} if cls is RejectionSFTConfig else {}
    with pytest.raises(ConfigError) as info:
        cls(**extra, **{name: value})
    assert str(info.value).startswith(f"{name}: ") and "Fix: give" in str(info.value)
    if cls is MixConfig and not isinstance(value, str):
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}.*: {name}: .*Fix: give"):
            mix_cli(["--config", write_yaml(tmp_path, {name: value}, "p.yaml")])


def test_fields_are_checked_even_after_the_parser_rewrote_field_types():
    """HfArgumentParser rewrites `Field.type` in place (`int | None` -> `int`); checks read the real hints."""
    StrictTrlParser((MixScriptArguments,))
    with pytest.raises(ConfigError, match="n_refusal: 2.5"):
        MixConfig(n_refusal=2.5, n_normal=1)
    assert MixConfig(n_refusal=None).n_refusal is None


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRL_REJECTION_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)


@pytest.mark.parametrize("entry,values", [
    (["-m", "trl_rejection.cli", "mix"], {"n_refusal": True, "n_normal": 5}),
    ([str(ROOT / "recipes" / "sft_rejection.py")], {"truncation_policy": "raise", "output_dir": "out"}),
    ([str(ROOT / "recipes" / "sft_rejection.py")], {"mix": {"n_refusal": 2, "n_normal": 2, "turn_choice": "last"},
                                                    "output_dir": "out"}),
    ([str(ROOT / "recipes" / "eval_safety.py")], {"benchmarks": "bundled", "model_name_or_path": "tiny-llava",
                                                  "output_dir": "out"}),
])
def test_entry_points_print_one_error_line_and_exit_2(entry, values, tmp_path):
    """As a user runs them: exit status 2, one `error: ...` line naming the file, no traceback, nothing written
    (the recipe fails before any model is built or output folder made)."""
    config = write_yaml(tmp_path, values)
    proc = _run([*entry, "--config", config], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {config}: ") and "Fix: " in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


@pytest.mark.parametrize("value,text", [(2e-5, "2.0e-05"), (1e20, "1.0e+20"), (0.85, "0.85"), (3, "3"),
                                        (True, "true"), (1.5e-7, "1.5e-07")])
def test_defaults_shown_in_fixes_read_back_as_the_same_value_in_yaml(value, text):
    """YAML 1.1 reads `2e-05` as a string: a default shown in a fix is written so that it reads back as itself."""
    from trl_rejection.validation import _scalar_text

    assert _scalar_text(value) == text and yaml.safe_load(f"x: {text}")["x"] == value


def test_a_fresh_run_refuses_measurement_files_of_an_earlier_run_and_a_resume_appends(tmp_path):
    """`--metrics_file` and `--record_data_order` append (a resumed run continues its records), so a run that does not
    resume must not pool its records with an earlier run's: it stops before building anything, naming the files and
    the fix, and leaves them as they were. A resume must name a checkpoint folder, the metrics file a usable path."""
    from trl_rejection.errors import UserError

    metrics, out, checkpoint = tmp_path / "metrics.jsonl", tmp_path / "out", tmp_path / "out" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    order, earlier = out / "data_order_rank1.jsonl", '{"step": 1}\n'
    base = ["--dataset_path", str(tmp_path / "data"), "--metrics_file", str(metrics)]

    def check(*extra: str, args: list[str] = base) -> None:
        SFT.check_run_paths(*sft_recipe([*args, *extra], tmp_path))

    metrics.write_text("")
    check("--record_data_order", "true")  # an empty metrics file and no data order yet: nothing to pool with
    metrics.write_text(earlier)
    with pytest.raises(UserError, match=rf"--metrics_file {re.escape(str(metrics))} already holds records of an "
                       r"earlier run.*Fix: pass another --metrics_file"):
        check()
    metrics.unlink()
    order.write_text('["row0"]\n')
    check()  # the data order files are not this run's business without --record_data_order
    with pytest.raises(UserError, match=rf"{re.escape(str(order))}: the data order of an earlier run.*Fix: pass "
                       r"another --output_dir"):
        check("--record_data_order", "true")
    metrics.write_text(earlier)
    check("--record_data_order", "true", "--resume_from_checkpoint", str(checkpoint))  # a resume appends to both
    assert order.read_text() == '["row0"]\n' and metrics.read_text() == earlier  # nothing written or removed
    for bad in ("true", "", str(out / "checkpoint-9")):
        with pytest.raises(UserError, match="is not a folder. Fix: give a checkpoint folder"):
            check("--resume_from_checkpoint", bad)
    for path in (tmp_path, tmp_path / "missing" / "metrics.jsonl"):
        with pytest.raises(UserError, match="is a folder or lies in a folder that does not exist"):
            check(args=["--dataset_path", str(tmp_path / "data"), "--metrics_file", str(path)])
