"""Per micro-batch table of the profiled runs in bench_scale.py's JSON lines (runs with `_prof` or PROFILE=...).

    python bench/profile_table.py bench/results/<call>.jsonl [more.jsonl ...]

For each profiled run and process (its `profile` entries: the recipe's `--profile_steps` rank JSON), prints one
Markdown row: the profiled step in seconds and the micro-batches it held, then per micro-batch in milliseconds the
GEMMs (`aten::mm`, `addmm`, `bmm` self GPU time, those among the rank's 20 top operators), the all-gather kernels
(and their calls), the time some compute kernel ran, the time only communication kernels ran, the time no kernel ran,
and the largest idle gap label. Profiled steps run slower than timed ones: compare profiled runs with each other only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path


def rows(record: dict) -> list[list[str]]:
    """The table rows of one bench_scale JSON line (none without a profile)."""
    out = []
    micro = record["accumulation"]
    for rank in record.get("profile", []):
        step = rank["step_s"]
        top = {name: (ms, calls) for name, ms, calls in rank["top_gpu_ms_per_step"]}
        gemms = [top[name][0] for name in GEMMS if name in top]
        gemm = sum(gemms) if gemms else None
        gather = [(ms, calls) for name, (ms, calls) in top.items() if name.startswith("ncclDevKernel_AllGather")]
        idle = step * (1 - rank["gpu_busy"]) if rank.get("gpu_busy") is not None else None
        compute = step * rank["compute_busy"] if rank.get("compute_busy") is not None else None
        comm = rank.get("communication_only_ms_per_step")
        gaps = rank["idle_ms_per_step_by_host_op"]

        def per_micro(ms: float | None) -> str:
            return "-" if ms is None else f"{ms / micro:.0f}"

        out.append([record["variant"], str(rank["rank"]), f"{step:.3f} ({micro})", per_micro(gemm),
                    f"{per_micro(sum(ms for ms, _ in gather))} ({sum(c for _, c in gather) // micro})"
                    if gather else "-",
                    per_micro(None if compute is None else compute * 1e3), per_micro(comm),
                    per_micro(None if idle is None else idle * 1e3),
                    f"{gaps[0][0]}: {per_micro(gaps[0][1])}" if gaps else "-"])
    return out


GEMMS = ("aten::mm", "aten::addmm", "aten::bmm")  # matrix-multiplication operators (self GPU time of each)
HEADER = ["run", "rank", "profiled step s (micro-batches)", "GEMM ms", "all-gather ms (calls)", "compute ms",
          "communication-only ms", "idle ms", "largest idle, by host op: ms"]


def print_table(argv: list[str] | None, doc: str, header: list[str], rows_of: Callable[[dict], list[list[str]]],
                what: str) -> int:
    """The command line of a profile table script: read the runs of the JSON lines given, print `header` and the
    `rows_of` each run (not `prepare`'s line) as Markdown; 1 (and a message naming `what` was missing) if none."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("jsonl", nargs="+", type=Path, help="bench_scale.py JSON lines")
    args = parser.parse_args(argv)
    records = [json.loads(line) for path in args.jsonl for line in path.read_text().splitlines() if line.strip()]
    table = [row for record in records if "accumulation" in record for row in rows_of(record)]
    if not table:
        print(f"no {what} in " + ", ".join(map(str, args.jsonl)), file=sys.stderr)
        return 1
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in table:
        print("| " + " | ".join(row) + " |")
    return 0


def main(argv: list[str] | None = None) -> int:
    return print_table(argv, __doc__, HEADER, rows, "profiled runs")


if __name__ == "__main__":
    sys.exit(main())
