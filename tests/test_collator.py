"""Label masks, token by token, for every supported chat template (checked against decoded text)."""

from __future__ import annotations

import functools
import logging
import unicodedata

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from trl_rejection.collator import RejectionDataCollator, TruncationError
from trl_rejection.constants import DEFAULT_REFUSAL, IGNORE_INDEX
from trl_rejection.spans import special_token_strings
from trl_rejection.testing.tiny import FAMILIES, TEXT_FAMILIES, VLM_FAMILIES, make_processor

END_OF_TURN = {"llava-1.5": "</s>", "llava-next": "</s>", "qwen2-vl": "<|im_end|>", "qwen2.5-vl": "<|im_end|>",
               "qwen3-vl": "<|im_end|>", "idefics3": "<end_of_utterance>", "smolvlm": "<end_of_utterance>",
               "gemma3": "<end_of_turn>", "llama3-text": "<|eot_id|>", "qwen2.5-text": "<|im_end|>"}
IMAGE = Image.new("RGB", (32, 32), (200, 30, 30))


@functools.lru_cache(maxsize=None)
def processor(family: str):
    return make_processor(family)


def user(text: str, n_images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image", "text": None}] * n_images + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def runs(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of labelled positions."""
    pos = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    out: list[list[int]] = []
    for p in pos:
        if out and out[-1][-1] == p - 1:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def norm(text: str) -> str:
    return unicodedata.normalize("NFC", text).strip()


def decode(tok, ids) -> str:
    return norm(tok.decode(ids))


def row(family: str, messages: list[dict], n_images: int, is_refusal: bool | None) -> dict:
    ex = {"messages": messages, "images": [IMAGE] * n_images if family in VLM_FAMILIES else []}
    if is_refusal is not None:
        ex["is_refusal"] = is_refusal
    return ex


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_decode_to_replies_and_end_of_turn(family):
    proc = processor(family)
    collate = RejectionDataCollator(proc)
    tok = collate.tokenizer
    n_img = 1 if family in VLM_FAMILIES else 0
    normal = row(family, [user("What is this?", n_img), assistant("A red square."), user("And?"),
                          assistant("Nothing else.")], n_img, False)
    refusal = row(family, [user("Describe the scan.", n_img), assistant(DEFAULT_REFUSAL)], n_img, None)
    batch = collate([normal, refusal])
    ids, labels = batch["input_ids"], batch["labels"]
    eot = END_OF_TURN[family]
    assert [decode(tok, ids[0][r]) for r in runs(labels[0])] == [f"A red square.{eot}", f"Nothing else.{eot}"]
    assert [decode(tok, ids[1][r]) for r in runs(labels[1])] == [DEFAULT_REFUSAL]  # no end-of-turn, no EOS
    assert batch["is_refusal"].tolist() == [False, True]  # second row found by exact match
    assert (labels[batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert ((labels == IGNORE_INDEX) | (labels == ids)).all()


@pytest.mark.parametrize("family", ["llava-1.5", "qwen2-vl", "qwen3-vl", "gemma3", "llama3-text"])
def test_refusal_label_tokens_and_unmasked_eos(family):
    proc = processor(family)
    n_img = 1 if family in VLM_FAMILIES else 0
    ex = row(family, [user("Describe it.", n_img), assistant(DEFAULT_REFUSAL)], n_img, True)
    full = RejectionDataCollator(proc)([ex])
    first4 = RejectionDataCollator(proc, refusal_label_tokens=4)([ex])
    with_eos = RejectionDataCollator(proc, mask_refusal_eos=False)([ex])
    full_pos = runs(full["labels"][0])[0]
    assert runs(first4["labels"][0]) == [full_pos[:4]]
    assert runs(with_eos["labels"][0]) == [full_pos + [full_pos[-1] + 1]]
    tok = proc.tokenizer if family in VLM_FAMILIES else proc
    assert tok.convert_ids_to_tokens(int(with_eos["input_ids"][0, full_pos[-1] + 1])) == END_OF_TURN[family]


_SAFE_TEXT = st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs"), exclude_characters="<>▁"),
                     min_size=1, max_size=60).filter(lambda s: s.strip())
_LONG_TEXT = st.lists(_SAFE_TEXT, min_size=1, max_size=12).map(" ".join)


@st.composite
def conversations(draw):
    turns = draw(st.integers(1, 4))
    n_images = draw(st.integers(0, 2))
    msgs = []
    for t in range(turns):
        msgs.append(user(draw(_SAFE_TEXT), n_images if t == 0 else 0))
        msgs.append(assistant(draw(st.one_of(_SAFE_TEXT, _LONG_TEXT))))
    return msgs, n_images


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv=conversations(), sentence=_SAFE_TEXT, k=st.one_of(st.none(), st.integers(1, 6)))
@example(conv=([user("0"), assistant("0 ")], 0), sentence="0", k=None)  # kept trailing space is part of the reply
@example(conv=([user("q", 1), assistant("  lead"), user("r"), assistant("x\u3000")], 1), sentence=" Sorry ", k=2)
def test_property_labels_for_random_conversations(family, conv, sentence, k):
    """Refusal rows: labels decode to exactly the refusal prefix and include no special token. Normal rows: one
    labelled run per reply, decoding to the reply followed by its end-of-turn token."""
    msgs, n_images = conv
    n_images = n_images if family in VLM_FAMILIES else 0
    if n_images == 0:
        msgs = [user(msgs[0]["content"][-1]["text"])] + msgs[1:]
    proc = processor(family)
    collate = RejectionDataCollator(proc, refusal_sentences=[sentence], refusal_label_tokens=k)
    tok = collate.tokenizer
    refusal_msgs = [msgs[0], assistant(sentence)]
    batch = collate([row(family, msgs, n_images, False), row(family, refusal_msgs, n_images, True)])
    ids, labels = batch["input_ids"], batch["labels"]
    specials = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(s) for s in special_token_strings(tok)}

    normal_runs = runs(labels[0])
    replies = [m["content"][0]["text"] for m in msgs if m["role"] == "assistant"]
    assert len(normal_runs) == len(replies)
    eot = END_OF_TURN[family]
    for r, reply in zip(normal_runs, replies):
        assert int(ids[0][r[-1]]) in specials and tok.convert_ids_to_tokens(int(ids[0][r[-1]])) == eot
        assert decode(tok, ids[0][r[:-1]]) == norm(reply)

    (refusal_run,) = runs(labels[1])
    labelled = ids[1][refusal_run]
    assert not specials & set(labelled.tolist())
    # The whole reply's labels (k=None): they decode to the sentence and the end-of-turn token comes right after
    whole = RejectionDataCollator(proc, refusal_sentences=[sentence])([row(family, refusal_msgs, n_images, True)])
    (whole_run,) = runs(whole["labels"][0])
    assert decode(tok, whole["input_ids"][0][whole_run]) == norm(sentence)
    end_of_turn = whole_run[-1] + 1
    assert tok.convert_ids_to_tokens(int(whole["input_ids"][0][end_of_turn])) == eot
    # With k drawn or not: the labels are the first k of those (a prefix may end inside a multi-byte character) and
    # the end-of-turn token after the reply stays unlabelled
    assert refusal_run == whole_run[:k] and ids[1][end_of_turn] == whole["input_ids"][0][end_of_turn]
    assert labels[1][end_of_turn] == IGNORE_INDEX and whole["labels"][0][end_of_turn] == IGNORE_INDEX


def test_truncation_never_labels_wrong_tokens(caplog):
    proc = processor("llava-1.5")
    long_refusal = row("llava-1.5", [user("q " * 30, 1), assistant(DEFAULT_REFUSAL)], 1, True)
    long_normal = row("llava-1.5", [user("q", 1), assistant("word " * 80)], 1, False)
    short = row("llava-1.5", [user("q", 1), assistant("ok.")], 1, False)
    full = RejectionDataCollator(proc)([long_refusal])
    refusal_start = runs(full["labels"][0])[0][0]
    collate = RejectionDataCollator(proc, max_length=refusal_start + 3)
    with caplog.at_level(logging.WARNING):
        batch = collate([long_refusal, long_normal, short])
    assert "would cut into the refusal reply" in caplog.text
    assert batch["input_ids"].shape == (2, refusal_start + 3)
    assert batch["is_refusal"].tolist() == [False, False]
    untruncated = RejectionDataCollator(proc)([long_normal, short])
    kept = untruncated["labels"][:, : refusal_start + 3]
    assert torch.equal(batch["labels"], kept)
    with pytest.raises(TruncationError, match="cut into the refusal reply"):
        RejectionDataCollator(proc, max_length=refusal_start + 3, truncation="error")([long_refusal])
    with pytest.raises(TruncationError, match="cut into an image"):
        RejectionDataCollator(proc, max_length=3, truncation="error")([short])


def test_clear_errors():
    tok = make_processor("llama3-text")
    with pytest.raises(ValueError, match="has 1 image"):
        RejectionDataCollator(tok)([{"id": "r9", "messages": [user("hi"), assistant("yo")], "images": [IMAGE]}])
    tok.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        RejectionDataCollator(tok)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_text_only_rows_from_a_mix(family):
    """Rows of a built mix (typed content, empty image list) work with text-only tokenizers."""
    collate = RejectionDataCollator(processor(family))
    batch = collate([row(family, [user("hi"), assistant(DEFAULT_REFUSAL)], 0, None)])
    assert decode(collate.tokenizer, batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX]) == DEFAULT_REFUSAL
