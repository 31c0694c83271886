"""Typed configuration checks shared by every entry point: Python, YAML (`--config`) and command-line flags.

`check_dataclass(obj)` checks each field's value against its type hint and raises a `ConfigError` naming the
option, the value, what was expected and the fix. The config dataclasses call it from `__post_init__` (then check
their own ranges), so `MixConfig(...)`, `RejectionSFTConfig(...)`, the CLI and the recipes all get the same checks.
Fields declared by TRL / transformers classes are left to those libraries.

Rules: `int` takes whole numbers only (not `true`, not `2.5`); `float` takes any number; `bool` only true/false;
`list[str]` a list of strings (a plain string is refused, it would be used one character at a time); `Literal`
one of its choices; `X | None` also null. Text from a YAML file or a flag is first converted as argparse converts
flags (`coerce_text`), so `learning_rate: 2e-5` (a string to YAML) works in both.

Example:
    >>> matches("Sorry.", list[str]), matches(["Sorry."], list[str]), matches(True, int), matches(2, float | None)
    (False, True, False, True)
    >>> coerce_text("learning_rate", "2e-5", float)
    2e-05
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import shlex
import types
from typing import Any, Callable, Iterable, Literal, Union, get_args, get_origin, get_type_hints

from .errors import UserError

FOREIGN_PACKAGES = ("trl", "transformers")  # their dataclass fields keep their own checks
TRUE_TEXT, FALSE_TEXT = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")  # as HfArgumentParser


class ConfigError(UserError):
    """A bad configuration value or option: names the option (and the file it came from), the problem and the fix.

    Example:
        >>> str(ConfigError("seed", "1.5 (float) is not a whole number", "give a whole number, e.g. seed: 0"))
        'seed: 1.5 (float) is not a whole number. Fix: give a whole number, e.g. seed: 0.'
    """

    def __init__(self, option: str, problem: str, fix: str, source: str | None = None):
        self.option, self.problem, self.fix, self.source = option, problem, fix, source
        fix += "" if fix.endswith((".", "?")) else "."
        super().__init__(f"{source + ': ' if source else ''}{option}: {problem}. Fix: {fix}")

    def located(self, source: str | None = None, prefix: str | None = None) -> ConfigError:
        """The same error, said of `source` (a file) and of `prefix.option` (an option inside a block)."""
        option = f"{prefix}.{self.option}" if prefix else self.option
        return ConfigError(option, self.problem, self.fix, source or self.source)


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like `name` (a misspelled option), or None when none is close."""
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_option(name: str, known: Iterable[str], flag: bool = False, source: str | None = None) -> ConfigError:
    """The error for an option that does not exist, suggesting the closest existing name."""
    dash = "--" if flag else ""
    match = closest(name, known)
    fix = f"did you mean {dash}{match}?" if match else "remove it; --help lists every option"
    return ConfigError(f"{dash}{name}", "no such option", fix, source)


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """`typing.get_type_hints(cls)`, cached. `HfArgumentParser` rewrites `Field.type` in place, so read these."""
    return get_type_hints(cls)


def own_fields(cls: type) -> list[str]:
    """Init fields of `cls` declared by this project's classes (not by TRL / transformers base classes)."""
    def owner(name: str) -> type:
        return next(c for c in cls.__mro__ if name in c.__dict__.get("__annotations__", {}))

    return [f.name for f in dataclasses.fields(cls) if f.init
            and owner(f.name).__module__.split(".")[0] not in FOREIGN_PACKAGES]


def _members(hint: Any) -> tuple[Any, ...]:
    return get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)


def non_null(hint: Any) -> list[Any]:
    """The members of a hint other than None: `int | None` -> [int], `list[str]` -> [list[str]]."""
    return [m for m in _members(hint) if m is not type(None)]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe(hint: Any) -> str:
    """Say in words what a type hint accepts: 'a whole number', "one of 'first', 'random'", ..."""
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(describe(m) for m in get_args(hint))
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if get_origin(hint) is list or hint is list:
        item = get_args(hint)
        return f"a list of {describe(item[0]).removeprefix('a ')}s" if item else "a list"
    if get_origin(hint) is dict or hint is dict:
        return "a mapping"
    names = {type(None): "null", bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    return names.get(hint, f"a {getattr(hint, '__name__', hint)}")


def matches(value: Any, hint: Any) -> bool:
    """Whether `value` has the type `hint` says: bool is not int, int is a float, a str is not a list."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list or hint is list:
        return isinstance(value, list) and (not args or all(matches(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict) and (not args or all(matches(k, args[0]) and matches(v, args[1])
                                                            for k, v in value.items()))
    return isinstance(value, hint) if isinstance(hint, type) else True


def _scalar_text(value: Any) -> str:
    """A bool, int or float as YAML and a flag write it (a float's exponent with a dot, which YAML needs)."""
    if isinstance(value, bool):
        return str(value).lower()
    text = repr(value)
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text


def _fix(name: str, hint: Any, value: Any, default: Any = None) -> str:
    members = non_null(hint)
    kind = members[0] if len(members) == 1 else None
    if get_origin(kind) is list or kind is list:
        example = [value] if isinstance(value, str) else ["..."]
        flag = " ".join(shlex.quote(str(v)) for v in example)
        return f"give a list, e.g. {name}: {example} in YAML, --{name} {flag} as a flag"
    examples = {int: "3", float: "2.0e-5", bool: "true"}
    if kind in examples:
        text = _scalar_text(default) if default is not None and matches(default, kind) else examples[kind]
        return f"give {describe(kind)}, e.g. {name}: {text} in YAML, --{name} {text} as a flag"
    return f"give {describe(hint)}"


def check_value(name: str, value: Any, hint: Any, default: Any = None) -> None:
    """Raise a `ConfigError` unless `value` has the type `hint` says (see `matches`); the fix shows the field's
    `default` as the example when it has that type."""
    if matches(value, hint):
        return
    expected = describe(hint)
    accepts_list = any(get_origin(m) is list or m is list for m in _members(hint))
    if isinstance(value, str) and accepts_list:
        problem = f"{_short(value)} is a plain string where {expected} is expected (it would be used one " \
                  "character at a time)"
    else:
        problem = f"{_short(value)} ({type(value).__name__}) is not {expected}"
    raise ConfigError(name, problem, _fix(name, hint, value, default))


def coerce_text(name: str, text: str, hint: Any, default: Any = None) -> Any:
    """Convert text (a YAML string, a flag) as argparse converts a flag of this type; other text is kept as is."""
    members = non_null(hint)
    if len(members) != 1 or members[0] not in (int, float, bool):
        return text
    kind = members[0]
    try:
        if kind is bool:
            if text.lower() not in TRUE_TEXT + FALSE_TEXT:
                raise ValueError(text)
            return text.lower() in TRUE_TEXT
        return kind(text)
    except ValueError:
        raise ConfigError(name, f"{_short(text)} is not {describe(kind)}", _fix(name, hint, text, default)) from None


def check_dataclass(obj: Any, names: Iterable[str] | None = None) -> None:
    """Check the fields `names` of a dataclass instance (default: those this project declares) against their hints."""
    hints = type_hints(type(obj))
    defaults = {f.name: f.default for f in dataclasses.fields(obj) if f.default is not dataclasses.MISSING}
    for name in own_fields(type(obj)) if names is None else names:
        check_value(name, getattr(obj, name), hints[name], defaults.get(name))


def check_range(obj: Any, name: str, ok: Callable[[Any], bool], expected: str, fix: str | None = None) -> None:
    """Raise a `ConfigError` when field `name` is set (not None) and `ok(value)` is false."""
    value = getattr(obj, name)
    if value is not None and not ok(value):
        raise ConfigError(name, f"{_short(value)} is not {expected}", fix or f"give {expected}")


def positive(value: float) -> bool:
    """A finite number > 0 (for counts, lengths and learning rates; NaN and infinity are refused)."""
    return math.isfinite(value) and value > 0


def non_negative(value: float) -> bool:
    """A finite number >= 0."""
    return math.isfinite(value) and value >= 0


def non_empty_strings(value: list[str]) -> bool:
    """Every string has a non-blank character (a blank fragment would match every name, a blank reply is no reply)."""
    return all(s.strip() for s in value)


def json_mapping(option: str, value: Any, what: str) -> dict[str, Any] | None:
    """A block given as a YAML mapping or as JSON text on the command line (`--option '{...}'`), as a dict; None if
    unset. `what` names the expected fields in the fix.

    Example:
        >>> json_mapping("mix", '{"n_refusal": 2}', "MixConfig fields")
        {'n_refusal': 2}
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(option, f"{_short(value)} is not a JSON object ({e.msg})",
                              f"give --{option} a JSON object of {what}, or a YAML block") from None
    if not isinstance(value, dict):
        raise ConfigError(option, f"{_short(value)} is not a mapping", f"give {what} as a YAML block or a JSON object")
    return value


def from_mapping(cls: type, values: Any, option: str) -> Any:
    """Build the dataclass `cls` from a mapping (a YAML block, a JSON object) given as option `option`: unknown keys
    are refused with the closest field name, text is converted as flags are, and `cls`'s own checks run.

    Example:
        >>> from trl_rejection.data import MixConfig
        >>> from_mapping(MixConfig, {"n_refusal": "2", "n_normal": 5}, "mix").counts()
        (2, 5)
    """
    if not isinstance(values, dict):
        raise ConfigError(option, f"{_short(values)} is not a mapping",
                          f"give {cls.__name__} fields as a YAML block or a JSON object")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in values:
        if key not in names:
            raise unknown_option(str(key), names).located(prefix=option)
    hints = type_hints(cls)
    try:
        coerced = {k: coerce_text(k, v, hints[k]) if isinstance(v, str) else v for k, v in values.items()}
        return cls(**coerced)
    except ConfigError as e:
        raise e.located(prefix=option) from None

