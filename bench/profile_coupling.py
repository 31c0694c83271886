"""Whether the processes of a sharded run wait for each other's idle GPU: per profiled run and process, per
micro-batch in milliseconds, the GPU's idle time, its communication-only time (only NCCL kernels running), and the
parts of both that fell while the other process's GPU was idle.

    python bench/profile_coupling.py bench/results/<call>.jsonl [more.jsonl ...]

Reads the `idle_spans_ms`, `communication_only_spans_ms` and `trace_start_unix_ns` of each rank's `--profile_steps`
JSON (`trl_rejection.callbacks.timeline_spans`; the processes of one host share its clock). Communication-only time
while the other GPU is idle is a process waiting in a collective for a process whose host has not launched its side
yet; idle time while the other is idle too is time both hosts lost at once. Runs of two processes only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def overlap(spans: list[list[float]], other: list[list[float]]) -> float:
    """Total length of the intersection of two lists of disjoint, sorted [start, end] spans."""
    total, j = 0.0, 0
    for start, stop in spans:
        while j < len(other) and other[j][1] <= start:
            j += 1
        k = j
        while k < len(other) and other[k][0] < stop:
            total += min(stop, other[k][1]) - max(start, other[k][0])
            k += 1
    return total


def rows(record: dict) -> list[list[str]]:
    """The table rows of one bench_scale JSON line (none unless it holds two processes' spans)."""
    ranks = [r for r in record.get("profile", []) if r.get("trace_start_unix_ns") is not None and "idle_spans_ms" in r]
    if len(ranks) != 2:
        return []

    def shifted(rank: dict, key: str) -> list[list[float]]:  # on the host's clock, in milliseconds
        offset = rank["trace_start_unix_ns"] / 1e6
        return [[a + offset, b + offset] for a, b in rank[key]]

    out = []
    micro = record["accumulation"] * ranks[0]["steps"]
    for me, other in (ranks, ranks[::-1]):
        idle, comm = shifted(me, "idle_spans_ms"), shifted(me, "communication_only_spans_ms")
        other_idle = shifted(other, "idle_spans_ms")
        values = [sum(b - a for a, b in idle), sum(b - a for a, b in comm), overlap(comm, other_idle),
                  overlap(idle, other_idle)]
        out.append([record["variant"], str(me["rank"]), *(f"{v / micro:.0f}" for v in values)])
    return out


HEADER = ["run", "rank", "idle ms", "communication-only ms", "communication-only while the other GPU idles ms",
          "idle while the other GPU idles ms"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", nargs="+", type=Path, help="bench_scale.py JSON lines")
    args = parser.parse_args(argv)
    records = [json.loads(line) for path in args.jsonl for line in path.read_text().splitlines() if line.strip()]
    table = [row for record in records if "accumulation" in record for row in rows(record)]
    if not table:
        print("no two-process profiles with timeline spans in " + ", ".join(map(str, args.jsonl)), file=sys.stderr)
        return 1
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for row in table:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
