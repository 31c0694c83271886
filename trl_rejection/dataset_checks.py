"""Checks of the datasets given to `RejectionSFTTrainer`, each failing with the problem and the fix."""

from __future__ import annotations

from typing import Any

from datasets import Dataset, IterableDataset

from .spans import message_text


def check_dataset(ds: Dataset | IterableDataset, name: str, refusal_sentences: list[str]) -> None:
    """A `messages` column, and something to learn a refusal from (an `is_refusal` column or a refusal reply)."""
    columns = ds.column_names or list(next(iter(ds)).keys())
    if "messages" not in columns:
        raise ValueError(f"The {name} dataset has columns {columns} but RejectionSFTTrainer needs a `messages` column "
                         "(TRL conversational format) and optionally `images` and `is_refusal`. Fix: build it with "
                         "`trl-rejection mix` / `trl_rejection.data.build_mix`, or rename your conversation column.")
    if "is_refusal" in columns or not isinstance(ds, Dataset):
        return
    wanted = {s.strip() for s in refusal_sentences}
    for messages in ds["messages"]:
        replies = [m for m in messages if m["role"] == "assistant"]
        if replies and message_text(replies[-1]).strip() in wanted:
            return
    raise ValueError(f"No row of the {name} dataset ends with one of the refusal sentences {sorted(wanted)} and it "
                     "has no `is_refusal` column, so there is nothing to learn a refusal from. Fix: set "
                     "`refusal_sentences` in RejectionSFTConfig to the sentences your data uses, or add `is_refusal`.")


def drop_empty_images(ds: Any, name: str) -> Any:
    """A text-only model may train on a mix whose `images` lists are all empty; image rows are an error."""
    if not isinstance(ds, Dataset) or "images" not in ds.column_names:
        return ds
    for i, images in enumerate(ds.with_format("arrow")["images"].to_pylist()):
        if images:
            rid = ds[i].get("id", i)
            raise ValueError(f"Row {rid!r} of the {name} dataset has {len(images)} image(s) but the model is not a "
                             "vision-language model (its processing class is a tokenizer). Fix: use a VLM and its "
                             "processor, or filter out image rows.")
    return ds.remove_columns("images")
