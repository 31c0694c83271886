"""Measurement hooks behind the training recipe's `--record_data_order`, `--metrics_file` and `--profile_steps`: the
row ids of every collated batch, per logged step what a throughput or scaling table needs (bench/bench_scale.py reads
both), and a profile of chosen optimizer steps."""

from __future__ import annotations

import bisect
import collections
import contextlib
import json
import os
import re
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
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


def parse_step_range(text: str) -> tuple[int, int]:
    """`"5-7"` -> (5, 7); `"5"` -> (5, 5). A `ValueError` unless 1 <= first <= last."""
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a step range such as 5-7")
    span = int(match[1]), int(match[2] or match[1])
    if not 1 <= span[0] <= span[1]:
        raise ValueError(f"{text!r} is not a step range first-last with 1 <= first <= last")
    return span


def busy_fraction(intervals: list[tuple[float, float]], window: float) -> float | None:
    """Share of `window` covered by the union of `intervals` (same unit); None without intervals."""
    if not intervals or window <= 0:
        return None
    return min(sum(stop - start for start, stop in _union(intervals)) / window, 1.0)


def communication_split(kernels: list[tuple[str, float, float]]) -> tuple[float, float]:
    """(time some compute kernel ran, time only communication kernels ran) in the unit of the kernels' (name, start,
    end) times. Communication kernels are NCCL's (names containing "nccl"). Time with no compute kernel but a
    communication kernel running is communication not hidden behind compute: the GPU waits for the network there."""
    compute, comm_only = _compute_and_communication_only(kernels)
    return sum(b - a for a, b in compute), sum(b - a for a, b in comm_only)


def timeline_spans(kernels: list[tuple[str, float, float]], min_span: float = 100.0
                   ) -> tuple[list[list[float]], list[list[float]]]:
    """(idle spans, communication-only spans) of one GPU's kernels (name, start, end), each `[start, end]` at least
    `min_span` long (the profiler's microseconds): the gaps between its kernels, and the time only communication
    kernels ran (`communication_split`). Two processes' spans on one host line up once shifted by their profilers'
    start times (`bench/profile_coupling.py`)."""
    busy = _union([(a, b) for _, a, b in kernels])
    idle = [[stop, start] for (_, stop), (start, _) in zip(busy, busy[1:]) if start - stop >= min_span]
    _, comm_only = _compute_and_communication_only(kernels)
    return idle, [span for span in comm_only if span[1] - span[0] >= min_span]


def _compute_and_communication_only(kernels: list[tuple[str, float, float]]
                                    ) -> tuple[list[list[float]], list[list[float]]]:
    """(the union of the compute kernels' times, the communication kernels' times outside it) as disjoint spans."""
    compute = _union([(a, b) for name, a, b in kernels if "nccl" not in name.lower()])
    comm = _union([(a, b) for name, a, b in kernels if "nccl" in name.lower()])
    return compute, subtract_spans(comm, compute)


def device_kernels(events: list[Any], device_type: Any) -> list[tuple[str, float, float]]:
    """(name, start, end) of the profiler events that ran on `device_type`, without the device-side copies of
    `record_function` ranges (`is_user_annotation`: on CUDA, a range such as `annotate_forward`'s spans every kernel
    it launched, gaps included, and would count as a busy GPU)."""
    return [(e.name, e.time_range.start, e.time_range.end) for e in events
            if e.device_type == device_type and not _is_annotation(e)]


def _is_annotation(event: Any) -> bool:
    """Whether a profiler event (or average) is the device-side span of a `record_function` range."""
    return bool(getattr(event, "is_user_annotation", False))


def _union(intervals: list[tuple[float, float]]) -> list[list[float]]:
    """The union of `intervals` as disjoint [start, stop] spans, in order."""
    spans: list[list[float]] = []
    for start, stop in sorted(intervals):
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], stop)
        else:
            spans.append([start, stop])
    return spans


def subtract_spans(spans: list[list[float]], minus: list[list[float]]) -> list[list[float]]:
    """The parts of `spans` outside `minus` (both disjoint, sorted `[start, end]` spans, as `timeline_spans` returns
    them), in order."""
    out: list[list[float]] = []
    i = 0
    for start, stop in spans:  # one sweep over both
        while i < len(minus) and minus[i][1] <= start:
            i += 1
        j = i
        while j < len(minus) and minus[j][0] < stop:
            if minus[j][0] > start:
                out.append([start, minus[j][0]])
            start = max(start, minus[j][1])
            j += 1
        if start < stop:
            out.append([start, stop])
    return out


class StepProfiler(TrainerCallback):
    """Trainer callback behind `--profile_steps first-last`: `torch.profiler` over those optimizer steps, in every
    process. Writes `<out_dir>/rank<N>.txt` (the operators with the most self GPU time, then self CPU time) and
    `<out_dir>/rank<N>.json` (seconds per step after a device sync, the share of that time the GPU ran kernels and
    compute kernels, the time a step only communication kernels ran (`communication_split`), the top kernels in
    milliseconds per step, the collective calls a step by where they were issued (`collectives_by_range`), the GPU's
    idle time a step by what the host ran meanwhile (`idle_gaps`; the model and its blocks are marked by
    `annotate_forward`, so a gap names the block the host was in), on CUDA the host synchronisations a step by
    call site, and the GPU's idle and communication-only spans over the profiled steps with the profiler's start
    time, to line two processes' timelines up (`timeline_spans`))."""

    def __init__(self, first: int, last: int, out_dir: Path, rank: int):
        self.first, self.last, self.out_dir, self.rank = first, last, out_dir, rank
        self._profiler: Any = None  # running between the first step's begin and the last step's end
        self._t0 = 0.0
        self._syncs = HostSyncRecorder()
        self._recording: contextlib.ExitStack | None = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.first and self._profiler is None:  # global_step counts finished steps
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            _sync()
            self._profiler = profile(activities=activities)
            self._recording = contextlib.ExitStack()
            self._recording.enter_context(self._syncs.recording())
            if model is not None and not compiled_run(args):
                self._recording.enter_context(annotate_forward(model))
            elif model is not None:
                warnings.warn("--profile_steps on a compiled model: the model and its blocks get no "
                              "`trl_rejection: <Class>` ranges (their hooks would make dynamo recompile every compiled "
                              "block inside the profiled steps), so idle gaps and collectives are not split by block.",
                              stacklevel=2)
            self._profiler.start()
            self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._profiler is not None and state.global_step == self.last:
            self._finish(self.last)

    def on_train_end(self, args, state, control, **kwargs):
        if self._profiler is not None:  # the run ended before the last profiled step: write the steps it ran
            self._finish(state.global_step)

    def close(self) -> None:
        """Stop profiling and recording without writing (a run that ended in an error): the sync debug mode and the
        warning filters are restored."""
        if self._profiler is not None:
            self._stop()
            self._profiler = None

    def _finish(self, last: int) -> None:
        _sync()
        wall = time.perf_counter() - self._t0
        self._stop()
        try:
            self._write(wall, last)
        finally:  # written or not, the profiler is done (`close` must not stop it again)
            self._profiler = None

    def _stop(self) -> None:
        self._profiler.stop()
        self._recording.close()

    def _trace_start_ns(self) -> int | None:
        """When the profiler's clock (every event's time counts from it) started, in nanoseconds since the epoch."""
        results = getattr(getattr(self._profiler, "profiler", None), "kineto_results", None)
        return int(results.trace_start_ns()) if results is not None else None

    def _write(self, wall: float, last: int) -> None:
        from torch.autograd import DeviceType

        steps = last - self.first + 1
        averages = self._profiler.key_averages()
        gpu = [e for e in averages if e.self_device_time_total > 0 and not _is_annotation(e)]
        events = self._profiler.events()
        named = device_kernels(events, DeviceType.CUDA)
        kernels = [(start, end) for _, start, end in named]
        compute_us, comm_only_us = communication_split(named)
        host_ops = [e for e in events if e.device_type == DeviceType.CPU]
        top = sorted(gpu, key=lambda e: -e.self_device_time_total)[:20]
        summary = dict(rank=self.rank, steps=steps, step_s=wall / steps, gpu_busy=busy_fraction(kernels, wall * 1e6),
                       compute_busy=round(compute_us / (wall * 1e6), 4) if named else None,
                       communication_only_ms_per_step=round(comm_only_us / 1e3 / steps, 2),
                       top_gpu_ms_per_step=[(e.key, round(e.self_device_time_total / 1e3 / steps, 3), e.count // steps)
                                            for e in top],
                       idle_ms_per_step_by_host_op=[(label, round(us / 1e3 / steps, 2), round(n / steps, 2))
                                                    for label, us, n in idle_gaps(kernels, host_ops)[:12]],
                       collectives_per_step_by_range=[(label, round(n / steps, 2))
                                                      for label, n in collectives_by_range(host_ops)[:15]],
                       host_syncs_per_step=[(site, round(n / steps, 2))
                                            for site, n in self._syncs.counts.most_common()])
        idle_spans, comm_spans = timeline_spans(named)
        summary.update(trace_start_unix_ns=self._trace_start_ns(),
                       idle_spans_ms=[[round(a / 1e3, 3), round(b / 1e3, 3)] for a, b in idle_spans],
                       communication_only_spans_ms=[[round(a / 1e3, 3), round(b / 1e3, 3)] for a, b in comm_spans])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{self.rank}.json").write_text(json.dumps(summary, indent=1) + "\n")
        tables = [averages.table(sort_by="self_cpu_time_total", row_limit=30)]
        if gpu:
            tables.insert(0, averages.table(sort_by="self_device_time_total", row_limit=30))
        (self.out_dir / f"rank{self.rank}.txt").write_text(f"steps {self.first}-{last}, {wall / steps:.3f} s a "
                                                           f"step\n\n" + "\n\n".join(tables) + "\n")


def compiled_run(args: Any) -> bool:
    """Whether the Trainer compiles the model: the dynamo plugin it builds (`--torch_compile`'s backend, else what
    `accelerate launch --dynamo_backend` or a config file's `dynamo_config` set) has a backend."""
    from accelerate.utils import DynamoBackend, TorchDynamoPlugin

    plugin = TorchDynamoPlugin(backend=getattr(args, "torch_compile_backend", None))
    return plugin.backend != DynamoBackend.NO


ANNOTATION = "trl_rejection: "
"""Prefix of the profiler ranges that `annotate_forward` opens."""


@contextlib.contextmanager
def annotate_forward(model: torch.nn.Module) -> Iterator[None]:
    """While open, each call of `model` and of its blocks (`distributed.fsdp_layer_classes`: the units FSDP shards
    and ZeRO-3 fetches, also once FSDP2 has renamed their classes `FSDP<Class>`) runs inside a profiler range named
    `"trl_rejection: <Class>"`. The range opens before the module's other forward pre-hooks (FSDP2's unshard,
    DeepSpeed's fetch) and closes after its other forward hooks (their release), also when the forward raises, so
    their host time is inside it. (transformers' gradient checkpointing recomputes a block's `forward` inside the
    backward without its hooks: no range there.)"""
    from torch.profiler import record_function

    from .distributed import class_name, fsdp_layer_classes

    blocks = set(fsdp_layer_classes(model))
    spans: dict[int, list[Any]] = collections.defaultdict(list)  # module id: its open ranges (a re-entered module)

    def hooks(name: str) -> tuple[Callable, Callable]:
        def enter(module, args):
            span = record_function(f"{ANNOTATION}{name}")
            span.__enter__()
            spans[id(module)].append(span)

        def leave(module, args, output):
            if spans[id(module)]:
                spans[id(module)].pop().__exit__(None, None, None)

        return enter, leave

    handles = []
    for module in model.modules():
        name = class_name(module)
        if module is model or name in blocks:
            enter, leave = hooks(name)
            handles.append(module.register_forward_pre_hook(enter, prepend=True))
            handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _ancestors(op: Any) -> list[Any]:
    """`op` and the operators enclosing it (its `cpu_parent` chain), innermost first."""
    chain = [op]
    while chain[-1].cpu_parent is not None:
        chain.append(chain[-1].cpu_parent)
    return chain


def collectives_by_range(host_ops: list[Any]) -> list[tuple[str, int]]:
    """The collective calls (`c10d::` operators, each counted once: not those inside another) by where the host issued
    them, `"<range> > <operator>"`: the innermost `"trl_rejection: "` range enclosing the call (the block whose hooks
    gathered parameters, for one), else its outermost operator (a backward's `autograd::engine::...`), else
    `"(top level)"`. Most calls first. `host_ops` need `name` and `cpu_parent`."""
    counts: collections.Counter[str] = collections.Counter()
    for op in host_ops:
        if not op.name.startswith("c10d::"):
            continue
        chain = _ancestors(op)[1:]
        if any(e.name.startswith("c10d::") for e in chain):
            continue
        marked = next((e for e in chain if e.name.startswith(ANNOTATION)), None)
        where = marked or (chain[-1] if chain else None)
        counts[f"{where.name if where else '(top level)'} > {op.name}"] += 1
    return counts.most_common()


def idle_gaps(kernels: list[tuple[float, float]], host_ops: list[Any],
              min_gap: float = 50.0) -> list[tuple[str, float, int]]:
    """Where the GPU waited for the host: each gap of at least `min_gap` (same unit as the times, the profiler's
    microseconds) between the kernels, labelled by what the host was running at the gap's middle: the innermost
    profiled operator running then on any thread (the latest started), as `"outermost > innermost"` (with the
    innermost `"trl_rejection: "` range enclosing the innermost operator between them, unless that operator is one
    or the range is the outermost), or `"(no operator: Python)"`. Returns (label, total gap time, gaps), longest
    total first. `host_ops` need `name`, `time_range.start` / `.end`, `cpu_parent` and `thread` (a profiler's
    `FunctionEvent`s, nested per thread)."""
    busy = _union(kernels)
    threads: dict[Any, list[Any]] = collections.defaultdict(list)
    for op in host_ops:
        threads[getattr(op, "thread", 0)].append(op)
    timelines = []
    for ops in threads.values():
        ops.sort(key=lambda e: (e.time_range.start, -e.time_range.end))  # a parent before a child of the same start
        timelines.append((ops, [e.time_range.start for e in ops]))
    totals: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for (_, gap_start), (gap_end, _) in zip(busy, busy[1:]):
        if gap_end - gap_start < min_gap:
            continue
        middle = (gap_start + gap_end) / 2
        running = []
        for ops, starts in timelines:
            i = bisect.bisect_right(starts, middle)
            op = ops[i - 1] if i else None  # the last op started: running, or one of its ancestors is (nesting)
            while op is not None and op.time_range.end <= middle:
                op = op.cpu_parent
            if op is not None:
                running.append(op)
        if not running:
            label = "(no operator: Python)"
        else:
            inner = max(running, key=lambda e: e.time_range.start)
            chain = _ancestors(inner)
            marked = None if inner.name.startswith(ANNOTATION) else \
                next((e for e in chain[1:-1] if e.name.startswith(ANNOTATION)), None)
            label = " > ".join(e.name for e in (chain[-1], marked, inner) if e is not None) if len(chain) > 1 \
                else inner.name
        totals[label] += gap_end - gap_start
        counts[label] += 1
    return [(label, total, counts[label]) for label, total in totals.most_common()]


class HostSyncRecorder:
    """Counts the operations that make the host wait for the GPU (`.item()`, `.tolist()`, `nonzero`, ...) by call
    site, while `recording()` is open: `torch.cuda.set_sync_debug_mode("warn")` reports each one as a warning, which
    is counted instead of shown. A site is the innermost frame outside torch, with the innermost torch frame it
    called when there is one, e.g. `"transformers/models/llava/modeling_llava.py:310 get_placeholder_mask"`."""

    MESSAGE = "called a synchronizing CUDA operation"

    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        cuda = torch.cuda.is_available()
        previous = torch.cuda.get_sync_debug_mode() if cuda else None
        with warnings.catch_warnings():
            warnings.filterwarnings("always", message=".*" + re.escape(self.MESSAGE))
            shown = warnings.showwarning

            def showwarning(message, category, filename, lineno, file=None, line=None):
                if self.MESSAGE in str(message):
                    stack = traceback.StackSummary.extract(traceback.walk_stack(None),
                                                           lookup_lines=False)  # no source lines: cheaper
                    self.counts[self.site(stack[:0:-1])] += 1  # outermost first, without this frame
                else:
                    shown(message, category, filename, lineno, file, line)

            warnings.showwarning = showwarning
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(previous)

    @staticmethod
    def site(stack: list[traceback.FrameSummary]) -> str:
        """The innermost frame of `stack` (outermost first) not in torch nor in `warnings`, as `path:line function`
        relative to its package, with the innermost torch frame it called, if any."""
        torch_dir = os.path.dirname(torch.__file__) + os.sep
        own = [f for f in stack if f.filename != warnings.__file__]
        in_torch = [f.filename.startswith(torch_dir) for f in own]
        outside = [i for i, t in enumerate(in_torch) if not t]
        frame = own[outside[-1]] if outside else (own or stack)[-1]
        parts = Path(frame.filename).parts
        package = next((i for i in range(len(parts) - 1, -1, -1) if parts[i] in ("site-packages", "dist-packages")),
                       None)
        short = "/".join(parts[package + 1:] if package is not None else parts[-2:])
        text = f"{short}:{frame.lineno} {frame.name}"
        inner = [i for i, t in enumerate(in_torch) if t]
        if outside and inner and inner[-1] > outside[-1]:
            torch_frame = own[inner[-1]]
            text += f" -> torch {Path(torch_frame.filename).name}:{torch_frame.lineno} {torch_frame.name}"
        return text


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
