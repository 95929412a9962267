"""API keys (401/403), settings that refuse unsafe defaults outside local."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest
from conftest import customer
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError

from nextbest.privacy import pseudonymise
from serving.app import create_app
from serving.pseudonym_binding import PseudonymKeyError, bind_pseudonym_key, key_fingerprint
from serving.security import (
    ApiKeys,
    AuthError,
    KeyFileError,
    create_api_key,
    main,
    revoke_api_key,
)
from serving.service import ScoringService
from serving.settings import DEV_PSEUDONYMISATION_KEY, Settings


def test_post_decision_without_key_is_401(api_client: TestClient) -> None:
    response = api_client.post("/v1/decisions", json={"customer": customer()})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "ApiKey"


def test_post_decision_unknown_key_is_401(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    forged = auth["decide"]["X-API-Key"][:-4] + "AAAA"
    for key in (forged, "nbk_00000000_secret", "not-a-key"):
        response = api_client.post(
            "/v1/decisions", json={"customer": customer()}, headers={"X-API-Key": key}
        )
        assert response.status_code == 401


def test_post_decision_wrong_scope_is_403(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    response = api_client.post(
        "/v1/decisions", json={"customer": customer()}, headers=auth["reward"]
    )
    assert response.status_code == 403
    assert "decide" in response.json()["detail"]


def test_get_metrics_needs_metrics_scope(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    assert api_client.get("/metrics").status_code == 401
    assert api_client.get("/metrics", headers=auth["decide"]).status_code == 403
    assert api_client.get("/metrics", headers=auth["metrics"]).status_code == 200
    assert api_client.get("/metrics", headers=auth["admin"]).status_code == 200


def test_post_reload_needs_admin_scope(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    assert api_client.post("/v1/admin/reload", headers=auth["decide"]).status_code == 403
    assert api_client.post("/v1/admin/reload", headers=auth["admin"]).status_code == 200


def test_get_health_needs_no_key(api_client: TestClient) -> None:
    assert api_client.get("/healthz").json() == {"status": "ok"}
    assert api_client.get("/readyz").status_code == 200


def test_create_key_stores_only_a_salted_hash(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key = create_api_key(path, "platform", ["decide", "reward"])
    text = path.read_text()
    secret = key.split("_", 2)[2]
    assert secret not in text and key not in text
    assert (path.stat().st_mode & 0o777) == 0o600
    entry = json.loads(text)["keys"][0]
    assert set(entry) == {"key_id", "name", "salt", "sha256", "scopes", "created_at"}
    keys = ApiKeys.from_file(path)
    assert keys.authenticate(key, "reward").name == "platform"
    with pytest.raises(AuthError) as denied:
        keys.authenticate(key, "admin")
    assert denied.value.status_code == 403


def test_create_settings_outside_local_refuses_unsafe_defaults(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="public development key") as refused:
        Settings(environment="production")
    message = str(refused.value)
    assert "NEXTBEST_PSEUDONYMISATION_KEY" in message and "NEXTBEST_API_KEYS_FILE" in message
    assert "NEXTBEST_DOCS=false" in message
    keys = tmp_path / "keys.json"
    create_api_key(keys, "ops", ["admin"])
    safe = Settings(
        environment="production",
        pseudonymisation_key="a-real-secret-from-the-vault-Xq7#pL2v",
        api_keys_file=keys,
        docs=False,
    )
    assert safe.environment == "production"
    with pytest.raises(ValidationError, match="16-64 bytes, got 5"):
        Settings(pseudonymisation_key="short")
    with pytest.raises(ValidationError, match=r"16-64 bytes, got 70.*keep the same pseudonyms"):
        Settings(pseudonymisation_key="k" * 70)  # would have been cut to 64 silently


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("nextbest-local-development-key-not-a-secret ", "public development key"),
        ("NEXTBEST-LOCAL-DEVELOPMENT-KEY-NOT-A-SECRET", "public development key"),
        ("a" * 16, "fewer than 8 distinct characters"),
        ("abababababababababab", "fewer than 8 distinct characters"),
        ("test-pseudonymisation-key-0123456789", "a key this repository publishes"),
        ("benchmark-pseudonymisation-key-0123456789", "a key this repository publishes"),
        ("0123456789abcdef", "a key this repository publishes or a plain sequence"),
        ("nextbest-local-development-key-not-a-secret2", "a key this repository publishes"),
    ],
)
def test_create_settings_outside_local_refuses_weak_pseudonymisation_keys(
    tmp_path: Path, key: str, reason: str
) -> None:
    keys = tmp_path / "keys.json"
    create_api_key(keys, "ops", ["admin"])
    production = {"environment": "production", "api_keys_file": keys, "docs": False}
    with pytest.raises(ValidationError, match=reason):
        Settings(pseudonymisation_key=key, **production)
    assert Settings(pseudonymisation_key=key, environment="local").environment == "local"


def test_api_keys_file_that_is_a_directory_is_a_key_file_error(tmp_path: Path) -> None:
    """``NEXTBEST_API_KEYS_FILE=""`` reads as the directory ``.``: a clear error, not a
    traceback of the operating system's."""
    with pytest.raises(KeyFileError, match=f"{tmp_path}: cannot read the API keys file"):
        ApiKeys.from_file(tmp_path)


def test_create_settings_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXTBEST_EPSILON", "0.2")
    monkeypatch.setenv("NEXTBEST_EXPLORATION", "softmax")
    settings = Settings()
    assert settings.epsilon == 0.2 and settings.exploration == "softmax"


def test_post_decision_local_without_keys_file_is_open(api_settings: Settings) -> None:
    settings = api_settings.model_copy(update={"api_keys_file": None})
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/decisions", json={"customer": customer()})
    assert response.status_code == 200


def test_get_docs_off_when_disabled(api_settings: Settings) -> None:
    settings = api_settings.model_copy(update={"docs": False})
    with TestClient(create_app(settings)) as client:
        assert client.get("/docs").status_code == 404
        assert client.get("/openapi.json").status_code == 200


def test_get_openapi_declares_the_api_key_on_every_keyed_route(api_settings: Settings) -> None:
    with TestClient(create_app(api_settings)) as client:
        schema = client.get("/openapi.json").json()
    scheme = schema["components"]["securitySchemes"]["APIKeyHeader"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "X-API-Key")
    for path in ("/v1/decisions", "/v1/decisions/batch", "/v1/rewards"):
        assert schema["paths"][path]["post"]["security"] == [{"APIKeyHeader": []}], path


def test_create_key_refuses_to_add_to_an_invalid_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text('{"keys": [{"key_id": "x"}]}')
    with pytest.raises(KeyFileError, match="not a valid API keys file"):
        create_api_key(path, "platform", ["decide"])
    assert path.read_text() == '{"keys": [{"key_id": "x"}]}'  # left as it was


def test_list_and_revoke_keys_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.json"
    old = create_api_key(path, "platform", ["decide"])
    new = create_api_key(path, "platform", ["decide", "reward"])  # a rotation: same name
    old_id, new_id = old.split("_")[1], new.split("_")[1]
    assert main(["list", "--keys-file", str(path)]) == 0
    listed = capsys.readouterr().out
    assert (
        f"{old_id}  platform  decide" in listed and f"{new_id}  platform  decide,reward" in listed
    )
    assert old.split("_", 2)[2] not in listed and new.split("_", 2)[2] not in listed

    assert main(["revoke", "--keys-file", str(path), "--key-id", old_id]) == 0
    keys = ApiKeys.from_file(path)
    assert keys.authenticate(new, "reward").name == "platform"
    with pytest.raises(AuthError) as denied:
        keys.authenticate(old, "decide")
    assert denied.value.status_code == 401

    before = path.read_text()
    assert main(["revoke", "--keys-file", str(path), "--key-id", old_id]) == 2
    assert f"no key with id {old_id!r}" in capsys.readouterr().err
    assert path.read_text() == before
    assert main(["list", "--keys-file", str(tmp_path / "nope.json")]) == 2
    assert "API keys file not found" in capsys.readouterr().err


def test_running_service_drops_a_revoked_key_and_keeps_keys_over_a_broken_file(
    api_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "own_keys.json"  # not the session's keys file: this test revokes
    decide = create_api_key(path, "platform", ["decide"])
    admin = {"X-API-Key": create_api_key(path, "ops", ["admin"])}
    body = {"customer": customer()}
    settings = api_settings.model_copy(update={"api_keys_file": path})
    with TestClient(create_app(settings)) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        ok = client.post("/v1/decisions", json=body, headers={"X-API-Key": decide})
        assert ok.status_code == 200
        service.refresh_api_keys()  # unchanged file: nothing read
        revoke_api_key(path, decide.split("_")[1])
        still = client.post("/v1/decisions", json=body, headers={"X-API-Key": decide})
        assert still.status_code == 200  # not reloaded yet
        service.refresh_api_keys()
        gone = client.post("/v1/decisions", json=body, headers={"X-API-Key": decide})
        assert gone.status_code == 401
        assert client.post("/v1/decisions", json=body, headers=admin).status_code == 200

        path.write_text("{broken")
        with caplog.at_level(logging.ERROR):
            service.refresh_api_keys()
            service.refresh_api_keys()
        assert caplog.text.count("API keys not reloaded") == 1  # logged once, not per check
        assert client.post("/v1/decisions", json=body, headers=admin).status_code == 200


def test_a_service_without_api_keys_says_authentication_is_off(
    api_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    open_settings = api_settings.model_copy(update={"api_keys_file": None})
    for settings, said in ((open_settings, True), (api_settings, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING), TestClient(create_app(settings)):
            pass
        assert ("authentication is off: NEXTBEST_API_KEYS_FILE is not set" in caplog.text) == said


def test_a_state_directory_keeps_its_pseudonymisation_key(api_settings: Settings) -> None:
    """The first start records the key's fingerprint in the journal and the contact store;
    a start with another key is refused (its customers' stored contacts would not be found,
    and caps and gaps would count from zero), and the files keep their fingerprint."""
    with TestClient(create_app(api_settings)):
        pass
    other = api_settings.model_copy(
        update={"pseudonymisation_key": SecretStr("another-key-of-the-same-bank-0123")}
    )
    with pytest.raises(PseudonymKeyError, match="another pseudonymisation key"):
        ScoringService.start(other)
    with pytest.raises(PseudonymKeyError, match=r"journal\.db"):
        bind_pseudonym_key(other.state_dir, other.pseudonym_key, record=False)
    bind_pseudonym_key(api_settings.state_dir, api_settings.pseudonym_key, record=False)
    with TestClient(create_app(api_settings)) as client:  # the first key still serves
        assert client.get("/readyz").status_code == 200
    # a fingerprint tells keys apart, and is no pseudonym of any customer id
    assert key_fingerprint(b"k" * 16) != key_fingerprint(b"k" * 17)
    assert key_fingerprint(b"k" * 16) not in pseudonymise("", b"k" * 16)


def test_a_refused_key_leaves_no_trace(api_settings: Settings) -> None:
    """Every file is checked before any is written: a journal without a fingerprint (made
    again from scratch) beside a contact store of key A does not take key B's on a refused
    start, so key A still starts."""
    with TestClient(create_app(api_settings)):
        pass
    journal = api_settings.state_dir / "journal.db"
    with sqlite3.connect(journal) as conn:
        conn.execute("DELETE FROM journal_meta WHERE key = 'pseudonym_key'")
    other = b"another-key-of-the-same-bank-0123"
    with pytest.raises(PseudonymKeyError, match=r"contacts\.db"):
        bind_pseudonym_key(api_settings.state_dir, other)
    bind_pseudonym_key(api_settings.state_dir, api_settings.pseudonym_key)  # still key A's
    with sqlite3.connect(journal) as conn:
        (recorded,) = conn.execute(
            "SELECT value FROM journal_meta WHERE key = 'pseudonym_key'"
        ).fetchone()
    assert recorded == key_fingerprint(api_settings.pseudonym_key)


def test_the_public_development_key_is_said(
    api_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    dev = api_settings.model_copy(
        update={"pseudonymisation_key": SecretStr(DEV_PSEUDONYMISATION_KEY)}
    )
    for settings, said in ((dev, True), (api_settings, False)):
        caplog.clear()
        state = settings.state_dir.with_name(f"state-{said}")
        with (
            caplog.at_level(logging.WARNING),
            TestClient(create_app(settings.model_copy(update={"state_dir": state}))),
        ):
            pass
        assert ("public development key" in caplog.text) == said


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"keys": [{"key_id": "x"}]}', "keys.0.name: missing"),
        ('{"keys": [1]}', "keys.0: must be an object"),
        ('{"keys": 3}', 'expected {"keys": [...]}'),
        ("[]", 'expected {"keys": [...]}'),
        ("{nope", "not JSON"),
        (
            '{"keys": [{"key_id": "a", "name": "n", "salt": "zz", "sha256": "00", "scopes": []}]}',
            "keys.0.salt: must be hexadecimal",
        ),
        (
            '{"keys": [{"key_id": "a", "name": "n", "salt": "00", "sha256": "00", "scopes": 5}]}',
            "keys.0.scopes: must be a list of scope names",
        ),
        (
            '{"keys": [{"key_id": 7, "name": "n", "salt": "00", "sha256": "00", "scopes": []}]}',
            "keys.0.key_id: must be a string",
        ),
    ],
)
def test_a_bad_keys_file_names_the_record_and_field(tmp_path: Path, text: str, reason: str) -> None:
    """The messages showed Python's internals (``('keys')``, ``'int' object is not
    iterable``)."""
    from serving.security import read_keys

    path = tmp_path / "keys.json"
    path.write_text(text)
    with pytest.raises(KeyFileError) as info:
        read_keys(path)
    assert reason in str(info.value) and "object is not" not in str(info.value)


def test_credentials_in_urls_are_redacted_and_refused_outside_local(tmp_path: Path) -> None:
    """An MLflow client's errors repeat its tracking URI: /readyz (no key needed) and the
    log showed the password. Outside local such a URI, or a keys file never re-read, is
    refused."""
    from nextbest.model_source import redacted

    text = "API request to http://svc:Sup3rS3cret@10.0.0.1:5000/api failed; sqlite:///a.db"
    assert redacted(text) == "API request to http://***@10.0.0.1:5000/api failed; sqlite:///a.db"
    safe = {
        "environment": "production",
        "pseudonymisation_key": "k3y-Wq8#zLp2@Vn5!rT9",
        "api_keys_file": tmp_path / "keys.json",
        "docs": False,
    }
    Settings(**safe)  # accepted as it is
    with pytest.raises(ValueError, match="NEXTBEST_TRACKING_URI holds credentials"):
        Settings(**safe, tracking_uri="http://svc:Sup3rS3cret@10.0.0.1:5000")
    with pytest.raises(ValueError, match="revoked key would keep working"):
        Settings(**safe, reload_poll_seconds=0)


def test_the_state_directory_is_the_owners_only(api_client: TestClient, api_settings) -> None:
    assert api_settings.state_dir.stat().st_mode & 0o777 == 0o700
