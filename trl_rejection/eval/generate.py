"""Batched greedy generation into a resumable JSONL: one line per prompt, flushed after every batch.

Re-running with the same output file skips the (benchmark, id) pairs already there, so an interrupted run picks up
where it stopped; a half-written last line left by a kill is dropped on resume. Image rows and text-only rows are
batched separately; VLM processors and plain tokenizers both work, with left padding.

Example:
    >>> model, processor = load_model_and_processor("llava-hf/llava-1.5-7b-hf")  # doctest: +SKIP
    >>> records = load_benchmark("xstest", "xstest_prompts.csv")  # doctest: +SKIP
    >>> generate(model, processor, records, "runs/base/generations.jsonl", batch_size=16)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence, get_args

import torch
from PIL import Image
from tqdm.auto import tqdm

from trl_rejection.eval.benchmarks import BenchmarkError, EvalRecord, Task

logger = logging.getLogger(__name__)

TINY_MODEL = "tiny-llava"  # special model name: the tiny random LLaVA-1.5 of `trl_rejection.tiny`, for dry runs


def load_model_and_processor(model_name_or_path: str, adapter_path: str | None = None, dtype: str = "auto",
                             device: str | None = None) -> tuple[Any, Any]:
    """Load a VLM (or text LM) and its processor (or tokenizer) from a local folder or Hub id, optionally with a
    LoRA adapter (merged). `TINY_MODEL` builds the tiny random LLaVA-1.5 in process.

    Example:
        >>> model, processor = load_model_and_processor("tiny-llava")
        >>> type(model).__name__
        'LlavaForConditionalGeneration'
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model_name_or_path == TINY_MODEL:
        from trl_rejection.tiny import make_model, make_processor

        processor = make_processor("llava-1.5")
        model = make_model("llava-1.5", processor)
    else:
        processor = AutoProcessor.from_pretrained(model_name_or_path)
        auto = AutoModelForImageTextToText if hasattr(processor, "image_processor") else AutoModelForCausalLM
        model = auto.from_pretrained(model_name_or_path, dtype=dtype)
    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    return model.to(device).eval(), processor


ROW_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,), "benchmark": (str,), "category": (str,), "prompt": (str,), "image": (str, type(None)),
    "harmful": (bool,), "task": (str,), "answers": (list,), "completion": (str,)}  # one generations.jsonl row
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _check_row(row: Any, path: Path, line: int) -> None:
    """A row must be a JSON object with every field of `ROW_FIELDS`, each of its type, a known task and string
    answers."""
    if not isinstance(row, dict):
        raise BenchmarkError(path, f"line {line}", f"is a JSON {_JSON_TYPES[type(row)]} ({json.dumps(row)[:40]}), "
                             "not a generation row (an object with id, benchmark, ..., completion); fix or delete the "
                             "line")
    for name, types in ROW_FIELDS.items():
        if name not in row:
            raise BenchmarkError(path, f"line {line}", f"has no field {name!r}; fix or delete the line")
        if not isinstance(row[name], types):
            raise BenchmarkError(path, f"line {line}", f"field {name!r} is {json.dumps(row[name])[:40]}, not a "
                                 f"{' or '.join(_JSON_TYPES[t] for t in types)}; fix or delete the line")
    if row["task"] not in get_args(Task):
        raise BenchmarkError(path, f"line {line}", f"field 'task' is {row['task']!r}, not one of {get_args(Task)}; fix "
                             "or delete the line")
    if not all(isinstance(answer, str) for answer in row["answers"]):
        raise BenchmarkError(path, f"line {line}", f"field 'answers' is {json.dumps(row['answers'])[:40]}, not a list "
                             "of strings; fix or delete the line")


def read_generations(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a generations JSONL, one per (benchmark, id), repaired for appending.

    A truncated last line (an interrupted write) is cut from the file with a warning and a missing final newline is
    added. A line that is not JSON, or not a row with the fields of `ROW_FIELDS`, is an error naming the file and the
    line. A repeated (benchmark, id) is read once: the first line is kept, with a warning (that also names lines
    whose content differs from the first).

    Example:
        >>> read_generations("runs/base/generations.jsonl")[0]["completion"]  # doctest: +SKIP
        "I'm sorry, but I cannot assist with your request"
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
    repeated, differing = 0, []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:  # bad JSON, or UTF-8 cut inside a character
            if i == len(lines) - 1:  # no newline after it: the write was cut off
                logger.warning("%s: dropping the half-written last line %d", path, i + 1)
                with path.open("r+b") as f:
                    f.truncate(len(raw) - len(line))
                break
            raise BenchmarkError(path, f"line {i + 1}", f"is not valid JSON ({err}); fix or delete the line") from err
        _check_row(row, path, i + 1)
        key = (row["benchmark"], row["id"])
        if key in rows:
            repeated += 1
            if row != rows[key][1]:
                differing.append(f"line {i + 1} ({key[0]}/{key[1]}) differs from line {rows[key][0]}")
            continue
        rows[key] = (i + 1, row)
    else:
        if raw and not raw.endswith(b"\n"):  # a complete last row without its newline: end it before appending
            with path.open("ab") as f:
                f.write(b"\n")
    if repeated:
        logger.warning("%s: %d line(s) repeat a (benchmark, id) read before and were ignored (the first is kept)%s",
                       path, repeated, "; " + ", ".join(differing[:5]) + (" ..." if len(differing) > 5 else "")
                       if differing else "")
    return [row for _, row in rows.values()]


def _open_image(record: EvalRecord) -> Image.Image:
    try:
        with Image.open(record.image) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise BenchmarkError(record.image, f"record {record.benchmark}/{record.id}",
                             f"the image cannot be opened ({err})") from err


def _render(processor: Any, record: EvalRecord) -> str:
    """The chat-formatted prompt text, with an image slot for image rows."""
    is_vlm = hasattr(processor, "image_processor")
    if record.image is not None and not is_vlm:
        raise ValueError(f"record {record.benchmark}/{record.id} has an image but the model has no image processor; "
                         "evaluate a vision-language model or drop image benchmarks")
    if is_vlm:
        content = ([{"type": "image"}] if record.image is not None else []) + [{"type": "text", "text": record.prompt}]
    else:
        content = record.prompt
    if getattr(processor, "chat_template", None) is None:
        if is_vlm:
            raise ValueError("the processor has no chat template; pass a model whose processor ships one")
        return record.prompt
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


@torch.no_grad()
def _generate_batch(model: Any, processor: Any, batch: Sequence[EvalRecord], max_new_tokens: int) -> list[str]:
    tokenizer = getattr(processor, "tokenizer", processor)
    texts = [_render(processor, r) for r in batch]
    special = not (tokenizer.bos_token and texts[0].startswith(tokenizer.bos_token))  # template already has BOS
    if hasattr(processor, "image_processor"):
        images = [[_open_image(r)] for r in batch if r.image is not None] or None  # one list per prompt
        enc = processor(text=texts, images=images, return_tensors="pt", padding=True, add_special_tokens=special)
    else:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=special)
    enc = enc.to(model.device)
    if "pixel_values" in enc:
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [t.strip() for t in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]


def generate(model: Any, processor: Any, records: Sequence[EvalRecord], output_path: str | Path, *,
             batch_size: int = 8, max_new_tokens: int = 256, progress: bool = True,
             on_batch: Callable[[int], None] | None = None) -> Path:
    """Generate greedily for every record not yet in `output_path` and append one JSON line per record
    (id, benchmark, category, prompt, image, harmful, task, answers, completion), flushed per batch.
    `on_batch(rows_written)` runs after each flush.

    Example:
        >>> generate(model, processor, records, "out/generations.jsonl", batch_size=4)  # doctest: +SKIP
        PosixPath('out/generations.jsonl')
    """
    keys = [(r.benchmark, r.id) for r in records]
    if len(set(keys)) != len(keys):
        dupes = sorted({f"{b}/{i}" for b, i in keys if keys.count((b, i)) > 1})
        raise ValueError(f"record ids must be unique per benchmark; repeated: {dupes[:5]}")
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    done = {(row["benchmark"], row["id"]) for row in read_generations(output_path)}
    todo = [r for r in records if (r.benchmark, r.id) not in done]
    groups = [[r for r in todo if r.image is not None], [r for r in todo if r.image is None]]  # one modality a batch
    batches = [group[i:i + batch_size] for group in groups for i in range(0, len(group), batch_size)]
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    written = 0
    with output_path.open("a", encoding="utf-8") as f, tqdm(total=len(records), initial=len(records) - len(todo),
                                                          desc="generate", disable=not progress) as bar:
        for batch in batches:
            completions = _generate_batch(model, processor, batch, max_new_tokens)
            f.write("".join(json.dumps({**asdict(r), "completion": c}, ensure_ascii=False) + "\n"
                            for r, c in zip(batch, completions)))
            f.flush()
            os.fsync(f.fileno())
            written += len(batch)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(written)
    return output_path
