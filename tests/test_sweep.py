"""The refusal-dose sweep: point identity, config errors, aggregation against hand-computed numbers, and the real
recipe (tiny model, CPU) killed mid-sweep and resumed, with identical mixes built once."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from trl_rejection.errors import UserError
from trl_rejection.sweep import SweepConfig, collect, compare_sweeps, csv_text, expand, markdown, plot_data, \
    write_outputs
from trl_rejection.sweep.runner import check_configs
from trl_rejection.validation import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "recipes" / "sweep.py"
TRAIN, EVAL = ROOT / "recipes" / "sft_rejection.py", ROOT / "recipes" / "eval_safety.py"


def config(**changes) -> SweepConfig:
    base = dict(train={"mix": {"n_normal": 8}, "max_steps": 2}, eval={"max_new_tokens": 4},
                grid={"n_refusal": [0, 4], "refusal_label_tokens": [None, 2]})
    return SweepConfig(**{**base, **changes})


def hashes(cfg: SweepConfig) -> dict[str, str]:
    return {p.label: p.hash for p in expand(cfg)}


def test_point_identity_follows_every_result_changing_setting():
    first = hashes(config())
    assert list(first) == ["n_refusal=0, refusal_label_tokens=None", "n_refusal=0, refusal_label_tokens=2",
                           "n_refusal=4, refusal_label_tokens=None", "n_refusal=4, refusal_label_tokens=2"]
    assert first == hashes(config()) and len(set(first.values())) == 4  # same settings, same hashes; all distinct
    # a point keeps its identity in another grid that contains it
    other = hashes(config(grid={"n_refusal": [4, 8], "refusal_label_tokens": [2]}))
    assert other["n_refusal=4, refusal_label_tokens=2"] == first["n_refusal=4, refusal_label_tokens=2"]
    changed = [config(train={"mix": {"n_normal": 8}, "max_steps": 3}),  # training
               config(train={"mix": {"n_normal": 9}, "max_steps": 2}),  # mix
               config(train={"mix": {"n_normal": 8, "seed": 1}, "max_steps": 2}),
               config(eval={"max_new_tokens": 5}),  # generation
               config(eval={"max_new_tokens": 4, "judge": "auto"}),  # scoring changes the numbers too
               config(launch_args=["--num_processes", "2"])]  # the process count changes the batch
    for cfg in changed:
        assert not set(hashes(cfg).values()) & set(first.values()), cfg
    # what never changes a result keeps finished points: logging, saving, workers, eval batch size, device, folders
    same = config(train={"mix": {"n_normal": 8}, "max_steps": 2, "logging_steps": 7, "save_strategy": "steps",
                         "dataloader_num_workers": 3}, eval={"max_new_tokens": 4, "batch_size": 1, "device": "cpu"},
                  output_dir="elsewhere", launch_args=["--main_process_port", "29511"])
    assert hashes(same) == first
    # points that differ only in training options share one mix
    points = expand(config())
    assert points[0].mix_hash == points[1].mix_hash != points[2].mix_hash == points[3].mix_hash


def test_bad_sweep_settings_fail_in_one_line_naming_them():
    with pytest.raises(ConfigError, match=r"grid: no dose to sweep"):
        expand(config(grid={}))
    with pytest.raises(ConfigError, match=r"grid.n_refusl: no such option. Fix: did you mean n_refusal\?"):
        expand(config(grid={"n_refusl": [1]}))
    with pytest.raises(ConfigError, match="grid.refusal_fraction: both n_refusal and refusal_fraction"):
        expand(config(grid={"n_refusal": [1], "refusal_fraction": [0.5]}))
    with pytest.raises(ConfigError, match=r"grid.total: refusal_fraction points need a mix size"):
        expand(config(grid={"refusal_fraction": [0.5]}))
    with pytest.raises(ConfigError, match=r"grid.n_refusal: \[1, 1\] is not a non-empty list without repeats"):
        expand(config(grid={"n_refusal": [1, 1]}))
    with pytest.raises(ConfigError, match=r"mix.n_refusal: -1 is not a count >= 0"):
        expand(config(grid={"n_refusal": [-1]}))
    fraction = expand(config(grid={"refusal_fraction": [0.25, 0.5], "total": 8}))
    assert [p.mix.counts() for p in fraction] == [(2, 6), (4, 4)]
    # options of the recipes are checked by the recipes' own parsers before anything runs
    with pytest.raises(UserError, match=r"point n_refusal=0, .* train settings: lerning_rate: no such option. "
                                        r"Fix: did you mean learning_rate\?"):
        check_configs(expand(config(train={"mix": {"n_normal": 8}, "lerning_rate": 1.0})), TRAIN, EVAL)
    if not torch.cuda.is_available():  # a library's own check, said of the point
        with pytest.raises(UserError, match=r"n_refusal=0, .* train settings: .*doesn't support bf16/gpu"):
            check_configs(expand(config(train={"mix": {"n_normal": 8}, "bf16": True, "use_cpu": False})), TRAIN, EVAL)
    with pytest.raises(UserError, match=r"eval settings: max_new_tokens: 'x' is not a whole number"):
        check_configs(expand(config(eval={"max_new_tokens": "x"})), TRAIN, EVAL)


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _fabricate(sweep: Path) -> tuple[Path, list[Path]]:
    """A base run and three points with known numbers; the third never finished (no done.json)."""
    def metrics(asr, n_h, full, partial, n_s, acc=None):
        entry = {"bundled": {"attack_success_rate": {"attack_success_rate": asr, "total": n_h},
                             "over_refusal": {"over_refusal_rate": full + partial, "full_refusal_rate": full,
                                              "partial_refusal_rate": partial, "total": n_s}}}
        if acc is not None:
            entry["vizwiz"] = {"utility": {"accuracy": acc, "total": 4, "per_category": {}}}
        return entry
    base = sweep / "base" / "b0"
    _write(base / "point.json", {"kind": "base", "hash": "b0", "label": "base model", "model": "m"})
    _write(base / "eval" / "metrics.json", metrics(0.8, 10, 0.0, 0.125, 8, 0.5))
    _write(base / "eval" / "run_config.json", {"generation": {"model_name_or_path": "tiny-llava"}})
    points = []
    for h, n, asr, full, partial, acc, losses in (("p0", 0, 0.7, 0.125, 0.125, 0.5, (None, 2.0, 2.0)),
                                                  ("p4", 4, 0.3, 0.25, 0.125, 0.25, (1.5, 2.5, 2.25)),
                                                  ("p8", 8, 0.1, 0.5, 0.0, 0.0, (1.0, 3.0, 2.0))):
        folder = sweep / "points" / h
        _write(folder / "point.json", {"kind": "point", "hash": h, "label": f"n_refusal={n}", "dose": {"n_refusal": n},
                                       "model": "m", "n_refusal": n, "n_normal": 12, "refusal_label_tokens": None,
                                       "mask_refusal_eos": True, "seed": 0})
        _write(folder / "eval" / "metrics.json", metrics(asr, 10, full, partial, 8, acc))
        refusal, normal, loss = losses
        history = [{"loss": 9.0, "loss_refusal": 9.0, "loss_normal": 9.0, "step": 1},
                   {k: v for k, v in {"loss": loss, "loss_normal": normal, "step": 2}.items()},
                   {"train_runtime": 1.0, "train_loss": 5.5, "step": 2}]
        if refusal is not None:
            history[1]["loss_refusal"] = refusal
        else:
            del history[0]["loss_refusal"]
        _write(folder / "train" / "trainer_state.json", {"log_history": history, "num_input_tokens_seen": 100 + n,
                                                         "global_step": 2})
        if h != "p8":
            _write(folder / "done.json", {"hash": h})
        points.append(folder)
    _write(base / "done.json", {"hash": "b0"})
    return base, points


def test_aggregation_matches_hand_computed_numbers(tmp_path):
    base, points = _fabricate(tmp_path / "s")
    summary = collect(base, points, ["n_refusal"], {})
    rows = list(csv.DictReader(io.StringIO(csv_text(summary))))
    assert [r["label"] for r in rows] == ["base model", "n_refusal=0", "n_refusal=4"]  # p8 never finished
    assert summary["missing"] == ["p8"]
    base_row, p0, p4 = rows
    assert base_row["kind"] == "base" and base_row["loss"] == base_row["n_refusal"] == ""
    assert (p4["n_refusal"], p4["n_normal"], float(p4["refusal_fraction"])) == ("4", "12", 0.25)
    assert (p4["refusal_label_tokens"], p4["mask_refusal_eos"]) == ("all", "True")
    assert float(p4["asr/bundled"]) == 0.3 and p4["n/attack_success_rate/bundled"] == "10"
    assert (float(p4["over_refusal/bundled"]), float(p4["over_refusal_full/bundled"]),
            float(p4["over_refusal_partial/bundled"])) == (0.375, 0.25, 0.125)
    assert float(p4["utility/vizwiz"]) == 0.25 and p4["n/utility/vizwiz"] == "4"
    # the last logged value of each loss; the no-refusal control has no refusal loss
    assert (float(p4["loss_refusal"]), float(p4["loss_normal"]), float(p4["loss"])) == (1.5, 2.5, 2.25)
    assert float(p4["train_loss"]) == 5.5
    assert (p0["loss_refusal"], float(p0["loss_normal"])) == ("", 2.0)
    assert (p4["tokens_seen"], p4["steps"]) == ("104", "2")
    text = markdown(summary)
    assert "| point | p4 | n_refusal=4 | 4 | 12 | 25.0% | all | True | 0 | 30.0% | 37.5% | 25.0% | 12.5% | 25.0% |" in text
    assert "asr/bundled (n=10)" in text and "RANDOM-WEIGHT DRY RUN" in text and "not finished" in text
    data = plot_data(summary)
    assert data["x_axis"] == "n_refusal" and data["x_ticks"] is None
    assert data["asr"] == [{"benchmark": "bundled", "series": "", "x": [0, 4], "y": [0.7, 0.3]}]
    assert data["asr_base"] == {"bundled": 0.8} and data["utility_base"] == {"vizwiz": 0.5}
    assert data["over_refusal"][0]["y"] == [0.25, 0.375]
    assert data["tradeoff"] == {"points": [{"label": "n_refusal=0", "x": 0.25, "y": 0.7},
                                           {"label": "n_refusal=4", "x": 0.375, "y": 0.3}],
                                "base": {"label": "base model", "x": 0.125, "y": 0.8}}
    write_outputs(summary, tmp_path / "s")
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"][2]["asr/bundled"] == 0.3
    assert (tmp_path / "s" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    # a second sweep beside it: one table with a sweep column, one trade-off figure
    _fabricate(tmp_path / "t")
    write_outputs(collect(*_fabricate(tmp_path / "t"), ["n_refusal"], {}), tmp_path / "t")
    text = compare_sweeps(tmp_path / "s", tmp_path / "t", tmp_path / "cmp")
    assert text.count("| s | point |") == 2 and text.count("| t | base |") == 1
    assert (tmp_path / "cmp" / "comparison.png").is_file() and (tmp_path / "cmp" / "comparison.csv").is_file()


def test_non_numeric_dose_axis_is_drawn_at_positions(tmp_path):
    base, points = _fabricate(tmp_path / "s")
    for folder, tokens in zip(points, (None, 2)):
        info = json.loads((folder / "point.json").read_text())
        info["dose"] = {"mask_refusal_eos": tokens is None, "refusal_label_tokens": tokens}
        _write(folder / "point.json", info)
    data = plot_data(collect(base, points, ["mask_refusal_eos", "refusal_label_tokens"], {}))
    assert data["x_ticks"] == ["True", "False"]
    assert [(line["series"], line["x"], line["y"]) for line in data["asr"]] == [
        ("refusal_label_tokens=2", [1], [0.3]), ("refusal_label_tokens=None", [0], [0.7])]


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "TRL_REJECTION_CACHE": str(tmp_path / "cache"), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_killed_sweep_resumes_skipping_finished_points_and_reusing_the_mix(tmp_path):
    settings = dict(train_config=str(ROOT / "recipes" / "configs" / "tiny.yaml"),
                    train={"mix": {"n_normal": 8}, "max_steps": 2, "logging_steps": 1, "save_strategy": "no",
                           "per_device_train_batch_size": 4},
                    eval_config=str(ROOT / "recipes" / "configs" / "eval_bundled.yaml"),
                    eval={"max_new_tokens": 4, "max_samples": 4, "dtype": "float32", "device": "cpu"},
                    grid={"n_refusal": [4], "refusal_label_tokens": [None, 2]}, output_dir="sweep",
                    launch_args=["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                                 "--dynamo_backend", "no"])
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(settings))
    first, second = [tmp_path / "sweep" / "points" / p.hash for p in expand(SweepConfig(**settings))]
    cmd = [sys.executable, str(SWEEP), "--config", "sweep.yaml"]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    deadline = time.time() + 240
    while not ((first / "done.json").exists() and (second / "running.json").exists()):  # the second point trains
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (second / "done.json").exists()
    finished = _mtimes(first)
    rerun = subprocess.run(cmd, env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "1 finished earlier, 1 to run" in rerun.stdout and "base model: started" not in rerun.stdout
    assert _mtimes(first) == finished  # the finished point is untouched
    assert (second / "done.json").is_file() and (second / "train" / "final" / "adapter_model.safetensors").is_file()
    assert len(list((tmp_path / "sweep" / "mixes").iterdir())) == 1  # both points trained on one mix, built once
    assert "building" not in rerun.stdout
    rows = list(csv.DictReader((tmp_path / "sweep" / "sweep.csv").open()))
    assert [(r["kind"], r["refusal_label_tokens"]) for r in rows] == [("base", ""), ("point", "all"), ("point", "2")]
    for row in rows:
        assert row["asr/bundled"] != "" and row["n/attack_success_rate/bundled"] == "2"  # 4 samples: 2 harmful
    assert all(r["steps"] == "2" and float(r["loss_normal"]) > 0 and float(r["train_loss"]) > 0 and int(r["tokens_seen"]) > 0 for r in rows[1:])
    assert (tmp_path / "sweep" / "sweep.png").is_file() and "RANDOM-WEIGHT DRY RUN" in \
        (tmp_path / "sweep" / "sweep.md").read_text()


def test_parallel_points_get_their_own_gpus_ports_and_a_clean_environment(monkeypatch):
    from trl_rejection.sweep.processes import Runner, leave_launcher

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29400", "ACCELERATE_USE_FSDP": "true"}.items():
        monkeypatch.setenv(name, value)
    assert leave_launcher() and "WORLD_SIZE" not in os.environ and "ACCELERATE_USE_FSDP" not in os.environ
    runner = Runner(config(parallel_points=2, gpus_per_point=2, launch_args=["--mixed_precision", "bf16"]), TRAIN, EVAL)
    assert [runner.env(slot)["CUDA_VISIBLE_DEVICES"] for slot in (0, 1)] == ["3,5", "6,7"]
    assert runner.launch_args(1) == ["--mixed_precision", "bf16", "--num_processes", "2", "--gpu_ids", "all",
                                     "--main_process_port", "29501"]
    with pytest.raises(UserError, match=r"parallel_points=3 x gpus_per_point=2 needs 6 GPUs, 4 are visible"):
        Runner(config(parallel_points=3, gpus_per_point=2), TRAIN, EVAL)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # CPU: points share the cores, nothing placed
    cpu = Runner(config(parallel_points=2), TRAIN, EVAL)
    assert cpu.launch_args(1) == [] and cpu.env(1)["CUDA_VISIBLE_DEVICES"] == "3,5,6,7"
    monkeypatch.setenv("RANK", "1")
    assert not leave_launcher()  # another process of a multi-process launch: it leaves the sweep to the main one
