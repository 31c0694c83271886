"""Publishing: pushes of trained models (with their card) and of built mixes to the Hugging Face Hub.

Example:
    >>> push_dataset("outputs/mix", "me/llava-refusal-mix", private=True)  # doctest: +SKIP
    >>> push_model("outputs/sft/final", "me/llava-1.5-7b-refusal")  # doctest: +SKIP
"""

from __future__ import annotations

import os


def push_model(model_dir: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Upload a saved model or adapter folder (with its README.md card) to the Hub; returns the URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(model_dir), repo_id=repo_id)
    return f"https://huggingface.co/{repo_id}"


def push_dataset(dataset_dir: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Push a mix written by `build_mix` (images embedded by `push_to_hub`) and its README.md card; returns the URL."""
    import datasets
    from huggingface_hub import DatasetCard

    ds = datasets.load_from_disk(str(dataset_dir))
    ds.push_to_hub(repo_id, private=private)
    card = os.path.join(dataset_dir, "README.md")
    if os.path.isfile(card):
        DatasetCard.load(card).push_to_hub(repo_id, repo_type="dataset")
    return f"https://huggingface.co/datasets/{repo_id}"
