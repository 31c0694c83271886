"""Measurement hooks behind the training recipe's `--record_data_order` and `--metrics_file`: the row ids of every
collated batch, and per logged step what a throughput or scaling table needs (bench/bench_scale.py reads both)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback


class RecordingCollator:
    """Wraps a collator and appends each batch's row ids to a file (debugging data order and sharding)."""

    def __init__(self, collator: Any, path: Path):
        self.collator, self.path = collator, path

    def __call__(self, examples: list[dict[str, Any]]) -> Any:
        with open(self.path, "a") as f:
            f.write(json.dumps([ex.get("id") for ex in examples]) + "\n")
        return self.collator(examples)


class StepMetrics(TrainerCallback):
    """Trainer callback behind `--metrics_file`: per logged step, what a throughput or scaling table needs.

    `time_s` is taken at the end of each optimizer step after a device sync; `tokens_seen` is the trainer's
    `num_input_tokens_seen` (non-padding tokens of every process); `peak_gib` the peak allocated GPU memory of each
    process so far (gathered from all processes at every step end)."""

    def __init__(self, path: Path):
        self.path: Path = path
        self.trainer: Any = None  # set after the trainer is built: gathers each process's peak memory
        self.t0: float | None = None
        self.steps: dict[int, dict[str, Any]] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        peaks = [peak]
        if self.trainer is not None and self.trainer.accelerator.num_processes > 1:
            peaks = self.trainer.accelerator.gather(torch.tensor([peak], device=args.device)).tolist()
        self.steps[state.global_step] = dict(time_s=time.perf_counter() - self.t0,
                                             tokens_seen=int(state.num_input_tokens_seen),
                                             peak_gib=[round(x, 3) for x in peaks])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        record = {"step": state.global_step, **{k: logs[k] for k in ("loss", "loss_refusal", "loss_normal",
                                                                     "grad_norm", "learning_rate") if k in logs},
                  "world_size": args.world_size, **self.steps.get(state.global_step, {})}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
