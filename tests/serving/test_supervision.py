"""A worker follows its supervisor only when there is one (the process-level behaviour is
tested in test_workers.py: workers stop when their supervisor is killed)."""

from __future__ import annotations

import os

import pytest

from serving.supervision import SUPERVISOR_ENV, follow_supervisor, mark_supervisor


def test_no_supervisor_nothing_to_follow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SUPERVISOR_ENV, raising=False)
    assert follow_supervisor() is False


def test_the_supervisor_does_not_follow_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    environ: dict[str, str] = {}
    mark_supervisor(environ)
    assert environ == {SUPERVISOR_ENV: str(os.getpid())}
    monkeypatch.setenv(SUPERVISOR_ENV, environ[SUPERVISOR_ENV])
    assert follow_supervisor() is False
