"""Constants shared by the data, training and evaluation layers (so that none imports another for them)."""

DEFAULT_REFUSAL = "I'm sorry, but I cannot assist with your request"
"""The paper's refusal sentence: the reply of every refusal row the builder writes."""

IGNORE_INDEX = -100
"""Label of a token that is not supervised (PyTorch's `CrossEntropyLoss` default `ignore_index`)."""

TINY_MODEL = "tiny-llava"
"""Model name of the tiny random-weight LLaVA-1.5 (`trl_rejection.testing.tiny`) that dry runs train and evaluate."""

PAPER_CITATION = """\
@inproceedings{wang2025curated,
  title     = {Do We Really Need Curated Malicious Data for Safety Alignment in Multi-modal Large Language Models?},
  author    = {Wang, Yanbo and Guan, Jiyang and Liang, Jian and He, Ran},
  booktitle = {CVPR},
  year      = {2025}
}"""
"""BibTeX of the method's paper, for model, dataset and metric cards."""
