"""Checks that a flag's optional extra (flash-attn, bitsandbytes) is installed, with the install command if not.

Example:
    >>> check_extras("sdpa", quantized=False)
"""

from __future__ import annotations

import importlib.util


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
