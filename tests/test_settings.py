"""Unit tests: the config file, environment overrides, credentials, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchd.settings import ConfigError, load_settings, parse_duration, resolve_api_key


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_example_config_loads() -> None:
    settings = load_settings(Path(__file__).parent.parent / "config.example.toml")
    assert settings.batching.max_wait == 600
    assert settings.providers["openai"].request_limit == 50_000
    assert settings.profile_for("anthropic", "claude-sonnet-4-5") == "anthropic"


@pytest.mark.parametrize(("value", "seconds"), [(5, 5), ("10m", 600), ("2h", 7200), ("500ms", 0.5), ("1.5", 1.5)])
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


def test_wrong_type_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[batching]\nmax_attempts = "many"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(path) in str(info.value) and "batching.max_attempts" in str(info.value)


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[daemon]\nspool_directory = '/tmp/x'\n")
    with pytest.raises(ConfigError, match=r"unknown key daemon\.spool_directory"):
        load_settings(path)


def test_bad_duration_and_route(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[batching]\nmax_wait = "soon"\n')
    with pytest.raises(ConfigError, match=r"batching\.max_wait"):
        load_settings(path)
    path = write(tmp_path / "d.toml", '[[routes]]\nmodel = "llama-*"\nprovider = "nowhere"\n')
    with pytest.raises(ConfigError, match="nowhere"):
        load_settings(path)


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "c.toml", "[batching]\nmax_wait = 30\n")
    monkeypatch.setenv("BATCHD_BATCHING__MAX_WAIT", "2m")
    assert load_settings(path).batching.max_wait == 120


def test_routes_send_models_to_profiles(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        """
[providers.openai]
kind = "openai"
[providers.local]
kind = "openai"
base_url = "http://127.0.0.1:8000/v1"
max_requests = 1000
[providers.anthropic]
kind = "anthropic"
[[routes]]
model = "llama-*"
provider = "local"
""",
    )
    settings = load_settings(path)
    assert settings.profile_for("openai", "llama-3-70b") == "local"
    assert settings.profile_for("openai", "gpt-4o") == "openai"
    assert settings.providers["local"].request_limit == 1000


def test_api_key_sources(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path / "c.toml", '[providers.openai]\nkind = "openai"\napi_key_env = "MY_KEY"\n')
    )
    profile = settings.providers["openai"]
    assert resolve_api_key("openai", profile, {"MY_KEY": "sk-env"}) == "sk-env"
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "openai_api_key").write_text("sk-cred\n")
    env = {"MY_KEY": "sk-env", "CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}
    assert resolve_api_key("openai", profile, env) == "sk-cred"
