"""The reference semantics of a rule set: one customer, one action, one rule at a time.

Slow and obviously right. The fast engine paths are tested against it, and the compliance
benchmark uses it as its baseline.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nextbest.compliance.engine import ALLOWED
from nextbest.compliance.rules import RuleSet


def reference_blocked_by(ruleset: RuleSet, row: dict[str, Any]) -> np.ndarray:
    """First blocking rule per action for one customer (``ContextBatch.row``), by plain loops.

    Returns
    -------
    ndarray of uint8, shape (A,)
        Rule index, or ``ALLOWED`` (the no-contact action is never blocked).
    """
    n_actions = ruleset.catalog.n_actions
    out = np.full(n_actions, ALLOWED, np.uint8)
    for action in range(1, n_actions):
        for rule in ruleset.rules:
            if all(cond.holds(row, action) for cond in rule.conditions):
                out[action] = rule.index
                break
    return out
