"""Data collator: render each conversation, tokenize (with images), and label the right tokens.

- Normal rows: every assistant reply plus the end-of-turn token that closes it; nothing else.
- Refusal rows: only the leading refusal tokens of the (last) reply, never its end-of-turn or EOS token, so the
  model learns to *start* a refusal without learning to end every answer right away.

Example:
    >>> from trl_rejection.testing.tiny import make_processor
    >>> collate = RejectionDataCollator(make_processor("llava-1.5"))
    >>> batch = collate([{"messages": msgs, "images": [img], "is_refusal": True}])  # doctest: +SKIP
    >>> batch["labels"].shape == batch["input_ids"].shape  # doctest: +SKIP
    True
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers.data.data_collator import DataCollatorMixin

from .constants import DEFAULT_REFUSAL, IGNORE_INDEX
from .packing import image_block_ids, marks_image_blocks, pack_padded_batch
from .processing import tokenizer_of
from .spans import TurnSpan, message_text, render_with_spans

logger = logging.getLogger(__name__)


class TruncationError(ValueError):
    """`max_length` would cut into an image or a refusal span of a row (with `truncation="error"`)."""


def _clean_messages(messages: list[dict[str, Any]], text_only: bool) -> list[dict[str, Any]]:
    """Drop Arrow's null keys from typed parts; text-only tokenizers get plain string content."""
    if text_only:
        return [{"role": m["role"], "content": message_text(m)} for m in messages]
    cleaned = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = [{"type": "image"} if p["type"] == "image" else {"type": "text", "text": p.get("text") or ""}
                       for p in content]
        cleaned.append({"role": m["role"], "content": content})
    return cleaned


@dataclass
class RejectionDataCollator(DataCollatorMixin):
    """Collate TRL conversational rows (`messages`, optional `images`, optional `is_refusal`) into model inputs.

    A TRL-style collator (`DataCollatorMixin`: calling it runs `torch_call`), configured entirely at construction.

    Args:
        processing_class ([`~transformers.ProcessorMixin`] or [`~transformers.PreTrainedTokenizerBase`]):
            The model's processor (VLMs) or tokenizer (text-only models); must have a pad token.
        refusal_sentences (`list[str]`, *optional*, defaults to the paper's sentence):
            Replies that mark a row as a refusal row when it has no `is_refusal` column.
        refusal_label_tokens (`int`, *optional*):
            Label only the first N tokens of a refusal reply. `None` labels all of its tokens.
        mask_refusal_eos (`bool`, *optional*, defaults to `True`):
            Never label the end-of-turn / EOS token after a refusal (the method's masking).
        max_length (`int`, *optional*):
            Truncate longer rows (keeping the start). `None` disables truncation.
        truncation (`"drop"` or `"error"`, *optional*, defaults to `"drop"`):
            A row that `max_length` would cut inside an image or a refusal span is dropped with a warning (`"drop"`)
            or raises `TruncationError` (`"error"`). Rows are never labelled on wrong tokens.
        add_eos_when_missing (`bool`, *optional*, defaults to `True`):
            Insert the EOS token after replies whose template closes them with no special token (llava-hf's
            LLaVA-1.5 template), as LLaVA's own training format does.
        chat_template (`str`, *optional*):
            Overrides the processing class's chat template.
        pad_to_multiple_of (`int`, *optional*):
            Pad the sequence length to a multiple of this.
        padding_free (`bool`, *optional*, defaults to `False`):
            Concatenate the batch's rows into one row without padding (`position_ids` restarting per row,
            `cu_seq_lens_q/k`, `max_length_q/k`, no `attention_mask`; see `trl_rejection.packing`). The model must
            keep rows apart: `RejectionSFTTrainer` switches SDPA models to its `"sdpa_varlen"` attention. Gemma 3
            batches also get `image_block_ids` (`trl_rejection.packing.image_block_ids`, from the packed
            `token_type_ids`), with which that attention lets each image's tokens attend to each other.
        return_tensors (`str`, *optional*, defaults to `"pt"`):
            Only `"pt"` (PyTorch tensors) is supported.
    """

    processing_class: Any
    refusal_sentences: list[str] = field(default_factory=lambda: [DEFAULT_REFUSAL])
    refusal_label_tokens: int | None = None
    mask_refusal_eos: bool = True
    max_length: int | None = None
    truncation: Literal["drop", "error"] = "drop"
    add_eos_when_missing: bool = True
    chat_template: str | None = None
    pad_to_multiple_of: int | None = None
    padding_free: bool = False
    return_tensors: str = "pt"

    def __post_init__(self) -> None:
        self.tokenizer = tokenizer_of(self.processing_class)
        self.text_only = self.tokenizer is self.processing_class
        if self.tokenizer.pad_token is None:
            raise ValueError(f"{type(self.tokenizer).__name__} has no pad token. Fix: set one, e.g. "
                             "`processor.tokenizer.pad_token = processor.tokenizer.eos_token`, or pass "
                             "`pad_token` in RejectionSFTConfig.")
        if self.return_tensors != "pt":
            raise ValueError(f"return_tensors={self.return_tensors!r}: RejectionDataCollator returns PyTorch tensors "
                             "only ('pt').")
        if self.refusal_label_tokens is not None and self.refusal_label_tokens < 1:
            raise ValueError(f"refusal_label_tokens must be >= 1 or None, got {self.refusal_label_tokens}.")
        self._refusals = {s.strip() for s in self.refusal_sentences}

    def is_refusal(self, example: dict[str, Any]) -> bool:
        """The row's `is_refusal` value, or whether its last reply is exactly one of the refusal sentences."""
        if example.get("is_refusal") is not None:
            return bool(example["is_refusal"])
        replies = [m for m in example["messages"] if m["role"] == "assistant"]
        return bool(replies) and message_text(replies[-1]).strip() in self._refusals

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Render, tokenize and label `examples`; pack them into one row when `padding_free`."""
        batch, keep = self._collate(examples)
        if keep is not None:  # some rows cannot be truncated safely: collate the others again
            kept = [examples[i] for i in keep]
            if not kept:
                raise TruncationError(f"max_length={self.max_length} cuts into an image or refusal span of every "
                                      "row of this batch. Fix: raise max_length.")
            batch, _ = self._collate(kept)
        if self.padding_free:
            batch = pack_padded_batch(batch, self.tokenizer.pad_token_id, self.pad_to_multiple_of)
            if "token_type_ids" in batch and marks_image_blocks(self.processing_class):
                batch["image_block_ids"] = image_block_ids(batch["token_type_ids"], batch["cu_seq_lens_q"])
        return batch

    def _collate(self, examples: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[int] | None]:
        texts, spans, images, refusal = [], [], [], []
        eos = self.tokenizer.eos_token if self.add_eos_when_missing else None
        for ex in examples:
            rows_images = list(ex.get("images") or ([ex["image"]] if ex.get("image") is not None else []))
            if rows_images and self.text_only:
                raise ValueError(f"row {ex.get('id', '?')!r} has {len(rows_images)} image(s) but the model's "
                                 f"processing class is a text-only {type(self.tokenizer).__name__}. Fix: use a "
                                 "vision-language model and its processor, or drop image rows.")
            text, turns = render_with_spans(self.processing_class, _clean_messages(ex["messages"], self.text_only),
                                            self.chat_template, eos)
            texts.append(text)
            spans.append(turns)
            images.append(rows_images)
            refusal.append(self.is_refusal(ex))
        # Like transformers' apply_chat_template: add BOS only when the template did not render it.
        bos = self.tokenizer.bos_token
        kwargs = dict(padding=True, padding_side="right", return_tensors="pt", return_offsets_mapping=True,
                      add_special_tokens=not (bos and texts[0].startswith(bos)),
                      pad_to_multiple_of=None if self.padding_free else self.pad_to_multiple_of)
        if self.text_only:
            out = self.tokenizer(texts, **kwargs)
            replacements = [[] for _ in texts]
        else:
            out = self.processing_class(text=texts, images=images if any(images) else None,
                                        return_text_replacement_offsets=True, **kwargs)
            replacements = out.pop("text_replacement_offsets", None) or [[] for _ in texts]
        offsets = out.pop("offset_mapping")
        labels = torch.full_like(out["input_ids"], IGNORE_INDEX)
        for b, (turns, repl) in enumerate(zip(spans, replacements)):
            mask = self._label_mask(turns, repl, offsets[b], refusal[b])
            labels[b][mask] = out["input_ids"][b][mask]
        out["labels"] = labels
        out["is_refusal"] = torch.tensor(refusal, dtype=torch.bool)
        if self.max_length is not None and out["input_ids"].shape[1] > self.max_length:
            keep = self._rows_safe_to_truncate(examples, out, offsets, replacements, refusal)
            if len(keep) < len(examples):
                return out, keep
            out = self._truncate(out)
        return out, None

    def _label_mask(self, turns: list[TurnSpan], replacements: list[dict], offsets: torch.Tensor,
                    is_refusal: bool) -> torch.Tensor:
        ends = [r["span"][1] for r in replacements]
        gained = [0] + [r["new_span"][1] - r["span"][1] for r in replacements]

        def tokens(span: tuple[int, int]) -> torch.Tensor:
            start, end = (c + gained[bisect.bisect_right(ends, c)] for c in span)
            return (offsets[:, 0] < end) & (offsets[:, 1] > start)

        mask = torch.zeros(offsets.shape[0], dtype=torch.bool)
        if is_refusal:
            last = turns[-1]
            reply = tokens(last.content)
            if self.refusal_label_tokens is not None:
                reply &= reply.cumsum(0) <= self.refusal_label_tokens
            mask |= reply
            if not self.mask_refusal_eos and last.end_of_turn is not None:
                mask |= tokens(last.end_of_turn)
            return mask
        for t in turns:
            mask |= tokens(t.content)
            if t.end_of_turn is not None:
                mask |= tokens(t.end_of_turn)
        return mask

    def _rows_safe_to_truncate(self, examples, out, offsets, replacements, refusal) -> list[int]:
        keep = []
        lengths = out["attention_mask"].sum(1).tolist()
        for b in range(len(examples)):
            if lengths[b] <= self.max_length:
                keep.append(b)
                continue
            cut_char = int(offsets[b, self.max_length - 1, 1])  # end of the last kept token
            image_cut = any(r["new_span"][1] > cut_char for r in replacements[b])
            refusal_cut = refusal[b] and bool((out["labels"][b, self.max_length:] != IGNORE_INDEX).any())
            if not (image_cut or refusal_cut):
                keep.append(b)
                continue
            what = "an image" if image_cut else "the refusal reply"
            msg = (f"row {examples[b].get('id', b)!r} is longer than max_length={self.max_length} and truncation "
                   f"would cut into {what}")
            if self.truncation == "error":
                raise TruncationError(msg + ". Fix: raise max_length or shorten the row.")
            logger.warning("%s: dropping the row from this batch.", msg)
        return keep

    def _truncate(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n, length = out["input_ids"].shape
        for key, value in out.items():
            if torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == (n, length):
                out[key] = value[:, : self.max_length]
        return out
