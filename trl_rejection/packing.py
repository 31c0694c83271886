"""Padding-free batches: the rows of a padded batch concatenated into one sequence, kept apart by their positions.

- `pack_padded_batch` turns a right-padded collated batch into one row of concatenated sequences (no padding) with
  `position_ids` restarting at 0 for each sequence and flash-attention-style `cu_seq_lens_q/k`, `max_length_q/k`.
- `padding_free_supported` says whether a model computes the same thing on such a batch (1-D RoPE, or a
  token-type mask the attention can rebuild); Qwen2-VL, Qwen2.5-VL and Qwen3-VL models get their per-row 3-D RoPE
  positions from `mrope_packed_inputs`.
- `image_block_ids` marks, in a packed batch of a Gemma 3 model, the tokens of each image, which attend to each other
  bidirectionally (the collator adds it as the batch's `image_block_ids`).
- `token_row_index` maps each token of a packed batch back to its row.

The attention that keeps packed rows apart for SDPA models (and rebuilds Gemma 3's image blocks and sliding windows
inside each row) is in `trl_rejection.attention`.

Example:
    >>> import torch
    >>> batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
    ...          "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
    ...          "labels": torch.tensor([[-100, 6, 7], [-100, 9, -100]])}
    >>> packed = pack_padded_batch(batch, pad_token_id=0)
    >>> packed["input_ids"].tolist(), packed["position_ids"].tolist(), packed["cu_seq_lens_q"].tolist()
    ([[5, 6, 7, 8, 9]], [[0, 1, 2, 0, 1]], [0, 3, 5])
"""

from __future__ import annotations

from typing import Any

import torch

from .constants import IGNORE_INDEX

# Models whose positions are not 1-D (multimodal RoPE) or whose mask depends on token types (bidirectional image
# blocks): concatenating rows with restarting 1-D position_ids would change what they compute.
_NOT_PACKABLE = ("qwen3_vl_moe", "glm4v", "glm4v_moe", "gemma3n", "paligemma", "mllama",
                 "qwen2_5_omni", "qwen3_omni_moe", "kimi_vl")
# Models whose image tokens attend to the other tokens of their image bidirectionally (a mask built from
# `token_type_ids`), packed with `image_block_ids`: only the `"sdpa_varlen"` attention rebuilds that mask per row
# (transformers' own packed masks index the image blocks by per-row position on sliding-window layers, so eager and
# flex attention get other masks than the padded batch's).
IMAGE_BLOCK_PACKABLE = ("gemma3",)
# Processors whose `token_type_ids` mark those image tokens (1) among text tokens (0).
_IMAGE_BLOCK_PROCESSORS = ("Gemma3Processor",)
# Multimodal-RoPE models packed with per-row 3-D positions (`mrope_packed_inputs`): their text model reads
# `[4, 1, tokens]` position ids, text positions first. Qwen3-VL's deepstack features need nothing more: the model adds
# them at the image tokens of whatever sequence it is given, in image order, which packing keeps.
_MROPE_PACKABLE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def padding_free_supported(config: Any, attn_implementation: str | None = None) -> tuple[bool, str]:
    """Whether rows of this model can be concatenated into one sequence; the reason when not.

    Gemma 3 can, with SDPA (which the trainer switches to `"sdpa_varlen"`): a config whose language model is set to
    another attention (eager, flex, flash) cannot. A config loaded by name has no attention set yet: pass the one the
    model will be loaded with as `attn_implementation` (if it then loads with another one,
    `trl_rejection.attention.use_varlen_attention` raises).
    """
    types = {getattr(config, "model_type", None)}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types.add(getattr(text, "model_type", None))
    if types & set(_NOT_PACKABLE):
        return False, f"model type {sorted(t for t in types if t)} uses multimodal RoPE or a token-type mask"
    attn = attn_implementation or getattr(text, "_attn_implementation", None)
    if types & set(IMAGE_BLOCK_PACKABLE) and attn not in (None, "sdpa", "sdpa_varlen"):
        return False, (f"Gemma 3's image-token mask in packed batches needs attn_implementation='sdpa' (switched to "
                       f"'sdpa_varlen'), not {attn!r}")
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    if isinstance(rope, dict) and ("mrope_section" in rope or rope.get("rope_type") == "mrope") \
            and not types & set(_MROPE_PACKABLE):
        return False, "the model uses multimodal RoPE (3-D position ids)"
    return True, ""


def rope_index_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The sub-module computing a Qwen-VL model's 3-D RoPE positions (`get_rope_index`); None for others."""
    return next((m for m in model.modules() if callable(getattr(m, "get_rope_index", None))), None)


def mrope_packed_inputs(rope_module: torch.nn.Module | None, inputs: dict[str, Any]) -> dict[str, Any]:
    """Give a packed batch of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model its `[4, 1, tokens]` position ids.

    Row 0 holds the packed text positions (restarting per row; the model keeps rows apart with them), rows 1-3 the
    temporal/height/width positions of multimodal RoPE, computed over the packed sequence and shifted so each row
    starts at 0: exactly the positions the model computes for that row in a padded batch. Inputs of other models,
    padded batches and batches without images are returned unchanged.

    Example:
        >>> batch = mrope_packed_inputs(rope_index_module(model), collator(rows))  # doctest: +SKIP
        >>> batch["position_ids"].shape  # doctest: +SKIP
        torch.Size([4, 1, 391])
    """
    if rope_module is None:  # every model but the Qwen-VL ones: nothing to do on this per-step path
        return inputs
    position_ids, cu = inputs.get("position_ids"), inputs.get("cu_seq_lens_q")
    grids = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
             if inputs.get(k) is not None}
    if cu is None or position_ids is None or position_ids.dim() != 2 or not grids:
        return inputs
    positions, _ = rope_module.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                              **grids)  # (3, 1, tokens): the packed rows as one sequence
    rows = token_row_index(inputs, inputs["input_ids"].shape)[0].to(positions.device)
    starts = cu[:-1].to(device=positions.device, dtype=torch.long)
    positions = positions - positions[:, :, starts][:, :, rows]  # RoPE is relative: each row back to 0
    return {**inputs, "position_ids": torch.cat([position_ids.to(positions.device)[None], positions], 0)}


def pack_padded_batch(batch: dict[str, Any], pad_token_id: int,
                      pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """Concatenate the rows of a right-padded batch into a single row without padding.

    Every tensor shaped `(batch, seq_len, ...)` is flattened over its real tokens; `attention_mask` is replaced by
    `position_ids` (restarting at 0 per row), `cu_seq_lens_q/k` (int32 row boundaries, `[0, len_0, len_0+len_1,
    ...]`) and `max_length_q/k`. The first token of each row gets label `-100`, so no row learns to predict the next
    row's first token (in a padded batch that position is never a target either). Other keys (pixel values,
    `is_refusal`, ...) are kept as they are. With `pad_to_multiple_of`, pad tokens are appended as one more sequence
    with label `-100`.
    """
    mask = batch["attention_mask"].bool()
    n, length = mask.shape
    lengths = mask.sum(1)
    if not bool((mask == (torch.arange(length)[None] < lengths[:, None])).all()):
        raise ValueError("pack_padded_batch needs a right-padded batch (each row's real tokens first).")
    out: dict[str, Any] = {}
    labels = batch["labels"].clone()
    labels[:, 0] = IGNORE_INDEX
    for key, value in batch.items():
        if key == "attention_mask":
            continue
        value = labels if key == "labels" else value
        if torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == (n, length):
            out[key] = value[mask][None]
        else:
            out[key] = value
    seq_lens = [int(x) for x in lengths]
    total = sum(seq_lens)
    if pad_to_multiple_of and total % pad_to_multiple_of:
        extra = pad_to_multiple_of - total % pad_to_multiple_of
        for key in list(out):
            value = out[key]
            if torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == (1, total):
                fill = pad_token_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
                out[key] = torch.cat([value, value.new_full((1, extra, *value.shape[2:]), fill)], 1)
        seq_lens.append(extra)
    out["position_ids"] = torch.cat([torch.arange(s) for s in seq_lens])[None]
    cu = torch.tensor([0, *seq_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu
    out["max_length_q"] = out["max_length_k"] = max(seq_lens)
    return out


def marks_image_blocks(processing_class: Any) -> bool:
    """Whether this processor's `token_type_ids` mark image tokens that attend bidirectionally (Gemma 3's)."""
    return any(cls.__name__ in _IMAGE_BLOCK_PROCESSORS for cls in type(processing_class).__mro__)


def image_block_ids(token_type_ids: torch.Tensor, cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """For a packed batch, `-1` at text tokens and a number per image (counted over the batch) at image tokens.

    An image is a run of consecutive tokens with `token_type_ids == 1` within one row (`cu_seq_lens` boundaries):
    Gemma 3's image blocks, each read as transformers' `get_block_sequence_ids_for_mask` reads them in a padded row.
    Inside a row, tokens of one image attend to each other in both directions.

    Example:
        >>> image_block_ids(torch.tensor([[0, 1, 1, 0, 1, 1, 1, 1]]), torch.tensor([0, 5, 6, 8])).tolist()
        [[-1, 0, 0, -1, 1, 2, 3, 3]]
    """
    is_image = token_type_ids == 1
    row_starts = torch.zeros_like(is_image)
    row_starts[:, cu_seq_lens[:-1].to(torch.long)] = True
    previous = torch.nn.functional.pad(is_image, (1, 0))[:, :-1] & ~row_starts
    starts = is_image & ~previous
    return torch.where(is_image, starts.cumsum(-1) - 1, -1)


def token_row_index(inputs: dict[str, Any], shape: torch.Size) -> torch.Tensor | None:
    """For a packed batch, the row (sequence) index of every token, shaped like `labels`; None for padded batches."""
    cu = inputs.get("cu_seq_lens_q")
    if cu is not None and shape[0] == 1:
        cu = cu.to(torch.long)
        # the collator's `cu_seq_lens_q` ends at the packed length (padding is one more sequence): giving it as
        # `output_size` spares the host a sync with the GPU to size the result
        return torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff(),
                                       output_size=shape[-1])[None]
    pos = inputs.get("position_ids")
    if pos is not None and shape[0] == 1 and "attention_mask" not in inputs:
        return ((pos == 0).cumsum(-1) - 1)[:1]
    return None
