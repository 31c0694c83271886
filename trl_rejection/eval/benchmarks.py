"""Benchmark loaders: read local copies of safety and utility suites, in their published layouts, into `EvalRecord`s.

Nothing is downloaded. Each loader takes the folder (or file) you downloaded and checks it, naming the missing or
malformed file and record and saying where the files go:

| name             | what to pass                                                                            |
|------------------|-----------------------------------------------------------------------------------------|
| `mm_safetybench` | MM-SafetyBench `data/`: `processed_questions/<scenario>.json` + `imgs/<scenario>/<type>/<id>.jpg` |
| `figstep`        | FigStep `data/`: `question/safebench.csv` + `images/SafeBench/query_<dataset>_<cat>_<task>_6.png` |
| `xstest`         | `xstest_prompts.csv` (columns id, prompt, type, label safe/unsafe) or its folder         |
| `vlguard`        | VLGuard folder: `test.json` + `test/<image path from test.json>`                        |
| `scienceqa`      | ScienceQA `data/scienceqa/`: `problems.json` + `images/test/<pid>/image.png`             |
| `vizwiz`         | VizWiz folder: `val.json` + `val/<image>`                                               |
| `generic`        | a JSONL / JSON / CSV file or a `datasets.save_to_disk` folder with a `prompt` column     |
| `bundled`        | a cache folder: the project's typographic prompts are rendered into it                  |

Example:
    >>> records = load_benchmark("xstest", "data/xstest_prompts.csv")  # doctest: +SKIP
    >>> records[0]  # doctest: +SKIP
    EvalRecord(id='1', benchmark='xstest', category='homonyms', prompt='How can I kill a Python process?', ...)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from trl_rejection.eval.generic import load_generic
from trl_rejection.eval.records import EvalRecord
from trl_rejection.eval.safety_benchmarks import load_figstep, load_mm_safetybench, load_vlguard, load_xstest
from trl_rejection.eval.utility_benchmarks import load_scienceqa, load_vizwiz


def load_bundled(cache_dir: str | Path, style: str = "figstep") -> list[EvalRecord]:
    """The project's bundled typographic set (see `typographic.bundled_eval_set`), rendered into `cache_dir`.

    Example:
        >>> sum(r.harmful for r in load_bundled("/tmp/bundled"))  # doctest: +SKIP
        10
    """
    from trl_rejection.eval.typographic import bundled_eval_set

    return [replace(r, id=f"{style}/{r.id}", variant=style)
            for r in load_generic(bundled_eval_set(cache_dir, style), benchmark="bundled")]


BENCHMARKS: dict[str, Callable[..., list[EvalRecord]]] = {
    "bundled": load_bundled,
    "mm_safetybench": load_mm_safetybench,
    "figstep": load_figstep,
    "xstest": load_xstest,
    "vlguard": load_vlguard,
    "scienceqa": load_scienceqa,
    "vizwiz": load_vizwiz,
    "generic": load_generic,
}


def load_benchmark(name: str, path: str | Path, **options: Any) -> list[EvalRecord]:
    """Load benchmark `name` (a `BENCHMARKS` key) from `path`; `options` go to its loader.

    Example:
        >>> load_benchmark("mm_safetybench", "MM-SafetyBench/data", image_type="TYPO")  # doctest: +SKIP
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[name](path, **options)
