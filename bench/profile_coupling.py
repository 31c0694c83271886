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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for trl_rejection
from profile_table import print_table  # noqa: E402  (in this script's folder, bench/)

from trl_rejection.callbacks import subtract_spans  # noqa: E402


def overlap(spans: list[list[float]], other: list[list[float]]) -> float:
    """Total length of the intersection of two lists of disjoint, sorted [start, end] spans."""
    return sum(b - a for a, b in spans) - sum(b - a for a, b in subtract_spans(spans, other))


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
    return print_table(argv, __doc__, HEADER, rows, "two-process profiles with timeline spans")


if __name__ == "__main__":
    sys.exit(main())
