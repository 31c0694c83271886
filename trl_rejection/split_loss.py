"""The loss of refusal rows and of normal rows, kept apart (`loss_refusal`, `loss_normal` in the trainer's logs)."""

from __future__ import annotations

from typing import Any

import torch

from .constants import IGNORE_INDEX


@torch.no_grad()
def split_loss_sums(outputs: Any, labels: torch.Tensor, is_refusal: torch.Tensor,
                    token_rows: torch.Tensor | None = None) -> torch.Tensor:
    """`[refusal NLL sum, refusal labelled tokens, normal NLL sum, normal labelled tokens]` of one batch.

    `outputs` holds TRL's fused-head `log_probs` (log-probability of each next-token label, aligned with
    `labels[:, 1:]`) or full `logits`. `token_rows` maps each token of a padding-free batch to its row; None for
    padded batches.
    """
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    log_probs = getattr(outputs, "log_probs", None)
    if log_probs is None:  # a forward that returned full logits
        logits = outputs.logits[:, :-1].float()
        log_probs = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = -log_probs.float() * labelled
    is_refusal = is_refusal.to(labelled.device)
    if token_rows is None:
        rows = is_refusal[:, None]
    else:  # tokens of a `pad_to_multiple_of` tail (never labelled) count as the last row's
        rows = is_refusal[token_rows.to(labelled.device)[:, 1:].clamp(max=is_refusal.numel() - 1)]
    return torch.stack([(nll * rows).sum(), (labelled & rows).sum(), (nll * ~rows).sum(), (labelled & ~rows).sum()])
