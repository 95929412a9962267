"""Where a scoring model comes from: a local ONNX file or the MLflow model registry.

One resolver for everything that loads a model (``nextbest evaluate --model``, ``nextbest
export`` and the scoring service): ``models:/<name>@<alias>``, ``models:/<name>/<version>``
and ``runs:/<run id>/<path>`` are downloaded from the tracking server given (MLflow is
imported only then); anything else is a path to an ``.onnx`` file. :func:`mlflow_client`
is the one way to reach a tracking server and its model registry (training uses it too).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nextbest.sqlite_writer import sqlite_tables

if TYPE_CHECKING:
    from mlflow import MlflowClient

REGISTRY_SCHEMES = ("models:/", "runs:/")
_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")


class ModelSourceError(ValueError):
    """A model URI that cannot be resolved to an ONNX file (names the URI and the reason)."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model URI pinned to one ONNX file."""

    uri: str
    """What the caller asked for (``models:/nextbest@champion`` or a path)."""
    path: Path
    """The local ``.onnx`` file."""
    version: str
    """``<name>/<version>`` for registry models, ``file:<sha256 prefix>`` for local files."""
    content: bytes
    """The file's bytes, read once: the version's digest and a session built from them
    belong to the same file, even if it is replaced meanwhile."""
    stat: os.stat_result
    """The file's status from the same open handle (what a watcher compares)."""


def is_registry_uri(uri: str) -> bool:
    """Whether ``uri`` names a model in an MLflow tracking server."""
    return uri.startswith(REGISTRY_SCHEMES)


def mlflow_client(tracking_uri: str | None = None, must_exist: bool = False) -> MlflowClient:
    """An MLflow client of the tracking store at ``tracking_uri`` whose model registry is that
    same store (build every client of a tracking URI with this).

    MLflow would otherwise take the registry from the process (``MLFLOW_REGISTRY_URI``,
    ``mlflow.set_registry_uri``), and a model could be registered, promoted and loaded in
    different stores. ``None``: MLflow's current tracking URI, and its registry.

    ``must_exist``, for readers: a ``sqlite:///`` store must be a file already. MLflow would
    create an empty store there, and a mistyped path would read as "no such model".

    Raises
    ------
    ModelSourceError
        ``must_exist`` and the SQLite file is missing (names the URI and the file).
    """
    from mlflow import MlflowClient

    if tracking_uri is not None and not tracking_uri.strip():
        raise ModelSourceError("tracking URI is empty (the default is sqlite:///mlflow.db)")
    store = sqlite_store_path(tracking_uri)
    if store is not None and store.exists():
        problem = not_an_mlflow_store(store)
        if problem:  # MLflow would add its tables to it (a service's journal, say)
            raise ModelSourceError(f"tracking URI {tracking_uri!r}: {store} {problem}")
    elif must_exist and store is not None:
        raise ModelSourceError(
            f"tracking URI {tracking_uri!r}: no MLflow store at {store} (nothing was tracked "
            "there: check the path, or train a model first)"
        )
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def not_an_mlflow_store(path: Path) -> str | None:
    """Why the existing file ``path`` cannot be an MLflow SQLite store, or None (an MLflow
    store, or an empty file or database MLflow may set up)."""
    if path.is_dir():
        return "is a directory, not a database file"
    try:
        tables = sqlite_tables(path)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if tables is None:
        return "is not a SQLite database"
    if tables and not {"experiments", "alembic_version"} <= tables:
        shown = ", ".join(sorted(tables)[:4])
        return f"is a SQLite database but not an MLflow store (its tables: {shown}, ...)"
    return None


_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/\s@]+@")


def redacted(text: str) -> str:
    """``text`` with the user and password of every URL in it replaced by ``***``: error
    messages of an MLflow client repeat its tracking URI, and ``/readyz`` and the log show
    them."""
    return _CREDENTIALS.sub(r"\g<scheme>***@", text)


def sqlite_store_path(tracking_uri: str | None) -> Path | None:
    """The database file of a ``sqlite:///<path>`` tracking URI (None for every other kind
    of store, and for an in-memory database)."""
    if tracking_uri is None or not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def resolve_model(
    uri: str, tracking_uri: str | None = None, download_dir: str | Path | None = None
) -> ResolvedModel:
    """Pin ``uri`` to a local ONNX file.

    An alias is resolved to its version first, so the file and the version reported belong
    together even if the alias moves during the download.

    Raises
    ------
    ModelSourceError
        Unknown model, alias or version, an unreachable tracking server, a missing file, or
        an artifact without exactly one ``.onnx`` file.
    """
    if not is_registry_uri(uri):
        path = Path(uri)
        if path.is_dir():
            raise ModelSourceError(f"model {uri!r}: a directory, not an .onnx file")
        if not path.is_file():
            raise ModelSourceError(f"model {uri!r}: no such file")
        content, stat = _read(path)
        return ResolvedModel(uri, path, f"file:{_digest(content)}", content, stat)
    import mlflow

    client = mlflow_client(tracking_uri, must_exist=True)
    try:
        pinned, version = _pin(client, uri)
        if pinned.startswith("models:/"):
            # the artifact location itself: models:/ downloads consult the process-wide
            # registry URI, not the one given here
            name, number = pinned.removeprefix("models:/").split("/")
            pinned = client.get_model_version_download_uri(name, number)
        target = Path(download_dir or tempfile.mkdtemp(prefix="nextbest-model-"))
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=pinned, dst_path=str(target), tracking_uri=tracking_uri
        )
    except mlflow.exceptions.MlflowException as exc:
        raise ModelSourceError(f"model {uri!r}: {exc.message}") from exc
    local_path = Path(local)
    if local_path.is_file() and local_path.suffix != ".onnx":
        raise ModelSourceError(
            f"model {uri!r}: the artifact {local_path.name} is not an .onnx file"
        )
    files = [local_path] if local_path.is_file() else sorted(local_path.rglob("*.onnx"))
    if len(files) != 1:
        raise ModelSourceError(
            f"model {uri!r}: expected one .onnx file in the artifact, found {len(files)}"
        )
    content, stat = _read(files[0])
    return ResolvedModel(uri, files[0], version, content, stat)


def registry_version(uri: str, tracking_uri: str | None = None) -> str:
    """The ``<name>/<version>`` a registry URI points at now (cheap: no download)."""
    import mlflow

    try:
        client = mlflow_client(tracking_uri, must_exist=True)
        return _pin(client, uri)[1]
    except mlflow.exceptions.MlflowException as exc:
        raise ModelSourceError(f"model {uri!r}: {exc.message}") from exc


def _pin(client: MlflowClient, uri: str) -> tuple[str, str]:
    """(download URI with an explicit version, ``<name>/<version>``)."""
    alias = _ALIAS.match(uri)
    if alias:
        mv = client.get_model_version_by_alias(alias["name"], alias["alias"])
        return f"models:/{alias['name']}/{mv.version}", f"{alias['name']}/{mv.version}"
    exact = _VERSION.match(uri)
    if exact:
        mv = client.get_model_version(exact["name"], exact["version"])
        return uri, f"{exact['name']}/{mv.version}"
    if uri.startswith("runs:/"):
        return uri, uri.removeprefix("runs:/").split("/", 1)[0]
    raise ModelSourceError(
        f"model {uri!r}: expected models:/<name>@<alias>, models:/<name>/<version> or runs:/..."
    )


def _read(path: Path) -> tuple[bytes, os.stat_result]:
    """The file's bytes and its status, from one open handle."""
    with path.open("rb") as handle:
        return handle.read(), os.fstat(handle.fileno())


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()[:12]


def unwritable_directory(directory: str | Path) -> str | None:
    """Why model files cannot be written into ``directory`` (created if missing), or None:
    checked before slow work (training, a registry download) so that it fails first.

    Returns a reason such as ``"is a file, not a directory"`` or ``"is below /x, which is a
    file"``, to be prefixed with the option or key that named the directory.
    """
    directory = Path(directory)
    existing = next(p for p in (directory, *directory.absolute().parents) if p.exists())
    if not existing.is_dir():
        if existing == directory:
            return "is a file, not a directory"
        return f"is below {existing}, which is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be written: {existing} is not writable"
    return None
