"""Optional extras (flash-attn, bitsandbytes): checks that a flag's extra is installed, with the install command if
not, and the bitsandbytes config that leaves the fully trained modules unquantized.

Example:
    >>> check_extras("sdpa", quantized=False)
"""

from __future__ import annotations

import copy
import importlib.util
import re
from collections.abc import Sequence
from typing import Any


def check_extras(attn_implementation: str | None, quantized: bool) -> None:
    """Fail early, with the install command, when a flag needs an optional extra that is missing."""
    if attn_implementation and attn_implementation.startswith("flash_attention") \
            and importlib.util.find_spec("flash_attn") is None:
        raise ImportError(f"attn_implementation={attn_implementation!r} needs flash-attn, which is not installed. "
                          "Fix: `pip install 'trl-rejection[flash-attn]'` (needs CUDA), or use "
                          "--attn_implementation sdpa.")
    if quantized and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("4-/8-bit loading (QLoRA) needs bitsandbytes, which is not installed. Fix: "
                          "`pip install 'trl-rejection[quantization]'` (needs CUDA), or drop --load_in_4bit.")


def keep_trained_modules_unquantized(config: Any, modules: Sequence[str]) -> Any:
    """A copy of a bitsandbytes quantization `config` whose `llm_int8_skip_modules` also lists `modules` (PEFT's
    `modules_to_save`, e.g. the projector: a 4-bit layer cannot be trained in full). transformers' default skip (the
    output embeddings, `lm_head`) is kept. Other configs, and configs that already skip them, are returned as given."""
    skip = getattr(config, "llm_int8_skip_modules", False)
    if skip is False or not modules:
        return config
    skip = list(skip) if skip is not None else ["lm_head"]
    # transformers matches skip patterns from the start of a module's full name ("model.multi_modal_projector..."),
    # PEFT's `modules_to_save` at the end: the pattern takes any prefix.
    patterns = [rf"(?:.*\.)?{re.escape(m)}" for m in modules if m not in skip]
    missing = [p for p in patterns if p not in skip]
    if not missing:
        return config
    config = copy.deepcopy(config)
    config.llm_int8_skip_modules = skip + missing
    return config
