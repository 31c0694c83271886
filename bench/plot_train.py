"""Plot the training-throughput results in bench/results/ (JSON lines written by bench_train.py).

    python bench/plot_train.py bench/results/2026-11-25-h100-call-*.jsonl --out docs/img/throughput.png

One bar per variant: the median real tokens/s over every run of it in the given files (each run a dot), with its
peak GPU memory written on the bar.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "stock": "stock TRL SFTTrainer",
    "ours": "RejectionSFTTrainer (defaults)",
    "ours_drop0": "defaults + LoRA dropout 0",
    "ours_nofuse": "eager RMSNorm / SiLU*up",
    "ours_upcast": "PEFT fp32 upcast of LoRA inputs",
    "ours_w0": "no dataloader workers",
    "ours_grouped": "padded, grouped by length",
    "ours_padded": "padded, random order",
    "ours_loop": "padding-free, per-row SDPA",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/img/throughput.png"))
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {}
    for path in args.files:
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "real_tok_s" in rec and rec["variant"] in LABELS:
                runs.setdefault(rec["variant"], []).append(rec)
    names = sorted(runs, key=lambda n: statistics.median(r["real_tok_s"] for r in runs[n]))
    medians = [statistics.median(r["real_tok_s"] for r in runs[n]) for n in names]
    colors = ["#c44e52" if n == "stock" else "#4c72b0" if n == "ours" else "#9aa9c4" for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    ax.barh(range(len(names)), medians, color=colors)
    for i, n in enumerate(names):
        ax.plot([r["real_tok_s"] for r in runs[n]], [i] * len(runs[n]), "k.", markersize=4)
        peak = max(r["peak_gib"] for r in runs[n])
        ax.text(max(r["real_tok_s"] for r in runs[n]) + 150, i, f"{medians[i]:,.0f}  ({peak:.1f} GiB)",
                va="center", fontsize=8)
    ax.set_yticks(range(len(names)), [LABELS[n] for n in names], fontsize=8)
    ax.set_xlabel("real (non-padding) tokens/s, batch 16 (median; dots: each run)")
    ax.set_xlim(0, max(medians) * 1.3)
    ax.set_title("LLaVA-1.5-7B shape, LoRA r=128, one H100", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
