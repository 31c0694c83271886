"""`StrictTrlParser`: TRL's `TrlParser` (dataclass flags + a `--config` YAML file) with the same checks for both.

TRL applies YAML values as argparse defaults, which skips argparse's type conversion and choice checks, and it
accepts unknown YAML keys until the end and abbreviated flags. This parser:

- refuses unknown YAML keys and unknown or abbreviated flags, suggesting the closest option (`--lerning_rate`:
  "did you mean --learning_rate?");
- converts YAML text as flags are converted and checks each YAML value against its field's type hint
  (`trl_rejection.validation`), naming the file; fields of TRL / transformers classes get the scalar checks
  (whole number, number, true/false, choices) their flags get;
- builds dataclasses given as a block (`nested={"mix": MixConfig}`: a YAML mapping or a JSON string), refusing
  unknown keys and checking values the same way;
- raises `ConfigError` (one line under `user_errors()`) instead of printing usage and exiting.

Example:
    >>> from trl_rejection.data import MixConfig
    >>> (cfg,) = StrictTrlParser(MixConfig).parse_args_and_config(["--n_refusal", "2", "--n_normal", "5"])
    >>> cfg.counts()
    (2, 5)
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any, Iterable, Literal, NoReturn, get_origin

import yaml
from trl import TrlParser

from .validation import (ConfigError, check_value, coerce_text, describe, from_mapping, json_mapping, non_null,
                         own_fields, type_hints, unknown_option)


def _scalar(hint: Any) -> bool:
    """A hint whose flag argparse converts and checks: int, float, bool, Literal (or one of them | None)."""
    members = non_null(hint)
    return len(members) == 1 and (members[0] in (int, float, bool) or get_origin(members[0]) is Literal)


class StrictTrlParser(TrlParser):
    """`TrlParser` that checks YAML values as strictly as flags and refuses unknown options (see the module doc)."""

    def __init__(self, dataclass_types: type | Iterable[type], nested: dict[str, type] | None = None, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)  # `--learn 1e-4` must not silently mean --learning_rate
        super().__init__(dataclass_types, **kwargs)
        self.nested = nested or {}
        self.fields: dict[str, tuple[Any, bool]] = {}  # option -> (type hint, declared by this project)
        self.defaults: dict[str, Any] = {}  # option -> its default (shown in the fix of a mistyped value)
        for cls in self.dataclass_types:
            ours = set(own_fields(cls))
            self.fields.update({f.name: (type_hints(cls)[f.name], f.name in ours)
                                for f in dataclasses.fields(cls) if f.init})
            self.defaults.update({f.name: f.default for f in dataclasses.fields(cls)
                                  if f.init and f.default is not dataclasses.MISSING})

    def parse_args_and_config(self, args: Iterable[str] | None = None) -> tuple[Any, ...]:
        """Parse `--config FILE` (YAML) and flags (which override it) into the dataclasses, checking both.

        Anything unknown is an error, so TRL's options to return leftover strings are not offered."""
        args = [part for arg in (sys.argv[1:] if args is None else args)
                for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
        path, config = None, {}
        if "--config" in args:
            at = args.index("--config")
            if at + 1 == len(args):
                raise ConfigError("--config", "no file was given", "give the path of a YAML file: --config FILE")
            path = args[at + 1]
            del args[at:at + 2]
            config = self._read_config(path)
            self.set_defaults_with_config(**config)
        try:
            outputs = self.parse_args_into_dataclasses(args=args)
        except ConfigError as e:  # a range check in a dataclass: name the file if the value came from it
            flags = {a.split("=", 1)[0].lstrip("-").replace("-", "_") for a in args if a.startswith("--")}
            if e.option in config and e.option not in flags:
                raise e.located(source=path) from None
            raise
        for obj in outputs:  # blocks from flags (JSON); from YAML they were checked with the file named
            for name, cls in self.nested.items():
                if hasattr(obj, name):
                    setattr(obj, name, self._nested(name, getattr(obj, name), cls))
        return outputs

    def _read_config(self, path: str) -> dict[str, Any]:
        """The checked values of a YAML config file; its `env:` block is applied to the environment as TRL does."""
        try:
            with open(path, encoding="utf-8-sig") as f:
                config = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError("--config", f"cannot read {path}: {e.strerror}", "give the path of a YAML file") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError("--config", f"{path} is not valid YAML ({' '.join(str(e).split())})",
                              "fix the file's syntax") from None
        if not isinstance(config, dict):
            raise ConfigError("--config", f"{path} holds {type(config).__name__}, not a mapping of options",
                              "write one `option: value` per line")
        env = config.pop("env", {})
        if not isinstance(env, dict):
            raise ConfigError("env", f"{env!r} is not a mapping", "give `env:` a block of NAME: value lines", path)
        try:
            config = {key: self._yaml_value(str(key), value) for key, value in config.items()}
        except ConfigError as e:
            raise e.located(source=path) from None
        os.environ.update({str(k): str(v) for k, v in env.items()})
        return config

    def _yaml_value(self, key: str, value: Any) -> Any:
        """A YAML value converted as its flag would be, and checked against the field's type hint."""
        if key not in self.fields:
            raise self._unknown(key, flag=False)
        hint, ours = self.fields[key]
        if key in self.nested:
            return self._nested(key, value, self.nested[key])
        if isinstance(value, str):
            value = coerce_text(key, value, hint, self.defaults.get(key))
        if ours or _scalar(hint):  # other fields of TRL / transformers keep TRL's handling (e.g. a str for a list)
            check_value(key, value, hint, self.defaults.get(key))
        return value

    def _nested(self, name: str, value: Any, cls: type) -> dict[str, Any] | None:
        """The block `name` (a mapping, or JSON text from a flag) checked by building `cls` from it; returned as a
        mapping of the given keys to their converted values."""
        value = json_mapping(name, value, f"{cls.__name__} fields")
        if value is None:
            return None
        built = from_mapping(cls, value, name)
        return {key: getattr(built, key) for key in value}

    def parse_known_args(self, args: list[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:
        """argparse's, refusing anything left over (unknown flags, stray values) with the closest option's name."""
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            flags = [a for a in extras if a.startswith("-") and not re.fullmatch(r"-[\d.]+(e-?\d+)?", a)]
            if not flags:
                raise ConfigError(repr(extras[0]), "a value without an option",
                                  "put it after its --option, or quote a value that contains spaces")
            raise self._unknown(flags[0].split("=", 1)[0].lstrip("-"), flag=True)
        return namespace, extras

    def _unknown(self, name: str, flag: bool) -> ConfigError:
        """The error for an unknown option; one that belongs in a nested block (`n_refusal` of `mix`) says so."""
        for block, cls in self.nested.items():
            if name in {f.name for f in dataclasses.fields(cls)}:
                return ConfigError(f"--{name}" if flag else name, f"is a field of the {block} block, not an option",
                                   f"put it in the {block}: block of the YAML file, or give --{block} "
                                   f"'{{\"{name}\": ...}}'")
        known = [o.lstrip("-") for o in self._option_string_actions] if flag else list(self.fields)
        return unknown_option(name, known, flag=flag)

    def error(self, message: str) -> NoReturn:
        """argparse's errors (bad flag values, missing values) as a `ConfigError` with the fix, not usage + exit."""
        found = re.match(r"argument ([^:]+): (.*)", message)
        if not found:
            raise ConfigError("arguments", message, "see --help")
        option, problem = found[1].split("/")[0], found[2]
        dest = option.lstrip("-").replace("-", "_")
        if dest in self.fields and not problem.startswith("expected"):
            hint = self.fields[dest][0]
            members = non_null(hint)  # a flag cannot be null
            fix = f"give {option} {describe(members[0] if len(members) == 1 else hint)}"
        else:
            fix = f"give a value after {option}, or drop the flag"
        raise ConfigError(option, problem, fix)
