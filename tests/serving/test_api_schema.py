"""Schemathesis against the OpenAPI schema: >= 1,000 generated requests, no 5xx."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from conftest import PSEUDONYM_KEY
from hypothesis import HealthCheck, settings

from serving.app import create_app
from serving.security import create_api_key
from serving.settings import Settings

CASES: Counter[str] = Counter()
EXAMPLES_PER_OPERATION = 250
"""Four POST operations carry the generated bodies: 4 x 250 >= 1,000 cases."""

_ADMIN_KEY: dict[str, str] = {}


@pytest.fixture(scope="module")
def api_schema(api_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The app's schema, loaded through the app (schemathesis runs its lifespan)."""
    state = tmp_path_factory.mktemp("schema-state")
    keys = state / "keys.json"
    _ADMIN_KEY["X-API-Key"] = create_api_key(keys, "schemathesis", ["admin"])
    app = create_app(
        Settings(
            model_uri=str(api_model),
            state_dir=state,
            api_keys_file=keys,
            pseudonymisation_key=PSEUDONYM_KEY,
            reload_poll_seconds=0,
            max_batch=50,
            seed=0,
        )
    )
    yield schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_post_generated_requests_no_server_error(case: schemathesis.Case) -> None:
    response = case.call(headers=_ADMIN_KEY)
    CASES[f"{case.method} {case.path}"] += 1
    assert response.status_code < 500, (case.method, case.path, response.text[:500])


def test_count_generated_cases_at_least_1000() -> None:
    assert sum(CASES.values()) >= 1000, dict(CASES)
