"""Training that waits for its dataloader: measured per optimizer step, logged, warned about on accelerators."""

from __future__ import annotations

import logging
import time

import pytest

from trl_rejection.collator import RejectionDataCollator
from trl_rejection.config import RejectionSFTConfig
from trl_rejection.data_wait import DataWaitMeter
from trl_rejection.testing.tiny import make_model, make_processor
from trl_rejection.trainer import RejectionSFTTrainer
from test_trainer import mix


def test_meter_counts_steps_after_warmup_and_starts_afresh():
    meter = DataWaitMeter(threshold=0.5, warmup_steps=2, on_accelerator=True)
    fetches = [(0, 3), (4, 5), (6, 6.5), (7, 8), (9, 9.2), (10, 10.1)]  # (start, end) of each step's fetch
    for start, end in fetches[:3]:
        meter.record(start, end)
    assert meter.pop() is None  # nothing closed after the warm-up yet
    for start, end in fetches[3:5]:
        meter.record(start, end)
    got = meter.pop()  # steps 3 (6 -> 7, 0.5 s waiting) and 4 (7 -> 9, 1 s waiting)
    assert (got.steps, got.wait_s, got.total_s) == (2, pytest.approx(1.5), pytest.approx(3.0))
    assert got.fraction == pytest.approx(0.5) and meter.warning(got) is None  # not above the threshold
    meter.record(*fetches[5])
    got = meter.pop()  # step 5 alone: 0.2 of 1 s
    assert got.steps == 1 and got.fraction == pytest.approx(0.2)


def test_warning_once_only_above_the_threshold_and_only_on_accelerators():
    from trl_rejection.data_wait import DataWait

    high, low = DataWait(0.4, 4.0, 10.0, 5), DataWait(0.05, 0.5, 10.0, 5)
    assert DataWaitMeter(0.1, on_accelerator=False).warning(high) is None
    assert DataWaitMeter(None, on_accelerator=True).warning(high) is None
    meter = DataWaitMeter(0.1, on_accelerator=True, workers=2)
    assert meter.warning(low) is None
    message = meter.warning(high)
    assert "40% of the time" in message and "2 worker processes" in message and "dataloader_num_workers" in message
    assert meter.warning(high) is None  # once


class SlowCollator:
    """The default collator, 0.5 s slower per batch: a dataloader that cannot keep up."""

    def __init__(self, collator: RejectionDataCollator):
        self.collator = collator
        self.padding_free = collator.padding_free

    def __call__(self, rows):
        time.sleep(0.5)
        return self.collator(rows)


def test_trainer_logs_the_measured_wait_and_warns_when_an_accelerator_starves(tmp_path, caplog):
    proc = make_processor("llava-1.5")
    args = RejectionSFTConfig(str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no",
                              logging_steps=1, max_steps=7, per_device_train_batch_size=2, dataloader_num_workers=0,
                              learning_rate=1e-3, data_wait_warning=0.2, padding_free=False)
    trainer = RejectionSFTTrainer(make_model("llava-1.5", proc), args=args, train_dataset=mix(6, 2),
                                  processing_class=proc)
    trainer.data_collator = SlowCollator(trainer.data_collator)
    assert not trainer._data_wait.on_accelerator  # CPU: measured and logged, never warned about
    trainer._data_wait.on_accelerator = True  # as on a GPU
    with caplog.at_level(logging.WARNING, logger="trl_rejection.trainer"):
        trainer.train()
    logged = {h["step"]: h.get("data_wait_fraction") for h in trainer.state.log_history if "loss" in h}
    assert [s for s, f in logged.items() if f is None] == [1, 2, 3, 4]  # warm-up: nothing closed yet
    # steps 4-6 closed, one per log. Each fetch collated one batch (0.5 s + the collation) ahead of a tiny model's
    # step; the data loader prefetches a batch, so at the epoch boundary one fetch collates none and the next two.
    closed = [logged[s] for s in (5, 6, 7)]
    assert sum(closed) / 3 > 0.3 and max(closed) > 0.5, sorted(logged.items())
    warnings = [r.message for r in caplog.records if "waited for data" in r.message]
    assert len(warnings) == 1 and "dataloader_num_workers" in warnings[0]
