"""Evaluate a model's safety and utility: generate on local benchmarks, judge, report; or compare two runs.

    python recipes/eval_safety.py --config recipes/configs/eval_bundled.yaml
    python recipes/eval_safety.py --config recipes/configs/eval_bundled.yaml --model_name_or_path tiny-llava
    python recipes/eval_safety.py --config recipes/configs/eval_paper.yaml --adapter_path runs/sft/checkpoint-final
    python recipes/eval_safety.py --compare runs/eval_base runs/eval_trained --output_dir runs/compare

A run folder (`output_dir`) gets run_config.json (every setting that changes a generation), generations.jsonl
(resumable: re-run the same command after an interruption), scored.jsonl, metrics.json, report.md and
asr_by_category.png. A rerun into the folder with other generation settings is refused; one that changes only the
judge re-scores the generations without loading the model (`trl_rejection.eval.run_config`). `--model_name_or_path
tiny-llava` uses the tiny random LLaVA of `trl_rejection.testing.tiny` for a dry run. See docs/evaluation.md for the
benchmark folder layouts.
"""

from pathlib import Path
from typing import Any

from trl_rejection.constants import TINY_MODEL
from trl_rejection.distributed import end_process_group
from trl_rejection.errors import UserError, user_errors
from trl_rejection.eval.benchmarks import load_benchmark
from trl_rejection.eval.generate import generate
from trl_rejection.eval.generations import read_generations
from trl_rejection.eval.records import EvalRecord
from trl_rejection.eval.report import compare_runs, markdown_table, report_run
from trl_rejection.eval.run_config import EvalSafetyArguments, benchmark_inputs, check_run_config, judge_spec, \
    run_config
from trl_rejection.eval.sampling import sample_records
from trl_rejection.generation import load_model_and_processor, prepare_for_generation
from trl_rejection.io import check_work_dir
from trl_rejection.parsing import StrictTrlParser


def load_records(args: EvalSafetyArguments) -> tuple[list[EvalRecord], list[EvalRecord]]:
    """The records of every requested benchmark, all of them and those kept by `--max_samples` (`sample_records`)."""
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
        records += loaded
    return records, sample_records(records, args.max_samples, args.sample_seed)


def load_model(args: EvalSafetyArguments) -> tuple[Any, Any]:
    """The model to evaluate (with its adapter merged) and its processor; `tiny-llava` builds the tiny random LLaVA."""
    if args.model_name_or_path == TINY_MODEL:
        from trl_rejection.testing.tiny import make_model, make_processor

        processor = make_processor("llava-1.5")
        return prepare_for_generation(make_model("llava-1.5", processor), args.adapter_path, args.device), processor
    return load_model_and_processor(args.model_name_or_path, args.adapter_path, args.dtype, args.device)


def run_generation(args: EvalSafetyArguments, records: list[EvalRecord]) -> None:
    """Load the model (and adapter) and write, or finish, `<output_dir>/generations.jsonl`; without loading the model
    when every record already has its generation."""
    done = {(row["benchmark"], row["id"]) for row in read_generations(Path(args.output_dir) / "generations.jsonl")}
    if all((r.benchmark, r.id) in done for r in records):
        print(f"All {len(records)} generations are in {args.output_dir}: scoring only")
        return
    model, processor = load_model(args)
    generate(model, processor, records, Path(args.output_dir) / "generations.jsonl", batch_size=args.batch_size,
             max_new_tokens=args.max_new_tokens)


def main(args: EvalSafetyArguments) -> None:
    check_work_dir(args.output_dir, inputs=benchmark_inputs(args), what="evaluation run")
    if args.compare:
        if len(args.compare) != 2:
            raise UserError(f"--compare takes two run folders, got {args.compare}. Fix: give exactly two")
        print(compare_runs(*args.compare, out_dir=args.output_dir))
        return
    if not args.model_name_or_path:
        raise UserError("no model given. Fix: set --model_name_or_path (a local folder, a Hub id, or tiny-llava)")
    judges = judge_spec(args)  # checked before generating: a typo must not cost a run
    everything, records = load_records(args)
    if note := check_run_config(args.output_dir, run_config(args, everything, records)):
        print(note)
    run_generation(args, records)  # the model is freed on return, before a judge model loads
    title = args.model_name_or_path + (f" + {args.adapter_path}" if args.adapter_path else "")
    print(markdown_table(report_run(args.output_dir, judge=judges, title=title, guard=args.guard_judge)))
    print(f"\nWrote {args.output_dir}/report.md, metrics.json, asr_by_category.png and scored.jsonl")


if __name__ == "__main__":
    with user_errors():
        (script_args,) = StrictTrlParser(EvalSafetyArguments).parse_args_and_config()
        main(script_args)
    end_process_group()
