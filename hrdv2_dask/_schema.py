"""The machinery of the options schema: settings dataclasses whose fields carry their options.

A field made with :func:`option` carries its name (the YAML key and Python keyword), its type
(the annotation), its default, its limits and its help. From that one definition come:

- the check, run in ``__post_init__`` (the same message whether the value came from YAML, the
  command line or Python: what failed, the value and the fix);
- ``from_dict`` for YAML sections (unknown keys get "did you mean"), ``to_dict`` for attrs;
- the command-line arguments (:meth:`Settings.add_arguments`, :meth:`Settings.from_args`);
- the keyword options of :func:`hrdv2_dask.extract` and of the analyses.

The settings themselves are in :mod:`hrdv2_dask.config` (and each analysis's module). A leaf:
it imports nothing of the package but the errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError

__all__ = ["Settings", "Spec", "key_value", "option", "unknown_key"]


@dataclass(frozen=True)
class Spec:
    """Everything about one option but its name, type and default (which the field has)."""

    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    # a check beyond type, range and choices: value -> None if fine, else what it must be
    check: Callable[[Any], str | None] | None = None
    fix: str = ""
    cli: str | None = None  # the flag; None: --name-with-dashes; "": not on the command line
    short: str | None = None  # e.g. "-k"
    metavar: str | None = None
    positional: bool = False  # a positional argument on the command line
    repeat: bool = False  # the flag is given once per item of a tuple (--point Y,X --point ...)
    api: str | None = None  # the Python keyword, where it differs from the YAML key
    # Python-only values that skip the checks (a backbone object, a mask array): value -> bool
    python_value: Callable[[Any], bool] | None = None


def option(default: Any, help: str, **spec: Any) -> Any:
    """A settings field: ``default`` and the :class:`Spec` built from ``help`` and ``spec``."""
    return field(default=default, metadata={"spec": Spec(help=help, **spec)})


def unknown_key(
    key: str, known: list[str] | tuple[str, ...], where: str, *, what: str = "key"
) -> ConfigError:
    """The error for an unknown key (or keyword, ``what``), with the closest known one.

    >>> str(unknown_key("tile_px", ["tile", "out_stride"], "features."))
    "Unknown key features.tile_px. Did you mean 'tile'? Known keys: ['out_stride', 'tile']."
    """
    hint = difflib.get_close_matches(str(key), list(known), n=1)
    extra = f" Did you mean {hint[0]!r}?" if hint else ""
    return ConfigError(f"Unknown {what} {where}{key}.{extra} Known {what}s: {sorted(known)}.")


# --- types ----------------------------------------------------------------------------------


def _optional(tp: Any) -> tuple[Any, bool]:
    """``(inner type, nullable)`` of an annotation such as ``int | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:  # pragma: no cover - a schema bug
            raise TypeError(f"an option has one type (or None), not {tp!r}")
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _describe(tp: Any) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string (not empty)"
    if tp is dict:
        return "a mapping"
    if isinstance(tp, type) and issubclass(tp, Settings):
        return "a mapping"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_plural(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} {_plural(args[0])}"
    return "anything"


def _plural(tp: Any) -> str:
    """``integers`` for ``int``, ``lists of 2 integers`` for ``tuple[int, int]``."""
    words = _describe(tp).removeprefix("an ").removeprefix("a ").split(" ", 1)
    return " ".join([words[0] + "s", *words[1:]])


class _Bad(Exception):
    """A value that does not have the option's type (caught and reworded by the caller)."""


def _coerce(tp: Any, value: Any) -> Any:
    """``value`` as type ``tp`` (lists become tuples, numpy integers ints), or raise _Bad."""
    if tp is Any or tp is object:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _Bad
        return value
    if tp is int:
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise _Bad
        return int(value)
    if tp is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            and not hasattr(value, "__float__")
        ):
            raise _Bad
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value.strip():
            raise _Bad
        return value
    if tp is dict:
        if not isinstance(value, Mapping):
            raise _Bad
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, Settings):
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise _Bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        if len(value) != len(args):
            raise _Bad
        return tuple(_coerce(a, v) for a, v in zip(args, value, strict=True))
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise _Bad
        return value
    raise TypeError(f"unsupported option type {tp!r}")  # pragma: no cover - a schema bug


def _numbers(value: Any) -> list[float]:
    """The numbers inside ``value`` (itself, or the items of nested tuples)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [value]
    if isinstance(value, tuple):
        return [n for v in value for n in _numbers(v)]
    return []


def _expectation(tp: Any, spec: Spec, nullable: bool) -> str:
    if spec.choices is not None:
        text = "one of " + ", ".join(repr(c) for c in spec.choices)
    else:
        text = _describe(tp)
        limits = []
        if spec.minimum is not None:
            limits.append(f">= {spec.minimum:g}")
        if spec.maximum is not None:
            limits.append(f"<= {spec.maximum:g}")
        if limits:
            text += " " + " and ".join(limits)
    return text + (" or null" if nullable else "")


# --- settings -------------------------------------------------------------------------------


class Settings:
    """Base of the frozen settings dataclasses: checks, dicts and command-line arguments.

    Subclasses are ``@dataclass(frozen=True)`` with fields made by :func:`option`, a ``SECTION``
    (the YAML path that messages name, e.g. ``"features"``) and optionally ``_check_together``
    for rules between fields.
    """

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        where = f"{self.SECTION}." if self.SECTION else ""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _check_value(f.name, getattr(self, f.name), hints[f.name], _spec(f), where)
            object.__setattr__(self, f.name, value)
        self._check_together()

    def _check_together(self) -> None:
        """Rules between fields (subclasses)."""

    # -- dicts -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None):
        """Build from a mapping (a YAML section); unknown keys are errors with a suggestion."""
        where = cls.SECTION if where is None else where
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{where or 'settings'} must be a mapping, got {type(data).__name__}: {data!r}."
            )
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        prefix = f"{where}." if where else ""
        kwargs = {}
        for key, value in data.items():
            if key not in names:
                raise unknown_key(key, names, prefix)
            inner, _ = _optional(hints[key])
            if isinstance(inner, type) and issubclass(inner, Settings) and value is not None:
                value = value if isinstance(value, inner) else inner.from_dict(value, prefix + key)
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists for tuples, dicts for nested settings), for YAML and attrs."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any):
        """A copy with ``changes`` (checked like any other value)."""
        return dataclasses.replace(self, **changes)

    # -- the Python API ----------------------------------------------------------------------

    @classmethod
    def api_names(cls) -> dict[str, str]:
        """``Python keyword -> field name`` (they differ where a spec sets ``api``)."""
        return {(_spec(f).api or f.name): f.name for f in dataclasses.fields(cls)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``field name -> default``."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def specs(cls) -> dict[str, Spec]:
        """``field name -> Spec``."""
        return {f.name: _spec(f) for f in dataclasses.fields(cls)}

    # -- the command line --------------------------------------------------------------------

    @classmethod
    def add_arguments(
        cls,
        parser: argparse.ArgumentParser,
        *,
        prefix: str = "",
        skip: tuple[str, ...] = (),
        positional: bool | None = None,
    ) -> None:
        """Add one argument per field (``prefix`` before nested settings' flags).

        ``positional`` True or False adds only the positional arguments or only the flags
        (so that a command can place its own positional arguments between them).
        """
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            spec = _spec(f)
            if f.name in skip or spec.cli == "":
                continue
            if positional is not None and spec.positional != positional:
                continue
            inner, _ = _optional(hints[f.name])
            if isinstance(inner, type) and issubclass(inner, Settings):
                inner.add_arguments(parser, prefix=f"{prefix}{f.name}-")
                continue
            _add_argument(parser, f, spec, inner, prefix)

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, prefix: str = "", **fixed: Any):
        """Build from parsed arguments (``fixed`` values for the fields not on the command line)."""
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in fixed:
                kwargs[f.name] = fixed[f.name]
                continue
            if _spec(f).cli == "":
                continue
            inner, _ = _optional(hints[f.name])
            if isinstance(inner, type) and issubclass(inner, Settings):
                sub = inner.from_args(args, prefix=f"{prefix}{f.name}-")
                kwargs[f.name] = None if sub == inner() else sub
                continue
            value = getattr(args, _dest(prefix, f.name))
            if isinstance(value, list) and inner is dict:
                value = dict(value) or None
            elif isinstance(value, list) and not value and _optional(hints[f.name])[1]:
                value = None  # a repeatable flag never given
            kwargs[f.name] = value
        return cls(**kwargs)


def _spec(f: dataclasses.Field) -> Spec:
    return f.metadata.get("spec") or Spec(help=f.name)


def _plain(value: Any) -> Any:
    if isinstance(value, Settings):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _check_value(name: str, value: Any, tp: Any, spec: Spec, where: str) -> Any:
    """``value`` checked and normalised, or a ConfigError naming ``where + name``."""
    inner, nullable = _optional(tp)
    if spec.python_value is not None and spec.python_value(value):
        return value
    if value is None:
        if nullable:
            return None
        raise ConfigError(
            f"{where}{name} must be {_expectation(inner, spec, False)}, got None.{_fix(spec)}"
        )
    if (
        inner is not str
        and typing.get_origin(inner) is tuple
        and not isinstance(value, list | tuple)
    ):
        args = typing.get_args(inner)
        if len(args) == 2 and args[1] is Ellipsis and not isinstance(value, str | Mapping):
            value = (value,)  # a scalar where a list is expected: a list of one
    try:
        value = _coerce(inner, value)
    except _Bad:
        raise ConfigError(
            f"{where}{name} must be {_expectation(inner, spec, nullable)}, got {value!r}."
            f"{_fix(spec)}"
        ) from None
    bad = spec.choices is not None and value not in spec.choices
    nums = _numbers(value)
    bad = bad or (spec.minimum is not None and any(n < spec.minimum for n in nums))
    bad = bad or (spec.maximum is not None and any(n > spec.maximum for n in nums))
    if bad:
        raise ConfigError(
            f"{where}{name} must be {_expectation(inner, spec, nullable)}, got {value!r}."
            f"{_fix(spec)}"
        )
    if spec.check is not None:
        need = spec.check(value)
        if need:
            raise ConfigError(f"{where}{name} must be {need}, got {value!r}.{_fix(spec)}")
    return value


def _fix(spec: Spec) -> str:
    return f" {spec.fix}" if spec.fix else ""


def _dest(prefix: str, name: str) -> str:
    return f"{prefix}{name}".replace("-", "_")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with the value read as YAML (``depth=2`` is an int, ``x=true`` a bool)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. depth=2), got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"cannot read the value of {text!r}: {err}") from err


def _parser_for(tp: Any) -> Callable[[str], Any] | None:
    """The argparse ``type`` for one command-line value of type ``tp``."""
    if tp in (int, float, str):
        return tp
    if tp is dict:
        return key_value
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        return _floats if args and args[0] is float else (_ints if args[0] is int else str)
    return str


def _add_argument(
    parser: argparse.ArgumentParser, f: dataclasses.Field, spec: Spec, tp: Any, prefix: str
) -> None:
    flag = spec.cli or "--" + f"{prefix}{f.name}".replace("_", "-")
    help_ = spec.help
    if not (f.default is None or f.default is False or f.default == ()) and not spec.positional:
        help_ += f" (default: {_plain(f.default)})"
    if spec.positional:
        parser.add_argument(_dest(prefix, f.name), help=help_, metavar=spec.metavar)
        return
    names = [spec.short, flag] if spec.short else [flag]
    kwargs: dict[str, Any] = {"dest": _dest(prefix, f.name), "help": help_}
    if tp is bool:
        parser.add_argument(*names, action="store_true", **kwargs)
        return
    if spec.metavar:
        kwargs["metavar"] = spec.metavar
    if tp is dict or spec.repeat:
        inner = typing.get_args(tp)[0] if spec.repeat else tp
        kwargs.update(action="append", default=[], type=_parser_for(inner))
        parser.add_argument(*names, **kwargs)
        return
    kwargs.update(default=f.default, type=_parser_for(tp))
    if spec.choices is not None:
        kwargs["choices"] = spec.choices
    parser.add_argument(*names, **kwargs)
