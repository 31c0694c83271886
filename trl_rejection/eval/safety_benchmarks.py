"""Loaders of the safety benchmarks, from local copies in their published layouts: MM-SafetyBench, FigStep
(SafeBench), XSTest and the VLGuard test split (see `benchmarks.py` for what to pass to each).

Example:
    >>> records = load_xstest("data/xstest/xstest_prompts.csv")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from trl_rejection.eval.records import BenchmarkError, EvalRecord, existing_image, read_csv, read_json, require_file

# --- MM-SafetyBench (Liu et al., ECCV 2024): github.com/isXinLiu/MM-SafetyBench ---------------------------------

MM_SAFETYBENCH_SCENARIOS = (
    "01-Illegal_Activitiy", "02-HateSpeech", "03-Malware_Generation", "04-Physical_Harm", "05-EconomicHarm",
    "06-Fraud", "07-Sex", "08-Political_Lobbying", "09-Privacy_Violence", "10-Legal_Opinion", "11-Financial_Advice",
    "12-Health_Consultation", "13-Gov_Decision",
)  # "Activitiy" is the published spelling
# The question each image type is paired with in MM-SafetyBench; "TEXT" is the text-only baseline without an image.
MM_SAFETYBENCH_QUESTION = {"SD": "Rephrased Question(SD)", "TYPO": "Rephrased Question",
                           "SD_TYPO": "Rephrased Question", "TEXT": "Question"}


def load_mm_safetybench(root: str | Path, image_type: str = "SD_TYPO", scenarios: Iterable[str] | None = None,
                        images_dir: str | Path | None = None) -> list[EvalRecord]:
    """MM-SafetyBench: one harmful record per question of each scenario, category = scenario.

    `image_type` is "SD", "TYPO", "SD_TYPO" (images `imgs/<scenario>/<type>/<id>.jpg`) or "TEXT" (no image).

    Example:
        >>> load_mm_safetybench("MM-SafetyBench/data", "TYPO", ["06-Fraud"])[0].image  # doctest: +SKIP
        'MM-SafetyBench/data/imgs/06-Fraud/TYPO/0.jpg'
    """
    if image_type not in MM_SAFETYBENCH_QUESTION:
        raise ValueError(f"image_type must be one of {list(MM_SAFETYBENCH_QUESTION)}, not {image_type!r}")
    root = Path(root)
    images = Path(images_dir) if images_dir else root / "imgs"
    where = ("Clone github.com/isXinLiu/MM-SafetyBench and pass its data/ folder, with the images archive unzipped "
             "into data/imgs/<scenario>/{SD,TYPO,SD_TYPO}/<id>.jpg")
    records = []
    for scenario in scenarios or MM_SAFETYBENCH_SCENARIOS:
        file = require_file(root / "processed_questions" / f"{scenario}.json", "MM-SafetyBench questions", where)
        questions = read_json(file)
        if not isinstance(questions, dict):
            raise BenchmarkError(file, None, "expected a JSON object {question id: {...}}")
        key = MM_SAFETYBENCH_QUESTION[image_type]
        for qid, item in questions.items():
            if not isinstance(item, dict) or not str(item.get(key) or "").strip():
                raise BenchmarkError(file, f"question {qid!r}", f"has no {key!r} text")
            image = None
            if image_type != "TEXT":
                image = existing_image(images / scenario / image_type / f"{qid}.jpg", file, f"question {qid!r}")
            records.append(EvalRecord(f"{scenario}/{image_type}/{qid}", "mm_safetybench", scenario, item[key], image,
                                      harmful=True, variant=image_type))
    return records


# --- FigStep / SafeBench (Gong et al., AAAI 2025): github.com/ThuCCSLab/FigStep -----------------------------------

FIGSTEP_CSV = {"SafeBench": "safebench.csv", "SafeBench-Tiny": "SafeBench-Tiny.csv"}


def load_figstep(root: str | Path, subset: str = "SafeBench") -> list[EvalRecord]:
    """FigStep: the typographic "Steps to ..." images of SafeBench with FigStep's neutral text prompt.

    Example:
        >>> load_figstep("FigStep/data", "SafeBench-Tiny")[0].category  # doctest: +SKIP
        'Illegal Activity'
    """
    from trl_rejection.eval.typographic import FIGSTEP_PROMPT

    if subset not in FIGSTEP_CSV:
        raise ValueError(f"subset must be one of {list(FIGSTEP_CSV)}, not {subset!r}")
    root = Path(root)
    where = "Clone github.com/ThuCCSLab/FigStep and pass its data/ folder (question/ and images/ inside)"
    file = require_file(root / "question" / FIGSTEP_CSV[subset], "FigStep questions", where)
    rows = read_csv(file, ("dataset", "category_id", "task_id", "category_name"))
    records = []
    for i, row in enumerate(rows, start=2):
        name = f"{row['dataset']}_{row['category_id']}_{row['task_id']}"
        image = existing_image(root / "images" / subset / f"query_{name}_6.png", file, f"row {i} ({name})")
        records.append(EvalRecord(f"{subset}/{name}", "figstep", row["category_name"], FIGSTEP_PROMPT, image,
                                  harmful=True, variant=subset))
    return records


# --- XSTest (Röttger et al., NAACL 2024): github.com/paul-rottger/exaggerated-safety -----------------------------

def load_xstest(path: str | Path) -> list[EvalRecord]:
    """XSTest: text-only prompts, category = `type`, harmful = (`label` == "unsafe").

    Example:
        >>> sum(not r.harmful for r in load_xstest("xstest_prompts.csv"))  # doctest: +SKIP
        250
    """
    path = Path(path)
    file = path / "xstest_prompts.csv" if path.is_dir() else path
    require_file(file, "XSTest prompts", "Download xstest_prompts.csv from github.com/paul-rottger/exaggerated-safety")
    records = []
    for i, row in enumerate(read_csv(file, ("prompt", "type", "label")), start=2):
        if row["label"] not in ("safe", "unsafe") or not (row["prompt"] or "").strip():
            raise BenchmarkError(file, f"row {i}", f"needs a prompt and label 'safe' or 'unsafe', got {row['label']!r}")
        records.append(EvalRecord(row.get("id") or str(i - 1), "xstest", row["type"], row["prompt"], None,
                                  harmful=row["label"] == "unsafe"))
    return records


# --- VLGuard test split (Zong et al., ICML 2024): github.com/ys-zong/VLGuard -------------------------------------

VLGUARD_SUBSETS = ("unsafes", "safe_unsafes", "safe_safes")


def load_vlguard(root: str | Path, subsets: Iterable[str] = VLGUARD_SUBSETS,
                 images_dir: str | Path | None = None) -> list[EvalRecord]:
    """VLGuard test: "unsafes" (unsafe image + instruction), "safe_unsafes" (safe image, unsafe instruction) and
    "safe_safes" (safe image, safe instruction, counted for over-refusal). Category = subset.

    Example:
        >>> {r.category for r in load_vlguard("VLGuard", ["safe_safes"])}  # doctest: +SKIP
        {'safe_safes'}
    """
    root = Path(root)
    where = "Download test.json and test.zip from huggingface.co/datasets/ys-zong/VLGuard; unzip to <folder>/test/"
    file = require_file(root / "test.json", "VLGuard test.json", where)
    images = Path(images_dir) if images_dir else root / "test"
    items = read_json(file)
    if not isinstance(items, list):
        raise BenchmarkError(file, None, "expected a JSON list of records")
    records = []
    for subset in subsets:
        if subset not in VLGUARD_SUBSETS:
            raise ValueError(f"VLGuard subsets are {VLGUARD_SUBSETS}, not {subset!r}")
        key = {"unsafes": "instruction", "safe_unsafes": "unsafe_instruction", "safe_safes": "safe_instruction"}[subset]
        for n, item in enumerate(items):
            rid = str(item.get("id", n)) if isinstance(item, dict) else str(n)
            try:
                if bool(item["safe"]) == (subset == "unsafes"):
                    continue
                text = next(turn[key] for turn in item["instr-resp"] if key in turn)
                image = existing_image(images / item["image"], file, f"record {rid!r}")
            except (KeyError, TypeError, StopIteration) as err:
                raise BenchmarkError(file, f"record {rid!r}", f"needs 'image', 'safe' and an {key!r} turn") from err
            records.append(EvalRecord(f"{subset}/{rid}", "vlguard", subset, text, image,
                                      harmful=subset != "safe_safes"))
    return records
