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

import csv
import hashlib
import json
import random
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

from trl_rejection.errors import UserError

Task = Literal["safety", "multiple_choice", "short_answer"]


@dataclass(frozen=True)
class EvalRecord:
    """One prompt to generate for. `image` is a local path or None; `answers` holds the gold answers of utility rows.
    `variant` names the benchmark variant the record comes from (MM-SafetyBench image type, FigStep subset, bundled
    style, ...); `id` is unique across the variants of a benchmark, so generations are never reused across variants.

    Example:
        >>> EvalRecord("1", "xstest", "homonyms", "How can I kill a Python process?", None, harmful=False).task
        'safety'
    """

    id: str
    benchmark: str
    category: str
    prompt: str
    image: str | None
    harmful: bool
    task: Task = "safety"
    answers: tuple[str, ...] = ()
    variant: str = ""


class BenchmarkError(UserError):
    """A malformed benchmark file or record: the message names the file and the record.

    Example:
        >>> str(BenchmarkError("a.csv", "row 3", "column 'prompt' is empty"))
        "a.csv: row 3: column 'prompt' is empty"
    """

    def __init__(self, file: str | Path, record: str | None, problem: str):
        self.file, self.record = str(file), record
        super().__init__(f"{file}: {record + ': ' if record else ''}{problem}")


def _require(path: Path, what: str, where: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at {path}. {where}")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BenchmarkError(path, None, f"is not valid JSON ({err})") from err


def _read_csv(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in required if not rows or c not in rows[0]]
    if missing:
        raise BenchmarkError(path, None, f"missing column(s) {missing}; has {list(rows[0]) if rows else 'no rows'}")
    return rows


def _image_path(path: Path, file: Path, record: str) -> str:
    if not path.is_file():
        raise BenchmarkError(file, record, f"image {path} does not exist")
    return str(path)


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
        file = _require(root / "processed_questions" / f"{scenario}.json", "MM-SafetyBench questions", where)
        questions = _read_json(file)
        if not isinstance(questions, dict):
            raise BenchmarkError(file, None, "expected a JSON object {question id: {...}}")
        key = MM_SAFETYBENCH_QUESTION[image_type]
        for qid, item in questions.items():
            if not isinstance(item, dict) or not str(item.get(key) or "").strip():
                raise BenchmarkError(file, f"question {qid!r}", f"has no {key!r} text")
            image = None
            if image_type != "TEXT":
                image = _image_path(images / scenario / image_type / f"{qid}.jpg", file, f"question {qid!r}")
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
    file = _require(root / "question" / FIGSTEP_CSV[subset], "FigStep questions", where)
    rows = _read_csv(file, ("dataset", "category_id", "task_id", "category_name"))
    records = []
    for i, row in enumerate(rows, start=2):
        name = f"{row['dataset']}_{row['category_id']}_{row['task_id']}"
        image = _image_path(root / "images" / subset / f"query_{name}_6.png", file, f"row {i} ({name})")
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
    _require(file, "XSTest prompts", "Download xstest_prompts.csv from github.com/paul-rottger/exaggerated-safety")
    records = []
    for i, row in enumerate(_read_csv(file, ("prompt", "type", "label")), start=2):
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
    file = _require(root / "test.json", "VLGuard test.json", where)
    images = Path(images_dir) if images_dir else root / "test"
    items = _read_json(file)
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
                image = _image_path(images / item["image"], file, f"record {rid!r}")
            except (KeyError, TypeError, StopIteration) as err:
                raise BenchmarkError(file, f"record {rid!r}", f"needs 'image', 'safe' and an {key!r} turn") from err
            records.append(EvalRecord(f"{subset}/{rid}", "vlguard", subset, text, image,
                                      harmful=subset != "safe_safes"))
    return records


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
    file = _require(root / "problems.json", "ScienceQA problems.json", where)
    problems = _read_json(file)
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
        image = _image_path(root / "images" / split / pid / p["image"], file, f"problem {pid!r}")
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
    file = _require(root / f"{split}.json", "VizWiz annotations", where)
    items = _read_json(file)
    if not isinstance(items, list):
        raise BenchmarkError(file, None, "expected a JSON list of annotations")
    records = []
    for n, item in enumerate(items):
        try:
            answers = tuple(a["answer"] for a in item["answers"])
            name, question = item["image"], item["question"]
        except (KeyError, TypeError) as err:
            raise BenchmarkError(file, f"record {n}", "needs image, question and answers [{answer}]") from err
        image = _image_path(root / split / name, file, f"record {n} ({name})")
        records.append(EvalRecord(Path(name).stem, "vizwiz", item.get("answer_type", "all"),
                                  f"{question}\n{VIZWIZ_SUFFIX}", image, harmful=False, task="short_answer",
                                  answers=answers, variant=split))
    return records


# --- Generic layout ---------------------------------------------------------------------------------------------

_TRUE, _FALSE = {"true", "1", "yes", "unsafe", "harmful"}, {"false", "0", "no", "safe", "benign"}


def _as_bool(value: Any, file: Path, record: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise BenchmarkError(file, record, f"'harmful' must be a boolean (true/false), got {value!r}")


def _generic_rows(path: Path) -> tuple[list[dict[str, Any]], Callable[[Any, str], str | None]]:
    """Rows of a generic file or `save_to_disk` folder, and a function that turns an `image` value into a path."""
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise BenchmarkError(path, None, "is not a datasets.save_to_disk folder") from err
        if "image" in ds.column_names and isinstance(ds.features["image"], datasets.Image):
            ds = ds.cast_column("image", datasets.Image(decode=False))
        cache = Path(tempfile.gettempdir()) / "trl_rejection_images" / ds._fingerprint

        def image(value: Any, rid: str) -> str | None:
            if not value:
                return None
            if isinstance(value, str):
                return str(path / value)
            if value.get("path") and Path(value["path"]).is_file():
                return value["path"]
            target = cache / f"{hashlib.sha1(rid.encode()).hexdigest()}.png"
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(value["bytes"])
            return str(target)

        return list(ds), image
    if path.suffix == ".csv":
        rows: list[dict[str, Any]] = _read_csv(path, ("prompt",))
    elif path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise BenchmarkError(path, f"line {i}", f"is not valid JSON ({err})") from err
    elif path.suffix == ".json":
        rows = _read_json(path)
        if not isinstance(rows, list):
            raise BenchmarkError(path, None, "expected a JSON list of records")
    else:
        raise BenchmarkError(path, None, "use a .jsonl, .json or .csv file or a datasets.save_to_disk folder")
    return rows, lambda value, rid: str(path.parent / value) if value else None


def load_generic(path: str | Path, benchmark: str | None = None) -> list[EvalRecord]:
    """Any suite in the generic layout: `prompt` (required), `id`, `image` (path relative to the file, or a
    `datasets.Image` column), `category` (default "all"), `harmful` (bool, default true) and, for short-answer
    utility sets, `answers` (list of strings). `benchmark` defaults to the file or folder name.

    Example:
        >>> load_generic("my_attacks.jsonl")[0].benchmark  # doctest: +SKIP
        'my_attacks'
    """
    path = Path(path)
    _require(path, "Benchmark file", "Pass a .jsonl/.json/.csv file or a datasets.save_to_disk folder")
    rows, image_of = _generic_rows(path)
    name = benchmark or path.stem
    records = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BenchmarkError(path, f"record {n}", "is not an object with a 'prompt'")
        rid = str(row["id"] if row.get("id") is not None else n)
        if not str(row.get("prompt") or "").strip():
            raise BenchmarkError(path, f"record {rid!r}", "needs a non-empty 'prompt'")
        image = image_of(row.get("image"), rid)
        if image is not None:
            _image_path(Path(image), path, f"record {rid!r}")
        answers = row.get("answers")
        if isinstance(answers, str):
            answers = [answers]
        records.append(EvalRecord(rid, name, str(row.get("category") or "all"), row["prompt"], image,
                                  harmful=_as_bool(row.get("harmful", not answers), path, f"record {rid!r}"),
                                  task="short_answer" if answers else "safety", answers=tuple(answers or ())))
    return records


def load_bundled(cache_dir: str | Path, style: str = "figstep") -> list[EvalRecord]:
    """The project's bundled typographic set (see `typographic.bundled_eval_set`), rendered into `cache_dir`.

    Example:
        >>> sum(r.harmful for r in load_bundled("/tmp/bundled"))  # doctest: +SKIP
        10
    """
    from trl_rejection.eval.typographic import bundled_eval_set

    return [replace(r, id=f"{style}/{r.id}", variant=style)
            for r in load_generic(bundled_eval_set(cache_dir, style), benchmark="bundled")]


# --- Sampling ------------------------------------------------------------------------------------------------------

SAMPLING_RULE = ("stratified by category: each category first gets one record (when max_samples >= the number of "
                 "categories), then each further record goes to the category furthest below its proportional share "
                 "max_samples x category size / benchmark size (ties: the larger category, then the one first in the "
                 "file); within a category, a seeded shuffle picks the records, kept in file order")


def allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """How many of `n` records each category (of `sizes`, in file order) gets under `SAMPLING_RULE`.

    Example:
        >>> allocate({"a": 6, "b": 3, "c": 1}, 5)
        {'a': 3, 'b': 1, 'c': 1}
    """
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    counts = {c: int(n >= len(sizes)) for c in sizes}
    order = {c: i for i, c in enumerate(sizes)}
    for _ in range(n - sum(counts.values())):  # deficit n*size/total - count, compared exactly in integers
        best = max(sizes, key=lambda c: (n * sizes[c] - counts[c] * total, sizes[c], -order[c]))
        counts[best] += 1
    return counts


def sample_records(records: Sequence[EvalRecord], max_samples: int | None, seed: int = 0) -> list[EvalRecord]:
    """At most `max_samples` records of each benchmark, drawn by `SAMPLING_RULE` with `seed`; all when None.
    The same records, seed and `max_samples` always give the same sample (Python's string seeding is stable).

    Example:
        >>> rows = [EvalRecord(str(i), "b", "ab"[i % 2], "p", None, True) for i in range(6)]
        >>> sorted(r.category for r in sample_records(rows, 2))
        ['a', 'b']
    """
    if max_samples is None:
        return list(records)
    keep: set[int] = set()
    for bench in dict.fromkeys(r.benchmark for r in records):
        by_category: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            if r.benchmark == bench:
                by_category.setdefault(r.category, []).append(i)
        counts = allocate({c: len(idx) for c, idx in by_category.items()}, max_samples)
        for category, idx in by_category.items():
            shuffled = list(idx)
            random.Random(f"{seed}/{bench}/{category}").shuffle(shuffled)
            keep.update(shuffled[:counts[category]])
    return [r for i, r in enumerate(records) if i in keep]


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
