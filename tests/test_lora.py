"""`fuse_lora_output`: PEFT's LoRA output added inside one `addmm`; the same sums (to rounding), PEFT's own forward
wherever the fused one does not apply."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch.overrides import TorchFunctionMode

from trl_rejection.lora import fuse_lora_output, recompute_lora_dropout
from tests.test_checkpointing import TARGETS, tiny_lm


class CountAddmm(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.addmm
        return func(*args, **(kwargs or {}))


def forward_backward(model, ids):
    model.zero_grad(set_to_none=True)
    with CountAddmm() as mode:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads, mode.calls


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_output_equals_peft_forward_and_gradients_in_fp32(dropout):
    plain = tiny_lm(dropout=dropout)
    fused = copy.deepcopy(plain)
    assert fuse_lora_output(fused) == 4 * len(TARGETS)
    assert fuse_lora_output(fused) == 0  # already fused
    if dropout:  # with the dropout moved into lora_A as well: the same masks
        recompute_lora_dropout(fused)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    logits, grads, calls_plain = forward_backward(plain, ids)
    torch.manual_seed(5)
    logits_f, grads_f, calls_fused = forward_backward(fused, ids)
    assert calls_plain == 0 and calls_fused == 4 * len(TARGETS)
    torch.testing.assert_close(logits_f, logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_f.keys() and any("lora_B" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads_f[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_output_under_bf16_autocast_stays_within_bf16_rounding():
    plain = tiny_lm(dropout=0.0)
    fused = copy.deepcopy(plain)
    fuse_lora_output(fused)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    from peft.helpers import disable_input_dtype_casting

    out = {}
    for name, model in (("plain", plain), ("fused", fused)):
        with torch.autocast("cpu", dtype=torch.bfloat16), disable_input_dtype_casting(model):
            out[name] = forward_backward(model, ids)
    assert out["fused"][2] == 4 * len(TARGETS)
    reference = forward_backward(tiny_lm(dropout=0.0), ids)[0]  # fp32: the bf16 noise floor of the PEFT path
    floor = (out["plain"][0].float() - reference).abs().max()
    assert (out["fused"][0].float() - reference).abs().max() <= 2 * floor


def forward_addmm_calls(model, ids) -> int:
    with torch.no_grad(), CountAddmm() as mode:
        model(input_ids=ids)
    return mode.calls


def test_peft_forward_runs_where_the_fused_one_does_not_apply():
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    dora = get_peft_model(transformers.LlamaForCausalLM(config), LoraConfig(r=4, use_dora=True,
                                                                            target_modules=TARGETS))
    assert fuse_lora_output(dora) == 2 * len(TARGETS)
    assert forward_addmm_calls(dora, ids) == 0  # DoRA: PEFT's variant forward

    model = tiny_lm(dropout=0.0)
    fuse_lora_output(model)
    assert forward_addmm_calls(model, ids) == 4 * len(TARGETS)  # (the control: fused when it applies)
    with model.disable_adapter():
        assert forward_addmm_calls(model, ids) == 0  # adapters off: the base layers only
    half = copy.deepcopy(model).to(torch.bfloat16)
    for module in half.modules():  # adapters in fp32, inputs in bf16, casting on: PEFT upcasts, so PEFT runs
        if hasattr(module, "lora_A"):
            module.lora_A.float(), module.lora_B.float()
    assert forward_addmm_calls(half, ids) == 0
    model.merge_adapter()
    assert forward_addmm_calls(model, ids) == 0  # merged: PEFT runs the base layer with the merged weight
