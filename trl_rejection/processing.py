"""What a model's processing class is: a VLM processor (tokenizer + image processor) or a plain tokenizer.

Example:
    >>> from trl_rejection.testing.tiny import make_processor
    >>> processor = make_processor("llava-1.5")
    >>> is_vlm_processor(processor), tokenizer_of(processor) is processor.tokenizer
    (True, True)
    >>> is_vlm_processor(tokenizer_of(processor))
    False
"""

from __future__ import annotations

from typing import Any


def is_vlm_processor(processing_class: Any) -> bool:
    """Whether `processing_class` takes images: a processor holding an image processor (not a bare tokenizer)."""
    return getattr(processing_class, "image_processor", None) is not None


def tokenizer_of(processing_class: Any) -> Any:
    """The tokenizer of a processor, or the tokenizer itself."""
    return getattr(processing_class, "tokenizer", processing_class)

