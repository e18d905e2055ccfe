"""Strict, typed model configs.

Every model config is a dataclass that inherits `Config`. Reading one from JSON is strict: unknown
fields, missing fields and wrongly typed values raise `ConfigError` naming the field, and
`validate()` refuses absurd sizes before any model is built (so a hostile `config.json` cannot make
us allocate a 10^9-entry codebook). The one exception: a field declared with `added_field(default)`,
added after models were saved without it, takes its default when a `config.json` lacks it; the default
must build the model those saves describe.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="Config")
_ADDED = "vqclip_added_field"


class ConfigError(ValueError):
    """A config is malformed: the message names the offending field."""


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """Return `value` coerced to `annotation` (lists to tuples, ints to floats) or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _check_type(name, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"config field {name!r}: {value!r} matches none of {annotation}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"config field {name!r}: expected null, got {type(value).__name__}")
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field {name!r}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"config field {name!r}: expected {len(args)} items, got {len(value)}")
        return tuple(_check_type(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"config field {name!r}: unsupported annotation {annotation}")
    raise ConfigError(f"config field {name!r}: expected {annotation.__name__}, got {type(value).__name__}")


def added_field(default: Any) -> Any:
    """A config field added after models were saved without it: a `config.json` that lacks it loads with
    `default`, which must therefore describe the model those older saves hold."""
    return dataclasses.field(default=default, metadata={_ADDED: True})


@dataclasses.dataclass
class Config:
    """Base class of model configs: JSON round trip with strict checks."""

    # Upper bounds checked by `validate`; subclasses extend this map.
    limits: ClassVar[dict[str, tuple[float, float]]] = {}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError if a field is outside its allowed range."""
        for name, (low, high) in self.limits.items():
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else (value,)
            for v in values:
                if not low <= v <= high:
                    raise ConfigError(f"config field {name!r}: {value!r} is outside [{low}, {high}]")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: Any) -> C:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown config field(s) {unknown}")
        added = {f.name for f in dataclasses.fields(cls) if f.metadata.get(_ADDED)}
        missing = sorted(fields - set(data) - added)
        if missing:
            raise ConfigError(f"{cls.__name__}: missing config field(s) {missing}")
        values = {name: _check_type(name, data[name], hints[name]) for name in fields & set(data)}
        return cls(**values)

    def replace(self: C, overrides: dict[str, Any]) -> C:
        """A copy with some fields changed, checked as strictly as a config read from JSON."""
        return type(self).from_dict({**self.to_dict(), **overrides})

    def replace_json(self: C, text: str | None) -> C:
        """`replace` with a JSON object given on the command line (e.g. --model_config '{"depth": 4}')."""
        if not text:
            return self
        try:
            overrides = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"model config overrides are not valid JSON: {err}") from err
        if not isinstance(overrides, dict):
            raise ConfigError("model config overrides must be a JSON object")
        return self.replace(overrides)
