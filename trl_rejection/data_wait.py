"""Is training waiting for data? The time each optimizer step spends fetching its batches from the dataloader,
against the step's wall time: logged as `data_wait_fraction`, and warned about once when an accelerator waits.

The fetch of step k (`Trainer.get_batch_samples`) blocks while the dataloader's workers have no collated batch
ready; the step's wall time runs from that fetch to the next one. A GPU that outruns its collators shows as a high
fraction; a GPU-bound run spends almost nothing in the fetch (CUDA runs ahead of the host only until the next sync).

Example:
    >>> meter = DataWaitMeter(threshold=0.1, warmup_steps=1, on_accelerator=True, workers=2)
    >>> for start, end in [(0.0, 0.5), (1.0, 1.6), (2.0, 2.7), (3.0, 3.1)]:
    ...     meter.record(start, end)
    >>> round(meter.pop().fraction, 2)   # steps 2 and 3: 0.6 + 0.7 s of waiting in 2 s
    0.65
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataWait:
    """What the steps since the last `pop` spent waiting for data."""

    fraction: float
    wait_s: float
    total_s: float
    steps: int


class DataWaitMeter:
    """Collects, per optimizer step, the seconds spent fetching batches and the step's wall time (after
    `warmup_steps`, which include dataloader start-up and compilation), and says when it is worth a warning."""

    def __init__(self, threshold: float | None, warmup_steps: int = 3, on_accelerator: bool = False,
                 workers: int = 0):
        self.threshold = threshold
        self.warmup_steps = warmup_steps
        self.on_accelerator = on_accelerator
        self.workers = workers
        self.warned = False
        self._seen = 0
        self._last: tuple[float, float] | None = None  # (start, end) of the previous step's fetch
        self._wait = self._total = 0.0
        self._steps = 0

    def record(self, start: float, end: float) -> None:
        """The fetch of a new step ran from `start` to `end` (`time.perf_counter()`): this closes the previous step."""
        if self._last is not None and self._seen > self.warmup_steps:
            last_start, last_end = self._last
            self._wait += last_end - last_start
            self._total += start - last_start
            self._steps += 1
        self._seen += 1
        self._last = (start, end)

    def pop(self) -> DataWait | None:
        """The waiting of the steps closed since the last call (None if none was), and start counting afresh."""
        if not self._steps or self._total <= 0:
            return None
        measured = DataWait(self._wait / self._total, self._wait, self._total, self._steps)
        self._wait = self._total = 0.0
        self._steps = 0
        return measured

    def warning(self, measured: DataWait) -> str | None:
        """The one-time warning when an accelerator waited for data longer than `threshold` of the time."""
        if self.warned or self.threshold is None or not self.on_accelerator or measured.fraction <= self.threshold:
            return None
        self.warned = True
        return (f"Training waited for data {measured.fraction:.0%} of the time over the last {measured.steps} steps "
                f"({measured.wait_s:.1f} of {measured.total_s:.1f} s): the dataloader ({self.workers} worker processes) "
                "collates more slowly than the model trains. Fix: raise `dataloader_num_workers` (each worker "
                "renders, tokenizes and processes images), store images at the processor's input size, or set "
                "`data_wait_warning: null` to silence this.")
