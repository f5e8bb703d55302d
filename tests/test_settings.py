"""Settings: defaults, validation naming the variable, secrets from files."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.settings import DEFAULT_REDIS_URL, Settings, SettingsError

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.redis_url == DEFAULT_REDIS_URL
    assert settings.lease_seconds == 60 and settings.max_attempts == 5
    assert settings.allow_private_networks is False


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HAUL_LEASE_SECONDS", "soon"),
        ("HAUL_LEASE_SECONDS", "0"),
        ("HAUL_MAX_ATTEMPTS", "2.5"),
        ("HAUL_ALLOW_PRIVATE_NETWORKS", "maybe"),
        ("HAUL_REDIS_URL", "http://127.0.0.1:6379"),
        ("HAUL_WEBHOOK_SECRET", "not-a-secret"),
        ("HAUL_WEBHOOK_URL", "ftp://example.com/hook"),
    ],
)
def test_invalid_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_retry_bounds_must_be_ordered() -> None:
    with pytest.raises(SettingsError, match="HAUL_RETRY_MIN_SECONDS"):
        Settings.from_env({"HAUL_RETRY_MIN_SECONDS": "10", "HAUL_RETRY_MAX_SECONDS": "1"})


def test_webhook_url_needs_a_secret() -> None:
    with pytest.raises(SettingsError, match="HAUL_WEBHOOK_SECRET"):
        Settings.from_env({"HAUL_WEBHOOK_URL": "https://backend.example.com/hook"})


def test_secret_from_file_and_rotation_list(tmp_path: Path) -> None:
    other = "whsec_" + "A" * 32
    path = tmp_path / "secret"
    path.write_text(f"{SECRET}\n{other}\n")
    settings = Settings.from_env({"HAUL_WEBHOOK_SECRET_FILE": str(path)})
    assert settings.webhook_secrets == (SECRET, other)
    assert SECRET not in repr(settings)


def test_secret_file_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="HAUL_WEBHOOK_SECRET_FILE"):
        Settings.from_env({"HAUL_WEBHOOK_SECRET_FILE": str(tmp_path / "missing")})
