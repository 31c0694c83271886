"""Where each assistant reply, and the end-of-turn token after it, sits in a rendered chat template.

Spans are character ranges of the rendered text, found by rendering the conversation's prefixes with the model's
own chat template: the text before assistant turn `i` (rendered with the generation prompt) and the text through
turn `i`. The reply is located inside that difference, so the same words are found however they tokenize in
context. Token labels are then read off the tokenizer's offsets (see `collator.py`); token ids are never searched.

Example:
    >>> from trl_rejection.testing.tiny import make_processor
    >>> proc = make_processor("qwen2.5-vl")
    >>> msgs = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ...         {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}]
    >>> text, turns = render_with_spans(proc, msgs)
    >>> [text[slice(*t.content)] for t in turns], [text[slice(*t.end_of_turn)] for t in turns]
    (['Hello.'], ['<|im_end|>'])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trl_rejection.processing import tokenizer_of


class ChatTemplateError(ValueError):
    """The chat template cannot be used to find assistant spans (and why, and what to do)."""


@dataclass(frozen=True)
class TurnSpan:
    """Character spans of one assistant turn: its reply text and the end-of-turn token that closes it."""

    message_index: int
    content: tuple[int, int]
    end_of_turn: tuple[int, int] | None


def message_text(message: dict[str, Any]) -> str:
    """The text of a message whose content is a string or a list of typed parts."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if part.get("type") == "text")


def special_token_strings(tokenizer: Any) -> list[str]:
    """All special and added-special token strings of `tokenizer`, longest first."""
    strings = set(tokenizer.all_special_tokens)
    strings.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((s for s in strings if s), key=len, reverse=True)


def _render(processing_class: Any, messages: list[dict], generation_prompt: bool, chat_template: str | None) -> str:
    return processing_class.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                chat_template=chat_template)


def render_with_spans(processing_class: Any, messages: list[dict[str, Any]], chat_template: str | None = None,
                      eos_when_missing: str | None = None) -> tuple[str, list[TurnSpan]]:
    """Render `messages` and return the text with one `TurnSpan` per assistant message.

    Args:
        processing_class: a processor or tokenizer with a chat template.
        messages: the conversation (TRL format).
        chat_template: a template overriding the processing class's own.
        eos_when_missing: when a template closes an assistant turn without any special token (llava-hf's
            LLaVA-1.5 template ends replies with a space), insert this string (the EOS token) right after the
            reply, as LLaVA's own training format does, so the model learns to stop. None leaves the text as is.

    Raises:
        ChatTemplateError: the template renders a conversation differently from its prefixes, or rewrites a reply
            beyond trimming whitespace.
    """
    tokenizer = tokenizer_of(processing_class)
    specials = special_token_strings(tokenizer)
    full = _render(processing_class, messages, False, chat_template)
    turns: list[TurnSpan] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render(processing_class, messages[:i], True, chat_template)
        through = _render(processing_class, messages[: i + 1], False, chat_template)
        if not (full.startswith(through) and through.startswith(before)):
            raise ChatTemplateError(
                f"the chat template renders assistant turn {i} differently inside the whole conversation than on "
                "its own (it is not prefix-preserving, e.g. it drops reasoning of earlier turns). Fix: pass a "
                "training chat template that renders every prefix identically (`chat_template=`).")
        text = message_text(msg)
        reply = text.strip()
        start = through.find(reply, len(before))
        if not reply or start < 0:
            raise ChatTemplateError(
                f"assistant turn {i} ({reply[:40]!r}) does not appear verbatim in the rendered template. Fix: use a "
                "chat template that prints assistant text unchanged (trimming whitespace is fine).")
        end = start + len(reply)
        # Whitespace around the reply belongs to it where the template kept it (and not where the template trims).
        lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()):]
        if lead and through[start - len(lead): start] == lead and start - len(lead) >= len(before):
            start -= len(lead)
        if trail and through[end: end + len(trail)] == trail:
            end += len(trail)
        tail = through[end:]
        hits = [(tail.find(s), s) for s in specials if s in tail]
        eot = None
        if hits:
            pos, tok = min(hits, key=lambda h: (h[0], -len(h[1])))
            eot = (end + pos, end + pos + len(tok))
        turns.append(TurnSpan(i, (start, end), eot))
    if eos_when_missing and any(t.end_of_turn is None for t in turns):
        full, turns = _insert_eos(full, turns, eos_when_missing)
    return full, turns


def _insert_eos(text: str, turns: list[TurnSpan], eos: str) -> tuple[str, list[TurnSpan]]:
    """Insert `eos` after each reply lacking an end-of-turn token, shifting every later span."""
    out, pieces, last, shift = [], [], 0, 0
    for t in turns:
        start, end = t.content[0] + shift, t.content[1] + shift
        eot = None if t.end_of_turn is None else (t.end_of_turn[0] + shift, t.end_of_turn[1] + shift)
        if eot is None:
            pieces += [text[last: t.content[1]], eos]
            last = t.content[1]
            eot = (end, end + len(eos))
            shift += len(eos)
        out.append(TurnSpan(t.message_index, (start, end), eot))
    pieces.append(text[last:])
    return "".join(pieces), out
