"""The declarative rule set: ``configs/compliance/*.yaml`` parsed into conditions.

A rule blocks a (customer, action) pair when every expression in its ``block_when`` list
holds. An expression is ``<left> <op> <right>`` where an operand is one of

* ``action.<attribute>``: an attribute of the action (see ``ACTION_ATTRIBUTES``);
* ``customer.<column>``: a scalar or per-channel column of the context (``CONTEXT_COLUMNS``);
  a per-channel column is read at the action's channel;
* ``contact.hour``: the local hour the contact would land in (with ``in_window``);
* ``param.<name>``: a value from the rule's ``params`` (a per-channel mapping is read at the
  action's channel);
* a YAML literal: ``365``, ``true``, ``R1``, ``C3``, ``[sms, outbound_call]``.

Operators: ``== != < <= > >=``, ``in``, ``not_in``, ``in_window``, ``not_in_window``.
Rules are listed in precedence order: when several rules block a pair, the first is reported.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import Field, ValidationError, field_validator

from nextbest.catalog import ACTION_ATTRIBUTES, RISK_LEVELS, ActionCatalog
from nextbest.compliance.conditions import (
    ALL_OPS,
    MEMBERSHIP_OPS,
    ORDERING_OPS,
    WINDOW_OPS,
    ActionCondition,
    ChannelCondition,
    Condition,
    ContactHourCondition,
    CrossCondition,
    CustomerCondition,
)
from nextbest.config_loading import (
    ConfigError,
    StrictModel,
    config_error_from_validation,
    content_hash,
    load_yaml_text,
    read_yaml,
)
from nextbest.context import CONTEXT_COLUMNS, INCOME_BANDS, LIFECYCLE_STAGES, RISK_TOLERANCES

DEFAULT_RULES_PATH = Path(__file__).resolve().parents[2] / "configs" / "compliance" / "default.yaml"
MAX_RULES = 254
MAX_RULE_KEYS = 1 << 16

_EXPRESSION = re.compile(
    r"^\s*(?P<left>\S+)\s+(?P<op>==|!=|<=|>=|<|>|not_in_window|in_window|not_in|in)\s+(?P<right>.+?)\s*$"
)
_REFERENCE = re.compile(r"^(action|customer|contact|param)\.([A-Za-z_][A-Za-z0-9_]*)$")
_VOCABULARIES: dict[str, tuple[str, ...]] = {
    "risk_tolerance": ("unassessed", *RISK_TOLERANCES),
    "income_band": INCOME_BANDS,
    "lifecycle_stage": LIFECYCLE_STAGES,
}


class RuleSpec(StrictModel):
    """One rule as written in the YAML file."""

    id: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str = Field(min_length=1)
    source: str = ""
    """Where the rule comes from (regulation, policy, domain brief)."""
    params: dict[str, Any] = Field(default_factory=dict)
    block_when: tuple[str, ...] = Field(min_length=1)


class RuleSetFile(StrictModel):
    """A rule-set file."""

    name: str = Field(min_length=1)
    description: str = ""
    rules: tuple[RuleSpec, ...] = Field(min_length=1, max_length=MAX_RULES)

    @field_validator("rules")
    @classmethod
    def _unique_ids(cls, value: tuple[RuleSpec, ...]) -> tuple[RuleSpec, ...]:
        seen: set[str] = set()
        for rule in value:
            if rule.id in seen:
                raise ValueError(f"duplicate rule id {rule.id!r}")
            seen.add(rule.id)
        return value


class Rule:
    """A parsed rule: its spec and its conditions bound to a catalogue."""

    def __init__(self, index: int, spec: RuleSpec, conditions: list[Condition]) -> None:
        self.index = index
        self.spec = spec
        self.conditions = conditions

    @property
    def id(self) -> str:
        return self.spec.id

    def __repr__(self) -> str:
        return f"Rule({self.index}, {self.id!r}, {[c.text for c in self.conditions]})"


class RuleSet:
    """An ordered set of rules bound to a catalogue, with a content-hash version."""

    def __init__(self, spec: RuleSetFile, catalog: ActionCatalog, source: str = "<memory>") -> None:
        self.spec = spec
        self.catalog = catalog
        self.source = source
        self.rules: tuple[Rule, ...] = tuple(
            Rule(
                i,
                r,
                [
                    _parse(expr, r, catalog, source, f"rules.{i}.block_when.{j}")
                    for j, expr in enumerate(r.block_when)
                ],
            )
            for i, r in enumerate(spec.rules)
        )

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def rule_ids(self) -> tuple[str, ...]:
        return tuple(r.id for r in self.rules)

    @cached_property
    def version(self) -> str:
        """Hash of the rule set's content; every decision records it."""
        return content_hash(json.dumps(self.spec.model_dump(mode="json"), sort_keys=True))

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"RuleSet({self.name!r}, {len(self.rules)} rules, version={self.version})"


def load_rules(path: str | Path, catalog: ActionCatalog) -> RuleSet:
    """Load and bind a rule-set file.

    Raises
    ------
    ConfigError
        Naming the file, the key (``rules.3.block_when.1``) and the reason: unknown fields,
        operators or parameters, malformed expressions, duplicate ids.
    """
    data = read_yaml(path)
    try:
        spec = RuleSetFile.model_validate(data)
    except ValidationError as exc:
        raise config_error_from_validation(path, exc) from None
    return RuleSet(spec, catalog, str(path))


def rules_from_yaml(text: str, catalog: ActionCatalog, source: str = "<string>") -> RuleSet:
    """Parse a rule set from YAML text (tests, notebooks)."""
    try:
        data = load_yaml_text(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, "", f"malformed YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(source, "", f"top level must be a mapping, got {type(data).__name__}")
    try:
        spec = RuleSetFile.model_validate(data)
    except ValidationError as exc:
        raise config_error_from_validation(source, exc) from None
    return RuleSet(spec, catalog, source)


def _parse(expr: str, rule: RuleSpec, catalog: ActionCatalog, source: str, key: str) -> Condition:
    def fail(reason: str) -> ConfigError:
        return ConfigError(source, key, f"{reason} (in {expr!r})")

    match = _EXPRESSION.match(expr)
    if match is None:
        raise fail(f"expected '<left> <op> <right>' with op one of {list(ALL_OPS)}")
    left, op, right = match["left"], match["op"], match["right"]
    lref = _REFERENCE.match(left)
    if lref is None:
        raise fail("the left side must be action.<attribute>, customer.<column> or contact.hour")
    rref = _REFERENCE.match(right)
    lkind, lname = lref.groups()

    if rref is not None and rref[1] == "param":
        if rref[2] not in rule.params:
            raise fail(f"unknown parameter {rref[2]!r}; this rule's params: {sorted(rule.params)}")
        rvalue: Any = rule.params[rref[2]]
        rref = None
    elif rref is None:
        try:
            rvalue = yaml.safe_load(right)
        except yaml.YAMLError:
            raise fail(f"cannot read the right-hand value {right!r}") from None
    else:
        rvalue = None

    if lkind == "param":
        raise fail("put the parameter on the right-hand side")
    if lkind == "contact":
        if lname != "hour":
            raise fail(f"unknown contact field {lname!r}; known: ['hour']")
        if op not in WINDOW_OPS:
            raise fail(f"contact.hour takes {list(WINDOW_OPS)}")
        window = _hour_window(rvalue, fail)
        slot_hours: list[tuple[int, ...] | None] = [None]
        for action in catalog.actions[1:]:
            slot_hours.append(catalog.slot(action.timing or "").hours())
        return ContactHourCondition(expr, op, window, slot_hours)
    if op in WINDOW_OPS:
        raise fail(f"{op} applies only to contact.hour")

    if lkind == "action":
        values = _action_values(lname, catalog, fail)
        if rref is not None:
            if rref[1] != "customer":
                raise fail("compare an action attribute with a customer column or a value")
            column = _customer_column(rref[2], fail, scalar_only=True)
            return _cross(expr, values, column, op, action_first=True, fail=fail)
        value = _normalise(lname, rvalue, op, fail, side="action", catalog=catalog)
        present = [a for a in values if a is not None]
        if all(isinstance(a, bool) for a in present):
            kind = "flag"
        elif all(isinstance(a, int | float) for a in present):
            kind = "number"
        else:  # names (channel, offer ...): checked by _normalise
            kind = "text"
        _check_kind(f"action.{lname}", kind, value, fail)
        return ActionCondition(expr, values, op, value)

    # lkind == "customer"
    column = _customer_column(lname, fail, scalar_only=False)
    spec = CONTEXT_COLUMNS[column]
    if rref is not None:
        if rref[1] != "action":
            raise fail("compare a customer column with an action attribute or a value")
        if spec.axis != "scalar":
            raise fail(f"per-channel column {column!r} cannot be compared with an action attribute")
        values = _action_values(rref[2], catalog, fail)
        return _cross(expr, values, column, op, action_first=False, fail=fail)
    if spec.axis == "channel":
        if op not in ORDERING_OPS:
            raise fail(f"per-channel column {column!r} takes {list(ORDERING_OPS)}")
        per_channel = _per_channel(rvalue, catalog, fail)
        _check_kind(column, _column_kind(column), per_channel, fail)
        return ChannelCondition(expr, column, op, per_channel, catalog.channel_index)
    value = _normalise(column, rvalue, op, fail, side="customer", catalog=catalog)
    _check_kind(column, _column_kind(column), value, fail)
    return CustomerCondition(expr, column, op, value, catalog.n_actions)


def _column_kind(column: str) -> str:
    """``flag`` or ``number``: what a customer column holds."""
    return "flag" if CONTEXT_COLUMNS[column].dtype is np.bool_ else "number"


def _check_kind(label: str, kind: str, value: Any, fail: Any) -> None:
    """Refuse a value of another kind than what ``label`` (a customer column, an action
    attribute) holds: a ``flag`` compares with true/false, a ``number`` with a finite number
    (``.nan`` or ``.inf`` would switch a cap off, ``true`` would be read as 1); any float
    compared must be finite."""
    for v in value if isinstance(value, list | tuple) else (value,):
        if kind == "flag" and not isinstance(v, bool):
            raise fail(f"{label} is true or false; got {v!r}")
        if kind == "number" and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise fail(f"{label} is a number; got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise fail(f"{label} must be compared with a finite number, got {v!r}")


def _action_values(name: str, catalog: ActionCatalog, fail: Any) -> list[Any]:
    if name not in ACTION_ATTRIBUTES:
        raise fail(f"unknown action attribute {name!r}; known: {sorted(ACTION_ATTRIBUTES)}")
    return catalog.attribute(name)


def _customer_column(name: str, fail: Any, scalar_only: bool) -> str:
    if name not in CONTEXT_COLUMNS:
        raise fail(f"unknown customer field {name!r}; known: {sorted(CONTEXT_COLUMNS)}")
    axis = CONTEXT_COLUMNS[name].axis
    if axis == "offer":
        raise fail(f"per-offer column {name!r} cannot be used in rules")
    if scalar_only and axis != "scalar":
        raise fail(f"per-channel column {name!r} cannot be compared with an action attribute")
    return name


def _cross(
    expr: str, values: list[Any], column: str, op: str, action_first: bool, fail: Any
) -> CrossCondition:
    if op not in ORDERING_OPS:
        raise fail(
            f"comparing an action attribute with a customer column takes {list(ORDERING_OPS)}"
        )
    if any(v is not None and not isinstance(v, int | float) for v in values):
        raise fail("only numeric action attributes can be compared with a customer column")
    return CrossCondition(expr, values, column, op, action_first)


def _normalise(name: str, value: Any, op: str, fail: Any, side: str, catalog: ActionCatalog) -> Any:
    """Map vocabulary literals (R3, C2, growth ...) to the numbers columns and attributes hold,
    and refuse names the catalogue does not have (a typo would silently exempt a channel)."""
    if value is None:
        raise fail("the right-hand side needs a value, got null")
    if op in MEMBERSHIP_OPS:
        if not isinstance(value, list):
            raise fail(f"{op} needs a list on the right, got {value!r}")
        return [_normalise_one(name, v, fail, side, catalog) for v in value]
    if isinstance(value, list | dict):
        raise fail(f"{op} needs a single value on the right, got {value!r}")
    return _normalise_one(name, value, fail, side, catalog)


def _normalise_one(name: str, value: Any, fail: Any, side: str, catalog: ActionCatalog) -> Any:
    if value is None:
        raise fail("null is not a value a rule can compare with")
    if side == "action" and name in ("channel", "offer", "timing", "family"):
        known = {
            "channel": catalog.channel_names,
            "offer": catalog.offer_names,
            "timing": catalog.timing_names,
            "family": tuple(sorted({o.family for o in catalog.offers})),
        }[name]
        if value not in known:
            raise fail(f"unknown {name} {value!r}; known: {list(known)}")
        return value
    if side == "action" and name == "risk_level" and isinstance(value, str):
        if value not in RISK_LEVELS:
            raise fail(f"risk level must be one of R1..R5, got {value!r}")
        return RISK_LEVELS.index(value) + 1
    if side == "customer" and name in _VOCABULARIES and isinstance(value, str):
        vocabulary = _VOCABULARIES[name]
        if value not in vocabulary:
            raise fail(f"{name} must be one of {list(vocabulary)}, got {value!r}")
        return vocabulary.index(value)
    if side == "customer" and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            raise fail(f"customer column {name!r} is numeric; got the string {value!r}") from None
    return value


def _per_channel(value: Any, catalog: ActionCatalog, fail: Any) -> tuple[Any, ...]:
    if isinstance(value, Mapping):
        unknown = [c for c in value if c not in catalog.channel_names]
        if unknown:
            raise fail(f"unknown channel {unknown[0]!r} in parameter")
        missing = [c for c in catalog.channel_names if c not in value]
        if missing:
            raise fail(f"parameter gives no value for channel(s) {missing}")
        out = tuple(value[c] for c in catalog.channel_names)
    else:
        out = (value,) * catalog.n_channels
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in out) and not all(
        isinstance(v, bool) for v in out
    ):
        raise fail(f"per-channel values must be numbers or booleans, got {out!r}")
    return out


def _hour_window(value: Any, fail: Any) -> tuple[int, int]:
    ok = (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h <= 24 for h in value)
    )
    if not ok:
        raise fail(f"an hour window is [start, end] with hours 0..24, got {value!r}")
    return int(value[0]), int(value[1])
