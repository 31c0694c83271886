"""One record shape for every source format: LLaVA conversations and TRL messages normalised to

    {"id": "42", "images": ["coco/42.jpg"], "turns": [("user", "What is this?", 1), ("assistant", "A cat.", 0)]}

Each turn is `(role, text, n_images)`: `text` has its image placeholders removed and `n_images` says how many images
that turn carried (LLaVA's training code moves them to the start of the turn; so do we). A record that cannot be
normalised raises `MixDataError` naming the file, the record and the fix.

Example:
    >>> normalize_record({"id": 1, "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>Hi"},
    ...                   {"from": "gpt", "value": "Hello."}]}, "f.json", 0)["turns"]
    [('user', 'Hi', 1), ('assistant', 'Hello.', 0)]
"""

from __future__ import annotations

from typing import Any

from ..errors import MixDataError

IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

Record = dict[str, Any]


class _Bad(Exception):
    """Raised inside record validation; `normalize_record` adds the file and record id."""

    def __init__(self, field: str | None, problem: str, fix: str):
        super().__init__(field, problem, fix)


def _check_turns(turns: list[tuple[str, str, int]]) -> None:
    """Turns must be: optional system, then user/assistant alternating, ending with a non-empty reply."""
    offset = 1 if turns and turns[0][0] == "system" else 0
    if len(turns) == offset:
        raise _Bad("conversations", "has no user/assistant turns", "give at least one human turn and one gpt reply")
    for i in range(offset, len(turns)):
        role, text, _ = turns[i]
        expected = "user" if (i - offset) % 2 == 0 else "assistant"
        if role != expected:
            raise _Bad(f"conversations[{i}]", f"turn {i} is {role!r} where {expected!r} was expected (turns out of "
                       "order)", "order the turns human, gpt, human, gpt, ... starting with a human turn")
        if role == "assistant" and not text.strip():
            raise _Bad(f"conversations[{i}]", "the reply is empty", "give every gpt turn a non-empty reply or drop "
                       "the record")
    if turns[-1][0] != "assistant":
        raise _Bad("conversations", "ends with a human turn that has no reply",
                   "end every conversation with a gpt reply or drop the unanswered last turn")


def _split_placeholders(text: str) -> tuple[str, int]:
    n = text.count(IMAGE_PLACEHOLDER)
    return (text.replace(IMAGE_PLACEHOLDER, "").strip() if n else text), n


def record_id(obj: Any, index: int) -> str:
    """The record's `id` as a string, or its position in the source when it has none."""
    rid = obj.get("id") if isinstance(obj, dict) else None
    return str(index) if rid is None else str(rid)


def normalize_record(obj: Any, file: str, index: int) -> Record:
    """Validate one LLaVA (`conversations`) or TRL (`messages`) record and return the normalised form."""
    try:
        return _normalize(obj, index)
    except _Bad as bad:
        raise MixDataError(file, record_id(obj, index), *bad.args) from None


def _normalize(obj: Any, index: int) -> Record:
    if not isinstance(obj, dict):
        raise _Bad(None, f"record #{index} is a {type(obj).__name__}, not an object",
                   "make every record a JSON object with 'conversations' (LLaVA) or 'messages' (TRL)")
    if "conversations" in obj:
        turns = _llava_turns(obj["conversations"])
        images, fld = obj.get("image", obj.get("images")), "image"
    elif "messages" in obj:
        turns = _trl_turns(obj["messages"])
        images, fld = obj.get("images", obj.get("image")), "images"
    else:
        raise _Bad("conversations", "the record has no 'conversations' (LLaVA) or 'messages' (TRL) list",
                   "add the conversation, or drop the record")
    if images is None:
        images = []
    elif not isinstance(images, list):
        images = [images]
    for k, im in enumerate(images):
        if not _is_image(im):
            raise _Bad(f"{fld}[{k}]" if len(images) > 1 else fld, f"expected an image path, got {im!r}",
                       "give image paths as non-empty strings relative to the image root")
    n_placeholders = sum(t[2] for t in turns)
    if n_placeholders and n_placeholders != len(images):
        raise _Bad(fld, f"the text has {n_placeholders} image placeholder(s) but the record has {len(images)} "
                   "image(s)", "give one image per <image> placeholder")
    _check_turns(turns)
    if images and not n_placeholders:  # LLaVA attaches an unplaced image to the first user turn
        first = next(i for i, t in enumerate(turns) if t[0] == "user")
        turns[first] = (turns[first][0], turns[first][1], len(images))
    return {"id": record_id(obj, index), "images": images, "turns": turns}


def _is_image(image: Any) -> bool:
    """A non-empty path, or `datasets.Image` storage: {"bytes": bytes or None, "path": str or None}, not both None."""
    if isinstance(image, dict):
        data, path = image.get("bytes"), image.get("path")
        return isinstance(data, (bytes, type(None))) and isinstance(path, (str, type(None))) and bool(data or path)
    return isinstance(image, str) and bool(image)


def _llava_turns(conv: Any) -> list[tuple[str, str, int]]:
    if not isinstance(conv, list) or not conv:
        raise _Bad("conversations", "is missing, empty or not a list", "give a list of {from, value} turns")
    turns = []
    for i, turn in enumerate(conv):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        role = LLAVA_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise _Bad(f"conversations[{i}].from", f"unknown speaker in {turn!r}",
                       "use 'from': 'human' or 'gpt' (or 'system' first)")
        value = turn.get("value")
        if not isinstance(value, str):
            raise _Bad(f"conversations[{i}].value", f"expected a string, got {type(value).__name__}",
                       "give every turn a text 'value'")
        n = value.count(IMAGE_PLACEHOLDER)  # inlined `_split_placeholders`: this loop runs for every turn
        turns.append((role, value.replace(IMAGE_PLACEHOLDER, "").strip() if n else value, n))
    return turns


def _trl_turns(messages: Any) -> list[tuple[str, str, int]]:
    if not isinstance(messages, list) or not messages:
        raise _Bad("messages", "is missing, empty or not a list", "give a list of {role, content} messages")
    turns = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise _Bad(f"messages[{i}].role", f"unknown role in {msg!r}", "use 'system', 'user' or 'assistant'")
        content = msg.get("content")
        if isinstance(content, str):
            turns.append((msg["role"], *_split_placeholders(content)))
            continue
        if not isinstance(content, list):
            raise _Bad(f"messages[{i}].content", f"expected a string or a list of parts, got "
                       f"{type(content).__name__}", "give content as a string or [{'type': 'text', 'text': ...}, "
                       "{'type': 'image'}]")
        texts, n_images = [], 0
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                n_images += 1
            elif kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise _Bad(f"messages[{i}].content", f"unsupported content part {part!r}",
                           "use {'type': 'text', 'text': str} or {'type': 'image'} parts")
        text, n_inline = _split_placeholders("".join(texts))
        turns.append((msg["role"], text, n_images + n_inline))
    return turns
