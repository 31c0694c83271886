"""Sum py-spy's collapsed stacks (`py-spy record --format raw`, as `bench_scale.py`'s `_spy` runs write) by function.

    python bench/pyspy_summary.py OUT/zero3_spy.pyspy.txt.gz [--within training_step] [--top 40]

For each sampled process whose stacks pass through `--within` (a function or method name; default `training_step`: the
trainer's micro-batches), prints the samples inside it, then the functions by inclusive share (on the stack) and by
self share (the innermost Python frame) of those samples. py-spy records only Python frames: time in a C call shows
as the Python line that made it, and a thread waiting without holding a core (a lock, the GIL) is not sampled. On
CUDA the backward's Python hooks (FSDP's post-backward, DeepSpeed's gradient reduction) run in autograd's device
thread, outside `training_step`: pass one of them as `--within` to see that thread.
"""

from __future__ import annotations

import argparse
import gzip
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^():]+)(?::\d+)?\)$")


def function(frame: str) -> str:
    """`func (path/to/file.py:123)` as `func (to/file.py)`; other frames (process, thread) as they are."""
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = Path(match["file"])
    return f"{match['func']} ({path.parent.name}/{path.name})" if path.parent.name else f"{match['func']} ({path.name})"


def is_within(frame: str, name: str) -> bool:
    """Whether a frame is a call of function `name` (or of a method of that name: `Class.name`)."""
    match = FRAME.match(frame.strip())
    return bool(match) and (match["func"] == name or match["func"].endswith("." + name))


def summarise(path: Path, within: str, top: int) -> None:
    """Print the tables of every process with samples inside `within`; exit with an error if none has any."""
    per_process: dict[str, list[tuple[list[str], int]]] = defaultdict(list)
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        processes = [f for f in frames if f.startswith("process ")]  # --subprocesses: launcher;...;worker
        per_process[processes[-1] if processes else "process"].append((frames, int(count)))
    found = False
    for process, stacks in sorted(per_process.items()):
        inclusive, own, total = Counter(), Counter(), 0
        for frames, n in stacks:
            first = next((i for i, f in enumerate(frames) if is_within(f, within)), None)
            if first is None:
                continue
            names = [function(f) for f in frames[first:]]  # the frames from `within` inwards
            for name in set(names):
                inclusive[name] += n
            own[names[-1]] += n
            total += n
        if not total:
            continue
        found = True
        print(f"\n## {process[:120]}\n{total} samples inside {within} (of {sum(n for _, n in stacks)})\n")
        print("| inclusive | self | function |\n|---|---|---|")
        for name, n in inclusive.most_common(top):
            print(f"| {100 * n / total:.1f}% | {100 * own[name] / total:.1f}% | {name} |")
        print("\n| self | function |\n|---|---|")
        for name, n in own.most_common(top // 2):
            print(f"| {100 * n / total:.1f}% | {name} |")
    if not found:
        sys.exit(f"no sample of {path} passes through a function named {within!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--within", default="training_step")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    summarise(args.path, args.within, args.top)


if __name__ == "__main__":
    main()
