"""Reading config files: every unusable file is a ConfigError naming it, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from nextbest.config_loading import ConfigError, read_yaml


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
