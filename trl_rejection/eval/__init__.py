"""Safety evaluation: benchmark loaders, resumable batched generation, typographic attack sets, scoring and reports.

Generation (torch) loads on first use of `generate`, `load_model_and_processor` or `prepare_for_generation`, so
scoring and reports start without torch.

Example:
    >>> from trl_rejection.eval import generate, load_benchmark, load_model_and_processor, report_run
    >>> model, processor = load_model_and_processor("llava-hf/llava-1.5-7b-hf")  # doctest: +SKIP
    >>> records = load_benchmark("bundled", "runs/x/bundled")  # doctest: +SKIP
    >>> generate(model, processor, records, "runs/x/generations.jsonl")  # doctest: +SKIP
    >>> report_run("runs/x")["bundled"]["attack_success_rate"]["attack_success_rate"]  # doctest: +SKIP
"""

from importlib import import_module
from typing import Any

from trl_rejection.eval.benchmarks import BENCHMARKS, load_benchmark, load_bundled
from trl_rejection.eval.chart import plot_asr
from trl_rejection.eval.generations import read_generations
from trl_rejection.eval.generic import load_generic
from trl_rejection.eval.records import BenchmarkError, EvalRecord
from trl_rejection.eval.report import (
    compare_runs,
    compute_metrics,
    markdown_comparison,
    markdown_table,
    report_run,
    score_generations,
)
from trl_rejection.eval.safety_benchmarks import (
    MM_SAFETYBENCH_SCENARIOS,
    VLGUARD_SUBSETS,
    load_figstep,
    load_mm_safetybench,
    load_vlguard,
    load_xstest,
)
from trl_rejection.eval.sampling import sample_records
from trl_rejection.eval.typographic import (
    FIGSTEP_PROMPT,
    TYPO_PROMPT,
    bundled_eval_set,
    bundled_prompts,
    figstep_text,
    render_figstep,
    render_prompts,
    render_typo,
)
from trl_rejection.eval.utility import normalize_answer, parse_choice, score_utility, vqa_accuracy
from trl_rejection.eval.utility_benchmarks import load_scienceqa, load_vizwiz

__all__ = [
    "BENCHMARKS",
    "FIGSTEP_PROMPT",
    "MM_SAFETYBENCH_SCENARIOS",
    "TYPO_PROMPT",
    "VLGUARD_SUBSETS",
    "BenchmarkError",
    "EvalRecord",
    "bundled_eval_set",
    "bundled_prompts",
    "compare_runs",
    "compute_metrics",
    "figstep_text",
    "generate",
    "load_benchmark",
    "load_bundled",
    "load_figstep",
    "load_generic",
    "load_mm_safetybench",
    "load_model_and_processor",
    "load_scienceqa",
    "load_vizwiz",
    "load_vlguard",
    "load_xstest",
    "markdown_comparison",
    "markdown_table",
    "normalize_answer",
    "parse_choice",
    "plot_asr",
    "prepare_for_generation",
    "read_generations",
    "render_figstep",
    "render_prompts",
    "render_typo",
    "report_run",
    "sample_records",
    "score_generations",
    "score_utility",
    "vqa_accuracy",
]

_GENERATION = {"generate": "trl_rejection.eval.generate", "load_model_and_processor": "trl_rejection.generation",
               "prepare_for_generation": "trl_rejection.generation"}


def __getattr__(name: str) -> Any:
    if name in _GENERATION:
        return getattr(import_module(_GENERATION[name]), name)
    raise AttributeError(f"module 'trl_rejection.eval' has no attribute {name!r}")
