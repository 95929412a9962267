"""Fixtures for the simulator tests: a simulator factory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from nextbest.catalog import ActionCatalog
from nextbest.compliance import RuleEngine
from simulators.scenario import Scenario
from simulators.world import BatchSimulator


@pytest.fixture
def make_sim(
    catalog: ActionCatalog, engine: RuleEngine, scenario: Scenario
) -> Callable[..., BatchSimulator]:
    """Factory ``make_sim(n, seed, world=None, **kwargs)``: a fresh simulator of ``world``
    (the default scenario if None) over the default catalogue and rules."""

    def make(n: int, seed: int, world: Scenario | None = None, **kwargs: Any) -> BatchSimulator:
        return BatchSimulator(world or scenario, catalog, engine, n, seed=seed, **kwargs)

    return make
