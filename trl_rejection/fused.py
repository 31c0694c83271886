"""Fused element-wise ops for Llama-style language models: RMSNorm and the SiLU-gated MLP activation, compiled.

`fuse_elementwise_ops(model)` replaces the `forward` of the RMSNorm and MLP modules of the Llama, Mistral, Qwen2 and
Qwen3 layers (matched by class name, so the copies that transformers generates for composite models, such as
Qwen2-VL's `Qwen2MLP`, are included) with two small pure functions compiled once with `torch.compile` (dynamic
shapes) and shared by every layer; the matmuls (and LoRA) stay eager. The functions repeat the upstream forwards op
for op, which holds for the transformers versions in `SUPPORTED_TRANSFORMERS` (checked at run time, and against the
installed classes by `tests/test_fused.py`); with any other version nothing is patched.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch
from packaging.specifiers import SpecifierSet

logger = logging.getLogger(__name__)

SUPPORTED_TRANSFORMERS = SpecifierSet(">=5.17,<6")
"""transformers versions whose patched classes compute what `_rms_norm` / `_silu_mul` compute."""
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen3VLTextRMSNorm")
"""Classes whose `forward(hidden_states)` is `weight * normalize_fp32(hidden_states).to(dtype)`."""
SILU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Qwen3VLTextMLP")
"""Classes whose `forward(x)` is `down_proj(act_fn(gate_proj(x)) * up_proj(x))`."""


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`LlamaRMSNorm.forward`, op for op (fp32 statistics, cast back, then the weight)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def _compiled(name: str) -> Callable[..., torch.Tensor]:
    if name not in _COMPILED:
        backend = os.environ.get("TRL_REJECTION_COMPILE_BACKEND", "inductor")  # "eager" in CPU tests: no codegen
        fn = {"rms_norm": _rms_norm, "silu_mul": _silu_mul}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=True, backend=backend)
    return _COMPILED[name]


def _fused_rms_norm(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda hidden_states: _compiled("rms_norm")(hidden_states, module.weight, module.variance_epsilon)


def _fused_mlp(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: module.down_proj(_compiled("silu_mul")(module.gate_proj(x), module.up_proj(x)))


def fuse_elementwise_ops(model: torch.nn.Module) -> int:
    """Run the RMSNorms and SiLU-gated MLP activations of `model` as compiled, fused kernels (one pass over the
    activations instead of five or so, forward and backward); return the number of patched modules (0 when the
    installed transformers is outside `SUPPORTED_TRANSFORMERS`)."""
    import transformers
    from transformers.activations import SiLUActivation

    if transformers.__version__ not in SUPPORTED_TRANSFORMERS:
        logger.warning("fuse_elementwise_ops is off: transformers %s is outside the checked range %s.",
                       transformers.__version__, SUPPORTED_TRANSFORMERS)
        return 0
    patched = 0
    for module in model.modules():
        name = type(module).__name__
        if "forward" in vars(module):  # patched already (or by someone else)
            continue
        if name in RMS_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = _fused_rms_norm(module)
            patched += 1
        elif name in SILU_MLPS and isinstance(getattr(module, "act_fn", None), (SiLUActivation, torch.nn.SiLU)):
            module.forward = _fused_mlp(module)
            patched += 1
    return patched
