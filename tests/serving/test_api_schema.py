"""Schemathesis against the OpenAPI schema: >= 1,000 generated requests, no 5xx."""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from conftest import PSEUDONYM_KEY, write_model
from hypothesis import HealthCheck, settings

from nextbest.catalog import load_catalog
from serving.app import create_app
from serving.security import create_api_key
from serving.settings import Settings

EXAMPLES_PER_OPERATION = 250
"""Five POST operations carry the generated bodies: 5 x 250 >= 1,000 cases."""
CASES: Counter[str] = Counter()

# schemathesis loads the schema when the module is collected; creating the app is cheap (the
# model and stores are opened by its lifespan, which schemathesis runs on the first call)
_STATE = Path(tempfile.mkdtemp(prefix="nextbest-schemathesis-"))
_ADMIN = {"X-API-Key": create_api_key(_STATE / "keys.json", "schemathesis", ["admin"])}
_APP = create_app(
    Settings(
        model_uri=str(write_model(load_catalog(), _STATE / "model.onnx")),
        state_dir=_STATE / "state",
        api_keys_file=_STATE / "keys.json",
        pseudonymisation_key=PSEUDONYM_KEY,
        reload_poll_seconds=0,
        max_batch=50,
        seed=0,
    )
)
schema = schemathesis.openapi.from_asgi("/openapi.json", _APP)


@pytest.fixture(scope="module", autouse=True)
def _cleanup() -> Iterator[None]:
    yield
    shutil.rmtree(_STATE, ignore_errors=True)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_post_generated_requests_no_server_error(case: schemathesis.Case) -> None:
    response = case.call(headers=_ADMIN)
    CASES[f"{case.method} {case.path}"] += 1
    assert response.status_code < 500, (case.method, case.path, response.text[:500])


def test_count_generated_cases_at_least_1000() -> None:
    """Counts what the generated test above ran (pytest runs a file's tests in order)."""
    if not CASES:
        pytest.skip("the generated test did not run before this one (deselected or reordered)")
    print(f"schemathesis cases: {dict(CASES)}")
    assert sum(CASES.values()) >= 1000, dict(CASES)
