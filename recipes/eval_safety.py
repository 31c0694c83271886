"""Evaluate a model's safety and utility: generate on local benchmarks, judge, report; or compare two runs.

    python recipes/eval_safety.py --config recipes/configs/eval_bundled.yaml
    python recipes/eval_safety.py --config recipes/configs/eval_bundled.yaml --model_name_or_path tiny-llava
    python recipes/eval_safety.py --config recipes/configs/eval_paper.yaml --adapter_path runs/sft/checkpoint-final
    python recipes/eval_safety.py --compare runs/eval_base runs/eval_trained --output_dir runs/compare

A run folder (`output_dir`) gets generations.jsonl (resumable: re-run the same command after an interruption),
scored.jsonl, metrics.json, report.md and asr_by_category.png. `--model_name_or_path tiny-llava` uses the tiny
random LLaVA of `trl_rejection.tiny` for a dry run. See docs/evaluation.md for the benchmark folder layouts.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from trl_rejection.errors import UserError, user_errors
from trl_rejection.eval.benchmarks import load_benchmark
from trl_rejection.eval.generate import generate, load_model_and_processor
from trl_rejection.eval.report import compare_runs, markdown_table, report_run
from trl_rejection.io import atomic_write_text, check_work_dir
from trl_rejection.parsing import StrictTrlParser


@dataclass
class EvalSafetyArguments:
    """Every knob of the evaluation; set them in YAML (`--config`) and override any on the command line."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Local folder, Hub id, or 'tiny-llava'."})
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
    max_samples: int | None = field(default=None, metadata={"help": "Keep the first N records of each benchmark."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate call."})
    max_new_tokens: int = field(default=256, metadata={"help": "Generation length."})
    judge: str = field(default="paper", metadata={
        "help": "paper, xstest, gcg, vlguard (string match) or a local Llama Guard folder."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, bfloat16, float16, float32."})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu; default cuda when available."})
    compare: list[str] | None = field(default=None, metadata={"help": "Two scored run folders to put side by side."})


def load_records(args: EvalSafetyArguments) -> list:
    """The records of every requested benchmark, each cut to `max_samples`."""
    sources = {
        "bundled": (Path(args.output_dir) / "bundled", {"style": args.bundled_style}),
        "mm_safetybench": (args.mm_safetybench_dir, {"image_type": args.mm_safetybench_image_type}),
        "figstep": (args.figstep_dir, {"subset": args.figstep_subset}),
        "xstest": (args.xstest_path, {}),
        "vlguard": (args.vlguard_dir, {}),
        "scienceqa": (args.scienceqa_dir, {}),
        "vizwiz": (args.vizwiz_dir, {}),
    }
    records = []
    for name in args.benchmarks:
        if name == "generic":
            if not args.generic_paths:
                raise UserError("benchmark 'generic' needs files. Fix: pass --generic_paths FILE_OR_FOLDER [...]")
            loaded = [r for path in args.generic_paths for r in load_benchmark("generic", path)]
        elif name in sources:
            path, options = sources[name]
            loaded = load_benchmark(name, path, **options)
        else:
            raise UserError(f"unknown benchmark {name!r}. Fix: choose from {sorted(sources) + ['generic']}")
        records += loaded[: args.max_samples]
    return records


def check_run_config(args: EvalSafetyArguments) -> None:
    """Refuse to resume a run folder that holds another model's generations."""
    file = Path(args.output_dir) / "run_config.json"
    current = {k: getattr(args, k) for k in ("model_name_or_path", "adapter_path", "max_new_tokens")}
    if file.exists() and (previous := json.loads(file.read_text())) != current:
        raise UserError(f"{args.output_dir} holds generations made with {previous}, not {current}. Fix: "
                        "choose another --output_dir or delete that folder")
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(file, json.dumps(current, indent=2) + "\n")


def run_generation(args: EvalSafetyArguments, records: list) -> None:
    """Load the model (and adapter) and write, or finish, `<output_dir>/generations.jsonl`."""
    model, processor = load_model_and_processor(args.model_name_or_path, args.adapter_path, args.dtype, args.device)
    generate(model, processor, records, Path(args.output_dir) / "generations.jsonl", batch_size=args.batch_size,
             max_new_tokens=args.max_new_tokens)


def benchmark_inputs(args: EvalSafetyArguments) -> list[str]:
    """The local inputs of this run (benchmark folders and files, model, adapter): never written to."""
    paths = {"mm_safetybench": args.mm_safetybench_dir, "figstep": args.figstep_dir, "xstest": args.xstest_path,
             "vlguard": args.vlguard_dir, "scienceqa": args.scienceqa_dir, "vizwiz": args.vizwiz_dir}
    return [paths[b] for b in args.benchmarks if b in paths] + list(args.generic_paths) + \
        [p for p in (args.model_name_or_path, args.adapter_path, *(args.compare or [])) if p]


def main(args: EvalSafetyArguments) -> None:
    check_work_dir(args.output_dir, inputs=benchmark_inputs(args), what="evaluation run")
    if args.compare:
        if len(args.compare) != 2:
            raise UserError(f"--compare takes two run folders, got {args.compare}. Fix: give exactly two")
        print(compare_runs(*args.compare, out_dir=args.output_dir))
        return
    if not args.model_name_or_path:
        raise UserError("no model given. Fix: set --model_name_or_path (a local folder, a Hub id, or tiny-llava)")
    check_run_config(args)
    run_generation(args, load_records(args))  # the model is freed on return, before a judge model loads
    title = args.model_name_or_path + (f" + {args.adapter_path}" if args.adapter_path else "")
    print(markdown_table(report_run(args.output_dir, judge=args.judge, title=title)))
    print(f"\nWrote {args.output_dir}/report.md, metrics.json, asr_by_category.png and scored.jsonl")


if __name__ == "__main__":
    with user_errors():
        (script_args,) = StrictTrlParser(EvalSafetyArguments).parse_args_and_config()
        main(script_args)
