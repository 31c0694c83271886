"""Judges: decide whether a completion complied with, refused, or half-refused a prompt.

Every judge is a callable `(prompt, completion) -> label` returning one of `LABELS` (`labels.py`). The default is
the string-match rule of Wang et al. (CVPR 2025); other published phrase lists are selectable by name, each also as
"<name>_normalized" (`string_match.py`); any callable can be plugged in, and a Llama Guard checkpoint (text, or
vision: prompt + image + response) can act as judge (`guard.py`). Results always carry the judge's `name`.

Example:
    >>> judge_name(get_judge("xstest"))
    'string_match:xstest'
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from trl_rejection.metrics.guard import LlamaGuardJudge
from trl_rejection.metrics.labels import LABELS, Judge
from trl_rejection.metrics.string_match import NORMALIZED_SUFFIX, PAPER, PHRASE_LISTS, PhraseList, StringMatchJudge


def get_judge(judge: str | PhraseList | Judge | None = None) -> Judge:
    """Resolve a judge spec: None or "default" (the paper's rule; "default" is `evaluate`'s config name when none is
    given), a `PHRASE_LISTS` name (or "<name>_normalized"), a `PhraseList`, a local Llama Guard directory (or
    "llama_guard:<path or Hub id>"), or any callable `(prompt, completion) -> label`.

    Example:
        >>> get_judge(None).name, get_judge("gcg").name
        ('string_match:paper', 'string_match:gcg')
    """
    if judge is None or isinstance(judge, str) and judge == "default":
        return StringMatchJudge(PAPER)
    if isinstance(judge, PhraseList):
        return StringMatchJudge(judge)
    if isinstance(judge, str):
        if judge.removesuffix(NORMALIZED_SUFFIX) in PHRASE_LISTS:
            return StringMatchJudge(judge)
        if judge.startswith("llama_guard:"):
            return LlamaGuardJudge(judge.removeprefix("llama_guard:"))
        if Path(judge).is_dir():
            return LlamaGuardJudge(judge)
        raise ValueError(f"unknown judge {judge!r}: give one of {sorted(PHRASE_LISTS)} (optionally with the suffix "
                         f"{NORMALIZED_SUFFIX!r}), a local Llama Guard "
                         "directory, 'llama_guard:<path or Hub id>', or a callable (prompt, completion) -> label")
    if callable(judge):
        return judge
    raise TypeError(f"a judge must be a name, a PhraseList or a callable, not {type(judge).__name__}")


def judge_name(judge: Judge) -> str:
    """The name recorded with results: the judge's `name`, else its function or class name.

    Example:
        >>> judge_name(lambda p, c: "full_refusal")
        '<lambda>'
    """
    return str(getattr(judge, "name", None) or getattr(judge, "__name__", None) or type(judge).__name__)


def classify(completions: Sequence[str], prompts: Sequence[str] | None = None,
             judge: str | PhraseList | Judge | None = None,
             images: Sequence[str | None] | None = None) -> tuple[list[str], str]:
    """Label every completion; returns `(labels, judge name)`. Uses the judge's `batch` method when it has one, and
    passes it the image paths (None: no image) when the judge sets `uses_images`.

    Example:
        >>> classify(["Sorry, no.", "Here is a simple recipe for bread with flour and water."])
        (['full_refusal', 'full_compliance'], 'string_match:paper')
    """
    resolved = get_judge(judge)
    prompts = [""] * len(completions) if prompts is None else list(prompts)
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(prompts)} prompts")
    completions = ["" if c is None else c for c in completions]
    if images is not None and len(images) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(images)} images")
    batch = getattr(resolved, "batch", None)
    if batch and getattr(resolved, "uses_images", False):
        labels = list(batch(prompts, completions, images))
    elif batch:
        labels = list(batch(prompts, completions))
    else:
        labels = [resolved(p, c) for p, c in zip(prompts, completions)]
    for i, label in enumerate(labels):
        if label not in LABELS:
            raise ValueError(f"judge {judge_name(resolved)!r} returned {label!r} for completion {i}; "
                             f"a judge must return one of {LABELS}")
    return labels, judge_name(resolved)
