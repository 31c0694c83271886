"""Over-refusal: the share of safe prompts that the model refuses (full and partial refusals, and their sum).

Loadable offline with `evaluate.load("<path to this folder>", "<judge>")` or imported from `trl_rejection.metrics`;
see README.md here for the metric card.
"""

import evaluate

from trl_rejection.constants import PAPER_CITATION
from trl_rejection.metrics import base  # a module, not its class: evaluate.load takes the first Metric class it sees
from trl_rejection.metrics.judge import get_judge, judge_name
from trl_rejection.metrics.rates import over_refusal_summary

_CITATION = """\
@inproceedings{rottger2024xstest,
  title     = {XSTest: A Test Suite for Identifying Exaggerated Safety Behaviours in Large Language Models},
  author    = {R{\\"o}ttger, Paul and Kirk, Hannah Rose and Vidgen, Bertie and Attanasio, Giuseppe and Bianchi, Federico
               and Hovy, Dirk},
  booktitle = {NAACL},
  year      = {2024}
}
""" + PAPER_CITATION + "\n"

_DESCRIPTION = """\
Over-refusal over completions to safe prompts (e.g. the XSTest "safe" prompts): full-refusal rate, partial-refusal
rate and their sum, overall and per category, with counts. The judge classes and defaults are those of
`attack_success_rate` (string match of Wang et al., CVPR 2025; config name picks "xstest", "gcg" or "vlguard"
lists, or a "<name>_normalized" variant). Judges that cannot see refusals (a Llama Guard model) are rejected.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): model completions to safe prompts.
    prompts (`list` of `str`, optional): the prompts, passed to judges that read them.
    categories (`list` of `str`, optional): a category per completion (e.g. XSTest type); adds `per_category`.
    images (`list` of `str`, optional): an image path per completion ("" or None: none), for judges that look.
    labels (`list` of `str`, optional): judge labels already made (all or none); the judge is not run again.
    prompts, categories, images and labels are features: pass them to `add_batch` / `add` with their predictions.
    judge (optional): a phrase-list name (also "<name>_normalized"), a `PhraseList` or a callable
        `(prompt, completion) -> label`; with `labels`, the name of the judge that made them. Defaults to the config
        name ("paper").
Returns:
    over_refusal_rate (`float`): (full_refusal + partial_refusal) / total.
    full_refusal_rate, partial_refusal_rate (`float`): each part.
    total, full_compliance, full_refusal, partial_refusal (`int`): counts.
    per_category (`dict`): the same keys for each category, when categories are given.
    judge (`str`): the name of the judge.
    labels (`list` of `str`): each prediction's label, in the order added.
Examples:
    >>> over_refusal = evaluate.load("trl_rejection/metrics/over_refusal")
    >>> result = over_refusal.compute(predictions=["I'm sorry, I can't.", "Use kill -9 followed by the process id."])
    >>> result["over_refusal_rate"]
    0.5
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class OverRefusal(base.SafetyMetric):
    """Over-refusal over completions to safe prompts (see `_DESCRIPTION`)."""

    MODULE_INFO = {"description": _DESCRIPTION, "citation": _CITATION, "inputs_description": _KWARGS_DESCRIPTION,
                   "reference_urls": ["https://arxiv.org/abs/2308.01263", "https://arxiv.org/abs/2504.10000"]}

    def _compute(self, predictions, prompts, categories, images, labels, judge=None):
        judge = judge if judge is not None else self.config_name
        if not any(labels):
            judge = get_judge(judge)
            if getattr(judge, "scores_refusal", True) is False:
                raise ValueError(f"judge {judge_name(judge)!r} cannot tell refusals apart; use a string-match judge")
        labels, name = self._labels(predictions, prompts, images, labels, judge)
        return {**over_refusal_summary(labels, self._categories(categories)), "judge": name, "labels": labels}
