"""Settings: defaults, validation naming the variable, secrets from files."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.settings import DEFAULT_REDIS_URL, Settings, SettingsError

pytestmark = pytest.mark.fast

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a folder where no haul up ran
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
        ("HAUL_LOG_FORMAT", "xml"),
    ],
)
def test_invalid_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_retry_bounds_must_be_ordered() -> None:
    with pytest.raises(SettingsError, match="HAUL_RETRY_MIN_SECONDS"):
        Settings.from_env({"HAUL_RETRY_MIN_SECONDS": "10", "HAUL_RETRY_MAX_SECONDS": "1"})


def test_log_format_is_text_unless_json_is_asked() -> None:
    assert Settings.from_env({}).log_format == "text"
    assert Settings.from_env({"HAUL_LOG_FORMAT": "JSON"}).log_format == "json"


def test_webhook_url_needs_a_secret_where_webhooks_are_sent() -> None:
    # A submitter signs nothing, so reading the settings is fine; a sender checks
    settings = Settings.from_env({"HAUL_WEBHOOK_URL": "https://backend.example.com/hook"})
    with pytest.raises(SettingsError, match="HAUL_WEBHOOK_SECRET"):
        settings.check_signing()


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


def test_without_haul_redis_url_the_redis_of_haul_up_in_this_folder_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a haul up that recorded its own Redis in ./.haul/redis.url
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".haul").mkdir()
    (tmp_path / ".haul" / "redis.url").write_text("redis://127.0.0.1:41234/0\n")
    assert Settings.from_env({}).redis_url == "redis://127.0.0.1:41234/0"
    # HAUL_REDIS_URL still wins, and HAUL_HOME names another folder
    assert Settings.from_env({"HAUL_REDIS_URL": "redis://db:6379/1"}).redis_url == "redis://db:6379/1"
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert Settings.from_env({"HAUL_HOME": str(other)}).redis_url == DEFAULT_REDIS_URL
    (other / "redis.url").write_text("http://not-redis\n")
    with pytest.raises(SettingsError, match="redis.url"):
        Settings.from_env({"HAUL_HOME": str(other)})


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"HAUL_API_TOKENS": "cli:0123456789abcdef0123"}, "names the command line"),
        ({"HAUL_UI_PREFIX": "/v1"}, "HAUL_UI_PREFIX"),
        ({"HAUL_UI_PREFIX": "/docs/ui"}, "HAUL_UI_PREFIX"),
        ({"HAUL_UI_PREFIX": "/ui/.."}, "HAUL_UI_PREFIX"),
        ({"HAUL_API_TRUSTED_PROXIES": "10.0.0.0/8 proxy.example"}, "'proxy.example' is not an address"),
    ],
)
def test_dashboard_settings_that_would_break_it_are_refused(env: dict[str, str], said: str) -> None:
    from actors.apisettings import ApiSettings

    with pytest.raises(SettingsError, match=said):
        ApiSettings.from_env(env)
