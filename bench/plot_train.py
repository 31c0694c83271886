"""Plot the training-throughput results in bench/results/ (JSON lines written by bench_train.py).

    python bench/plot_train.py bench/results/2026-11-25-h100-call-*.jsonl --out docs/img/throughput.png
    python bench/plot_train.py bench/results/2026-11-26-h100-s20-call*.jsonl --out docs/img/throughput.png \
        --families-out docs/img/throughput_families.png
    python bench/plot_train.py bench/results/2026-11-26-h100-s21-call5-llava-levers.jsonl \
        --label "ours=defaults + fuse_lora_output (dropped)" --label "ours_nofuselora=defaults (today)"

`--out`: the LLaVA-1.5-7B levers, one bar per variant: the median real tokens/s over every run of it in the given
files (each run a dot), with its peak GPU memory written on the bar. `--families-out`: stock TRL vs the defaults for
each model shape in the files (the shape of a run is that of the `info` line before it), medians and runs; given
alone, only that chart is drawn.
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
    "ours_ckpt2": "checkpoint every 2nd block only",
    "ours_ckptall": "every block checkpointed",
    "ours_keepdrop": "PEFT's LoRA dropout (input copy kept)",
}
SHAPES = {"llava-1.5": "LLaVA-1.5-7B", "qwen2.5-vl": "Qwen2.5-VL-7B", "qwen3-vl": "Qwen3-VL-8B", "gemma3": "Gemma-3-4B",
          "gemma3-12b": "Gemma-3-12B"}


def read_runs(files: list[Path]) -> dict[tuple[str, str], list[dict]]:
    """(model shape, variant) -> its training runs in the files; failed variants (no `real_tok_s`) and profiled runs
    (the profiler slows them) are left out."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for path in files:
        model = "llava-1.5"  # files from before the harness named the shape
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["variant"] == "info":
                model = rec.get("model", model)
            elif "real_tok_s" in rec and "profile" not in rec:
                runs.setdefault((model, rec["variant"]), []).append(rec)
    return runs


def plot_families(runs: dict[tuple[str, str], list[dict]], out: Path) -> None:
    shapes = [m for m in SHAPES if (m, "stock") in runs and (m, "ours") in runs]
    tps = {(m, v): [r["real_tok_s"] for r in runs[(m, v)]] for m in shapes for v in ("stock", "ours")}
    median = {key: statistics.median(values) for key, values in tps.items()}
    fig, ax = plt.subplots(figsize=(8, 0.9 * len(shapes) + 1.2))
    for i, m in enumerate(shapes):
        for j, (variant, color) in enumerate((("stock", "#c44e52"), ("ours", "#4c72b0"))):
            y = i + 0.2 - 0.4 * j
            ax.barh(y, median[(m, variant)], height=0.38, color=color, label=None if i else
                    ("stock TRL SFTTrainer" if variant == "stock" else "RejectionSFTTrainer (defaults)"))
            ax.plot(tps[(m, variant)], [y] * len(tps[(m, variant)]), "k.", markersize=4)
        ours = median[(m, "ours")]
        ax.text(max(tps[(m, "ours")]) + 150, i - 0.2, f"{ours:,.0f}  ({ours / median[(m, 'stock')]:.2f}x)",
                va="center", fontsize=8)
    ax.set_yticks(range(len(shapes)), [SHAPES[m] for m in shapes], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("real (non-padding) tokens/s, batch 16 (median; dots: each run)")
    ax.set_xlim(0, max(median[(m, "ours")] for m in shapes) * 1.3)
    ax.set_title("stock TRL vs RejectionSFTTrainer, LoRA r=128, one H100", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None,
                        help="levers chart (default docs/img/throughput.png; not drawn when only --families-out is given)")
    parser.add_argument("--families-out", type=Path, default=None)
    parser.add_argument("--label", action="append", default=[], metavar="VARIANT=TEXT",
                        help="name a variant's bar in the levers chart (adds variants without a default label)")
    args = parser.parse_args()
    labels = {**LABELS, **dict(item.split("=", 1) for item in args.label)}
    every = read_runs(args.files)
    if args.families_out is not None:
        plot_families(every, args.families_out)
        if args.out is None:
            return
    runs = {v: recs for (m, v), recs in every.items() if m == "llava-1.5" and v in labels}
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
    ax.set_yticks(range(len(names)), [labels[n] for n in names], fontsize=8)
    ax.set_xlabel("real (non-padding) tokens/s, batch 16 (median; dots: each run)")
    ax.set_xlim(0, max(medians) * 1.3)
    ax.set_title("LLaVA-1.5-7B shape, LoRA r=128, one H100", fontsize=10)
    fig.tight_layout()
    out = args.out or Path("docs/img/throughput.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
