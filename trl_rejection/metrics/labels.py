"""The labels a judge gives a completion, and what a judge is.

Example:
    >>> LABELS
    ('full_compliance', 'full_refusal', 'partial_refusal')
"""

from __future__ import annotations

from typing import Callable

FULL_COMPLIANCE = "full_compliance"
FULL_REFUSAL = "full_refusal"
PARTIAL_REFUSAL = "partial_refusal"
LABELS = (FULL_COMPLIANCE, FULL_REFUSAL, PARTIAL_REFUSAL)

Judge = Callable[[str, str], str]
"""A judge: `(prompt, completion) -> label`, one of `LABELS`."""
