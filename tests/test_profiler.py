"""`--profile_steps`: the step range, the GPU-busy share, and the files the profiler callback writes."""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_rejection.callbacks import (HostSyncRecorder, StepProfiler, annotate_forward, busy_fraction,
                                     collectives_by_range, communication_split, device_kernels, idle_gaps,
                                     timeline_spans,
                                     parse_step_range)


def test_step_ranges_parse_or_fail_with_what_is_wrong():
    assert parse_step_range("5-7") == (5, 7) and parse_step_range("4") == (4, 4)
    for bad in ("7-5", "0-2", "a-b", "5-", "-3", ""):
        with pytest.raises(ValueError, match="step range"):
            parse_step_range(bad)


@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 20)), max_size=12), st.integers(1, 100))
@settings(max_examples=200, deadline=None)
def test_busy_fraction_is_the_covered_share_of_the_window(spans, window):
    intervals = [(float(a), float(a + n)) for a, n in spans]
    covered = {t for a, b in intervals for t in range(int(a), int(b))}  # unit cells [t, t+1) under some interval
    expected = min(len(covered) / window, 1.0) if intervals else None
    assert busy_fraction(intervals, float(window)) == pytest.approx(expected) if expected is not None \
        else busy_fraction(intervals, float(window)) is None


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 60), st.integers(0, 20)), max_size=14))
@settings(max_examples=300, deadline=None)
def test_communication_split_counts_compute_time_and_communication_not_hidden_behind_it(spans):
    kernels = [("ncclDevKernel_AllGather_RING_LL" if comm else "sm90_xmma_gemm_bf16", float(a), float(a + n))
               for comm, a, n in spans]
    cells = {kind: {t for comm, a, n in spans if comm == kind for t in range(a, a + n)} for kind in (True, False)}
    assert communication_split(kernels) == (pytest.approx(len(cells[False])),
                                            pytest.approx(len(cells[True] - cells[False])))


def test_communication_split_of_a_timeline():
    kernels = [("gemm", 0, 10), ("ncclKernel_ReduceScatter", 5, 14), ("elementwise", 12, 13),
               ("NCCL_AllGather", 20, 25)]
    assert communication_split(kernels) == (11, 2 + 1 + 5)  # 10-12 and 13-14 exposed, then 20-25
    assert communication_split([]) == (0, 0)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 60), st.integers(0, 20)), max_size=14))
@settings(max_examples=300, deadline=None)
def test_timeline_spans_are_the_gaps_between_kernels_and_the_communication_only_time(spans):
    kernels = [("ncclDevKernel_AllGather_RING_LL" if comm else "sm90_xmma_gemm_bf16", float(a), float(a + n))
               for comm, a, n in spans if n]
    idle, comm_only = timeline_spans(kernels, min_span=0)
    cells = {kind: {t for comm, a, n in spans if comm == kind for t in range(a, a + n)} for kind in (True, False)}
    busy = cells[True] | cells[False]
    inside = set(range(min(busy), max(busy))) if busy else set()
    assert {t for a, b in idle for t in range(int(a), int(b))} == inside - busy
    assert {t for a, b in comm_only for t in range(int(a), int(b))} == cells[True] - cells[False]
    assert all(a < b for a, b in idle + comm_only)
    assert sum(b - a for a, b in comm_only) == pytest.approx(communication_split(kernels)[1])


def test_timeline_spans_keep_only_spans_of_the_minimum_length():
    kernels = [("gemm", 0, 10), ("nccl_AllGather", 5, 300), ("gemm", 400, 420), ("gemm", 450, 500)]
    assert timeline_spans(kernels) == ([[300, 400]], [[10, 300]])  # the 30 us gap 420-450 is left out
    assert timeline_spans(kernels, min_span=20) == ([[300, 400], [420, 450]], [[10, 300]])
    assert timeline_spans([]) == ([], [])


def test_device_kernels_leave_out_the_device_side_of_annotated_ranges():
    from types import SimpleNamespace as NS

    def event(name, start, end, device="CUDA", annotation=False):
        return NS(name=name, time_range=NS(start=start, end=end), device_type=device, is_user_annotation=annotation)

    events = [event("trl_rejection: forward LlavaForConditionalGeneration", 0, 100, annotation=True),
              event("gemm", 0, 40), event("trl_rejection: forward LlavaForConditionalGeneration", 0, 100, "CPU"),
              event("nccl:_all_gather_base", 50, 60, annotation=True), event("ncclDevKernel_AllGather", 50, 60),
              event("aten::mm", 0, 40, "CPU")]
    kernels = device_kernels(events, "CUDA")
    assert kernels == [("gemm", 0, 40), ("ncclDevKernel_AllGather", 50, 60)]
    assert busy_fraction([(a, b) for _, a, b in kernels], 100) == 0.5  # the range's 0-100 would make it 1.0


def test_the_profiler_writes_the_chosen_steps_of_a_run(tmp_path):
    from peft import LoraConfig

    from test_trainer import LORA_TARGETS, config, mix
    from trl_rejection.testing.tiny import make_model, make_processor
    from trl_rejection.trainer import RejectionSFTTrainer

    proc = make_processor("llava-1.5")
    profiler = StepProfiler(2, 3, tmp_path / "profile", rank=0)
    trainer = RejectionSFTTrainer(make_model("llava-1.5", proc), args=config(tmp_path, max_steps=4,
                                  per_device_train_batch_size=2), train_dataset=mix(), processing_class=proc,
                                  peft_config=LoraConfig(r=4, target_modules=LORA_TARGETS), callbacks=[profiler])
    trainer.train()
    summary = json.loads((tmp_path / "profile" / "rank0.json").read_text())
    assert summary["steps"] == 2 and summary["step_s"] > 0 and summary["rank"] == 0
    assert summary["gpu_busy"] is None and summary["top_gpu_ms_per_step"] == []  # no GPU here
    assert summary["compute_busy"] is None and summary["communication_only_ms_per_step"] == 0
    assert summary["host_syncs_per_step"] == []  # (CUDA's sync debug mode reports them)
    assert summary["idle_ms_per_step_by_host_op"] == []  # no kernels
    assert summary["collectives_per_step_by_range"] == []  # one process
    assert summary["idle_spans_ms"] == summary["communication_only_spans_ms"] == []  # no kernels
    assert abs(summary["trace_start_unix_ns"] - time.time_ns()) < 600e9  # the profiler's start, on the epoch clock
    table = (tmp_path / "profile" / "rank0.txt").read_text()
    assert table.startswith("steps 2-3,") and "aten::mm" in table
    late = StepProfiler(3, 9, tmp_path / "late", rank=0)  # the run ends at step 4: steps 3-4 are written
    trainer.callback_handler.add_callback(late)
    trainer.callback_handler.remove_callback(profiler)
    trainer.train()
    assert json.loads((tmp_path / "late" / "rank0.json").read_text())["steps"] == 2
    assert (tmp_path / "late" / "rank0.txt").read_text().startswith("steps 3-4,")


def _trainer(tmp_path, callbacks=None):
    from peft import LoraConfig

    from test_trainer import LORA_TARGETS, config, mix
    from trl_rejection.testing.tiny import make_model, make_processor
    from trl_rejection.trainer import RejectionSFTTrainer

    proc = make_processor("llava-1.5")
    return RejectionSFTTrainer(make_model("llava-1.5", proc), args=config(tmp_path, max_steps=2,
                               per_device_train_batch_size=2, gradient_accumulation_steps=2),
                               train_dataset=mix(), processing_class=proc,
                               peft_config=LoraConfig(r=4, target_modules=LORA_TARGETS), callbacks=callbacks)


def test_training_steps_and_their_loss_computations_run_in_named_ranges(tmp_path):
    from torch.profiler import profile

    trainer = _trainer(tmp_path)
    with profile() as prof:
        trainer.train()
    events = prof.events()
    steps = [e for e in events if e.name == "trl_rejection: training_step"]
    losses = [e for e in events if e.name == "trl_rejection: compute_loss"]
    assert len(steps) == len(losses) == 4  # 2 optimizer steps x 2 micro-batches
    for loss in losses:  # each inside a training step: its forward; the backward follows in the same range
        assert loss.cpu_parent.name == "trl_rejection: training_step"
    for step in steps:
        assert any(e.name.startswith("autograd::engine::evaluate_function") and
                   step.time_range.start <= e.time_range.start <= step.time_range.end for e in events)


def test_the_profiler_annotates_the_model_being_trained_from_its_first_step(tmp_path, monkeypatch):
    import trl_rejection.callbacks as callbacks

    annotated = []

    @contextlib.contextmanager
    def record(model):
        annotated.append(model)
        yield
        annotated.append("closed")

    monkeypatch.setattr(callbacks, "annotate_forward", record)
    trainer = _trainer(tmp_path, callbacks=[StepProfiler(2, 2, tmp_path / "profile", rank=0)])
    trainer.train()
    assert annotated == [trainer.model, "closed"]  # the Trainer passes its model to the callback


def test_a_failed_write_leaves_the_profiler_stopped_for_close(tmp_path, monkeypatch):
    """If writing the tables fails, the profiler and the sync recording are stopped all the same, and the recipe's
    `close` (in its `finally`) then has nothing left to stop: it neither fails nor stops them a second time."""

    profiler = StepProfiler(1, 1, tmp_path / "profile", rank=0)
    profiler.on_step_begin(None, SimpleNamespace(global_step=0), None)
    stops = []
    real_stop = profiler._stop
    monkeypatch.setattr(profiler, "_stop", lambda: stops.append(1) or real_stop())
    monkeypatch.setattr(profiler, "_write", lambda wall, last: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        profiler.on_step_end(None, SimpleNamespace(global_step=1), None)
    profiler.close()
    assert stops == [1] and not (tmp_path / "profile").exists()


def _reads_the_gpu():
    """Stands for an op that makes the host wait (on CUDA, `set_sync_debug_mode("warn")` warns from inside it)."""
    warnings.warn("an op " + HostSyncRecorder.MESSAGE, UserWarning)


def test_host_sync_recorder_counts_sync_warnings_by_their_call_site_and_passes_other_warnings_on():
    recorder = HostSyncRecorder()
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with recorder.recording():
            for _ in range(3):
                _reads_the_gpu()
            warnings.warn("something else")
        _reads_the_gpu()  # after recording: shown as usual, not counted
    line = _reads_the_gpu.__code__.co_firstlineno + 2
    assert recorder.counts == {f"tests/test_profiler.py:{line} _reads_the_gpu": 3}
    assert [str(w.message) for w in shown] == ["something else", "an op " + HostSyncRecorder.MESSAGE]


def test_idle_gaps_are_labelled_by_what_the_host_ran_in_their_middle():
    from types import SimpleNamespace as NS

    def op(name, start, end, parent=None, thread=1):
        return NS(name=name, time_range=NS(start=start, end=end), cpu_parent=parent, thread=thread)

    step = op("optimizer.step", 100, 400)
    first = op("aten::_foreach_add_", 100, 250, step)  # starts with its parent
    many = [op("aten::mul_", 260 + i * 1e-3, 260 + i * 1e-3 + 1e-4, step) for i in range(6000)]  # all done by 300
    backward = op("autograd::engine::evaluate_function: MmBackward0", 700, 745, thread=2)
    host = [op("aten::item", 500, 560), *many[::-1], backward, first, step]  # any order
    kernels = [(750, 760), (0, 120), (110, 140), (260, 300), (320, 330), (600, 700), (700, 710)]
    # gaps: 140-260 (middle 200: the foreach, inside the step), 300-320 (20: too short), 330-600 (middle 465: no
    # operator running), 710-750 (40: too short)
    assert idle_gaps(kernels, host) == [("(no operator: Python)", 270, 1),
                                        ("optimizer.step > aten::_foreach_add_", 120, 1)]
    # with shorter gaps counted: 300-320's middle (310) lies in the step after its 6,000 children ended, and
    # 710-750's (730) in another thread's backward
    assert idle_gaps(kernels, host, min_gap=10) == [("(no operator: Python)", 270, 1),
                                                    ("optimizer.step > aten::_foreach_add_", 120, 1),
                                                    ("autograd::engine::evaluate_function: MmBackward0", 40, 1),
                                                    ("optimizer.step", 20, 1)]
    assert idle_gaps([], host) == []


def test_idle_gaps_name_the_innermost_annotated_block_between_the_outermost_and_innermost_operator():
    from types import SimpleNamespace as NS

    def op(name, start, end, parent=None):
        return NS(name=name, time_range=NS(start=start, end=end), cpu_parent=parent, thread=1)

    step = op("trl_rejection: training_step", 0, 2000)
    forward = op("trl_rejection: PeftModel", 0, 1000, step)
    block = op("trl_rejection: LlamaDecoderLayer", 100, 300, forward)
    hook = op("FSDP::pre_forward", 100, 200, block)
    copy = op("aten::copy_", 150, 190, hook)
    alone = op("trl_rejection: CLIPEncoderLayer", 500, 700, forward)
    kernels = [(0, 120), (200, 210), (480, 490), (720, 730)]
    # gaps: 120-200 (middle 160: the copy, in FSDP's hook, in the block), 210-480 (345: the forward only), 490-720
    # (605: the CLIP block)
    assert idle_gaps(kernels, [step, forward, block, hook, copy, alone]) == [
        ("trl_rejection: training_step > trl_rejection: PeftModel", 270, 1),
        ("trl_rejection: training_step > trl_rejection: CLIPEncoderLayer", 230, 1),
        ("trl_rejection: training_step > trl_rejection: LlamaDecoderLayer > aten::copy_", 80, 1)]


def test_collectives_are_counted_once_by_the_range_that_issued_them():
    from types import SimpleNamespace as NS

    def op(name, parent=None):
        return NS(name=name, cpu_parent=parent)

    step = op("trl_rejection: training_step")
    model = op("trl_rejection: PeftModelForCausalLM", step)
    block = op("trl_rejection: LlamaDecoderLayer", model)
    hook = op("FSDP::pre_forward", block)
    gather = op("c10d::_allgather_base_", hook)
    backward = op("autograd::engine::evaluate_function: MmBackward0")
    ops = [step, model, block, hook, gather, op("record_param_comms", gather),
           op("c10d::_allgather_base_", op("FSDP::pre_forward", op("trl_rejection: LlamaDecoderLayer", model))),
           op("c10d::_allgather_base_", model),  # in the model's forward, outside any block (the LM head)
           op("c10d::_reduce_scatter_base_", op("FSDP::post_backward", backward)),
           op("c10d::allreduce_", op("record_param_comms", op("c10d::barrier"))),  # inside another: not again
           op("c10d::barrier"), op("c10d::allreduce_")]
    assert collectives_by_range(ops) == [
        ("trl_rejection: LlamaDecoderLayer > c10d::_allgather_base_", 2),
        ("trl_rejection: PeftModelForCausalLM > c10d::_allgather_base_", 1),
        ("autograd::engine::evaluate_function: MmBackward0 > c10d::_reduce_scatter_base_", 1),
        ("(top level) > c10d::barrier", 1), ("(top level) > c10d::allreduce_", 1)]


def test_collectives_of_a_real_process_group_are_found_under_the_block_that_issued_them(tmp_path):
    import torch.distributed as dist
    from torch.profiler import profile

    from trl_rejection.testing.tiny import make_model, make_processor

    model = make_model("llava-1.5", make_processor("llava-1.5"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        fetch = model.model.language_model.layers[1].register_forward_pre_hook(  # stands for a ZeRO-3 fetch
            lambda module, args: dist.all_reduce(torch.ones(2)), prepend=True)
        with profile() as prof, annotate_forward(model):
            model(input_ids=torch.tensor([[1, 5, 6, 7, 8]]))
            dist.barrier()
        fetch.remove()
    finally:
        dist.destroy_process_group()
    counts = dict(collectives_by_range([e for e in prof.events() if e.device_type.name == "CPU"]))
    assert counts == {"trl_rejection: LlamaDecoderLayer > c10d::allreduce_": 1, "(top level) > c10d::barrier": 1}


def test_annotate_forward_marks_the_model_and_each_block_around_their_other_hooks():
    import torch
    from torch.profiler import profile, record_function

    from trl_rejection.testing.tiny import make_model, make_processor

    model = make_model("llava-1.5", make_processor("llava-1.5"))
    layers = model.model.language_model.layers
    ids = torch.tensor([[1, 5, 6, 7, 8]])

    def hook(name):  # stands for FSDP2's unshard / reshard, DeepSpeed's fetch / release: hooks registered earlier
        def run(*args):
            with record_function(name):
                torch.ones(1)
        return run

    earlier = [layers[0].register_forward_pre_hook(hook("fetch"), prepend=True),
               layers[0].register_forward_hook(hook("release"))]
    hooks = {id(m): (len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()}
    with profile() as prof:
        with annotate_forward(model):
            model(input_ids=ids)
            with pytest.raises(IndexError):
                model(input_ids=torch.tensor([[10**6]]))  # fails inside the embedding
            with record_function("between"):  # the failed forward's range closed as it failed, before this
                torch.ones(1)
        assert {id(m): (len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()} == hooks
    for handle in earlier:
        handle.remove()
    events = prof.events()
    names = [e.name for e in events if e.name.startswith("trl_rejection: ")]
    assert names.count("trl_rejection: LlavaForConditionalGeneration") == 2
    assert names.count("trl_rejection: LlamaDecoderLayer") == len(layers) == 2
    assert not any("CLIP" in n for n in names)  # no image: the vision blocks did not run
    (between,) = [e for e in events if e.name == "between"]
    assert max(e.time_range.end for e in events if e.name.startswith("trl_rejection: ")) < between.time_range.start
    for name in ("fetch", "release"):  # inside the block's range, inside the model's
        (event,) = [e for e in events if e.name == name]
        assert event.cpu_parent.name == "trl_rejection: LlamaDecoderLayer"
        assert event.cpu_parent.cpu_parent.name == "trl_rejection: LlavaForConditionalGeneration"


class FSDPStyleName(torch.nn.Module):
    pass


def test_annotate_forward_finds_the_blocks_fsdp2_has_sharded(tmp_path):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.profiler import profile

    from trl_rejection.distributed import class_name, fsdp_layer_classes
    from trl_rejection.testing.tiny import make_model, make_processor

    model = make_model("llava-1.5", make_processor("llava-1.5"))
    blocks = fsdp_layer_classes(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.language_model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert type(model).__name__ == "FSDPLlavaForConditionalGeneration"
        assert class_name(model) == "LlavaForConditionalGeneration"
        assert class_name(FSDPStyleName()) == "FSDPStyleName"  # a name alone does not make a sharded module
        assert fsdp_layer_classes(model) == blocks  # the sharded blocks count as their own classes
        with profile() as prof, annotate_forward(model):
            model(input_ids=torch.tensor([[1, 5, 6, 7, 8]]))
    finally:
        dist.destroy_process_group()
    names = [e.name for e in prof.events() if e.name.startswith("trl_rejection: ")]
    assert sorted(names) == ["trl_rejection: LlamaDecoderLayer"] * 2 + ["trl_rejection: LlavaForConditionalGeneration"]


def test_host_sync_sites_name_the_caller_outside_torch_and_the_torch_frame_it_called():
    import os
    import traceback

    import torch

    torch_file = os.path.join(os.path.dirname(torch.__file__), "_tensor.py")
    packages = "/venv/lib/python3.11/site-packages"

    def frame(path, line, name):
        return traceback.FrameSummary(path, line, name, lookup_line=False)

    stack = [frame("/work/recipes/sft_rejection.py", 10, "main"),
             frame(f"{packages}/transformers/models/llava/modeling_llava.py", 189, "get_placeholder_mask"),
             frame(torch_file, 1150, "__format__"), frame(warnings.__file__, 1, "_showwarnmsg")]
    assert HostSyncRecorder.site(stack) == ("transformers/models/llava/modeling_llava.py:189 get_placeholder_mask "
                                            "-> torch _tensor.py:1150 __format__")
    vision = frame(os.path.dirname(torch.__file__) + "vision/ops.py", 3, "nms")  # torchvision: not torch
    assert HostSyncRecorder.site(stack[:2] + [vision]).endswith("vision/ops.py:3 nms")
    assert HostSyncRecorder.site(stack[:1]) == "recipes/sft_rejection.py:10 main"  # no package: the last 2 parts


def test_the_bench_profile_table_divides_each_profiled_step_into_micro_batches(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import profile_table

    rank = dict(rank=1, step_s=2.0, gpu_busy=0.9, compute_busy=0.8, communication_only_ms_per_step=40.0,
                top_gpu_ms_per_step=[["aten::mm", 900.0, 3600], ["ncclDevKernel_AllGather_RING_LL(x)", 300.0, 200],
                                     ["aten::add", 10.0, 5], ["aten::addmm", 100.0, 30]],
                idle_ms_per_step_by_host_op=[["trl_rejection: compute_loss", 120.0, 4],
                                             ["(no operator: Python)", 80, 9]])
    run = dict(variant="fsdp_prof", accumulation=2, profile=[rank])
    assert profile_table.rows(run) == [["fsdp_prof", "1", "2.000 (2)", "500", "150 (100)", "800", "20", "100",
                                        "trl_rejection: compute_loss: 60"]]
    path = tmp_path / "call.jsonl"
    path.write_text(json.dumps({"variant": "prepare", "rows": 640}) + "\n" + json.dumps(run) + "\n")
    assert profile_table.main([str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("| fsdp_prof | 1 | 2.000 (2) | 500 |")
    bare = {**rank, "gpu_busy": None, "top_gpu_ms_per_step": [], "idle_ms_per_step_by_host_op": []}  # no CUDA
    assert profile_table.rows({**run, "profile": [bare]})[0][3:] == ["-", "-", "800", "20", "-", "-"]
    path.write_text(json.dumps({**run, "profile": []}) + "\n")
    assert profile_table.main([str(path)]) == 1


def test_the_bench_coupling_table_finds_one_process_waiting_while_the_other_idles(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import profile_coupling

    # rank 1's profiler started 5 ms after rank 0's: its spans shift by 5 ms onto rank 0's clock
    rank0 = dict(rank=0, steps=1, trace_start_unix_ns=1_000_000_000, idle_spans_ms=[[10.0, 20.0], [50.0, 60.0]],
                 communication_only_spans_ms=[[30.0, 40.0]])
    rank1 = dict(rank=1, steps=1, trace_start_unix_ns=1_005_000_000, idle_spans_ms=[[25.0, 35.0], [50.0, 52.0]],
                 communication_only_spans_ms=[[5.0, 15.0]])
    run = dict(variant="fsdp_prof", accumulation=2, profile=[rank0, rank1])
    # on rank 0's clock rank 1 idles 30-40 and 55-57, and only communicates 10-20
    assert profile_coupling.rows(run) == [["fsdp_prof", "0", "10", "5", "5", "1"],
                                          ["fsdp_prof", "1", "6", "5", "5", "1"]]
    assert profile_coupling.overlap([[0, 10], [20, 30]], [[5, 25]]) == 10
    path = tmp_path / "call.jsonl"
    path.write_text(json.dumps({"variant": "prepare"}) + "\n" + json.dumps(run) + "\n")
    assert profile_coupling.main([str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[2] == "| fsdp_prof | 0 | 10 | 5 | 5 | 1 |"
    path.write_text(json.dumps({**run, "profile": [rank0]}) + "\n")  # one process: nothing to line up
    assert profile_coupling.main([str(path)]) == 1


@pytest.mark.parametrize("how", ["accelerate", "torch_compile"])
def test_the_profiler_adds_no_block_ranges_to_a_compiled_model(tmp_path, monkeypatch, how):
    """Under `accelerate launch --dynamo_backend ...` (ACCELERATE_DYNAMO_BACKEND) or `--torch_compile`, the block
    ranges' hooks would make dynamo recompile every compiled block inside the profiled steps: the profiler warns and
    leaves them out; with the variable set to "no" (accelerate's default) it adds them."""
    import trl_rejection.callbacks as callbacks

    annotated = []

    @contextlib.contextmanager
    def record(model):
        annotated.append(model)
        yield

    monkeypatch.setattr(callbacks, "annotate_forward", record)
    args = SimpleNamespace(torch_compile_backend="inductor" if how == "torch_compile" else None)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR" if how == "accelerate" else "NO")
    model = torch.nn.Linear(2, 2)
    profiler = StepProfiler(1, 1, tmp_path / "profile", rank=0)
    with pytest.warns(UserWarning, match="no `trl_rejection: <Class>` ranges"):
        profiler.on_step_begin(args, SimpleNamespace(global_step=0), None, model=model)
    profiler.close()
    assert annotated == []
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    profiler = StepProfiler(1, 1, tmp_path / "profile2", rank=0)
    profiler.on_step_begin(SimpleNamespace(torch_compile_backend=None), SimpleNamespace(global_step=0), None,
                           model=model)
    profiler.close()
    assert annotated == [model]
