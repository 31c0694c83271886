"""The fused RMSNorm / SiLU-MLP patch: the same numbers as the upstream classes it replaces, on the installed
transformers; a test here fails as soon as an upstream forward changes what it computes or how it is called."""

from __future__ import annotations

import importlib
import inspect
import types

import pytest
import torch
import transformers
from packaging.specifiers import SpecifierSet

from trl_rejection import fused
from trl_rejection.attention import use_varlen_attention
from trl_rejection.collator import RejectionDataCollator
from trl_rejection.testing.tiny import make_model, make_processor

# transformers modules that define (or generate a copy of) a patched class, for the supported model families
MODULES = ["llama", "mistral", "qwen2", "qwen3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def patched_classes() -> list[type]:
    found = []
    for name in MODULES:
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        found += [getattr(module, c) for c in (*fused.RMS_NORMS, *fused.SILU_MLPS) if hasattr(module, c)]
    return found


@pytest.fixture(autouse=True)
def eager_compile(monkeypatch):
    monkeypatch.setenv("TRL_REJECTION_COMPILE_BACKEND", "eager")  # dynamo tracing without code generation: fast
    fused._COMPILED.clear()
    yield
    fused._COMPILED.clear()


def test_every_patched_class_name_exists_upstream():
    names = {cls.__name__ for cls in patched_classes()}
    assert names == {*fused.RMS_NORMS, *fused.SILU_MLPS}, names
    assert transformers.__version__ in fused.SUPPORTED_TRANSFORMERS


@pytest.mark.parametrize("cls", patched_classes(), ids=lambda c: f"{c.__module__.split('.')[-1]}.{c.__name__}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_forward_equals_the_upstream_forward(cls, dtype):
    """Random weights (not the ones of a fresh RMSNorm: a `(1 + weight)` norm would pass with those), random inputs:
    the patched forward returns the upstream forward's values, bit for bit, and takes the same argument."""
    torch.manual_seed(0)
    is_norm = cls.__name__ in fused.RMS_NORMS
    params = list(inspect.signature(cls.forward).parameters)
    assert params == (["self", "hidden_states"] if is_norm else ["self", "x"]), (cls, params)
    if is_norm:
        module = cls(16, eps=1e-5)
    else:
        module = cls(types.SimpleNamespace(hidden_size=16, intermediate_size=24, hidden_act="silu", mlp_bias=False))
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    module = module.to(dtype)
    x = torch.randn(2, 5, 16, dtype=dtype) * 3
    with torch.no_grad():
        expected = cls.forward(module, x)
        assert fused.fuse_elementwise_ops(module) == 1
        got = module(x)
    assert "forward" in vars(module) and got.dtype == expected.dtype
    assert torch.equal(got, expected), (got - expected).abs().max()


def test_unsupported_transformers_version_patches_nothing(monkeypatch, caplog):
    model = make_model("llama3-text", make_processor("llama3-text"))
    monkeypatch.setattr(fused, "SUPPORTED_TRANSFORMERS", SpecifierSet("<5"))
    assert fused.fuse_elementwise_ops(model) == 0
    assert not any("forward" in vars(m) for m in model.modules())
    assert "outside the checked range" in caplog.text


def test_fused_model_loss_and_gradients_equal_the_eager_model():
    proc = make_processor("llava-1.5")
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A small red square on white."}]}]
    batch = RejectionDataCollator(proc, padding_free=True)([{"messages": messages}] * 3)
    batch.pop("is_refusal")
    ref, patched = make_model("llava-1.5", proc).float(), make_model("llava-1.5", proc).float()
    assert fused.fuse_elementwise_ops(patched) == 2 * 2 + 1 + 2  # 2 layers x (2 norms + MLP) + final norm
    assert fused.fuse_elementwise_ops(patched) == 0  # already patched
    losses = []
    for model in (ref, patched):
        use_varlen_attention(model)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        losses.append(float(loss))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for (name, a), b in zip(ref.named_parameters(), patched.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
