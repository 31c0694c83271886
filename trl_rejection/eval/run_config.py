"""The settings of an evaluation run: its arguments (`EvalSafetyArguments`, the knobs of `recipes/eval_safety.py`)
and their record, `<output_dir>/run_config.json`, which decides whether a rerun into the folder may resume it.

`run_config.json` holds `generation` (every setting that changes a generation: a rerun must match them all, model
and adapter fingerprints, a hash of the sampled records and the package versions included), `scoring` (the judges:
a rerun that changes only these re-scores the existing generations), `sampling` (how `--max_samples` drew the
records) and `recorded` (batch sizes and device, not compared).

Example:
    >>> args = EvalSafetyArguments(model_name_or_path="runs/sft/final", output_dir="runs/eval")  # doctest: +SKIP
    >>> note = check_run_config(args.output_dir, run_config(args, everything, kept))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import trl_rejection
from trl_rejection.constants import TINY_MODEL
from trl_rejection.errors import UserError
from trl_rejection.eval.records import EvalRecord
from trl_rejection.eval.safety_benchmarks import MM_SAFETYBENCH_QUESTION
from trl_rejection.eval.sampling import SAMPLING_RULE
from trl_rejection.eval.scoring import check_judge
from trl_rejection.io import atomic_write_text


@dataclass
class EvalSafetyArguments:
    """Every knob of the evaluation; set them in YAML (`--config`) and override any on the command line."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": f"Local folder, Hub id, or {TINY_MODEL!r}."})
    adapter_path: str | None = field(default=None, metadata={"help": "Optional LoRA adapter folder (peft)."})
    benchmarks: list[str] = field(default_factory=lambda: ["bundled"], metadata={
        "help": "Any of bundled, mm_safetybench, figstep, xstest, vlguard, scienceqa, vizwiz, generic."})
    output_dir: str = field(default="runs/eval", metadata={"help": "Run folder for generations and the report."})
    mm_safetybench_dir: str = field(default="data/MM-SafetyBench/data", metadata={"help": "MM-SafetyBench data/."})
    mm_safetybench_image_type: str = field(default="SD_TYPO", metadata={"help": "SD, TYPO, SD_TYPO or TEXT."})
    figstep_dir: str = field(default="data/FigStep/data", metadata={"help": "FigStep data/ (question/, images/)."})
    figstep_subset: str = field(default="SafeBench", metadata={"help": "SafeBench or SafeBench-Tiny."})
    xstest_path: str = field(default="data/xstest/xstest_prompts.csv", metadata={"help": "xstest_prompts.csv."})
    vlguard_dir: str = field(default="data/VLGuard", metadata={"help": "Folder with test.json and test/."})
    scienceqa_dir: str = field(default="data/ScienceQA/data/scienceqa", metadata={"help": "problems.json, images/."})
    vizwiz_dir: str = field(default="data/VizWiz", metadata={"help": "Folder with val.json and val/."})
    generic_paths: list[str] = field(default_factory=list, metadata={"help": "Generic-layout files or folders."})
    bundled_style: str = field(default="figstep", metadata={"help": "figstep or typo rendering of the bundled set."})
    max_samples: int | None = field(default=None, metadata={
        "help": "Evaluate at most N records of each benchmark, sampled with --sample_seed, stratified by category."})
    sample_seed: int = field(default=0, metadata={"help": "Seed of the --max_samples sample."})
    batch_size: int = field(default=8, metadata={
        "help": "Prompts per generate call (recorded; may change between resumes: see docs/evaluation.md)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Generation length."})
    judge: str = field(default="paper", metadata={
        "help": "Judge of every benchmark: paper, xstest, gcg, vlguard (string match; each also <name>_normalized), "
                "auto (each benchmark's own list where it has one: xstest, vlguard; else paper) or a local Llama Guard "
                "folder. A string match's normalized variant is always reported beside it."})
    judges: list[str] = field(default_factory=list, metadata={
        "help": "Per-benchmark judges overriding --judge, as BENCHMARK=JUDGE, e.g. vlguard=vlguard xstest=xstest."})
    guard_judge: str | None = field(default=None, metadata={
        "help": "A Llama Guard model id or folder (text, or vision: prompt + image + response); its ASR is reported "
                "beside the string match's."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, bfloat16, float16, float32."})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu; default cuda when available."})
    compare: list[str] | None = field(default=None, metadata={"help": "Two scored run folders to put side by side."})


def read_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """`<run_dir>/run_config.json` (written by `recipes/eval_safety.py`), or None for a run folder without one."""
    file = Path(run_dir) / "run_config.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.exists() else None


def setting_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`name old -> new` for each differing setting of two (nested) settings dicts, nested names joined with dots.

    Example:
        >>> setting_differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}})
        ['b.c 2 -> 3']
    """
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in dict.fromkeys([*old, *new])
                for line in setting_differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [f"{prefix.rstrip('.')} {old!r} -> {new!r}"]


def fingerprint(path: str | None) -> str | None:
    """A sha256 over a local folder's (or file's) files: content for files up to 256 MiB, name, size and mtime for
    larger ones (weights retrained in place change their mtime). None for a Hub id or the tiny model."""
    if not path or not os.path.exists(path):
        return None
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(root) if file != root else file.name}:{stat.st_size}\n".encode())
        if stat.st_size <= 256 << 20:
            with file.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        else:
            digest.update(str(stat.st_mtime_ns).encode())
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def generation_settings(args: EvalSafetyArguments, records: list[EvalRecord]) -> dict[str, Any]:
    """Every setting that changes a generation, keyed by its flag: a rerun into the folder must match all of them.

    Not here, on purpose: the judge (scoring only) and `batch_size` / `device` (recorded, not compared: batching and
    hardware change greedy outputs only through floating-point rounding, and a smaller batch after running out of
    memory must be able to resume). Per benchmark, `records` holds the count and a sha256 of the sampled records'
    ids, prompts, labels and answers, so edited benchmark files are caught too.
    """
    def local(path: str | None) -> str | None:
        return os.path.abspath(path) if path and os.path.exists(path) else path

    benches = set(args.benchmarks)
    by_bench: dict[str, list[EvalRecord]] = {}
    for r in records:
        by_bench.setdefault(r.benchmark, []).append(r)
    settings: dict[str, Any] = {
        "model_name_or_path": local(args.model_name_or_path), "model_fingerprint": fingerprint(args.model_name_or_path),
        "adapter_path": local(args.adapter_path), "adapter_fingerprint": fingerprint(args.adapter_path),
        "dtype": args.dtype, "max_new_tokens": args.max_new_tokens, "decoding": "greedy",
        "benchmarks": sorted(benches), "max_samples": args.max_samples,
        "sample_seed": args.sample_seed if args.max_samples is not None else None}
    if "mm_safetybench" in benches:
        settings.update(mm_safetybench_dir=local(args.mm_safetybench_dir),
                        mm_safetybench_image_type=args.mm_safetybench_image_type,
                        mm_safetybench_question_field=MM_SAFETYBENCH_QUESTION.get(args.mm_safetybench_image_type))
    if "figstep" in benches:
        settings.update(figstep_dir=local(args.figstep_dir), figstep_subset=args.figstep_subset)
    if "bundled" in benches:
        settings["bundled_style"] = args.bundled_style
    for bench in ("xstest", "vlguard", "scienceqa", "vizwiz"):
        if bench in benches:
            flag = "xstest_path" if bench == "xstest" else f"{bench}_dir"
            settings[flag] = local(getattr(args, flag))
    if "generic" in benches:
        settings["generic_paths"] = [local(p) for p in args.generic_paths]
    settings["records"] = {
        bench: {"n": len(rows), "sha256": hashlib.sha256(json.dumps(
            [[r.variant, r.id, r.category, r.prompt, r.harmful, r.task, list(r.answers)] for r in rows]).encode())
            .hexdigest()} for bench, rows in sorted(by_bench.items())}
    settings["versions"] = {"torch": _version("torch"), "transformers": _version("transformers"),
                            "trl_rejection": trl_rejection.__version__,
                            **({"peft": _version("peft")} if args.adapter_path else {})}
    return settings


def run_config(args: EvalSafetyArguments, everything: list[EvalRecord], kept: list[EvalRecord]) -> dict[str, Any]:
    """The content of `<output_dir>/run_config.json`: `generation` (compared on reruns), `scoring` (may change:
    re-scores only), `sampling` (how `--max_samples` drew the records) and `recorded` (batch size, device)."""
    sampling: dict[str, Any] = {"max_samples": args.max_samples}
    if args.max_samples is not None:
        sampling.update(seed=args.sample_seed, rule=SAMPLING_RULE, benchmarks={
            bench: {"kept": sum(r.benchmark == bench for r in kept),
                    "of": sum(r.benchmark == bench for r in everything)}
            for bench in dict.fromkeys(r.benchmark for r in everything)})
    return {"generation": generation_settings(args, kept),
            "scoring": {f.name: getattr(args, f.name) for f in fields(args) if "judge" in f.name},
            "sampling": sampling,
            "recorded": {"batch_size": [args.batch_size], "device": args.device or "auto"}}


def check_run_config(output_dir: str, config: dict[str, Any]) -> str | None:
    """Refuse a run folder whose generations were made with other generation settings (`UserError` naming them and
    the fix); otherwise write `config` there. Returns a note when only the scoring settings changed. A folder without
    generations yet (a first attempt stopped before its first batch) takes the new settings."""
    out = Path(output_dir)
    file, generations = out / "run_config.json", out / "generations.jsonl"
    fix = f"Fix: pass another --output_dir (or delete {output_dir} to start over)"
    previous = None
    if generations.exists() and generations.stat().st_size:
        if not file.exists():
            raise UserError(f"{generations} has no run_config.json beside it, so its settings are unknown. {fix}")
        try:
            previous = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"{file} is not valid JSON ({err}), so the settings of the generations beside it are "
                            f"unknown. {fix}") from err
        if not isinstance(previous, dict) or "generation" not in previous:
            raise UserError(f"{file} was written by an earlier trl-rejection that recorded only "
                            f"{sorted(previous) if isinstance(previous, dict) else previous!r}; the other settings of "
                            f"its generations are unknown. {fix}")
    note = None
    if previous is not None:
        old, new = ({k: v for k, v in c["generation"].items() if k != "records"} for c in (previous, config))
        short = [{b: {**r, "sha256": r["sha256"][:12]} for b, r in c["generation"].get("records", {}).items()}
                 for c in (previous, config)]
        changed = setting_differences(old, new) or [  # same flags, other records: the benchmark files were edited
            f"{line} (the benchmark files changed)" for line in setting_differences(*short, "records.")]
        if changed:
            raise UserError(f"{output_dir} holds generations made with other settings ({'; '.join(changed)}). {fix}; "
                            "changing only the judge re-scores without regenerating")
        if judge_changes := setting_differences(previous.get("scoring"), config["scoring"]):
            note = (f"judge settings changed ({'; '.join(judge_changes)}): re-scoring the existing generations "
                    "(judging does not change generations)")
        sizes = previous.get("recorded", {}).get("batch_size", [])
        config["recorded"]["batch_size"] = sizes + [s for s in config["recorded"]["batch_size"] if s not in sizes]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(file, json.dumps(config, indent=2) + "\n")
    return note


def benchmark_inputs(args: EvalSafetyArguments) -> list[str]:
    """The local inputs of this run (benchmark folders and files, model, adapter): never written to."""
    paths = {"mm_safetybench": args.mm_safetybench_dir, "figstep": args.figstep_dir, "xstest": args.xstest_path,
             "vlguard": args.vlguard_dir, "scienceqa": args.scienceqa_dir, "vizwiz": args.vizwiz_dir}
    return [paths[b] for b in args.benchmarks if b in paths] + list(args.generic_paths) + \
        [p for p in (args.model_name_or_path, args.adapter_path, *(args.compare or [])) if p]


def judge_spec(args: EvalSafetyArguments) -> dict[str, str]:
    """`--judge` for every benchmark ("*") and `--judges` BENCHMARK=JUDGE overrides, as a `report_run` judge mapping."""
    spec = {"*": args.judge}
    for item in args.judges:
        bench, sep, judge = item.partition("=")
        if not sep or not bench or not judge:
            raise UserError(f"--judges takes BENCHMARK=JUDGE items, got {item!r}. Fix: e.g. --judges vlguard=vlguard")
        if bench not in args.benchmarks and "generic" not in args.benchmarks:
            raise UserError(f"--judges names {bench!r}, which is not in --benchmarks {args.benchmarks}. Fix: name one "
                            "of them")
        spec[bench] = judge
    for judge in spec.values():
        try:
            check_judge(judge)
        except ValueError as err:
            raise UserError(f"{err}. Fix: correct --judge / --judges") from None
    return spec
