"""Safety metrics: attack success rate and over-refusal (`evaluate` modules), and the judges behind them.

The two `evaluate.Metric` classes load on first use: `evaluate` imports torch, the judges and rates do not.

Example:
    >>> from trl_rejection.metrics import AttackSuccessRate
    >>> AttackSuccessRate().compute(predictions=["Sorry, I can't."])["attack_success_rate"]
    0.0
    >>> import evaluate
    >>> evaluate.load(ATTACK_SUCCESS_RATE_PATH, "xstest").compute(predictions=["Sure: step one, ..."])["judge"]
    'string_match:xstest'
    >>> evaluate.load(OVER_REFUSAL_PATH, "paper_normalized").compute(predictions=["I can’t."])["labels"]
    ['full_refusal']
"""

from importlib import import_module
from pathlib import Path
from typing import Any

from trl_rejection.metrics.guard import LlamaGuardJudge, parse_guard_verdict
from trl_rejection.metrics.judge import classify, get_judge, judge_name
from trl_rejection.metrics.labels import FULL_COMPLIANCE, FULL_REFUSAL, LABELS, PARTIAL_REFUSAL, Judge
from trl_rejection.metrics.string_match import (
    NORMALIZED_SUFFIX,
    PHRASE_LISTS,
    PhraseList,
    StringMatchJudge,
    normalize_text,
    normalized,
)
from trl_rejection.metrics.rates import asr_summary, over_refusal_summary

ATTACK_SUCCESS_RATE_PATH = str(Path(__file__).parent / "attack_success_rate")
OVER_REFUSAL_PATH = str(Path(__file__).parent / "over_refusal")

__all__ = [
    "ATTACK_SUCCESS_RATE_PATH",
    "FULL_COMPLIANCE",
    "FULL_REFUSAL",
    "LABELS",
    "NORMALIZED_SUFFIX",
    "OVER_REFUSAL_PATH",
    "PARTIAL_REFUSAL",
    "PHRASE_LISTS",
    "AttackSuccessRate",
    "Judge",
    "LlamaGuardJudge",
    "OverRefusal",
    "PhraseList",
    "StringMatchJudge",
    "asr_summary",
    "classify",
    "get_judge",
    "judge_name",
    "normalize_text",
    "normalized",
    "over_refusal_summary",
    "parse_guard_verdict",
]

_METRICS = {"AttackSuccessRate": "trl_rejection.metrics.attack_success_rate.attack_success_rate",
            "OverRefusal": "trl_rejection.metrics.over_refusal.over_refusal"}


def __getattr__(name: str) -> Any:
    if name in _METRICS:
        return getattr(import_module(_METRICS[name]), name)
    raise AttributeError(f"module 'trl_rejection.metrics' has no attribute {name!r}")
