"""Helpers shared by the simulator tests (imported as ``sim_helpers``)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np

from simulators.population import Population
from simulators.scenario import Scenario
from simulators.world import BatchSimulator, StepResult


def with_behaviour(scenario: Scenario, **changes: Any) -> Scenario:
    """A copy of ``scenario`` with some ``behaviour`` fields replaced."""
    return scenario.model_copy(update={"behaviour": scenario.behaviour.model_copy(update=changes)})


def wait_step(sim: BatchSimulator) -> StepResult:
    """Advance ``sim`` one day with every decider waiting (no contact is always allowed)."""
    customers = sim.decision_customers()
    allowed = sim.allowed(customers, sim.context(customers))
    return sim.step(customers, np.zeros(len(customers), np.int64), allowed)


def assert_same_population(a: Population, b: Population) -> None:
    """Every array of the two populations is equal (inf == inf, NaN == NaN)."""
    for f in fields(Population):
        np.testing.assert_array_equal(getattr(a, f.name), getattr(b, f.name), err_msg=f.name)


def populations_equal(a: Population, b: Population) -> bool:
    """Whether every array of the two populations is equal (NaN == NaN in float arrays)."""
    for f in fields(Population):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            return False
    return True
