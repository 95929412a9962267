"""The scoring service's settings: one pydantic-settings class, read once at start-up.

Every field can be set from the environment with the ``NEXTBEST_`` prefix
(``NEXTBEST_ENVIRONMENT=production``, ``NEXTBEST_MODEL_URI=models:/nextbest@champion``,
``NEXTBEST_PSEUDONYMISATION_KEY=...``). Outside the ``local`` environment the settings refuse
the defaults that are only safe on a developer's machine: the public development
pseudonymisation key, a service without API keys, and the interactive API docs.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from nextbest.catalog import DEFAULT_CATALOG_DIR
from nextbest.compliance import DEFAULT_RULES_PATH
from nextbest.config_loading import MAX_SEED, dotted, error_message
from nextbest.model_source import redacted, unwritable_directory
from nextbest.privacy import MAX_KEY_BYTES, check_key
from nextbest.rewards import ATTRIBUTION_WINDOW
from serving.supervision import SUPERVISOR_ENV

DEV_PSEUDONYMISATION_KEY = "nextbest-local-development-key-not-a-secret"
"""The pseudonymisation key of the ``local`` environment: public, so refused elsewhere."""
MIN_DISTINCT_KEY_BYTES = 8
"""Outside ``local``, a pseudonymisation key needs this many distinct bytes (refuses keys
such as ``aaaaaaaaaaaaaaaa``; a random key of 16 bytes or more has them)."""
DEFAULT_CAMPAIGNS_PATH = DEFAULT_CATALOG_DIR.parent / "serving" / "campaigns.yaml"

Environment = Literal["local", "staging", "production"]
ExplorationKind = Literal["epsilon_greedy", "softmax"]


ENV_PREFIX = "NEXTBEST_"
OTHER_VARIABLES = frozenset({SUPERVISOR_ENV, "NEXTBEST_NOTEBOOK_DIR"})
"""``NEXTBEST_`` variables that are not settings (the supervisor's process id for its
workers, the notebooks' output folder)."""


class UnsafeSettingsError(ValueError):
    """Settings that are only acceptable in the ``local`` environment, used elsewhere."""


class SettingsError(ValueError):
    """Settings that cannot be used: each environment variable at fault and the reason."""


PUBLIC_KEY_MARKS = (b"pseudonymisation-key", b"not-a-secret", b"0123456789", b"abcdefgh")
"""Parts of the keys this repository publishes (development, tests, benchmarks) and of
trivial sequences: a key holding one is not a secret."""


def looks_public(key: bytes) -> bool:
    """Whether ``key`` holds a :data:`PUBLIC_KEY_MARKS` part (in any case)."""
    lowered = key.lower()
    return any(mark in lowered for mark in PUBLIC_KEY_MARKS)


def is_development_key(key: bytes) -> bool:
    """Whether ``key`` is the public development key (in any case, with spaces around it)."""
    return key.strip().lower() == DEV_PSEUDONYMISATION_KEY.encode().lower()


class Settings(BaseSettings):
    """Configuration of the scoring service (``nextbest serve``)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, validate_default=True
    )

    environment: Environment = "local"
    """``local`` allows the development defaults; ``staging`` and ``production`` refuse them."""
    model_uri: str = "models:/nextbest@champion"
    """The scoring model: ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or an
    ``.onnx`` file."""
    tracking_uri: str = "sqlite:///mlflow.db"
    """MLflow tracking server holding the model registry (for ``models:/`` URIs)."""
    catalog_dir: Path = DEFAULT_CATALOG_DIR
    """Directory with ``channels.yaml``, ``offers.yaml`` and ``timing.yaml``."""
    rules_path: Path = DEFAULT_RULES_PATH
    """Compliance rule-set YAML file."""
    campaigns_path: Path | None = DEFAULT_CAMPAIGNS_PATH
    """YAML list of known campaigns (a request naming another campaign gets 400); None
    accepts any campaign id."""
    state_dir: Path = Path("data/serving")
    """Where the decision journal (``journal.db``) and contact store (``contacts.db``) live;
    shared by every worker."""
    exploration: ExplorationKind = "epsilon_greedy"
    """How the served action is drawn from the allowed ranked actions."""
    epsilon: float = Field(default=0.05, ge=0.0, le=1.0)
    """Exploration rate of epsilon-greedy."""
    temperature: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    """Temperature of softmax exploration (score units)."""
    attribution_window: timedelta = Field(default=ATTRIBUTION_WINDOW, gt=timedelta(0))
    """A reward later than this after its decision is stored but flagged late."""
    complaint_penalty_cny: float = Field(default=300.0, ge=0.0, allow_inf_nan=False)
    """Price of a complaint in the logged reward (as in training's reward spec)."""
    count_recommended: bool = True
    """Count recommended (not yet reported delivered) contacts towards caps and gaps."""
    max_batch: int = Field(default=10_000, ge=1, le=100_000)
    """Customers per batch request at most (more: HTTP 413)."""
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    """Request bodies larger than this are refused with HTTP 413 before they are read."""
    api_keys_file: Path | None = None
    """JSON file of hashed API keys (``python -m serving.security create``); None disables
    authentication, which only the ``local`` environment allows."""
    pseudonymisation_key: SecretStr = SecretStr(DEV_PSEUDONYMISATION_KEY)
    """Secret key of the customer pseudonyms in every log and metric (at least 16 bytes)."""
    docs: bool = True
    """Serve the interactive API docs (``/docs``, ``/redoc``); the schema stays at
    ``/openapi.json``."""
    reload_poll_seconds: float = Field(default=30.0, ge=0.0)
    """How often the model alias (or file) is checked for a new version; 0 disables."""
    journal_synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    """``NORMAL``: acknowledged decisions survive a killed process; ``FULL``: also power loss."""
    onnx_threads: int = Field(default=1, ge=1, le=64)
    """ONNX Runtime intra-op threads per worker."""
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    """Seed of the exploration draws (None: from the operating system)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("state_dir", mode="before")
    @classmethod
    def _a_directory(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must name a directory (empty: the working directory, unsaid)")
        problem = unwritable_directory(value)
        if problem:
            raise ValueError(f"{value} {problem}")
        return value

    @model_validator(mode="after")
    def _safe_outside_local(self) -> Settings:
        key = self.pseudonymisation_key.get_secret_value().encode("utf-8")
        try:
            check_key(key)
        except ValueError as exc:
            hint = (
                f"; versions before this check used the first {MAX_KEY_BYTES} bytes of a longer "
                "key only, so set it to those to keep the same pseudonyms (and with them the "
                "contact history)"
                if len(key) > MAX_KEY_BYTES
                else ""
            )
            raise UnsafeSettingsError(f"{exc} (NEXTBEST_PSEUDONYMISATION_KEY){hint}") from None
        if self.environment == "local":
            return self
        unsafe = []
        if is_development_key(key):
            unsafe.append("NEXTBEST_PSEUDONYMISATION_KEY is the public development key")
        elif looks_public(key):
            unsafe.append(
                "NEXTBEST_PSEUDONYMISATION_KEY holds a part of a key this repository publishes "
                "or a plain sequence (use a random key, e.g. python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))')"
            )
        elif len(set(key)) < MIN_DISTINCT_KEY_BYTES:
            unsafe.append(
                f"NEXTBEST_PSEUDONYMISATION_KEY has fewer than {MIN_DISTINCT_KEY_BYTES} distinct "
                "characters (use a random key, e.g. python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))')"
            )
        if self.api_keys_file is None:
            unsafe.append("NEXTBEST_API_KEYS_FILE is not set (the API would be open)")
        if self.docs:
            unsafe.append("the docs are on (set NEXTBEST_DOCS=false)")
        if redacted(self.tracking_uri) != self.tracking_uri:
            unsafe.append(
                "NEXTBEST_TRACKING_URI holds credentials (give them to MLflow as "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"
            )
        if self.api_keys_file is not None and self.reload_poll_seconds == 0:
            unsafe.append(
                "NEXTBEST_RELOAD_POLL_SECONDS=0 with an API keys file: a revoked key would "
                "keep working until a SIGHUP or a restart"
            )
        if unsafe:
            raise UnsafeSettingsError(
                f"refusing to start in environment {self.environment!r}: " + "; ".join(unsafe)
            )
        return self

    @property
    def pseudonym_key(self) -> bytes:
        """The pseudonymisation key as bytes (for :func:`nextbest.privacy.pseudonymise`)."""
        return self.pseudonymisation_key.get_secret_value().encode("utf-8")


_SECRET_FIELDS = frozenset(
    name for name, field in Settings.model_fields.items() if field.annotation is SecretStr
)


def load_settings() -> Settings:
    """The settings of the ``NEXTBEST_`` environment.

    Raises
    ------
    SettingsError
        Naming each variable at fault (``NEXTBEST_EPSILON=2: Input should be less than or
        equal to 1``), rather than the field.
    """
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            field = dotted(error["loc"])
            variable = f"{ENV_PREFIX}{field.upper()}"
            if not field:  # a check across settings names its variables itself
                problems.append(error_message(error))
            elif error["type"] == "missing" or field in _SECRET_FIELDS:  # no secret printed
                problems.append(f"{variable}: {error_message(error)}")
            else:
                problems.append(f"{variable}={error['input']!s}: {error_message(error)}")
        raise SettingsError("; ".join(problems)) from None


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """The ``NEXTBEST_`` variables of ``environ`` that set nothing, each with the setting it
    most resembles (``NEXTBEST_EPSLION (did you mean NEXTBEST_EPSILON?)``): a misspelt
    setting would otherwise leave its default in force without a word."""
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    accepted = known | OTHER_VARIABLES
    unknown = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX) or name.upper() in accepted:
            continue
        close = difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.75)
        unknown.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return unknown
