"""Option records declared once: frozen dataclasses whose ``Literal`` and ``bool`` fields check themselves.

A record's fields are the only declaration of its options (name, type, default). The allowed values
of a ``Literal`` field are read from its annotation (:func:`choices`) wherever they are listed: in
errors, in ``python -m bconv.inspect``, in the docs.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from typing import Any, Literal, Mapping, TypeVar

from .errors import ConfigError

__all__ = ["check_fields", "choices", "build", "show_choices"]

R = TypeVar("R")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def choices(cls: type, name: str) -> tuple[Any, ...]:
    """The allowed values of the ``Literal`` field ``name`` of the record class ``cls``."""
    hint = _hints(cls)[name]
    if typing.get_origin(hint) is not Literal:
        raise TypeError(f"{cls.__name__}.{name} is not a Literal field")
    return typing.get_args(hint)


def show_choices(cls: type, name: str) -> str:
    """``'v1', 'v2'``: the allowed values of a ``Literal`` field, as an error message lists them."""
    return ", ".join(map(repr, choices(cls, name)))


def check_fields(record: Any) -> None:
    """Check every ``Literal`` and ``bool`` field of a dataclass instance against its annotation.

    Raises:
        bconv.errors.ConfigError: a value outside its ``Literal``, or a ``bool`` field that holds another type.
    """
    cls = type(record)
    for f in dataclasses.fields(record):
        value, hint = getattr(record, f.name), _hints(cls)[f.name]
        if typing.get_origin(hint) is Literal:
            allowed = typing.get_args(hint)
            if not (isinstance(value, str) and value in allowed):
                raise ConfigError(f"{f.name}={value!r} is not one of {show_choices(cls, f.name)}")
        elif hint is bool and not isinstance(value, bool):
            raise ConfigError(f"{f.name} must be True or False; got {value!r}")


def build(cls: type[R], options: Mapping[str, Any], what: str) -> R:
    """``cls(**options)``, with an unknown option named (and the closest known one) instead of a bare TypeError.

    Raises:
        bconv.errors.ConfigError: an option ``cls`` does not declare; or what ``cls`` itself raises.
    """
    known = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{what} has no option {name!r}.{hint} Its options are: {', '.join(known)}.")
    return cls(**options)
