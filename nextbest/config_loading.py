"""Loading YAML configs into typed pydantic models, with errors that name file, key and reason.

Every config in ``configs/`` goes through :func:`load_model`: a bad file fails once, at load,
with a :class:`ConfigError` such as::

    configs/catalog/offers.yaml: offers.3.risk_level: must be one of R1..R5, got 'R7'
"""

from __future__ import annotations

import hashlib
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(ValueError):
    """A config file that cannot be used.

    Attributes
    ----------
    path : str
        The file that was being loaded.
    key : str
        Dotted location of the offending key inside the file (``""`` for the whole file).
    reason : str
        Why it was refused.
    """

    def __init__(self, path: str | Path, key: str, reason: str) -> None:
        self.path = str(path)
        self.key = key
        self.reason = reason
        where = f"{self.path}: {key}" if key else self.path
        super().__init__(f"{where}: {reason}")


MAX_SEED = 2**31 - 1
"""The largest seed a config, a command or a setting takes: every generator accepts it (numpy,
torch, Vowpal Wabbit's ``--random_seed``)."""
MAX_BOOTSTRAP = 100_000
"""Bootstrap resamples at most (more only costs memory: 10**12 asked for terabytes)."""


class StrictModel(BaseModel):
    """Base for config models: unknown keys are refused, instances are immutable, and a
    boolean is refused where a number is expected, or a number where a boolean is, at any
    depth (``epochs: true``, ``age: [18, true]``, ``pair_terms: 1``): pydantic would read
    the one as the other. Numbers must be finite: a config has no use for ``.inf`` or
    ``.nan`` (a cost of ``.inf`` made every simulated reward infinite)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        assert info.field_name is not None  # field validators always know their field
        mixed_up = _boolean_number_mix_up(cls.model_fields[info.field_name].annotation, value)
        if mixed_up:
            raise ValueError(mixed_up)
        return value


_SEQUENCES = (tuple, list, set, frozenset, Sequence)
_NUMBERS = (int, float)


def _boolean_number_mix_up(annotation: Any, value: Any) -> str | None:
    """Why ``value`` (or an item or mapping value inside it) does not fit ``annotation``: a
    boolean where it expects a number (``"expected an integer, got a boolean"``), or a
    number where it expects a boolean; None if there is no such mix-up.

    Unions that admit both (``int | bool``, ``Any``) take either; a union of containers is
    refused if any of them would read an item as the other kind (``list[str] | list[int]``:
    pydantic would pick the second); a nested model's fields are its own validators'
    business."""
    members = _members(annotation)
    if Any in members or object in members:
        return None
    if isinstance(value, bool):
        if bool in members:
            return None
        if float in members:
            return "expected a number, got a boolean"
        return "expected an integer, got a boolean" if int in members else None
    if isinstance(value, _NUMBERS):
        if bool in members and not any(number in members for number in _NUMBERS):
            return "expected a boolean (true or false), got a number"
        return None
    for member in members:
        origin, args = get_origin(member), get_args(member)
        if isinstance(value, _SEQUENCES) and origin in _SEQUENCES and args:
            if origin is tuple and args[-1] is not Ellipsis:  # tuple[int, float]: by position
                items = list(zip(args, value, strict=False))
            else:
                items = [(args[0], item) for item in value]
        elif isinstance(value, Mapping) and origin in (dict, Mapping) and len(args) == 2:
            items = [(args[1], item) for item in value.values()]
        else:
            continue
        for inner, item in items:
            mixed_up = _boolean_number_mix_up(inner, item)
            if mixed_up:
                return mixed_up
    return None


def _members(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of a union (of one type otherwise), ``Annotated`` metadata removed."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return tuple(m for arg in get_args(annotation) for m in _members(arg))
    return (annotation,)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last
    silently: a second ``days: 0`` would switch a rule's period off unseen)."""


def _mapping_without_repeats(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor``: its keys may be
            continue  # given again explicitly (YAML: the explicit one wins)
        key = loader.construct_object(key_node, deep=True)
        try:
            line = first.get(key)
        except TypeError:  # an unhashable key: construct_mapping names it
            continue
        if line is None:
            first[key] = key_node.start_mark.line + 1
        else:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} appears twice (first at line {line})",
                key_node.start_mark,
            )
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_without_repeats,  # type: ignore[arg-type]
)


def load_yaml_text(text: str) -> Any:
    """Parse YAML text safely, refusing a key repeated in a mapping.

    Raises
    ------
    yaml.YAMLError
        Malformed YAML, or a repeated key (its line, and the first one's, in the message).
    """
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML file whose top level must be a mapping.

    Raises
    ------
    ConfigError
        If the file is missing or unreadable, is not UTF-8 or not valid YAML, repeats a key
        in a mapping, or its top level is not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            path, "", f"not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {exc.start}"
        ) from None
    try:
        data = load_yaml_text(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, "", f"malformed YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError(path, "", "file is empty")
    if not isinstance(data, dict):
        raise ConfigError(path, "", f"top level must be a mapping, got {type(data).__name__}")
    return data


def dotted(loc: tuple[Any, ...]) -> str:
    """Render a pydantic error location as a dotted key (``offers.3.risk_level``)."""
    return ".".join(str(part) for part in loc)


def config_error_from_validation(path: str | Path, exc: ValidationError) -> ConfigError:
    """Turn the first pydantic validation error into a :class:`ConfigError`.

    All errors are listed in the reason when there are several, so one run shows every
    mistake in the file.
    """
    errors = exc.errors(include_url=False)
    first = errors[0]
    reason = error_message(first)
    if len(errors) > 1:
        others = "; ".join(f"{dotted(e['loc'])}: {error_message(e)}" for e in errors[1:6])
        reason = f"{reason} (also: {others})"
    return ConfigError(path, dotted(first["loc"]), reason)


def error_message(error: Mapping[str, Any]) -> str:
    """A pydantic error's message in the words of a config file: ``unknown key`` for a key
    the model does not have, and without the ``Value error, `` that pydantic puts before the
    messages of validators (``expected an integer, got a boolean``)."""
    if error["type"] == "extra_forbidden":
        return "unknown key"
    return str(error["msg"]).removeprefix("Value error, ")


def load_model(
    path: str | Path, model: type[ModelT], context: dict[str, Any] | None = None
) -> ModelT:
    """Read ``path`` and validate it as ``model``; errors become :class:`ConfigError`."""
    data = read_yaml(path)
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise config_error_from_validation(path, exc) from None


def content_hash(*parts: str | bytes, length: int = 12) -> str:
    """Stable short SHA-256 hex digest of the given parts (config versions, fingerprints)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8") if isinstance(part, str) else part)
        digest.update(b"\x00")
    return digest.hexdigest()[:length]
