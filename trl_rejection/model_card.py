"""Model card (README.md) of a trained model: base model, data mix, training settings, safety results.

Example:
    >>> print(model_card("llava-hf/llava-1.5-7b-hf", "outputs/mix", training_args, model_args))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .constants import PAPER_CITATION


def _mix_summary(mix_location: str) -> str:
    config = Path(mix_location) / "mix_config.json"
    if not config.is_file():
        return f"Trained on `{mix_location}`."
    mix = json.loads(config.read_text())
    sentences = ", ".join(json.dumps(s) for s in mix["refusal_sentences"])
    size = (f"{mix['n_refusal']} refusal + {mix['n_normal']} normal rows" if mix.get("n_refusal") is not None
            else f"{mix['total']} rows at refusal fraction {mix['refusal_fraction']}")
    return (f"Trained on a refusal-swap mix (`{mix_location}`, whose card has the exact counts): refusal source "
            f"`{mix['refusal_source']}`, normal source `{mix['normal_source']}`, {size} requested, refusal "
            f"sentences {sentences}, seed {mix['seed']}.")


def model_card(base_model: str, mix_location: str, args: Any, model_args: Any, results: str | None = None) -> str:
    """README.md for a trained model: base model, data mix, training settings, safety results when measured."""
    from . import __version__

    lora = (f"LoRA r={model_args.lora_r}, alpha={model_args.lora_alpha}, dropout={model_args.lora_dropout}, "
            f"targets `{model_args.lora_target_modules}`, modules to save `{model_args.lora_modules_to_save}`"
            if model_args.use_peft else "full fine-tuning")
    rows = [("base model", f"`{base_model}`"), ("adapter", lora),
            ("learning rate", f"{args.learning_rate} ({getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}"
                              f", warm-up {args.warmup_steps})"),
            ("projector learning rate", str(args.projector_lr)), ("epochs / max steps",
                                                                  f"{args.num_train_epochs} / {args.max_steps}"),
            ("per-device batch x grad. accumulation", f"{args.per_device_train_batch_size} x "
                                                      f"{args.gradient_accumulation_steps}"),
            ("max length", str(args.max_length)), ("refusal labels", f"first {args.refusal_label_tokens or 'all'} "
                                                   f"refusal tokens; end-of-turn masked: {args.mask_refusal_eos}"),
            ("precision", "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"), ("seed", str(args.seed))]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    safety = f"## Safety results\n\n{results}\n" if results else "## Safety results\n\nNo evaluation was run.\n"
    return f"""---
base_model: {base_model}
library_name: peft
tags:
- trl
- trl-rejection
- safety-alignment
---

# {Path(args.output_dir).name}: refusal-swap safety fine-tune of `{base_model}`

Trained with trl-rejection {__version__} (the method of "Do We Really Need Curated Malicious Data for Safety
Alignment in Multi-modal Large Language Models?", CVPR 2025): benign rows with their reply swapped for a refusal,
mixed with ordinary instruction data; refusal rows are supervised only on their leading refusal tokens.

## Data

{_mix_summary(mix_location)}

## Training

| setting | value |
|---|---|
{table}

{safety}
## Citation

```bibtex
{PAPER_CITATION}
```
"""
