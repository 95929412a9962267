"""Session fixtures shared by all tests: the default catalogue, rules, engine and scenario."""

from __future__ import annotations

import pytest

from nextbest.catalog import ActionCatalog, load_catalog
from nextbest.compliance import DEFAULT_RULES_PATH, RuleEngine, RuleSet, load_rules
from simulators.scenario import DEFAULT_SCENARIO, Scenario, load_scenario


@pytest.fixture(scope="session")
def catalog() -> ActionCatalog:
    """The catalogue of ``configs/catalog``."""
    return load_catalog()


@pytest.fixture(scope="session")
def ruleset(catalog: ActionCatalog) -> RuleSet:
    """The default compliance rules bound to the default catalogue."""
    return load_rules(DEFAULT_RULES_PATH, catalog)


@pytest.fixture(scope="session")
def engine(ruleset: RuleSet) -> RuleEngine:
    """The rule engine over the default rules."""
    return RuleEngine(ruleset)


@pytest.fixture(scope="session")
def scenario(catalog: ActionCatalog) -> Scenario:
    """``configs/scenarios/retail_bank.yaml`` bound to the default catalogue."""
    return load_scenario(DEFAULT_SCENARIO, catalog)
