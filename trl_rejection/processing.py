"""A model's processing class, a VLM processor (tokenizer + image processor) or a plain tokenizer: what it is, and
greedy generation through it (torch loads on the first `greedy_generate`).

Example:
    >>> from trl_rejection.testing.tiny import make_processor
    >>> processor = make_processor("llava-1.5")
    >>> is_vlm_processor(processor), tokenizer_of(processor) is processor.tokenizer
    (True, True)
    >>> is_vlm_processor(tokenizer_of(processor))
    False
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from PIL import Image


def is_vlm_processor(processing_class: Any) -> bool:
    """Whether `processing_class` takes images: a processor holding an image processor (not a bare tokenizer)."""
    return getattr(processing_class, "image_processor", None) is not None


def tokenizer_of(processing_class: Any) -> Any:
    """The tokenizer of a processor, or the tokenizer itself."""
    return getattr(processing_class, "tokenizer", processing_class)


def greedy_generate(model: Any, processing_class: Any, texts: Sequence[str],
                    images: Sequence[Sequence[Image.Image]] | None = None, max_new_tokens: int = 256) -> list[str]:
    """Greedy completions of rendered prompts `texts` (one image list per prompt with images, or None), decoded
    without special tokens. Prompts are left-padded; the tokenizer adds BOS only when the text does not already start
    with it (a chat template that renders it).

    Example:
        >>> greedy_generate(model, processor, ["USER: <image>\\nWhat is it? ASSISTANT:"], [[image]])  # doctest: +SKIP
        ['A red square.']
    """
    import torch

    tokenizer = tokenizer_of(processing_class)
    special = not (tokenizer.bos_token and texts[0].startswith(tokenizer.bos_token))
    if is_vlm_processor(processing_class):
        enc = processing_class(text=list(texts), images=images, return_tensors="pt", padding=True,
                               add_special_tokens=special)
    else:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=special)
    enc = enc.to(model.device)
    if "pixel_values" in enc:
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
