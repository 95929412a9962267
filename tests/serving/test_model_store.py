"""Loading and hot-swapping the serving model: spec checks, broken files keep the old model,
swaps are atomic under concurrent scoring, registry alias moves are noticed."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from test_decision_engine import write_model

from nextbest.catalog import ActionCatalog
from nextbest.features import ContextEncoder
from nextbest.onnx_scoring import (
    SOURCE_KEY,
    SPEC_KEY,
    linear_scoring_model,
    save_scoring_model,
    set_metadata,
)
from nextbest.synthetic import random_context_batch
from serving.decision_engine import DecisionEngine
from serving.model_store import ModelStore


def store_for(catalog: ActionCatalog, uri: str, **kwargs) -> ModelStore:
    spec = ContextEncoder(catalog).spec
    return ModelStore(
        uri, expected_spec_version=spec.version, n_actions=catalog.n_actions, **kwargs
    )


def test_load_local_file_reports_version(catalog, tmp_path: Path) -> None:
    store = store_for(catalog, str(write_model(catalog, tmp_path / "m.onnx")))
    status = store.status()
    assert status.model_version is not None and status.model_version.startswith("file:")
    assert status.last_error is None and status.loaded_at is not None
    assert not store.changed()


def test_a_scorer_with_several_threads_scores_the_same_and_its_threads_do_not_spin(
    catalog, tmp_path: Path
) -> None:
    """Spinning pool threads took 80 ms more CPU a 10,000-customer batch call (2 threads
    against 1) from the writers and the other worker; idle ones sleep instead."""
    from nextbest.onnx_scoring import OnnxScorer

    path = write_model(catalog, tmp_path / "m.onnx")
    one, two = OnnxScorer(path), OnnxScorer(path, threads=2)
    options = two.session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    context = np.random.default_rng(0).normal(size=(3000, len(one.spec["context_names"])))
    assert np.allclose(one.scores(context), two.scores(context), atol=1e-5)


def test_load_model_of_other_features_refused(catalog, tmp_path: Path) -> None:
    spec = ContextEncoder(catalog).spec
    stale = type(spec)(spec.context_names[:-1], spec.action_names, spec.catalog_version)
    weights = np.zeros((stale.n_context, catalog.n_actions), np.float32)
    model = linear_scoring_model(weights, np.zeros(catalog.n_actions, np.float32), stale, "t")
    path = save_scoring_model(model, tmp_path / "stale.onnx", stale, "t")
    store = store_for(catalog, str(path))
    assert store.current is None
    assert "reads features" in store.status().last_error


def test_load_model_of_other_catalogue_size_refused(catalog, tmp_path: Path) -> None:
    path = write_model(catalog, tmp_path / "m.onnx")
    spec = ContextEncoder(catalog).spec
    store = ModelStore(
        str(path), expected_spec_version=spec.version, n_actions=catalog.n_actions + 1
    )
    assert store.current is None
    assert f"scores {catalog.n_actions} actions; the catalogue has" in store.status().last_error


def test_load_model_with_non_finite_scores_says_so(catalog, tmp_path: Path) -> None:
    spec = ContextEncoder(catalog).spec
    bias = np.zeros(catalog.n_actions, np.float32)
    bias[5] = np.nan
    weights = np.zeros((spec.n_context, catalog.n_actions), np.float32)
    model = linear_scoring_model(weights, bias, spec, "t")
    store = store_for(catalog, str(save_scoring_model(model, tmp_path / "nan.onnx", spec, "t")))
    assert store.current is None
    assert "non-finite scores (NaN or infinite)" in store.status().last_error


def test_reload_broken_file_keeps_old_model(catalog, tmp_path: Path) -> None:
    path = write_model(catalog, tmp_path / "m.onnx")
    store = store_for(catalog, str(path))
    old = store.current
    path.write_bytes(b"not an onnx model")
    assert store.changed()
    assert store.reload() is False
    assert store.current is old
    assert "cannot load ONNX model" in store.status().last_error
    assert not store.changed()  # the same broken file is not read again at every poll
    write_model(catalog, path, seed=1)
    assert store.changed()
    assert store.reload() is True
    assert store.current is not old and store.status().last_error is None


def test_reload_during_scoring_never_fails_a_request(catalog, engine, tmp_path: Path) -> None:
    a = write_model(catalog, tmp_path / "a.onnx", seed=1)
    b = write_model(catalog, tmp_path / "b.onnx", seed=2)
    live = tmp_path / "live.onnx"
    shutil.copyfile(a, live)
    store = store_for(catalog, str(live))
    versions = {store.current.version}
    decider = DecisionEngine(catalog, engine, store, seed=0)
    batch = random_context_batch(catalog, 50, np.random.default_rng(0))
    errors: list[BaseException] = []
    seen: set[str] = set()
    stop = threading.Event()

    def score() -> None:
        while not stop.is_set():
            try:
                seen.add(decider.decide(batch).model_version)
            except BaseException as exc:  # any failure fails the test
                errors.append(exc)

    workers = [threading.Thread(target=score) for _ in range(3)]
    for w in workers:
        w.start()
    for i in range(20):
        source = b if i % 2 == 0 else a
        partial = tmp_path / "live.partial"
        shutil.copyfile(source, partial)
        partial.replace(live)  # how a deployment moves a new file into place
        assert store.reload()
        versions.add(store.current.version)
    stop.set()
    for w in workers:
        w.join()
    assert not errors
    assert len(versions) == 2 and seen <= versions


def register(mlflow, experiment: str, path: Path, external: bool = False) -> None:
    """Log the ONNX file at ``path`` as a new version of registered model ``nb`` (with its
    weights in a file beside it when ``external``, as MLflow does by default)."""
    import onnx

    with mlflow.start_run(experiment_id=experiment):
        mlflow.onnx.log_model(
            onnx.load(str(path)),
            name="model",
            registered_model_name="nb",
            save_as_external_data=external,
        )


def test_registry_alias_move_is_noticed_and_loaded(catalog, tmp_path: Path) -> None:
    mlflow = pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri, registry_uri=uri)
    # an experiment of this store: the active one another test set belongs to another store
    experiment = client.create_experiment("alias-move")
    for seed in (1, 2):
        register(mlflow, experiment, write_model(catalog, tmp_path / f"m{seed}.onnx", seed=seed))
    client.set_registered_model_alias("nb", "champion", "1")
    store = store_for(catalog, "models:/nb@champion", tracking_uri=uri)
    assert store.status().model_version == "nb/1"
    assert not store.changed()
    client.set_registered_model_alias("nb", "champion", "2")
    assert store.changed()
    assert store.reload()
    assert store.status().model_version == "nb/2"
    assert not store.changed()


def test_an_exported_file_reports_the_version_it_came_from_once(catalog, tmp_path: Path) -> None:
    """``nextbest export`` marks the file with its registered version (set_metadata replaces
    the mark of a file exported again, it does not add a second one)."""
    import onnx

    path = write_model(catalog, tmp_path / "m.onnx")
    model = onnx.load(str(path))
    set_metadata(model, **{SOURCE_KEY: "nextbest/2"})
    set_metadata(model, **{SOURCE_KEY: "nextbest/3"})
    assert [p.value for p in model.metadata_props if p.key == SOURCE_KEY] == ["nextbest/3"]
    onnx.save(model, str(path))
    version = store_for(catalog, str(path)).status().model_version
    assert version is not None and version.startswith("nextbest/3 (file:")


def _edited(path: Path, out: Path, edit) -> Path:
    """A copy of the ONNX file at ``path`` with ``edit(model)`` applied."""
    import onnx

    model = onnx.load(str(path))
    edit(model)
    onnx.save(model, str(out))
    return out


def _fixed_batch(model, rows: int = 8) -> None:
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = rows


def _scores_through(model, node_type: str, constant: list[int], **attributes) -> None:
    """Route the scores through ``node_type(scores, constant)`` before the output."""
    from onnx import helper, numpy_helper

    from nextbest.onnx_scoring import OUTPUT_NAME

    node = next(n for n in model.graph.node if OUTPUT_NAME in n.output)
    node.output[0] = "raw_scores"
    model.graph.initializer.append(numpy_helper.from_array(np.array(constant), "constant"))
    model.graph.node.append(
        helper.make_node(node_type, ["raw_scores", "constant"], [OUTPUT_NAME], **attributes)
    )
    model.graph.output[0].type.tensor_type.ClearField("shape")


def _one_dimensional(model) -> None:
    """One score per context, not one per action."""
    _scores_through(model, "ReduceSum", [1], keepdims=0)


def _eight_rows_inside(model) -> None:
    """A batch axis declared free, but a graph that only works for 8 contexts."""
    n_actions = model.graph.initializer[1].dims[0]
    _scores_through(model, "Reshape", [8, n_actions])


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda m: set_metadata(m, **{SPEC_KEY: "{not json"}), "not JSON"),
        (lambda m: set_metadata(m, **{SPEC_KEY: '{"version": "x"}'}), "context_names"),
        (_one_dimensional, "as shape (1,)"),
        (_fixed_batch, "batches of exactly 8"),
        (_eight_rows_inside, "fails on a probe batch of 1"),
    ],
)
def test_reload_onto_any_broken_model_keeps_the_old_one_and_says_why(
    catalog, tmp_path: Path, edit, reason: str
) -> None:
    """Whatever is wrong with the new file (its spec unreadable, its output not one row of
    scores per context, a graph fixed to one batch size, which a probe at that size alone
    would pass), the reload is refused with the reason and the old model keeps serving."""
    good = write_model(catalog, tmp_path / "good.onnx")
    served = tmp_path / "served.onnx"
    shutil.copy(good, served)
    store = store_for(catalog, str(served))
    before = store.current
    assert before is not None
    _edited(good, served, edit)
    assert store.reload() is False  # refused, not raised
    assert store.current is before
    assert reason in store.status().last_error


def test_a_file_replaced_during_a_load_is_served_under_its_own_version(
    catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The version is the digest of the bytes the session is built from: a file renamed into
    place between the two reads can no longer be served under the old file's version."""
    import nextbest.model_source as model_source

    first = write_model(catalog, tmp_path / "a.onnx", seed=1)
    second = write_model(catalog, tmp_path / "b.onnx", seed=2)
    served = tmp_path / "served.onnx"
    shutil.copy(first, served)
    read = model_source._read

    def read_then_replace(path: Path):
        content = read(path)
        shutil.copy(second, served)  # lands right after the read
        return content

    monkeypatch.setattr(model_source, "_read", read_then_replace)
    store = store_for(catalog, str(served))
    monkeypatch.undo()
    context = np.zeros((1, ContextEncoder(catalog).spec.n_context), np.float32)
    context[0, :5] = 1.0
    first_scores = store_for(catalog, str(first)).current.scorer.scores(context)
    assert store.current.version == store_for(catalog, str(first)).current.version
    np.testing.assert_array_equal(store.current.scorer.scores(context), first_scores)
    assert store.changed()  # the file on disk is now another one


def test_registry_reloads_leave_no_downloads_behind(
    catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlflow = pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("downloads")
    path = write_model(catalog, tmp_path / "m.onnx")
    register(mlflow, experiment, path)
    register(mlflow, experiment, _edited(path, tmp_path / "broken.onnx", _fixed_batch))
    client.set_registered_model_alias("nb", "champion", "1")
    store = store_for(catalog, "models:/nb@champion", tracking_uri=uri)
    for _ in range(3):
        assert store.reload()
    assert store.status().model_version == "nb/1"
    # a broken version under the alias is fetched once, not again at every poll
    client.set_registered_model_alias("nb", "champion", "2")
    assert store.changed()
    assert not store.reload()
    assert "batches of exactly 8" in store.status().last_error
    assert store.status().model_version == "nb/1"
    assert not store.changed()
    client.set_registered_model_alias("nb", "champion", "1")
    assert not store.changed()  # back on the version it serves
    # version 3, a good one, its weights in a file beside it
    register(mlflow, experiment, write_model(catalog, tmp_path / "m3.onnx", seed=3), True)
    client.set_registered_model_alias("nb", "champion", "3")
    assert store.changed()
    # a fault that may pass (the disk, here) does not mark the version: it is tried again
    import nextbest.model_source as model_source

    def disk_full(path: Path):
        raise OSError(28, "No space left on device")

    read = model_source._read
    model_source._read = disk_full
    try:
        assert not store.reload()
    finally:
        model_source._read = read
    assert store.changed()
    assert store.reload()
    assert store.status().model_version == "nb/3"
    assert not list(temp.glob("nextbest-model-*"))


def test_a_spec_kept_beside_the_model_is_watched_too(catalog, tmp_path: Path) -> None:
    """A model without its spec inside reads the sidecar: replacing only the sidecar is a
    change to reload (the watcher looked at the model file alone)."""
    import json

    from nextbest.onnx_scoring import spec_path

    def without_spec(model) -> None:
        kept = [p for p in model.metadata_props if p.key != SPEC_KEY]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)

    good = write_model(catalog, tmp_path / "good.onnx")
    path = _edited(good, tmp_path / "bare.onnx", without_spec)
    spec = json.loads(spec_path(good).read_text())
    spec_path(path).write_text(json.dumps(spec))
    store = store_for(catalog, str(path))
    assert store.current is not None and not store.changed()
    spec_path(path).write_text(json.dumps(spec, indent=1))  # the same spec, a new file
    assert store.changed()
    assert store.reload() and not store.changed()
    spec_path(path).write_text("{not json")
    assert store.changed() and store.reload() is False
    assert not store.changed()  # the broken pair is not read again until one changes
