"""Reading config files: every unusable file is a ConfigError naming it, never a traceback."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import Field

from nextbest.config_loading import ConfigError, StrictModel, load_model, read_yaml


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\xff\xfelearner: vw_bandit\n", "not UTF-8 text: byte 0xff at offset 0"),
        ("name: caf\u00e9\n".encode("latin-1"), "not UTF-8 text: byte 0xe9 at offset 9"),
        (b"", "file is empty"),
        (b"- a\n- b\n", "top level must be a mapping, got list"),
    ],
)
def test_read_yaml_unusable_file_raises_config_error(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    assert (info.value.path, info.value.key, info.value.reason) == (str(path), "", reason)


class _Numbers(StrictModel):
    """Numbers the ways config models declare them (scenario, catalogue, training)."""

    count: int = 1
    share: Annotated[float, Field(ge=0)] = 0.5
    cap: int | None = None
    ages: tuple[int, int] = (18, 65)
    weights: tuple[Annotated[float, Field(ge=0)], ...] = ()
    by_stage: dict[str, dict[str, float]] = Field(default_factory=dict)
    flag: bool = False
    count_or_flag: int | bool = 0
    params: dict[str, Any] = Field(default_factory=dict)
    names_or_counts: list[str] | list[int] = Field(default_factory=list)
    series: Sequence[int] = ()


@pytest.mark.parametrize(
    ("body", "key", "reason"),
    [
        ("count: true", "count", "expected an integer, got a boolean"),
        ("share: false", "share", "expected a number, got a boolean"),
        ("cap: true", "cap", "expected an integer, got a boolean"),
        ("ages: [18, true]", "ages", "expected an integer, got a boolean"),
        ("weights: [0.5, true]", "weights", "expected a number, got a boolean"),
        ("by_stage: {young: {email: true}}", "by_stage", "expected a number, got a boolean"),
        ("names_or_counts: [1, true]", "names_or_counts", "expected an integer, got a boolean"),
        ("series: [true]", "series", "expected an integer, got a boolean"),
        ("flag: 1", "flag", "expected a boolean (true or false), got a number"),
        ("flag: 0.0", "flag", "expected a boolean (true or false), got a number"),
    ],
)
def test_load_model_boolean_for_a_number_or_the_reverse_refused_naming_key(
    tmp_path: Path, body: str, key: str, reason: str
) -> None:
    """Pydantic reads a boolean as 1 or 0 where a number is expected, and 1 or 0 as a boolean
    where a boolean is; a config refuses both."""
    path = tmp_path / "config.yaml"
    path.write_text(body + "\n")
    with pytest.raises(ConfigError) as info:
        load_model(path, _Numbers)
    assert (info.value.key, info.value.reason) == (key, reason)


def test_load_model_booleans_where_a_boolean_is_allowed_still_read(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("flag: true\ncount_or_flag: true\nparams: {x: true}\nages: [1, 2]\n")
    loaded = load_model(path, _Numbers)
    assert (loaded.flag, loaded.count_or_flag, loaded.params) == (True, True, {"x": True})


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("days: 30\nname: a\ndays: 0\n", "days", 3),  # the second one used to win
        ("rules:\n  - id: r\n    params: {days: 30, days: 0}\n", "days", 3),
        ("neural_bandit:\n  hidden: 8\nneural_bandit:\n  hidden: 16\n", "neural_bandit", 3),
    ],
)
def test_a_key_given_twice_is_refused_naming_it_and_its_lines(
    tmp_path: Path, text: str, key: str, line: int
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"line {line}.*key '{key}' appears twice \(first at"):
        read_yaml(path)


def test_merge_keys_still_work_and_may_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {days: 30, id: r}\nrule:\n  <<: *b\n  days: 7\n")
    assert read_yaml(path)["rule"] == {"days": 7, "id": "r"}


def test_the_same_key_in_different_mappings_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("a: {x: 1}\nb: {x: 2}\nlist:\n  - {id: 1}\n  - {id: 2}\n")
    assert read_yaml(path) == {"a": {"x": 1}, "b": {"x": 2}, "list": [{"id": 1}, {"id": 2}]}


def test_every_shipped_config_reads_without_repeated_keys() -> None:
    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert len(files) >= 8
    for path in files:
        assert read_yaml(path)
