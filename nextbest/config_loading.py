"""Loading YAML configs into typed pydantic models, with errors that name file, key and reason.

Every config in ``configs/`` goes through :func:`load_model`: a bad file fails once, at load,
with a :class:`ConfigError` such as::

    configs/catalog/offers.yaml: offers.3.risk_level: must be one of R1..R5, got 'R7'
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

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


class StrictModel(BaseModel):
    """Base for config models: unknown keys are refused, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML file whose top level must be a mapping.

    Raises
    ------
    ConfigError
        If the file is missing or unreadable, is not UTF-8 or not valid YAML, or its top
        level is not a mapping.
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
        data = yaml.safe_load(text)
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
    reason = _reason(first)
    if len(errors) > 1:
        others = "; ".join(f"{dotted(e['loc'])}: {_reason(e)}" for e in errors[1:6])
        reason = f"{reason} (also: {others})"
    return ConfigError(path, dotted(first["loc"]), reason)


def _reason(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    msg = str(error["msg"])
    return msg.removeprefix("Value error, ")


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
