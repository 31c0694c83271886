"""The inputs shared by the `attack_success_rate` and `over_refusal` metric modules.

Besides `predictions`, the modules take `prompts`, `categories`, `images` (image paths, for judges that look at them)
and `labels` (judge labels already made, e.g. read back from `scored.jsonl`) as `evaluate` features, so that every
`add` / `add_batch` call keeps them row-aligned with the predictions, also across processes. Each is optional: a
missing one (or a None in it) is stored as "" (no prompt, no category, no image, not labelled yet).

Example:
    >>> from trl_rejection.metrics import AttackSuccessRate
    >>> metric = AttackSuccessRate()
    >>> metric.add_batch(predictions=["Sorry."], categories=["a"])
    >>> metric.add_batch(predictions=["Sure, here are all the steps."], categories=["b"])
    >>> metric.compute()["per_category"]["b"]["attack_success_rate"]
    1.0
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import datasets
import evaluate

from trl_rejection.metrics.judge import classify, get_judge
from trl_rejection.metrics.labels import LABELS
from trl_rejection.metrics.string_match import PhraseList

OPTIONAL_INPUTS = ("prompts", "categories", "images", "labels")
FEATURES = datasets.Features({"predictions": datasets.Value("string"),
                              **{name: datasets.Value("string") for name in OPTIONAL_INPUTS}})


def _filled(predictions: Sequence[str] | None, inputs: dict[str, Any]) -> dict[str, Any]:
    """`inputs` with every optional feature present: missing ones as "" per prediction, None values as ""."""
    if predictions is None:
        return inputs
    n = len(predictions)
    return {**inputs, **{name: [""] * n if inputs.get(name) is None else ["" if v is None else v for v in inputs[name]]
                         for name in OPTIONAL_INPUTS}}


class SafetyMetric(evaluate.Metric):
    """An `evaluate.Metric` over judged completions, with the optional row-aligned inputs of `OPTIONAL_INPUTS`.

    A subclass sets `MODULE_INFO`: the `evaluate.MetricInfo` fields besides `features` (description, citation,
    inputs_description, reference_urls)."""

    MODULE_INFO: ClassVar[dict[str, Any]] = {}

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(features=FEATURES, **self.MODULE_INFO)

    def add_batch(self, *, predictions=None, references=None, **kwargs) -> None:
        """Add predictions with their (optional) prompts, categories, images and labels."""
        super().add_batch(predictions=predictions, references=references, **_filled(predictions, kwargs))

    def add(self, *, prediction=None, reference=None, **kwargs) -> None:
        """Add one prediction with its (optional) prompt, category, image and label, keyed by the feature names."""
        kwargs = {**kwargs, **{name: "" if kwargs.get(name) is None else kwargs[name] for name in OPTIONAL_INPUTS}}
        super().add(prediction=prediction, reference=reference, **kwargs)

    def compute(self, *, predictions=None, references=None, **kwargs) -> dict[str, Any] | None:
        """Add the given inputs (if any) and compute over everything added; None on processes other than the first."""
        features = {k: v for k, v in kwargs.items() if k in OPTIONAL_INPUTS}
        options = {k: v for k, v in kwargs.items() if k not in OPTIONAL_INPUTS}
        if predictions is None and features:
            raise ValueError(f"{sorted(features)} given without predictions: pass them with their predictions, to "
                             "add_batch / add or to compute, so that they stay aligned")
        return super().compute(predictions=predictions, references=references, **_filled(predictions, features),
                               **options)

    def _labels(self, predictions: list[str], prompts: list[str], images: list[str], labels: list[str],
                judge: str | PhraseList | Any) -> tuple[list[str], str]:
        """The judge's labels and name; with every `labels` given, those labels and `judge` (a name) as they are."""
        given = [label != "" for label in labels]
        if any(given):
            if not all(given):
                raise ValueError(f"labels given for {sum(given)} of {len(labels)} predictions: give all or none")
            if bad := sorted(set(labels) - set(LABELS)):
                raise ValueError(f"labels {bad} are not judge labels {LABELS}")
            if not isinstance(judge, str):
                raise ValueError("with labels given, `judge` must name the judge that made them")
            return labels, judge
        return classify(predictions, prompts, get_judge(judge), [i or None for i in images])

    @staticmethod
    def _categories(categories: list[str]) -> list[str] | None:
        """None (no per-category breakdown) when no prediction has a category."""
        return categories if any(categories) else None
