"""trl-rejection: safety-align vision-language models with refusal-swapped benign data, on top of TRL.

Heavy modules (torch, trl) load on first use, so `trl-rejection mix` starts fast.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0.dev0"

_LAZY = {
    "MixConfig": "trl_rejection.data",
    "RefusalMix": "trl_rejection.data",
    "build_mix": "trl_rejection.data",
    "MixDataError": "trl_rejection.data",
    "DEFAULT_REFUSAL": "trl_rejection.constants",
    "RejectionSFTConfig": "trl_rejection.config",
    "RejectionSFTTrainer": "trl_rejection.trainer",
    "RejectionDataCollator": "trl_rejection.collator",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trl_rejection' has no attribute {name!r}")
