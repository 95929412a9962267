"""The serving model: loaded from a local ONNX file or the MLflow registry, swapped atomically.

A reload builds the new model completely (download, ONNX Runtime session, feature-spec check,
a probe batch scored) before one reference assignment makes it current, so a request in
flight keeps the model it started with and never sees half a swap. A model that fails any
step is not installed: the old one keeps serving and the error is kept for ``/readyz``.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from nextbest.model_source import (
    is_registry_uri,
    redacted,
    registry_version,
    resolve_model,
)
from nextbest.onnx_scoring import ModelSpecError, OnnxScorer, spec_path
from serving.file_stamp import FileStamp, file_stamp, stamp_of

ModelStamp = tuple[FileStamp, FileStamp | None]
"""A local model's stamp and its sidecar spec's (None without one)."""

log = logging.getLogger(__name__)

PROBE_ROWS = (1, 8)
"""Batches of contexts scored before a new model is installed (catches shape and runtime
errors; two sizes, so that a graph fixed to one batch size is refused: the service scores
one customer, a group of requests or thousands at a time)."""


@dataclass(frozen=True)
class LoadedModel:
    """One model ready to score; immutable, so a request can hold it while a swap happens."""

    scorer: OnnxScorer
    version: str
    """``<name>/<version>`` for registry models, ``file:<sha256 prefix>`` for files, and
    ``<name>/<version> (file:<sha256 prefix>)`` for a file ``nextbest export`` wrote."""
    uri: str
    loaded_at: datetime

    @property
    def spec_version(self) -> str:
        return self.scorer.spec_version


@dataclass(frozen=True)
class ModelStatus:
    """What ``/readyz`` reports."""

    model_version: str | None
    loaded_at: datetime | None
    last_error: str | None


class ModelStore:
    """Holds the current model of ``uri`` and reloads it on demand.

    Parameters
    ----------
    uri : an ``.onnx`` path or ``models:/<name>@<alias>`` (or ``/<version>``)
    tracking_uri : MLflow tracking URI for registry models
    threads : ONNX Runtime intra-op threads per session
    expected_spec_version : the feature-spec version the service's encoder produces; a model
        trained on other features is refused
    n_actions : the catalogue size; a model scoring another number of actions is refused

    The first load happens in the constructor; when it fails the store is empty
    (``current`` is None, ``status().last_error`` says why) and the service is not ready.
    """

    def __init__(
        self,
        uri: str,
        tracking_uri: str | None = None,
        threads: int = 1,
        expected_spec_version: str | None = None,
        n_actions: int | None = None,
    ) -> None:
        self.uri = uri
        self.tracking_uri = tracking_uri
        self.threads = threads
        self.expected_spec_version = expected_spec_version
        self.n_actions = n_actions
        self.current: LoadedModel | None = None
        self.last_error: str | None = None
        self._reload_lock = threading.Lock()
        self._file_stamp: ModelStamp | None = None
        self._failed: str | ModelStamp | None = None
        """What last failed to load for a fault of its own files (:class:`ModelSpecError`):
        the registry version, or the local file's stamp. While another model serves, the
        watcher does not fetch it again until the alias moves or the file changes (a reload
        by hand still tries)."""
        self.reload()

    def reload(self) -> bool:
        """Load ``uri`` again and install it; False (old model kept, error recorded) on
        failure. Thread-safe: concurrent reloads run one after the other."""
        with self._reload_lock:
            registry = is_registry_uri(self.uri)
            resolved = None
            # a spec kept beside a local model is watched too; its stamp is taken first, so
            # a spec replaced during the load differs at the next poll
            spec_before = None if registry else file_stamp(spec_path(Path(self.uri)))
            try:
                # a registry model is downloaded into a directory removed once it is loaded
                with (
                    tempfile.TemporaryDirectory(prefix="nextbest-model-")
                    if registry
                    else nullcontext(None)
                ) as download:
                    resolved = resolve_model(self.uri, self.tracking_uri, download_dir=download)
                    scorer = OnnxScorer(
                        resolved.path, threads=self.threads, content=resolved.content
                    )
                model = self._checked(scorer, resolved.version)
            except Exception as exc:  # whatever a broken file or registry raises
                self.last_error = redacted(f"{type(exc).__name__}: {exc}")
                log.error("model %s not loaded, %s", self.uri, self.last_error)
                # only a fault of the version's own files is not fetched again; anything
                # else (the registry, the disk, memory) may pass, and is retried
                if isinstance(exc, ModelSpecError) and resolved is not None:
                    self._failed = (
                        resolved.version if registry else (stamp_of(resolved.stat), spec_before)
                    )
                return False
            self.current = model  # one reference assignment: the atomic swap
            self._file_stamp = None if registry else (stamp_of(resolved.stat), spec_before)
            self.last_error = None
            self._failed = None
            log.info("serving model %s (features %s)", model.version, model.spec_version)
            return True

    def _checked(self, scorer: OnnxScorer, version: str) -> LoadedModel:
        """``scorer`` (of ``version``) as a model to serve, once it passes every check.

        Raises
        ------
        ModelSpecError
            A fixed batch size, another feature spec or catalogue size, a probe batch it
            fails or scores wrongly.
        """
        batch = scorer.session.get_inputs()[0].shape[0]
        if isinstance(batch, int):
            raise ModelSpecError(
                f"model {self.uri!r} takes batches of exactly {batch} contexts; the service "
                "scores any number at a time (export it with a dynamic batch axis)"
            )
        if self.expected_spec_version is not None:
            scorer.require_features(
                self.expected_spec_version,
                self.uri,
                "this service encodes",
                "retrain, or change the catalogue",
            )
        n_context = len(scorer.spec["context_names"])
        for rows in PROBE_ROWS:
            try:
                scores = scorer.scores(np.zeros((rows, n_context), np.float32))
            except Exception as exc:  # ONNX Runtime raises its own exception types
                raise ModelSpecError(
                    f"model {self.uri!r} fails on a probe batch of {rows}: {exc}"
                ) from exc
            if scores.ndim != 2 or len(scores) != rows:
                raise ModelSpecError(
                    f"model {self.uri!r} scores {rows} contexts as shape {scores.shape}, "
                    f"not ({rows}, actions)"
                )
            if self.n_actions is not None and scores.shape[1] != self.n_actions:
                raise ModelSpecError(
                    f"model {self.uri!r} scores {scores.shape[1]} actions; the catalogue has "
                    f"{self.n_actions}"
                )
            if not np.isfinite(scores).all():
                raise ModelSpecError(
                    f"model {self.uri!r} gives non-finite scores (NaN or infinite) on a probe batch"
                )
        if scorer.exported_from and not is_registry_uri(self.uri):  # nextbest export's file
            version = f"{scorer.exported_from} ({version})"
        return LoadedModel(scorer, version, self.uri, datetime.now(UTC))

    def changed(self) -> bool:
        """Whether ``uri`` now points at another model than the current one: the registry
        alias moved, or the file was replaced. Cheap (no download); may raise
        :class:`ModelSourceError` while the registry is unreachable."""
        if is_registry_uri(self.uri):
            version = registry_version(self.uri, self.tracking_uri)
            if version == self._failed and self.current is not None:
                return False  # its files are broken: wait for the alias to move
            return self.current is None or version != self.current.version
        path = Path(self.uri)
        model = file_stamp(path)
        if model is None:
            return False
        stamp = (model, file_stamp(spec_path(path)))
        if stamp == self._failed and self.current is not None:
            return False  # the same broken file: wait for it to change
        return stamp != self._file_stamp

    def status(self) -> ModelStatus:
        model = self.current
        return ModelStatus(
            None if model is None else model.version,
            None if model is None else model.loaded_at,
            self.last_error,
        )

    def close(self) -> None:
        """Nothing to release (sessions go with their last reference); kept for symmetry."""
