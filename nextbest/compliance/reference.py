"""The reference semantics of a rule set: one customer, one action, one rule at a time.

Slow and obviously right. The fast engine paths are tested against it, and the compliance
benchmark uses it as its baseline.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nextbest.compliance.engine import ALLOWED
from nextbest.compliance.rules import RuleSet


def reference_rule(ruleset: RuleSet, row: dict[str, Any], action: int) -> int | None:
    """Index of the first rule of ``ruleset`` that blocks ``action`` for one customer
    (``ContextBatch.row``), by plain loops; None if no rule does (the no-contact action,
    id 0, is never blocked)."""
    if action == 0:
        return None
    for rule in ruleset.rules:
        if all(cond.holds(row, action) for cond in rule.conditions):
            return rule.index
    return None


def reference_blocked_by(ruleset: RuleSet, row: dict[str, Any]) -> np.ndarray:
    """First blocking rule per action for one customer (``ContextBatch.row``), by plain loops.

    Returns
    -------
    ndarray of uint8, shape (A,)
        Rule index, or ``ALLOWED`` (the no-contact action is never blocked).
    """
    out = np.full(ruleset.catalog.n_actions, ALLOWED, np.uint8)
    for action in range(1, ruleset.catalog.n_actions):
        rule = reference_rule(ruleset, row, action)
        if rule is not None:
            out[action] = rule
    return out
