"""Batched greedy generation into a resumable JSONL: one line per prompt, flushed after every batch.

Re-running with the same output file skips the (benchmark, id) pairs already there, so an interrupted run picks up
where it stopped; a half-written last line left by a kill is dropped on resume. Image rows and text-only rows are
batched separately; VLM processors and plain tokenizers both work, with left padding.

Example:
    >>> from trl_rejection.generation import load_model_and_processor
    >>> model, processor = load_model_and_processor("llava-hf/llava-1.5-7b-hf")  # doctest: +SKIP
    >>> records = load_benchmark("xstest", "xstest_prompts.csv")  # doctest: +SKIP
    >>> generate(model, processor, records, "runs/base/generations.jsonl", batch_size=16)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image
from tqdm.auto import tqdm

from trl_rejection.eval.generations import read_generations
from trl_rejection.eval.records import BenchmarkError, EvalRecord
from trl_rejection.generation import greedy_generate
from trl_rejection.processing import is_vlm_processor


def _open_image(record: EvalRecord) -> Image.Image:
    try:
        with Image.open(record.image) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise BenchmarkError(record.image, f"record {record.benchmark}/{record.id}",
                             f"the image cannot be opened ({err})") from err


def _render(processor: Any, record: EvalRecord) -> str:
    """The chat-formatted prompt text, with an image slot for image rows."""
    is_vlm = is_vlm_processor(processor)
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


def _generate_batch(model: Any, processor: Any, batch: Sequence[EvalRecord], max_new_tokens: int) -> list[str]:
    images = [[_open_image(r)] for r in batch if r.image is not None] or None  # one list per prompt
    texts = greedy_generate(model, processor, [_render(processor, r) for r in batch], images, max_new_tokens)
    return [t.strip() for t in texts]


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
