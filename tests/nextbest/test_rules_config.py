"""Rule-set files: every kind of bad rule fails at load naming file, key and reason; versions."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from nextbest.catalog import ActionCatalog
from nextbest.compliance import DEFAULT_RULES_PATH, RuleEngine, RuleSet, load_rules, rules_from_yaml
from nextbest.config_loading import ConfigError


def _rule(block_when: list[str], params: dict[str, Any] | None = None, **extra: Any) -> dict:
    rule: dict[str, Any] = {"id": "r", "description": "A test rule."}
    if params is not None:
        rule["params"] = params
    rule["block_when"] = block_when
    rule.update(extra)
    return rule


def _file(*rules: dict) -> str:
    return yaml.safe_dump({"name": "test", "rules": list(rules)}, sort_keys=False)


GOOD = _rule(["customer.age < 18"])
CAPS = {"app_push": 3, "sms": 2, "wechat": 2, "outbound_call": 1, "relationship_manager": 1}

# (file text, key, reason pattern)
BAD_RULE_FILES = [
    pytest.param(
        _file(_rule(["customer.wealth > 1000000"])),
        "rules.0.block_when.0",
        "unknown customer field 'wealth'; known: ",
        id="unknown_customer_field",
    ),
    pytest.param(
        _file(_rule(["action.credit == true", "action.colour == red"])),
        "rules.0.block_when.1",
        "unknown action attribute 'colour'",
        id="unknown_action_attribute",
    ),
    pytest.param(
        _file(GOOD, _rule(["customer.age < param.limit"], {"max_age": 3}, id="s")),
        "rules.1.block_when.0",
        r"unknown parameter 'limit'; this rule's params: \['max_age'\]",
        id="unknown_param",
    ),
    pytest.param(
        _file(_rule(["customer.age<18"])),
        "rules.0.block_when.0",
        "expected '<left> <op> <right>'",
        id="malformed_expression_no_spaces",
    ),
    pytest.param(
        _file(_rule(["customer.age"])),
        "rules.0.block_when.0",
        "expected '<left> <op> <right>'",
        id="malformed_expression_no_operator",
    ),
    pytest.param(
        _file(_rule(["customer.age ~= 18"])),
        "rules.0.block_when.0",
        r"op one of \['==', '!=', '<', '<=', '>', '>=', 'in', 'not_in', 'in_window'",
        id="unknown_operator",
    ),
    pytest.param(
        _file(_rule(["age < 18"])),
        "rules.0.block_when.0",
        "the left side must be action.<attribute>, customer.<column> or contact.hour",
        id="unqualified_left_side",
    ),
    pytest.param(
        _file(GOOD, GOOD),
        "rules",
        "duplicate rule id 'r'",
        id="duplicate_rule_id",
    ),
    pytest.param(
        _file(_rule(["customer.age < 18"], severity="high")),
        "rules.0.severity",
        "unknown key",
        id="unknown_key_in_rule",
    ),
    pytest.param(
        "name: test\nrules:\n  - id: r\n    block_when: [customer.age < 18\n",
        "",
        "malformed YAML at line",
        id="malformed_yaml",
    ),
    pytest.param(
        _file(_rule(["customer.contacts_7d >= param.cap"], {"cap": CAPS})),
        "rules.0.block_when.0",
        r"parameter gives no value for channel\(s\) \['branch_invite'\]",
        id="per_channel_param_missing_channel",
    ),
    pytest.param(
        _file(_rule(["customer.contacts_7d >= param.cap"], {"cap": {**CAPS, "branch": 1}})),
        "rules.0.block_when.0",
        "unknown channel 'branch' in parameter",
        id="per_channel_param_unknown_channel",
    ),
    pytest.param(
        _file(_rule(["customer.contacts_7d_total >= param.cap"], {"cap": float("nan")})),
        "rules.0.block_when.0",
        "contacts_7d_total must be compared with a finite number, got nan",
        id="nan_cap_would_switch_the_rule_off",
    ),
    pytest.param(
        _file(_rule(["customer.days_since_complaint < param.days"], {"days": float("inf")})),
        "rules.0.block_when.0",
        "days_since_complaint must be compared with a finite number, got inf",
        id="infinite_period",
    ),
    pytest.param(
        _file(
            _rule(
                ["customer.contacts_7d >= param.cap"],
                {"cap": {**CAPS, "sms": float("nan"), "branch_invite": 1}},
            )
        ),
        "rules.0.block_when.0",
        "contacts_7d must be compared with a finite number, got nan",
        id="nan_per_channel_cap",
    ),
    pytest.param(
        _file(_rule(["customer.contacts_7d_total >= param.cap"], {"cap": True})),
        "rules.0.block_when.0",
        "contacts_7d_total is a number; got True",
        id="boolean_cap",
    ),
    pytest.param(
        _file(_rule(["customer.age >= true"])),
        "rules.0.block_when.0",
        "age is a number; got True",
        id="boolean_age",
    ),
    pytest.param(
        _file(_rule(["customer.litigation == 1"])),
        "rules.0.block_when.0",
        "litigation is true or false; got 1",
        id="number_for_a_flag",
    ),
    pytest.param(
        _file(_rule(["action.cost_cny > true"])),
        "rules.0.block_when.0",
        "action.cost_cny is a number; got True",
        id="boolean_for_an_action_number",
    ),
    pytest.param(
        _file(_rule(["action.credit == 1"])),
        "rules.0.block_when.0",
        "action.credit is true or false; got 1",
        id="number_for_an_action_flag",
    ),
    pytest.param(
        _file(_rule(["customer.age < param.a"], {"a": "nan"})),
        "rules.0.block_when.0",
        "age must be compared with a finite number, got nan",
        id="nan_as_text",
    ),
    pytest.param(
        _file(_rule(["action.risk_level > R9"])),
        "rules.0.block_when.0",
        "risk level must be one of R1..R5, got 'R9'",
        id="risk_literal_r9",
    ),
    pytest.param(
        _file(_rule(["action.risk_level in [R1, R9]"])),
        "rules.0.block_when.0",
        "risk level must be one of R1..R5, got 'R9'",
        id="risk_literal_r9_in_list",
    ),
    pytest.param(
        _file(_rule(["customer.risk_tolerance < C9"])),
        "rules.0.block_when.0",
        r"risk_tolerance must be one of \['unassessed', 'C1'",
        id="tolerance_literal_c9",
    ),
    pytest.param(
        _file(_rule(["customer.age > old"])),
        "rules.0.block_when.0",
        "customer column 'age' is numeric; got the string 'old'",
        id="string_for_numeric_column",
    ),
    pytest.param(
        _file(_rule(["customer.holds == true"])),
        "rules.0.block_when.0",
        "per-offer column 'holds' cannot be used in rules",
        id="per_offer_column",
    ),
    pytest.param(
        _file(_rule(["customer.age in_window [1, 2]"])),
        "rules.0.block_when.0",
        "in_window applies only to contact.hour",
        id="window_op_on_customer",
    ),
    pytest.param(
        _file(_rule(["contact.hour < 3"])),
        "rules.0.block_when.0",
        r"contact.hour takes \['in_window', 'not_in_window'\]",
        id="ordering_op_on_contact_hour",
    ),
    pytest.param(
        _file(_rule(["contact.minute in_window [1, 2]"])),
        "rules.0.block_when.0",
        "unknown contact field 'minute'",
        id="unknown_contact_field",
    ),
    pytest.param(
        _file(_rule(["contact.hour in_window [21, 25]"])),
        "rules.0.block_when.0",
        r"an hour window is \[start, end\] with hours 0..24, got \[21, 25\]",
        id="hour_window_out_of_range",
    ),
    pytest.param(
        _file(_rule(["param.x < customer.age"], {"x": 3})),
        "rules.0.block_when.0",
        "put the parameter on the right-hand side",
        id="param_on_left",
    ),
    pytest.param(
        _file(_rule(["customer.age in 3"])),
        "rules.0.block_when.0",
        "in needs a list on the right, got 3",
        id="membership_without_list",
    ),
    pytest.param(
        _file(_rule(["action.family < customer.age"])),
        "rules.0.block_when.0",
        "only numeric action attributes can be compared with a customer column",
        id="cross_non_numeric_attribute",
    ),
    pytest.param(
        _file(_rule(["customer.contacts_7d < action.min_age"])),
        "rules.0.block_when.0",
        "per-channel column 'contacts_7d' cannot be compared with an action attribute",
        id="cross_per_channel_column",
    ),
    # At 13a7f79 the next four loaded: a misspelt channel or offer silently exempted it from
    # the rule, and a null literal failed with a bare TypeError (at load or at evaluation).
    pytest.param(
        _file(
            _rule(
                ["action.channel in param.channels", "contact.hour in_window param.window"],
                {"channels": ["sms", "outbound_cal"], "window": [21, 8]},
            )
        ),
        "rules.0.block_when.0",
        "unknown channel 'outbound_cal'",
        id="unknown_channel_literal",
    ),
    pytest.param(
        _file(_rule(["action.credit == true", "action.offer == bitcoin"])),
        "rules.0.block_when.1",
        "unknown offer 'bitcoin'",
        id="unknown_offer_literal",
    ),
    pytest.param(
        _file(_rule(["action.risk_level > null"])),
        "rules.0.block_when.0",
        "null",
        id="null_literal_action",
    ),
    pytest.param(
        _file(_rule(["customer.age > null"])),
        "rules.0.block_when.0",
        "null",
        id="null_literal_customer",
    ),
    pytest.param(
        _file(_rule([])),
        "rules.0.block_when",
        "at least 1 item",
        id="empty_block_when",
    ),
    pytest.param(
        _file({"id": "r", "block_when": ["customer.age < 18"]}),
        "rules.0.description",
        "Field required",
        id="missing_description",
    ),
    pytest.param(
        _file(_rule(["customer.age < 18"], id="Bad-Id")),
        "rules.0.id",
        "should match pattern",
        id="bad_rule_id",
    ),
    pytest.param(
        "name: test\nrules: []\n",
        "rules",
        "at least 1 item",
        id="no_rules",
    ),
    pytest.param(
        "- customer.age < 18\n",
        "",
        "top level must be a mapping, got list",
        id="top_level_list",
    ),
]


@pytest.mark.parametrize(("text", "key", "reason"), BAD_RULE_FILES)
def test_load_rules_bad_file_raises_config_error(
    catalog: ActionCatalog, tmp_path: Path, text: str, key: str, reason: str
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=reason) as info:
        load_rules(path, catalog)
    assert info.value.path == str(path)
    assert info.value.key == key
    assert str(info.value).startswith(f"{path}: ")


def test_load_rules_error_quotes_expression(catalog: ActionCatalog, tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(_file(GOOD, _rule(["customer.wealth > 1"], id="s")), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_rules(path, catalog)
    assert info.value.key == "rules.1.block_when.0"
    assert "'wealth'" in info.value.reason
    assert "(in 'customer.wealth > 1')" in info.value.reason


def test_load_rules_missing_file_raises(catalog: ActionCatalog, tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="file not found") as info:
        load_rules(path, catalog)
    assert (info.value.path, info.value.key) == (str(path), "")


def test_compile_rule_too_many_keys(catalog: ActionCatalog) -> None:
    text = _file(
        _rule(
            ["customer.contacts_7d >= 1", "customer.contacts_30d >= 2", "customer.consent == true"]
        )
    )
    ruleset = rules_from_yaml(text, catalog, source="three_channel_conditions.yaml")
    with pytest.raises(ConfigError, match="combines too many customer conditions") as info:
        RuleEngine(ruleset)
    assert info.value.path == "three_channel_conditions.yaml"
    assert info.value.key == "rules.0.block_when"


def test_parse_rules_yaml_bad_expression_names_source(catalog: ActionCatalog) -> None:
    with pytest.raises(ConfigError, match="unknown customer field 'wealth'") as info:
        rules_from_yaml(_file(_rule(["customer.wealth > 1"])), catalog, source="inline")
    assert (info.value.path, info.value.key) == ("inline", "rules.0.block_when.0")


# At 13a7f79 rules_from_yaml let yaml.YAMLError escape (load_rules goes through read_yaml).
def test_parse_rules_yaml_malformed_yaml_raises_config_error(catalog: ActionCatalog) -> None:
    with pytest.raises(ConfigError, match="malformed YAML") as info:
        rules_from_yaml("name: test\nrules: [\n", catalog, source="inline")
    assert (info.value.path, info.value.key) == ("inline", "")


def test_parse_rules_yaml_top_level_list_raises_config_error(catalog: ActionCatalog) -> None:
    with pytest.raises(ConfigError, match="list") as info:
        rules_from_yaml("- customer.age < 18\n", catalog, source="inline")
    assert (info.value.path, info.value.key) == ("inline", "")


def test_hash_ruleset_version_stable_across_loads(catalog: ActionCatalog, ruleset: RuleSet) -> None:
    again = load_rules(DEFAULT_RULES_PATH, catalog)
    assert again.version == ruleset.version
    assert again.rule_ids == ruleset.rule_ids
    assert RuleEngine(again).version == ruleset.version


def test_hash_ruleset_version_changes_when_rule_changes(
    catalog: ActionCatalog, ruleset: RuleSet, tmp_path: Path
) -> None:
    path = tmp_path / "default.yaml"
    shutil.copy(DEFAULT_RULES_PATH, path)
    assert load_rules(path, catalog).version == ruleset.version
    text = path.read_text(encoding="utf-8")
    assert text.count("days: 30") == 1
    path.write_text(text.replace("days: 30", "days: 31"), encoding="utf-8")
    changed = load_rules(path, catalog)
    assert changed.rule_ids == ruleset.rule_ids
    assert changed.version != ruleset.version


def test_hash_ruleset_version_changes_when_rules_reordered(
    catalog: ActionCatalog, ruleset: RuleSet, tmp_path: Path
) -> None:
    data = yaml.safe_load(DEFAULT_RULES_PATH.read_text(encoding="utf-8"))
    data["rules"] = data["rules"][::-1]
    path = tmp_path / "reordered.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    assert load_rules(path, catalog).version != ruleset.version


def test_hash_ruleset_version_ignores_comments(
    catalog: ActionCatalog, ruleset: RuleSet, tmp_path: Path
) -> None:
    path = tmp_path / "default.yaml"
    path.write_text(
        "# reviewed 2026-01\n" + DEFAULT_RULES_PATH.read_text(encoding="utf-8"), encoding="utf-8"
    )
    assert load_rules(path, catalog).version == ruleset.version


def test_parse_rules_yaml_equals_load_rules(catalog: ActionCatalog, ruleset: RuleSet) -> None:
    text = DEFAULT_RULES_PATH.read_text(encoding="utf-8")
    inline = rules_from_yaml(text, catalog)
    assert inline.version == ruleset.version
    assert [[c.text for c in r.conditions] for r in inline.rules] == [
        [c.text for c in r.conditions] for r in ruleset.rules
    ]
