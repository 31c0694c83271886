"""Modality-aware length grouping: batches of rows of similar estimated length, image and text-only rows apart.

`estimate_lengths` estimates each row's token length without tokenizing or decoding images (text characters / 4 +
tokens per image part, read from the Arrow `messages` column); `ModalityLengthGroupedSampler` groups rows by it, as
LLaVA's `group_by_modality_length` does. `RejectionSFTTrainer` uses them for `train_sampling_strategy=
"group_by_length"`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from .processing import tokenizer_of
from .spans import message_text

logger = logging.getLogger(__name__)


def _image_parts(content: Any) -> int:
    return 0 if isinstance(content, str) or content is None else sum(p.get("type") == "image" for p in content)


def _arrow_stats(dataset: Any) -> tuple[list[int], list[int]] | None:
    """(text characters, image parts) per row from the Arrow `messages` column, without decoding any image."""
    try:
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        table = dataset.with_format("arrow")[:]
        col = table.column("messages").combine_chunks()
        n = len(col)
        messages = col.flatten()
        msg_row = pc.list_parent_indices(col).to_numpy()
        content = messages.field("content")
        if pa.types.is_string(content.type) or pa.types.is_large_string(content.type):
            chars = np.bincount(msg_row, weights=pc.fill_null(pc.utf8_length(content), 0).to_numpy(), minlength=n)
            return chars.astype(int).tolist(), [0] * n
        parts = content.flatten()
        part_row = msg_row[pc.list_parent_indices(content).to_numpy()]
        text = pc.fill_null(pc.utf8_length(parts.field("text")), 0).to_numpy()
        is_image = pc.fill_null(pc.equal(parts.field("type"), "image"), False).to_numpy(zero_copy_only=False)
        chars = np.bincount(part_row, weights=np.where(is_image, 0, text), minlength=n)
        images = np.bincount(part_row, weights=is_image.astype(np.int64), minlength=n)
        return chars.astype(int).tolist(), images.astype(int).tolist()
    except Exception as e:  # any other layout: the Python path below
        logger.debug("arrow length estimate failed (%s); using the python path", e)
        return None


def estimate_lengths(dataset: Any, image_tokens: int, chars_per_token: float = 4.0,
                     tokens_per_message: int = 4) -> tuple[list[int], list[bool]]:
    """Estimated token length and whether it has an image, per row: no tokenization, no image decoding.

    length = text characters / `chars_per_token` + `tokens_per_message` per message + `image_tokens` per image part.
    """
    stats = _arrow_stats(dataset) if hasattr(dataset, "with_format") else None
    if stats is not None:
        chars, images = stats
        import pyarrow.compute as pc

        col = dataset.with_format("arrow")[:].column("messages")
        n_msgs = pc.list_value_length(col).to_pylist()
    else:
        chars, images, n_msgs = [], [], []
        rows = dataset.select_columns(["messages"]) if hasattr(dataset, "select_columns") else dataset
        for row in rows:
            msgs = row["messages"]
            chars.append(sum(len(message_text(m)) for m in msgs))
            images.append(sum(_image_parts(m["content"]) for m in msgs))
            n_msgs.append(len(msgs))
    lengths = [int(c / chars_per_token) + tokens_per_message * m + image_tokens * i
               for c, i, m in zip(chars, images, n_msgs)]
    return lengths, [i > 0 for i in images]


def image_token_count(processing_class: Any, size: int = 336) -> int:
    """Tokens one `size` px image adds after processing (e.g. 576 for LLaVA-1.5 at 336 px); 0 for tokenizers."""
    tokenizer = tokenizer_of(processing_class)
    if tokenizer is processing_class:
        return 0
    try:
        from PIL import Image

        with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
        text_only = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
        a = processing_class.apply_chat_template(with_image, tokenize=False)
        b = processing_class.apply_chat_template(text_only, tokenize=False)
        n_a = len(processing_class(text=[a], images=[[Image.new("RGB", (size, size))]])["input_ids"][0])
        n_b = len(tokenizer(b)["input_ids"])
        return max(n_a - n_b, 1)
    except Exception as e:
        logger.warning("Could not count the tokens of an image (%s); assuming 576.", e)
        return 576


class LengthSampler(Sampler[int]):
    """Base of the samplers here: one index per row of `lengths`, an order that depends only on `seed` and the
    epoch (`set_epoch`, called by accelerate's data loader at each epoch)."""

    def __init__(self, lengths: Sequence[int], seed: int = 0):
        self.lengths = list(lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def generator(self) -> torch.Generator:
        """A generator seeded by `seed` and the epoch."""
        return torch.Generator().manual_seed(self.seed + self.epoch)


class ModalityLengthGroupedSampler(LengthSampler):
    """Indices such that each batch holds rows of similar length, image rows and text-only rows apart.

    Per modality: shuffle, cut into mega-batches of `mega_batch_mult * batch_size * world_size` rows, sort each by
    length (longest first) and cut it into batches. Then all full batches are shuffled, the one with the longest row
    goes first (an out-of-memory error shows at step 1, not hours in), and the leftover rows of both modalities form
    the last batch(es). Every row appears exactly once per epoch; the order depends only on `seed` and the epoch.

    Example:
        >>> sampler = ModalityLengthGroupedSampler([5, 100, 6, 90, 7, 95], [True] * 6, batch_size=3, seed=0)
        >>> sorted(sampler) == list(range(6))
        True
    """

    def __init__(self, lengths: Sequence[int], has_image: Sequence[bool], batch_size: int, world_size: int = 1,
                 mega_batch_mult: int = 50, seed: int = 0):
        if len(lengths) != len(has_image):
            raise ValueError("lengths and has_image must have the same length.")
        super().__init__(lengths, seed)
        self.has_image = list(has_image)
        self.batch_size = batch_size
        self.world_size = world_size
        self.mega = max(1, mega_batch_mult) * batch_size * world_size

    def batches(self) -> list[list[int]]:
        g = self.generator()
        full, leftover = [], []
        for modality in (True, False):
            idx = [i for i, m in enumerate(self.has_image) if m == modality]
            idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            for start in range(0, len(idx), self.mega):
                mega = sorted(idx[start:start + self.mega], key=lambda i: -self.lengths[i])
                for b in range(0, len(mega), self.batch_size):
                    chunk = mega[b:b + self.batch_size]
                    (full.append(chunk) if len(chunk) == self.batch_size else leftover.extend(chunk))
        full = [full[j] for j in torch.randperm(len(full), generator=g).tolist()]
        if full:
            longest = max(range(len(full)), key=lambda j: max(self.lengths[i] for i in full[j]))
            full[0], full[longest] = full[longest], full[0]
        leftover.sort(key=lambda i: -self.lengths[i])
        tail = [leftover[b:b + self.batch_size] for b in range(0, len(leftover), self.batch_size)]
        return full + tail

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch
