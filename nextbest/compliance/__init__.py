"""Compliance: one rule set, one engine, used as the action mask everywhere."""

from nextbest.compliance.engine import ALLOWED, RuleEngine, Verdict, code_counts
from nextbest.compliance.rules import DEFAULT_RULES_PATH, Rule, RuleSet, load_rules, rules_from_yaml

__all__ = [
    "ALLOWED",
    "DEFAULT_RULES_PATH",
    "Rule",
    "RuleEngine",
    "RuleSet",
    "Verdict",
    "code_counts",
    "load_rules",
    "rules_from_yaml",
]
