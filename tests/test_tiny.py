"""`trl_rejection.testing.tiny`: offline tiny models and processors with real templates, tokens and classes."""

import functools
import hashlib
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.utils import is_torchvision_available

from trl_rejection.testing.tiny import FAMILIES, TEXT_FAMILIES, VLM_FAMILIES, chat_template, make_model, make_processor
from trl_rejection.testing.tiny_tokenizers import template_source

IMAGE = Image.new("RGB", (32, 32), (255, 0, 0))
# family: (markers the rendered conversation contains, expanded image token, its count for IMAGE)
EXPECTED = {
    "llava-1.5": (("USER: <image>\nWhat is this? ", "ASSISTANT: A red square. "), "<image>", 4),
    "llava-next": (("[INST] <image>\nWhat is this? [/INST]", " A red square.</s> "), "<image>", 24),
    "qwen2-vl": (("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>",
                  "<|im_start|>assistant\nA red square.<|im_end|>\n"), "<|image_pad|>", 4),
    "qwen2.5-vl": (("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>",
                    "<|im_start|>assistant\nA red square.<|im_end|>\n"), "<|image_pad|>", 4),
    "qwen3-vl": (("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>",
                  "<|im_start|>assistant\nA red square.<|im_end|>\n"), "<|image_pad|>", 4),
    "idefics3": (("<|begin_of_text|>User:<image>What is this?<end_of_utterance>\n",
                  "Assistant: A red square.<end_of_utterance>\n"), "<image>", 4),
    "smolvlm": (("<|im_start|>User:<image>What is this?<end_of_utterance>\n",
                 "Assistant: A red square.<end_of_utterance>\n"), "<image>", 4),
    "gemma3": (("<bos><start_of_turn>user\n<start_of_image>What is this?<end_of_turn>\n",
                "<start_of_turn>model\nA red square.<end_of_turn>\n"), "<image_soft_token>", 4),
    "llama3-text": (("<|start_header_id|>user<|end_header_id|>\n\nWhat is this?<|eot_id|>",
                     "<|start_header_id|>assistant<|end_header_id|>\n\nA red square.<|eot_id|>"), None, 0),
    "qwen2.5-text": (("<|im_start|>user\nWhat is this?<|im_end|>", "<|im_start|>assistant\nA red square.<|im_end|>"),
                     None, 0),
}  # fmt: skip
# sha256 of each family's template as vendored before TRL's copies were read (the Hub repos' bytes, see tiny.py)
TEMPLATE_SHA256 = {
    "llava-1.5": "6fef09c05345e88b9f85e80bcb3491003332050750586568bdf91cfa81965d0c",
    "llava-next": "2c17243a977fd0643fb549a509a8e2684f45517df0f9f608d5893b719f16569f",
    "qwen2-vl": "a0bc6f6fc7a29a80017a433e8f03a1cc1236e838a944a2d034295a60c4f2fddb",
    "qwen2.5-vl": "a0bc6f6fc7a29a80017a433e8f03a1cc1236e838a944a2d034295a60c4f2fddb",
    "qwen3-vl": "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4",  # TRL's copy (no vendored one)
    "idefics3": "0d7e56ca41705b79932de707b22bc855c3cfcefae62f1ac5e458560654883d2e",
    "smolvlm": "830005085ddd94cec605b6e21b885b28ffad6e3f82ee6a212c523533e8f04f01",
    "gemma3": "7de1c58e208eda46e9c7f86397df37ec49883aeece39fb961e0a6b24088dd3c4",
    "llama3-text": "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65",
    "qwen2.5-text": "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f",
}
QWEN_VL_NEEDS_TORCHVISION = "transformers loads a Qwen-VL processor's video processor, which needs torchvision"


def conversation(family):
    if family in TEXT_FAMILIES:
        return [{"role": "user", "content": "What is this?"}, {"role": "assistant", "content": "A red square."}]
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
    ]


def encode(processor, family, text, **kwargs):
    """Tokenize rendered `text` as `apply_chat_template` does (bos only if the template rendered none), with IMAGE."""
    bos = getattr(processor, "tokenizer", processor).bos_token
    kwargs.update(add_special_tokens=bos is None or not text.startswith(bos), return_tensors="pt")
    if family in TEXT_FAMILIES:
        return processor(text, **kwargs)
    return processor(text=text, images=[IMAGE], **kwargs)


@functools.cache
def tokenizer_of(family):
    processor = make_processor(family)
    return getattr(processor, "tokenizer", processor)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    family = request.param
    processor = make_processor(family)
    return family, processor, make_model(family, processor)


def test_templates_are_the_shipped_ones():
    """TRL's `trl/chat_templates/` files (or ours, for llava-1.5) are still the Hub bytes pinned here: a TRL release
    that edits one in place fails this test (TRL adds a revision as `<name>_v2.jinja` instead)."""
    for family in FAMILIES:
        source = template_source(family)
        assert source.is_file() and source.name.endswith(".jinja"), source
        assert hashlib.sha256(chat_template(family).encode()).hexdigest() == TEMPLATE_SHA256[family], source
    assert {f for f in FAMILIES if "trl" in Path(str(template_source(f))).parts} == set(FAMILIES) - {"llava-1.5"}
    # transformers' tests/models/llava/test_processor_llava.py renders llava-hf/llava-1.5-7b-hf's template so:
    content = [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]
    messages = [{"role": "user", "content": content}]
    prompt = make_processor("llava-1.5").apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    with pytest.raises(ValueError, match="Unknown family"):
        make_processor("llava-2")


def test_render_train_generate(tiny):
    family, processor, model = tiny
    markers, image_token, n_image_tokens = EXPECTED[family]
    messages = conversation(family)
    text = processor.apply_chat_template(messages, tokenize=False)
    assert all(marker in text for marker in markers), text

    if family in VLM_FAMILIES:  # the image inside the message, as TRL's prepare_multimodal_messages puts it
        messages[0]["content"][0]["image"] = IMAGE
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], encode(processor, family, text)["input_ids"])
    tokenizer = getattr(processor, "tokenizer", processor)
    assert tokenizer.unk_token_id not in inputs["input_ids"][0].tolist()
    if image_token:
        image_id = tokenizer.convert_tokens_to_ids(image_token)
        assert (inputs["input_ids"] == image_id).sum() == n_image_tokens
        assert model.config.image_token_id == image_id

    assert model.config.get_text_config().vocab_size == len(tokenizer)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert torch.isfinite(loss)
    loss.backward()
    generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("tiny", VLM_FAMILIES, indirect=True)
def test_offsets_map_text_onto_expanded_image_tokens(tiny):
    family, processor, _ = tiny
    text = processor.apply_chat_template(conversation(family), tokenize=False)
    out = encode(processor, family, text, return_offsets_mapping=True, return_text_replacement_offsets=True)
    (replacement,) = out["text_replacement_offsets"][0]
    (start, end), (new_start, new_end) = replacement["span"], replacement["new_span"]
    assert text[start:end] == replacement["text"] == processor.image_token
    offsets = out["offset_mapping"][0].tolist()
    assert len(offsets) == out["input_ids"].shape[1]

    # the tokens inside the new span are the image's; the answer, shifted by the expansion, maps back onto its tokens
    _, image_token, n_image_tokens = EXPECTED[family]
    tokenizer = processor.tokenizer
    ids = out["input_ids"][0].tolist()
    inside = [token for token, (a, b) in zip(ids, offsets) if new_start <= a < b <= new_end]
    assert inside.count(tokenizer.convert_tokens_to_ids(image_token)) == n_image_tokens
    answer_start = text.index("A red square.") + (new_end - new_start) - (end - start)
    answer = [i for i, (a, b) in enumerate(offsets) if a < answer_start + len("A red square.") and b > answer_start]
    assert tokenizer.decode(out["input_ids"][0, answer]).strip() == "A red square."


def test_save_and_load_offline(tiny, tmp_path, monkeypatch):
    family, processor, model = tiny
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model.save_pretrained(tmp_path / "model")
    model_class = AutoModelForImageTextToText if family in VLM_FAMILIES else AutoModelForCausalLM
    loaded = model_class.from_pretrained(tmp_path / "model")
    assert type(loaded) is type(model)
    inputs = encode(processor, family, processor.apply_chat_template(conversation(family), tokenize=False))
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)

    processor.save_pretrained(tmp_path / "processor")
    if family.startswith("qwen") and family in VLM_FAMILIES and not is_torchvision_available():
        pytest.skip(QWEN_VL_NEEDS_TORCHVISION)
    loaded = (AutoProcessor if family in VLM_FAMILIES else AutoTokenizer).from_pretrained(tmp_path / "processor")
    assert type(loaded) is type(processor)
    assert loaded.chat_template == chat_template(family)
    text = loaded.apply_chat_template(conversation(family), tokenize=False)
    assert torch.equal(encode(loaded, family, text)["input_ids"], inputs["input_ids"])


def test_processors_are_fresh():
    first, second = make_processor("qwen2.5-text"), make_processor("qwen2.5-text")
    first.add_tokens(["<new>"])
    assert len(first) == len(second) + 1


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=40, deadline=None)
@given(text=st.text(min_size=1, max_size=40).filter(lambda s: "\u2581" not in s))
def test_any_unicode_encodes_without_unk_and_decodes_back(family, text):
    tokenizer = tokenizer_of(family)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert encoding["input_ids"] and tokenizer.unk_token_id not in encoding["input_ids"]
    assert all(0 <= a <= b <= len(text) for a, b in encoding["offset_mapping"])
    expected = unicodedata.normalize("NFC", text) if family.startswith("qwen") else text  # Qwen2 normalizes to NFC
    assert tokenizer.decode(encoding["input_ids"]) == expected
