"""Training paths checked against an independent computation, on tiny random models on CPU: evaluation losses (the
split ones included) against a hand computation, an `IterableDataset` against the same rows as a `Dataset`, a resumed
run against an uninterrupted one (losses, learning rate, optimizer state, weights)."""

from __future__ import annotations

import datasets
import pytest
import torch
from PIL import Image

from trl_rejection.collator import RejectionDataCollator
from trl_rejection.config import RejectionSFTConfig
from trl_rejection.constants import DEFAULT_REFUSAL, IGNORE_INDEX
from trl_rejection.testing.tiny import make_model, make_processor
from trl_rejection.trainer import RejectionSFTTrainer

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def mix(n_normal: int, n_refusal: int, offset: int = 0) -> datasets.Dataset:
    rows = []
    for i in range(offset, offset + n_normal + n_refusal):
        refusal = i - offset >= n_normal
        rows.append({
            "id": str(i), "source": "test", "is_refusal": refusal,
            "messages": [
                {"role": "user", "content": [{"type": "image", "text": None},
                                             {"type": "text", "text": f"What colour is picture {i}?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": DEFAULT_REFUSAL if refusal else
                                                   f"It is colour number {i % 4}."}]}],
            "images": [Image.new("RGB", (32, 32), COLORS[i % 4])]})
    return datasets.Dataset.from_list(rows)


def config(tmp_path, **kw) -> RejectionSFTConfig:
    base = dict(use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1, max_steps=3,
                per_device_train_batch_size=4, per_device_eval_batch_size=16, learning_rate=1e-2, warmup_steps=0,
                seed=0, dataloader_num_workers=0)
    return RejectionSFTConfig(str(tmp_path / "out"), **{**base, **kw})


def hand_losses(model, processor, data: datasets.Dataset) -> dict[str, float]:
    """Mean next-token NLL over the labelled tokens of all rows, of refusal rows and of normal rows, from full
    logits of one padded batch: no TRL, no fused head, no packing."""
    batch = RejectionDataCollator(processor)([dict(r) for r in data])
    is_refusal = batch.pop("is_refusal").bool()
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model.eval()(**batch).logits[:, :-1].float()
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    nll = -torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * labelled
    rows = is_refusal[:, None].expand_as(labelled)
    return {"loss": float(nll.sum() / labelled.sum()),
            "loss_refusal": float(nll[rows].sum() / (labelled & rows).sum()),
            "loss_normal": float(nll[~rows].sum() / (labelled & ~rows).sum())}


def test_eval_dataset_logs_the_loss_and_the_split_losses(tmp_path):
    proc = make_processor("llava-1.5")
    train, evaluation = mix(6, 2), mix(3, 2, offset=100)
    trainer = RejectionSFTTrainer(make_model("llava-1.5", proc), args=config(tmp_path, eval_strategy="steps",
                                                                           eval_steps=2, max_steps=2),
                                  train_dataset=train, eval_dataset=evaluation, processing_class=proc)
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    trains = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in evals] == [2] and [h["step"] for h in trains] == [1, 2]
    expected = hand_losses(trainer.model, proc, evaluation)  # the weights the evaluation at step 2 saw
    logged = evals[0]
    assert logged["eval_loss"] == pytest.approx(expected["loss"], rel=1e-4)
    assert logged["eval_loss_refusal"] == pytest.approx(expected["loss_refusal"], rel=1e-4)
    assert logged["eval_loss_normal"] == pytest.approx(expected["loss_normal"], rel=1e-4)
    assert logged["eval_loss_refusal"] != pytest.approx(logged["eval_loss_normal"], rel=1e-3)  # really split
    # the evaluation's sums are kept apart from training's: the step-2 training log holds only its own batch
    assert "eval_loss_refusal" not in trains[-1] and "loss_refusal" not in logged
    again = trainer.evaluate()
    assert again["eval_loss"] == pytest.approx(expected["loss"], rel=1e-4)
    assert trainer.state.log_history[-1]["eval_loss_refusal"] == pytest.approx(expected["loss_refusal"], rel=1e-4)


def test_iterable_dataset_trains_like_the_same_rows_in_order(tmp_path):
    """An `IterableDataset` (streamed rows, no length) trains for `max_steps` and logs the split losses; step for
    step it computes what the same rows as a `Dataset` read in order compute."""
    proc = make_processor("llava-1.5")
    data = mix(6, 2).select([0, 6, 1, 2, 3, 7, 4, 5])  # a refusal row in each batch of 4
    logs = {}
    for kind, ds, extra in (("iterable", data.to_iterable_dataset(), {}),
                            ("map", data, {"train_sampling_strategy": "sequential"})):
        trainer = RejectionSFTTrainer(make_model("llava-1.5", proc), args=config(tmp_path / kind, **extra),
                                      train_dataset=ds, processing_class=proc)
        trainer.train()
        assert trainer.state.global_step == 3, kind  # max_steps, past the end of the 2-batch stream
        logs[kind] = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs["iterable"]] == [1, 2, 3]
    for streamed, indexed in zip(logs["iterable"], logs["map"]):
        for key in ("loss", "loss_refusal", "loss_normal", "refusal_tokens", "normal_tokens"):
            assert key in streamed, (key, streamed)
            assert streamed[key] == pytest.approx(indexed[key], rel=1e-5), (key, streamed["step"])


LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@pytest.mark.parametrize("tuning", ["lora", pytest.param("full", marks=pytest.mark.xfail(
    strict=True, reason="transformers 5 saves a LLaVA checkpoint under its original (Hub) key names and "
    "Trainer._load_from_checkpoint loads it without converting them back: a resumed full fine-tune starts again "
    "from the initial weights (only a 'missing keys' warning). LoRA checkpoints load through PEFT and resume."))])
def test_resumed_run_matches_the_uninterrupted_run(tmp_path, tuning):
    """Interrupted mid-epoch at step 2 (12 rows, batch 4: 3 steps an epoch) and resumed: steps 3-5 log the same
    losses and learning rates as the uninterrupted run, and end with the same Adam state and weights."""
    from peft import LoraConfig

    proc = make_processor("llava-1.5")
    data = mix(9, 3)
    peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      modules_to_save=["multi_modal_projector"]) if tuning == "lora" else None
    runs = {}
    for name in ("full", "resumed"):
        args = config(tmp_path / name, max_steps=5, save_strategy="steps", save_steps=2, learning_rate=5e-3,
                      lr_scheduler_type="cosine")
        trainer = RejectionSFTTrainer(make_model("llava-1.5", proc), args=args, train_dataset=data,
                                      processing_class=proc, peft_config=peft)
        trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2")
                      if name == "resumed" else None)
        runs[name] = trainer
    full, resumed = runs["full"], runs["resumed"]
    assert resumed.state.global_step == 5
    by_step = {n: {h["step"]: h for h in t.state.log_history if "loss" in h} for n, t in runs.items()}
    assert set(by_step["resumed"]) >= {3, 4, 5}
    for step in (3, 4, 5):
        a, b = by_step["full"][step], by_step["resumed"][step]
        for key in ("loss", "loss_refusal", "loss_normal", "learning_rate", "grad_norm"):
            if key in a or key in b:  # a batch without refusal rows logs no loss_refusal
                assert b.get(key) == pytest.approx(a.get(key), rel=1e-4, abs=1e-7), (step, key, a, b)
    assert full.optimizer.param_groups[0]["lr"] == pytest.approx(resumed.optimizer.param_groups[0]["lr"])
    names = dict(full.model.named_parameters())
    checked = 0
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name
        if not p.requires_grad:
            continue
        sa, sb = full.optimizer.state[p], resumed.optimizer.state[q]
        assert int(sa["step"]) == int(sb["step"]) == 5, name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(sa[key], sb[key], rtol=1e-4, atol=1e-8), (name, key)
        checked += 1
    assert checked == sum(p.requires_grad for p in names.values()) > 0
