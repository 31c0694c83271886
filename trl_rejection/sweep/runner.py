"""Run a sweep: build each distinct mix once, evaluate the base model once, and per point launch the real recipes as
child processes (`accelerate launch recipes/sft_rejection.py`, then `python recipes/eval_safety.py`).

Folders under `output_dir` (each named by a settings hash, so a changed setting never lands in another's folder):
`mixes/<mix hash>/` (a `build_mix` folder), `base/<hash>/eval/`, `points/<hash>/` with `point.json` (written first:
the settings), `train/`, `eval/`, `train.log`, `eval.log` and `done.json` (written last, atomically). A rerun skips
points with `done.json` and redoes one without it from scratch (only a folder holding `point.json`, i.e. ours).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from ..data import build_mix
from ..errors import UserError
from ..io import UnsafePathError, atomic_write_text, check_work_dir, real, terminate_as_interrupt
from .config import REPO_ROOT, Point, SweepConfig, expand, model_name, short_hash
from .processes import ChildFailed, Runner, running_elsewhere, sweep_lock
from .table import collect, write_outputs


def _load_recipe(path: Path) -> Any:
    """A recipe script imported as a module (its `__main__` block does not run)."""
    spec = importlib.util.spec_from_file_location(f"_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_configs(points: list[Point], train_script: Path, eval_script: Path) -> None:
    """Parse every point's child configs with the recipes' own parsers, so a bad option fails now, in one line
    naming it, not after hours of earlier points."""
    from trl import ModelConfig

    from ..config import RejectionSFTConfig
    from ..data import MixConfig
    from ..parsing import StrictTrlParser

    sft, evaluation = _load_recipe(train_script), _load_recipe(eval_script)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes of the libraries: the children print them in their logs
        for point in points:
            for name, config, parser in (
                    ("train", train_config(point, Path(tmp) / "train", Path(tmp) / "mix"),
                     StrictTrlParser((sft.ScriptArguments, RejectionSFTConfig, ModelConfig), nested={"mix": MixConfig})),
                    ("eval", {**point.eval, "output_dir": f"{tmp}/eval"}, StrictTrlParser(evaluation.EvalSafetyArguments))):
                file = Path(tmp) / f"{name}.yaml"
                file.write_text(yaml.safe_dump(config))
                try:
                    parser.parse_args_and_config(["--config", str(file)])
                except ValueError as e:  # a UserError, or a library's own check (e.g. bf16 without a GPU)
                    raise UserError(f"point {point.label}: {name} settings: {str(e).replace(str(file) + ': ', '')}"
                                    " (set in the sweep's train_config/train or eval_config/eval)") from None


def _write_yaml(path: Path, config: dict[str, Any]) -> Path:
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


def _fresh(folder: Path, what: str) -> None:
    """Make `folder` empty for a (re)run: remove an interrupted attempt, only if it holds our point.json and no
    process of it still runs."""
    if folder.exists():
        if not (folder / "point.json").is_file():
            raise UnsafePathError(f"{folder} exists without point.json, so it is not a {what} folder this tool "
                                  "wrote. Fix: move it away")
        if pid := running_elsewhere(folder / "running.json"):
            raise UserError(f"{folder} is still being written by process {pid} (left by a killed sweep). Fix: stop "
                            f"that process (kill {pid}), then rerun")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def point_record(point: Point) -> dict[str, Any]:
    """What point.json holds: identity, label, swept values, effective doses and the settings the hash covers."""
    n_refusal, n_normal = point.mix.counts()
    return {"kind": "point", "hash": point.hash, "label": point.label, "dose": point.dose,
            "model": model_name(point.train), "n_refusal": n_refusal, "n_normal": n_normal,
            "refusal_label_tokens": point.train.get("refusal_label_tokens"),
            "mask_refusal_eos": point.train.get("mask_refusal_eos", True), "seed": point.mix.seed,
            "refusal_sentences": point.mix.refusal_sentences, "mix_hash": point.mix_hash,
            "settings": point.settings}


def _base_settings(point: Point) -> dict[str, Any]:
    return {"model": model_name(point.train), "eval": point.settings["eval"]}


def _eval_config(point: Point, model: str, adapter: str | None, out: Path) -> dict[str, Any]:
    return {**point.eval, "model_name_or_path": model, "adapter_path": adapter, "output_dir": str(out)}


def train_config(point: Point, train_dir: Path, mix_dir: Path) -> dict[str, Any]:
    """The training child's config: the point's, on the prepared mix, with per-step metrics (tokens seen)."""
    return {**point.train, "output_dir": str(train_dir), "dataset_path": str(mix_dir), "eval_bundled": False,
            "metrics_file": str(train_dir.parent / "train_steps.jsonl")}


def _run_children(runner: Runner, folder: Path, slot: int, what: str, record: dict[str, Any],
                  configs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Empty `folder`, write `record` as point.json, run each child in order with its config (`train`: the training
    recipe under `accelerate launch`; `eval`: the evaluation recipe), each logging to `<name>.log`, then write
    `done.json` last. Returns each child's seconds."""
    _fresh(folder, what)
    atomic_write_text(folder / "point.json", json.dumps(record, indent=2) + "\n")
    seconds = {}
    for name, config in configs.items():
        launcher = ([sys.executable, "-m", "accelerate.commands.launch", *runner.launch_args(slot),
                     str(runner.train_script)] if name == "train" else [sys.executable, str(runner.eval_script)])
        cmd = [*launcher, "--config", str(_write_yaml(folder / f"{name}_config.yaml", config))]
        seconds[name] = runner.run(cmd, folder / f"{name}.log", slot, folder / "running.json")
    atomic_write_text(folder / "done.json", json.dumps({"hash": record["hash"], "seconds": seconds}) + "\n")
    return seconds


def run_point(runner: Runner, point: Point, folder: Path, mix_dir: Path, slot: int) -> dict[str, float]:
    """Train and evaluate one point into `folder` (emptied first); `done.json` is written last. Returns timings."""
    train_dir = folder / "train"
    adapter_only = point.train.get("use_peft", False) and not point.train.get("merge_adapter", False)
    final = str(train_dir / "final")  # the adapter, or the whole model (full fine-tuning, merge_adapter)
    model, adapter = (model_name(point.train), final) if adapter_only else (final, None)
    return _run_children(runner, folder, slot, "sweep point", point_record(point), {
        "train": train_config(point, train_dir, mix_dir), "eval": _eval_config(point, model, adapter, folder / "eval")})


def run_base(runner: Runner, point: Point, folder: Path, slot: int) -> dict[str, float]:
    """Evaluate the base model (no training) into `folder`, with `done.json` last."""
    model = model_name(point.train)
    record = {"kind": "base", "hash": folder.name, "label": "base model", "model": model,
              "settings": _base_settings(point)}
    return _run_children(runner, folder, slot, "base evaluation", record,
                         {"eval": _eval_config(point, model, None, folder / "eval")})


def _inputs(points: list[Point]) -> list[str]:
    return [p for point in points for p in (point.mix.refusal_source, point.mix.normal_source,
                                            point.mix.refusal_image_root, point.mix.normal_image_root) if p]


def run_sweep(cfg: SweepConfig, train_script: Path = REPO_ROOT / "recipes" / "sft_rejection.py",
              eval_script: Path = REPO_ROOT / "recipes" / "eval_safety.py", root: Path = REPO_ROOT) -> dict[str, Any]:
    """Run every unfinished point of `cfg` (and the base model), then write the table, figure and sweep.json.
    Returns the sweep.json content."""
    points = expand(cfg, root)
    out = check_work_dir(cfg.output_dir, inputs=_inputs(points), what="sweep")
    check_configs(points, train_script, eval_script)
    base_dir = out / "base" / short_hash(_base_settings(points[0]))
    todo = [(i, p) for i, p in enumerate(points, 1) if not (out / "points" / p.hash / "done.json").is_file()]
    print(f"Sweep of {len(points)} points into {cfg.output_dir}: {len(points) - len(todo)} finished earlier, "
          f"{len(todo)} to run" + ("" if (base_dir / "done.json").is_file() else ", and the base model"), flush=True)
    failed: list[str] = []
    with sweep_lock(out), terminate_as_interrupt():
        for mix_hash, point in {p.mix_hash: p for _, p in todo}.items():
            mix_dir = out / "mixes" / mix_hash
            if not (mix_dir / "mix_config.json").is_file():
                print(f"  mix {mix_hash}: building {point.mix.counts()[0]} refusal + {point.mix.counts()[1]} normal "
                      "rows", flush=True)
                build_mix(point.mix, mix_dir, overwrite=True, command="trl_rejection.sweep")
        runner = Runner(cfg, real(train_script), real(eval_script))

        def job(name: str, fn: Any, *args: Any) -> None:
            slot = runner.slots.get()
            try:
                gpus = runner.env(slot).get("CUDA_VISIBLE_DEVICES") if runner.gpus else None
                print(f"  {name}: started" + (f" (CUDA_VISIBLE_DEVICES={gpus})" if gpus else ""), flush=True)
                seconds = fn(runner, *args, slot)
                print(f"  {name}: done ({', '.join(f'{k} {v:.1f} s' for k, v in seconds.items())})", flush=True)
            except (ChildFailed, UserError) as e:
                failed.append(f"{name}: {e}")
                print(f"  {name}: FAILED: {e}", flush=True)
            finally:
                runner.slots.put(slot)

        jobs = [] if (base_dir / "done.json").is_file() else [("base model", run_base, points[0], base_dir)]
        jobs += [(f"[{i}/{len(points)}] {p.hash} {p.label}", run_point, p, out / "points" / p.hash,
                  out / "mixes" / p.mix_hash) for i, p in todo]
        pool = ThreadPoolExecutor(max_workers=cfg.parallel_points)
        try:
            for future in [pool.submit(job, *j) for j in jobs]:
                future.result()
        except BaseException:
            runner.stop_all()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    summary = collect(base_dir, [out / "points" / p.hash for p in points], list(points[0].dose), asdict(cfg))
    write_outputs(summary, out)
    print(f"\nWrote {cfg.output_dir}/sweep.md, sweep.csv, sweep.json and sweep.png", flush=True)
    if failed:
        raise UserError(f"{len(failed)} of {len(jobs)} runs failed (the table holds the others): "
                        + " | ".join(line.splitlines()[0] for line in failed) + ". Fix: read the logs named, then rerun")
    return summary
