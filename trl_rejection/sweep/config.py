"""What a refusal-dose sweep runs: `SweepConfig` (base configs, overrides, grid) expanded into `Point`s, each with the
exact training and evaluation configs its child processes get and an identity hash over every setting that changes
its results.

Example:
    >>> cfg = SweepConfig(grid={"n_refusal": [0, 20]}, train={"mix": {"n_normal": 50}})
    >>> [p.label for p in expand(cfg, root=REPO_ROOT)]  # doctest: +SKIP
    ['n_refusal=0', 'n_refusal=20']
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..constants import TINY_MODEL
from ..data import MixConfig
from ..errors import UserError
from ..validation import ConfigError, check_dataclass, check_range, from_mapping, json_mapping

REPO_ROOT = Path(__file__).resolve().parents[2]

# Settings that never change a trained model or its evaluation: left out of a point's identity, so changing them
# keeps a finished point (logging_steps changes only which window the final logged split loss covers).
NON_RESULT_TRAIN = frozenset({
    "output_dir", "logging_steps", "logging_first_step", "logging_strategy", "logging_dir", "report_to", "run_name",
    "save_strategy", "save_steps", "save_total_limit", "save_only_model", "push_to_hub", "hub_model_id",
    "hub_private_repo", "hub_strategy", "hub_token", "push_dataset_to_hub", "dataloader_num_workers",
    "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor", "disable_tqdm",
    "eval_bundled", "eval_max_new_tokens", "metrics_file", "record_data_order", "mix_build", "overwrite_output_dir",
    "resume_from_checkpoint", "log_level", "log_level_replica", "include_num_input_tokens_seen"})
NON_RESULT_EVAL = frozenset({"output_dir", "batch_size", "device", "compare"})
NON_RESULT_LAUNCH = ("--main_process_port",)  # a launch flag (with its value) that changes nothing


@dataclass
class SweepGrid:
    """The doses: every combination of the lists given is one point (unset axes keep the base config's value)."""

    n_refusal: list[int] | None = field(default=None, metadata={
        "help": "Refusal rows per point (0: the no-refusal control, fine-tuned on normal rows only); n_normal comes "
                "from the training config's mix block."})
    refusal_fraction: list[float] | None = field(default=None, metadata={
        "help": "Share of refusal rows per point, in (0, 1), of `total` rows (instead of n_refusal)."})
    total: int | None = field(default=None, metadata={
        "help": "Mix size of refusal_fraction points (one number, not a list; default: the mix block's total)."})
    refusal_label_tokens: list[int | None] | None = field(default=None, metadata={
        "help": "Supervise only the first N refusal tokens (null: all of them)."})
    mask_refusal_eos: list[bool] | None = field(default=None, metadata={
        "help": "Mask the end-of-turn token after a refusal (the paper: true) or supervise it."})
    refusal_sentences: list[list[str]] | None = field(default=None, metadata={
        "help": "Refusal sentence lists (each a list), set in the mix and the trainer alike."})
    seed: list[int] | None = field(default=None, metadata={"help": "Seeds (mix sampling and training) per point."})

    def __post_init__(self) -> None:
        check_dataclass(self)
        if self.n_refusal is not None and self.refusal_fraction is not None:
            raise ConfigError("grid.refusal_fraction", "both n_refusal and refusal_fraction were given",
                              "sweep one dose axis: n_refusal, or refusal_fraction with total")
        for name in ("n_refusal", "refusal_fraction", "refusal_label_tokens", "mask_refusal_eos",
                     "refusal_sentences", "seed"):
            check_range(self, name, lambda v: len(v) > 0 and len({json.dumps(x) for x in v}) == len(v),
                        "a non-empty list without repeats", f"give distinct values, e.g. grid: {{{name}: [...]}}")

    def axes(self) -> dict[str, list[Any]]:
        """The swept axes, in a fixed order: name -> values."""
        names = ("n_refusal", "refusal_fraction", "refusal_label_tokens", "mask_refusal_eos", "refusal_sentences",
                 "seed")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class SweepConfig:
    """A refusal-dose sweep: per grid point build the mix, train with `recipes/sft_rejection.py`, evaluate with
    `recipes/eval_safety.py`; the base model once; then one table and one figure."""

    train_config: str = field(default="recipes/configs/tiny.yaml", metadata={
        "help": "Training YAML every point starts from (a recipes/sft_rejection.py config)."})
    train: dict | str | None = field(default=None, metadata={
        "help": "Training options overriding train_config for every point (a `mix:` key merges into its mix "
                "block); YAML block, or a JSON string on the command line."})
    eval_config: str = field(default="recipes/configs/eval_bundled.yaml", metadata={
        "help": "Evaluation YAML (a recipes/eval_safety.py config); its model is replaced by the trained one."})
    eval: dict | str | None = field(default=None, metadata={
        "help": "Evaluation options overriding eval_config (e.g. max_samples, max_new_tokens)."})
    grid: dict | str | None = field(default=None, metadata={"help": "The doses (SweepGrid fields): lists to sweep."})
    output_dir: str = field(default="outputs/sweep_tiny", metadata={
        "help": "Sweep folder: points/<hash>/, mixes/<hash>/, base/<hash>/, sweep.md, sweep.csv, sweep.json, "
                "sweep.png."})
    launch_args: list[str] = field(default_factory=list, metadata={
        "help": "Arguments of `accelerate launch` for every training run, e.g. [--config_file, "
                "recipes/accelerate_configs/zero3.yaml]."})
    parallel_points: int = field(default=1, metadata={
        "help": "Points run side by side, at most N at a time. With GPUs each point gets its own gpus_per_point GPUs "
                "(CUDA_VISIBLE_DEVICES); on CPU N processes share the cores. 1: one after another."})
    gpus_per_point: int = field(default=1, metadata={"help": "GPUs (processes) of each point when parallel_points > 1."})
    compare: list[str] | None = field(default=None, metadata={
        "help": "Two sweep folders (with sweep.json) to put side by side in output_dir; runs nothing."})

    def __post_init__(self) -> None:
        check_dataclass(self)
        check_range(self, "parallel_points", lambda v: v >= 1, "a number of points >= 1")
        check_range(self, "gpus_per_point", lambda v: v >= 1, "a number of GPUs >= 1")

    def block(self, name: str) -> dict[str, Any]:
        """`train`, `eval` or `grid` as a mapping (parsed from JSON when given as a flag)."""
        return dict(json_mapping(name, getattr(self, name), f"{name} settings") or {})


@dataclass
class Point:
    """One run of the sweep: its label, swept values, child configs and identity."""

    label: str
    dose: dict[str, Any]  # the swept values of this point
    mix: MixConfig
    train: dict[str, Any]  # the training config, mix block removed (the child gets dataset_path)
    eval: dict[str, Any]  # the evaluation config, model/adapter/output_dir set by the runner
    launch_args: list[str]

    @property
    def mix_hash(self) -> str:
        return short_hash(asdict(self.mix))

    @property
    def settings(self) -> dict[str, Any]:
        """Everything that changes this point's results (what its hash covers)."""
        launch, skip = [], False
        for arg in self.launch_args:
            if skip or arg.split("=", 1)[0] in NON_RESULT_LAUNCH:
                skip = "=" not in arg and not skip
                continue
            launch.append(arg)
        return {"mix": asdict(self.mix), "train": {k: v for k, v in self.train.items() if k not in NON_RESULT_TRAIN},
                "eval": {k: v for k, v in self.eval.items() if k not in NON_RESULT_EVAL}, "launch_args": launch}

    @property
    def hash(self) -> str:
        return short_hash(self.settings)


def short_hash(value: Any) -> str:
    """12 hex digits of the sha256 of `value` as canonical JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resolve(path: str, root: Path = REPO_ROOT) -> Path:
    """A config path as given (relative to the current folder), else relative to the repository root (so the
    bundled configs work from any folder)."""
    if Path(path).exists() or Path(path).is_absolute() or not (root / path).exists():
        return Path(path)
    return root / path


def read_yaml(path: str, option: str, root: Path = REPO_ROOT) -> dict[str, Any]:
    """A YAML mapping from `path`, or a `ConfigError` naming `option` and the fix."""
    file = resolve(path, root)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(option, f"cannot read {path} ({e.strerror})", "give the path of a YAML config") from None
    except yaml.YAMLError as e:
        raise ConfigError(option, f"{path} is not valid YAML ({' '.join(str(e).split())})", "fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(option, f"{path} holds no mapping of options", "give a recipe config file")
    return data


def _dose_mix(mix: dict[str, Any], grid: SweepGrid, dose: dict[str, Any]) -> dict[str, Any]:
    """The base mix block with this point's dose, counts or fraction, applied."""
    mix = dict(mix)
    if "n_refusal" in dose:
        if mix.get("n_normal") is None:
            raise ConfigError("grid.n_refusal", "the training config's mix block has no n_normal",
                              "set it, e.g. train: {mix: {n_normal: 5000}} in the sweep config")
        mix.pop("total", None), mix.pop("refusal_fraction", None)
        mix["n_refusal"] = dose["n_refusal"]
    if "refusal_fraction" in dose:
        total = grid.total if grid.total is not None else mix.get("total")
        if total is None:
            raise ConfigError("grid.total", "refusal_fraction points need a mix size",
                              "give grid: {total: 7000, refusal_fraction: [...]}")
        mix.pop("n_refusal", None), mix.pop("n_normal", None)
        mix.update(total=total, refusal_fraction=dose["refusal_fraction"])
    if "refusal_sentences" in dose:
        mix["refusal_sentences"] = dose["refusal_sentences"]
    if "seed" in dose:
        mix["seed"] = dose["seed"]
    return mix


def expand(cfg: SweepConfig, root: Path = REPO_ROOT) -> list[Point]:
    """The sweep's points in grid order, each with its full training and evaluation config (checked mix)."""
    train = {**read_yaml(cfg.train_config, "train_config", root)}
    overrides = cfg.block("train")
    base_mix = {**(train.pop("mix", None) or {}), **(overrides.pop("mix", None) or {})}
    if train.get("dataset_path") or overrides.get("dataset_path"):
        raise ConfigError("train.dataset_path", "a sweep builds each point's mix itself",
                          "give the sources in the mix block instead of dataset_path")
    train.update(overrides)
    evaluation = {**read_yaml(cfg.eval_config, "eval_config", root), **cfg.block("eval")}
    for key in ("model_name_or_path", "adapter_path", "output_dir"):  # set per run: the trained model, its folder
        evaluation.pop(key, None)
    grid = from_mapping(SweepGrid, cfg.block("grid"), "grid")
    axes = grid.axes()
    if not axes:
        raise ConfigError("grid", "no dose to sweep", "give at least one list, e.g. grid: {n_refusal: [0, 500, 2000]}")
    points = []
    for values in itertools.product(*axes.values()):
        dose = dict(zip(axes, values))
        point_train = dict(train)
        for name in ("refusal_label_tokens", "mask_refusal_eos", "refusal_sentences", "seed"):
            if name in dose:
                point_train[name] = dose[name]
        mix = from_mapping(MixConfig, _dose_mix(base_mix, grid, dose), "mix")
        mix.counts()
        label = ", ".join(f"{k}={'/'.join(v) if isinstance(v, list) else v}" for k, v in dose.items())
        points.append(Point(label, dose, mix, point_train, dict(evaluation), list(cfg.launch_args)))
    hashes = [p.hash for p in points]
    if len(set(hashes)) != len(hashes):
        raise UserError("two grid points have the same settings. Fix: remove the repeated values from the grid")
    return points


def model_name(train: dict[str, Any]) -> str:
    """The training config's base model (the recipe's default is the tiny one)."""
    return train.get("model_name_or_path") or TINY_MODEL
