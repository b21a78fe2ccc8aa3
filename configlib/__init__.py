"""Strict YAML -> dataclass loading, shared by every recipe section.

A recipe is a YAML mapping. It may name another recipe under ``base:`` (a path relative
to the file); the two are deep-merged, the child winning. Command-line overrides are
``dotted.key=value`` strings applied on top. The merged mapping is then converted into a
tree of dataclasses, collecting *every* problem (unknown key with a suggestion, wrong
type, missing value, value outside its set or range, a key with no effect under the
chosen options) before raising one :class:`ConfigError`.

Conventions for schema dataclasses:

* every field is declared with :func:`option`, which carries a one-line ``doc`` and the
  optional ``choices`` / ``ge`` / ``gt`` / ``le`` / ``lt`` constraints;
* a dataclass with a ``REGISTRY`` class attribute (``{name: subclass}``) is a tagged
  union: the mapping's ``name`` key picks the subclass;
* a dataclass may define ``check(self, given: set[str]) -> list[tuple[str, str]]``,
  returning ``(relative key, message)`` pairs for cross-field problems. ``given`` holds
  the dotted keys (relative to that dataclass) the user wrote explicitly, so a check can
  reject a key that has no effect.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml

MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A recipe has one or more user mistakes; ``problems`` lists them with key paths."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(self.problems)} problem(s){where}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


def option(
    default: Any = MISSING,
    doc: str = "",
    *,
    factory: Any = MISSING,
    choices: typing.Iterable[Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """Declare a schema field with its one-line documentation and constraints."""
    meta = {"doc": doc, "choices": tuple(choices) if choices is not None else None}
    meta.update(ge=ge, gt=gt, le=le, lt=lt)
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- loading


def _deep_merge(base: dict, child: Mapping) -> dict:
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_yaml_with_bases(path: str | Path) -> dict:
    """Read a recipe file and merge in its ``base:`` chain (paths relative to the file)."""
    merged: dict = {}
    for layer in load_layers(path):
        merged = _deep_merge(merged, layer)
    return merged


def load_layers(path: str | Path) -> list[dict]:
    """The recipe and its ``base:`` chain as separate mappings, most basic first."""
    return [layer for _, layer in recipe_chain(path)]


def recipe_chain(path: str | Path, _seen: tuple[str, ...] = ()) -> list[tuple[Path, dict]]:
    """``(file, mapping without base:)`` for the recipe and its ``base:`` chain, most basic
    first."""
    path = Path(path)
    resolved = str(path.resolve())
    if resolved in _seen:
        chain = " -> ".join([*_seen, resolved])
        raise ConfigError([f"base: recipes extend each other in a cycle ({chain})"], str(path))
    if not path.is_file():
        raise ConfigError([f"recipe file not found: {path}"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
    if not isinstance(data, Mapping):
        raise ConfigError(["the top level of a recipe must be a mapping of keys"], str(path))
    data = dict(data)
    base = data.pop("base", None)
    if base is None:
        return [(path, data)]
    if not isinstance(base, str):
        raise ConfigError(["base: expected a path to another recipe file"], str(path))
    return [*recipe_chain(path.parent / base, (*_seen, resolved)), (path, data)]


def _lookup(mapping: Mapping, path: str) -> Mapping | None:
    node: Any = mapping
    for part in path.split(".") if path else []:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, Mapping) else None


def layered_given(layers: list[Mapping]) -> Any:
    """Which keys count as written by the user, per section, for "has no effect" checks.

    The last layer (base recipe, child recipe, command line) that writes into a section
    decides: overriding ``eval.every=0`` on the command line silences the recipe's other
    eval keys instead of turning them into errors, while a key written in the same layer
    as the option that disables it is still reported.
    """

    def given(path: str) -> set[str]:
        if not path:
            return set().union(*(_given_keys(layer) for layer in layers))
        for layer in reversed(layers):
            section = _lookup(layer, path)
            if section:
                return _given_keys(section)
        return set()

    return given


def _parse_scalar(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested mapping."""
    data = _deep_merge({}, data)
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: expected dotted.key=value")
            continue
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, Mapping):
                problems.append(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {key}")
                break
            else:
                child = node[part] = dict(child)
            node = child
        else:
            node[parts[-1]] = _parse_scalar(raw)
    if problems:
        raise ConfigError(problems, "command-line overrides")
    return data


# -------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Converter:
    def __init__(self, given=None) -> None:
        self.problems: list[str] = []
        self.given = given

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{path or '<root>'}: {message}")

    def convert(self, value: Any, tp: Any, path: str) -> Any:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if tp is Any:
            return value
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            non_none = [a for a in args if a is not type(None)]
            if len(non_none) == 1:
                return self.convert(value, non_none[0], path)
            for arg in non_none:  # first member that accepts the value without problems
                trial = _Converter()
                result = trial.convert(value, arg, path)
                if not trial.problems:
                    return result
            self.fail(path, f"expected {_type_name(tp)}, got {value!r}")
            return None
        if origin is Literal:
            if value in args and type(value) in {type(a) for a in args}:
                return value
            self.fail(path, f"{value!r} is not allowed; expected one of {list(args)}")
            return None
        if dataclasses.is_dataclass(tp):
            return self.convert_dataclass(value, tp, path)
        if origin in (list, tuple):
            if not isinstance(value, (list, tuple)):
                self.fail(path, f"expected a list, got {value!r}")
                return None
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    self.fail(path, f"expected a list of {len(args)} items, got {len(value)}")
                    return None
                return tuple(
                    self.convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args))
                )
            item_tp = args[0] if args else Any
            items = [self.convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
        if origin is dict:
            if not isinstance(value, Mapping):
                self.fail(path, f"expected a mapping, got {value!r}")
                return None
            val_tp = args[1] if args else Any
            return {str(k): self.convert(v, val_tp, _join(path, str(k))) for k, v in value.items()}
        if tp is bool:
            if isinstance(value, bool):
                return value
            self.fail(path, f"expected true or false, got {value!r}")
            return None
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            self.fail(path, f"expected an integer, got {value!r}")
            return None
        if tp is float:
            number = None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
                try:
                    number = float(value)
                except ValueError:
                    pass
            if number is None:
                self.fail(path, f"expected a number, got {value!r}")
            elif not math.isfinite(number):
                self.fail(path, f"expected a finite number, got {value!r}")
                number = None
            return number
        if tp is str:
            if isinstance(value, str):
                return value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)  # e.g. a project name "123" typed on the command line
            self.fail(path, f"expected a string, got {value!r}")
            return None
        raise TypeError(f"unsupported schema type {tp!r} at {path}")  # schema bug, not user's

    def convert_dataclass(self, value: Any, cls: type, path: str) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            self.fail(path, f"expected a mapping, got {value!r}")
            return None
        registry = getattr(cls, "REGISTRY", None)
        if registry is not None and cls in registry.values():
            registry = None  # already a concrete member of the union
        if registry is not None:
            name = value.get("name")
            if name is None:
                self.fail(_join(path, "name"), f"missing required value; one of {sorted(registry)}")
                return None
            if name not in registry:
                hint = _suggest(str(name), registry)
                self.fail(_join(path, "name"), f"unknown {name!r}{hint}; one of {sorted(registry)}")
                return None
            cls = registry[name]
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for key in value:
            if key not in fields:
                self.fail(_join(path, str(key)), f"unknown key{_suggest(str(key), fields)}")
        kwargs = {}
        failed_sections: set[str] = set()  # nested dataclass fields with problems
        own_failed = False  # a scalar field of this dataclass has a problem
        for name, fld in fields.items():
            sub = _join(path, name)
            is_section = dataclasses.is_dataclass(hints[name])
            n_problems = len(self.problems)
            if name in value:
                converted = self.convert(value[name], hints[name], sub)
                if len(self.problems) == n_problems:
                    self.check_bounds(converted, fld, sub)
                if len(self.problems) == n_problems:
                    kwargs[name] = converted
            elif fld.default is MISSING and fld.default_factory is MISSING:
                if is_section:
                    converted = self.convert_dataclass({}, hints[name], sub)
                    if len(self.problems) == n_problems:
                        kwargs[name] = converted
                else:
                    doc = fld.metadata.get("doc", "")
                    self.fail(sub, "missing required value" + (f" ({doc})" if doc else ""))
            if len(self.problems) > n_problems:
                if is_section:
                    failed_sections.add(name)
                    if fld.default_factory is not MISSING:  # stand-in so sibling checks can run
                        kwargs[name] = fld.default_factory()
                else:
                    own_failed = True
        try:
            obj = cls(**kwargs)
        except TypeError:
            return None  # a required value is missing or wrong: already reported
        check = getattr(obj, "check", None)
        # Checks of a dataclass whose own values are wrong would reason about defaults
        # standing in for them and report misleading follow-on problems: skip those.
        if check is not None and not own_failed:
            given = self.given(path) if self.given is not None else _given_keys(value)
            for key, message in check(given):
                if key.split(".")[0].split("[")[0] not in failed_sections:
                    self.fail(_join(path, key), message)
        return None if (own_failed or failed_sections) else obj

    def check_bounds(self, value: Any, fld: dataclasses.Field, path: str) -> None:
        meta = fld.metadata
        if value is None:
            return
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            self.fail(path, f"{value!r} is not allowed; expected one of {list(choices)}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            for key, ok, word in (
                ("ge", lambda v, b: v >= b, ">="),
                ("gt", lambda v, b: v > b, ">"),
                ("le", lambda v, b: v <= b, "<="),
                ("lt", lambda v, b: v < b, "<"),
            ):
                bound = meta.get(key)
                if bound is not None and not ok(value, bound):
                    self.fail(path, f"{value!r} is out of range; must be {word} {bound}")


def _given_keys(mapping: Mapping, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in mapping.items():
        dotted = _join(prefix, str(key))
        keys.add(dotted)
        if isinstance(value, Mapping):
            keys |= _given_keys(value, dotted)
    return keys


def from_dict(
    cls: type, data: Mapping, source: str | None = None, layers: list[Mapping] | None = None
) -> Any:
    """Convert a mapping into ``cls``; raise one ConfigError listing every problem.

    ``layers`` (base first, command line last) refine which keys count as user-written.
    """
    converter = _Converter(layered_given(layers) if layers else None)
    obj = converter.convert_dataclass(data, cls, "")
    if converter.problems:
        raise ConfigError(converter.problems, source)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain YAML-ready data for a config tree (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def field_docs(cls: type) -> dict[str, str]:
    """The one-line documentation of each field of a schema dataclass."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}
