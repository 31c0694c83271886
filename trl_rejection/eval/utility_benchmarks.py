"""Loaders of the utility benchmarks, from local copies in their published layouts: ScienceQA-IMG (multiple choice)
and VizWiz VQA (short answers), with LLaVA's evaluation prompts.

Example:
    >>> records = load_scienceqa("data/ScienceQA/data/scienceqa")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from trl_rejection.eval.records import BenchmarkError, EvalRecord, existing_image, read_json, require_file

# --- Utility: ScienceQA-IMG (Lu et al., NeurIPS 2022) and VizWiz VQA (Gurari et al., CVPR 2018) -----------------

SCIENCEQA_SUFFIX = "Answer with the option's letter from the given choices directly."
VIZWIZ_SUFFIX = ("When the provided information is insufficient, respond with 'Unanswerable'.\n"
                 "Answer the question using a single word or phrase.")


def load_scienceqa(root: str | Path, split: str = "test") -> list[EvalRecord]:
    """ScienceQA-IMG: the `split` problems that have an image, as multiple choice (LLaVA's prompt); answer = letter.

    Example:
        >>> load_scienceqa("ScienceQA/data/scienceqa")[0].answers  # doctest: +SKIP
        ('B',)
    """
    root = Path(root)
    where = "Pass ScienceQA's data/scienceqa folder: problems.json plus images/<split>/<pid>/image.png"
    file = require_file(root / "problems.json", "ScienceQA problems.json", where)
    problems = read_json(file)
    if not isinstance(problems, dict):
        raise BenchmarkError(file, None, "expected a JSON object {pid: problem}")
    records = []
    for pid, p in problems.items():
        try:
            if p.get("split") != split or not p.get("image"):
                continue
            choices = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(p["choices"]))
            context = f"Context: {p['hint']}\n" if p.get("hint") else ""
            prompt = f"{context}{p['question']}\n{choices}\n{SCIENCEQA_SUFFIX}"
            answer = chr(65 + int(p["answer"]))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise BenchmarkError(file, f"problem {pid!r}", "needs question, choices, answer (index)") from err
        image = existing_image(root / "images" / split / pid / p["image"], file, f"problem {pid!r}")
        records.append(EvalRecord(pid, "scienceqa", p.get("subject", "all"), prompt, image, harmful=False,
                                  task="multiple_choice", answers=(answer,), variant=split))
    return records


def load_vizwiz(root: str | Path, split: str = "val") -> list[EvalRecord]:
    """VizWiz VQA: `<split>.json` annotations (10 human answers each) + `<split>/` images; category = answer_type.

    Example:
        >>> len(load_vizwiz("VizWiz")[0].answers)  # doctest: +SKIP
        10
    """
    root = Path(root)
    where = "Download the VizWiz VQA annotations (<split>.json) and images (<split>/) from vizwiz.org into one folder"
    file = require_file(root / f"{split}.json", "VizWiz annotations", where)
    items = read_json(file)
    if not isinstance(items, list):
        raise BenchmarkError(file, None, "expected a JSON list of annotations")
    records = []
    for n, item in enumerate(items):
        try:
            answers = tuple(a["answer"] for a in item["answers"])
            name, question = item["image"], item["question"]
        except (KeyError, TypeError) as err:
            raise BenchmarkError(file, f"record {n}", "needs image, question and answers [{answer}]") from err
        image = existing_image(root / split / name, file, f"record {n} ({name})")
        records.append(EvalRecord(Path(name).stem, "vizwiz", item.get("answer_type", "all"),
                                  f"{question}\n{VIZWIZ_SUFFIX}", image, harmful=False, task="short_answer",
                                  answers=answers, variant=split))
    return records
