"""One typed settings object: a TOML file, overridden by BATCHD_* variables, keys from credentials.

Built once by the command line and passed to everything that needs it. Every invalid value is
reported as a `ConfigError` naming the file and the key.
"""

from __future__ import annotations

import fnmatch
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .exits import EX_CONFIG, OperatorError
from .pricing import ModelPrice, PriceTable

ProviderKind = Literal["openai", "anthropic"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class ConfigError(OperatorError):
    """The configuration cannot be used; the message names the file and the key."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EX_CONFIG)


def parse_duration(value: Any) -> Any:
    """Accept plain seconds (int/float) or strings like "500ms", "10m", "2h", "1d"."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"not a duration: {value!r} (use seconds, or e.g. '30s', '10m', '2h')")
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DaemonSettings(_Section):
    """`[daemon]`: where things live and how the process behaves."""

    spool_dir: Path = Path("/var/spool/batchd")
    state_dir: Path = Path("/var/lib/batchd")
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    graceful_timeout: Duration = 20.0
    rescan_interval: Duration = 30.0
    # How long finished things are kept: done/ inputs, rejected/ inputs (with their .error.json),
    # delivered results files in out/, and the database's finished rows (their report totals are
    # kept in a totals table). 0 keeps them forever.
    done_retention: Duration = 7 * 86400.0
    rejected_retention: Duration = 30 * 86400.0
    out_retention: Duration = 30 * 86400.0
    rows_retention: Duration = 90 * 86400.0
    # A file in new/ whose last line has no newline is taken as still being written until it
    # has been left alone this long.
    settle_time: Duration = 5.0

    @property
    def database_path(self) -> Path:
        return self.state_dir / "batchd.sqlite3"


NODE_ID_FILE = "node-id"


class StoreSettings(_Section):
    """`[store]`: which database holds the queue, who this daemon is in it, and how long its leases last.

    `url` follows the SQLAlchemy convention: sqlite:////ABSOLUTE/PATH.sqlite3 (the default, beside
    the state directory) or postgresql://user@host:port/db (several daemons sharing one queue).
    """

    url: str | None = None  # None: "sqlite:///" + daemon.state_dir/batchd.sqlite3
    node: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")  # None: state_dir/node-id
    lease: Duration = Field(default=30.0, gt=0, le=60.0)

    @field_validator("url")
    @classmethod
    def _parsable(cls, value: str | None) -> str | None:
        if value is not None:
            from .store.url import parse_store_url

            parse_store_url(value)  # a ValueError names what is wrong
        return value


class BatchingSettings(_Section):
    """`[batching]`: when groups are flushed and how batches are polled and retried."""

    max_wait: Duration = 600.0
    poll_interval_min: Duration = 10.0
    poll_interval_max: Duration = 300.0
    max_attempts: int = Field(default=3, ge=1)
    tick: Duration = 1.0
    retry_backoff_max: Duration = 900.0
    # A retryable per-request failure waits retry_backoff_base · 2^(attempt-1) (jittered, capped at
    # retry_backoff_max) before it may be batched again.
    retry_backoff_base: Duration = 1.0
    # The providers' processing window (both: 24 h). A batch not ended this long after its creation
    # plus expiry_grace is cancelled; promised output still missing expiry_grace after a batch
    # ended counts as unavailable.
    completion_window: Duration = 86400.0
    expiry_grace: Duration = 3600.0

    @model_validator(mode="after")
    def _intervals_ordered(self) -> BatchingSettings:
        if self.poll_interval_min > self.poll_interval_max:
            raise ValueError("poll_interval_min must not exceed poll_interval_max")
        return self


_PROVIDER_LIMITS: dict[str, tuple[int, int]] = {
    "openai": (50_000, 200_000_000),
    "anthropic": (100_000, 256_000_000),
}


class ProviderProfile(_Section):
    """`[providers.NAME]`: one account at one batch API."""

    kind: ProviderKind
    base_url: str | None = None
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    api_key_credential: str | None = None
    max_requests: int | None = Field(default=None, ge=1)
    max_bytes: int | None = Field(default=None, ge=1024)
    max_in_flight: int = Field(default=20, ge=1)
    request_timeout: Duration = 600.0
    batch_discount: float = Field(default=0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _fill_limits(self) -> ProviderProfile:
        default_requests, default_bytes = _PROVIDER_LIMITS[self.kind]
        self.max_requests = min(self.max_requests or default_requests, default_requests)
        self.max_bytes = min(self.max_bytes or default_bytes, default_bytes)
        return self

    @property
    def request_limit(self) -> int:
        assert self.max_requests is not None
        return self.max_requests

    @property
    def byte_limit(self) -> int:
        assert self.max_bytes is not None
        return self.max_bytes


class Route(_Section):
    """`[[routes]]`: requests whose model matches `model` (a glob) go to profile `provider`."""

    model: str
    provider: str


class WebhookSink(_Section):
    """`[[sinks]]` of kind webhook: POSTs signed chunks of result lines to a URL."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    kind: Literal["webhook"] = "webhook"
    url: str
    secret: SecretStr | None = None
    secret_env: str | None = None
    secret_credential: str | None = None
    batch_size: int = Field(default=100, ge=1, le=10_000)
    timeout: Duration = 10.0
    max_age: Duration = 86400.0
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("secret", "secret_env", "secret_credential")
    @classmethod
    def _not_empty(cls, value: Any, info: ValidationInfo) -> Any:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text is not None and not text.strip():
            raise ValueError(f"{info.field_name} is empty; a webhook must be signed with a secret")
        return value

    def resolve_secret(self, environ: Mapping[str, str] | None = None) -> str | None:
        return resolve_secret(
            self.secret, self.secret_env, (self.secret_credential, f"{self.name}_webhook_secret"), environ
        )

    def require_secret(self, environ: Mapping[str, str] | None = None) -> str:
        """The secret, or a ConfigError: an unsigned webhook would let anyone forge results to the receiver.

        Checked when the daemon starts rather than when the file is read, because the secret may come
        from a systemd credential or an environment variable that only the daemon's process has.
        """
        secret = self.resolve_secret(environ)
        if not secret:
            sources = [f"credential {self.secret_credential or self.name + '_webhook_secret'}"]
            if self.secret_env:
                sources.insert(0, f"${self.secret_env}")
            raise ConfigError(
                f"sinks: webhook {self.name!r} has no secret (set secret, secret_env or secret_credential;"
                f" looked in {' and '.join(sources)})"
            )
        return secret


class OutboxSettings(_Section):
    """`[outbox]`: the results-file sink in spool/out/."""

    enabled: bool = True


class HttpSettings(_Section):
    """`[http]`: the daemon's HTTP listener (/metrics, /healthz, /readyz, the status page, webhooks in).

    No `[http]` section: no listener. `listen` is "HOST:PORT" (e.g. "127.0.0.1:9187", "[::1]:9187")
    or "unix:/ABSOLUTE/PATH" (e.g. "unix:/run/batchd/http.sock", RuntimeDirectory= in the unit).
    """

    listen: str = "127.0.0.1:9187"
    # OpenAI's webhook signing secret (whsec_…): inline, from a systemd credential, or from a variable.
    webhook_secret: SecretStr | None = None
    webhook_secret_env: str | None = "OPENAI_WEBHOOK_SECRET"
    webhook_secret_credential: str | None = "openai_webhook_secret"
    # An event signed longer ago (or further ahead) than this is refused as stale (replay window).
    webhook_tolerance: Duration = Field(default=300.0, gt=0)
    # While verified events keep arriving (one within webhook_healthy_for), OpenAI batches are polled
    # at most this far apart: the events do the waking, polling is only the fallback.
    webhook_poll_interval: Duration = 1800.0
    webhook_healthy_for: Duration = 3600.0
    # The status page reloads its content this often.
    page_refresh: Duration = Field(default=5.0, gt=0)
    # /readyz reuses a provider check this long, so that a busy probe does not call the providers each time.
    ready_cache: Duration = 10.0

    @field_validator("listen")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        listen_address(value)  # a ValueError names what is wrong
        return value

    def address(self) -> tuple[str, int] | str:
        """(host, port) for TCP, or the socket path for "unix:PATH"."""
        return listen_address(self.listen)

    def resolve_webhook_secret(self, environ: Mapping[str, str] | None = None) -> str | None:
        return resolve_secret(self.webhook_secret, self.webhook_secret_env, (self.webhook_secret_credential,), environ)


def listen_address(value: str) -> tuple[str, int] | str:
    """Parse `[http] listen`: "unix:/abs/path" gives the path, "HOST:PORT" gives (host, port)."""
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"unix socket path must be absolute: {value!r}")
        return path
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT or unix:/PATH: {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _default_providers() -> dict[str, ProviderProfile]:
    return {
        "openai": ProviderProfile(kind="openai", api_key_env="OPENAI_API_KEY"),
        "anthropic": ProviderProfile(kind="anthropic", api_key_env="ANTHROPIC_API_KEY"),
    }


class Settings(BaseSettings):
    """The whole configuration of one daemon."""

    model_config = SettingsConfigDict(
        env_prefix="BATCHD_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    providers: dict[str, ProviderProfile] = Field(default_factory=_default_providers)
    routes: list[Route] = Field(default_factory=list)
    store: StoreSettings = Field(default_factory=StoreSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    sinks: list[WebhookSink] = Field(default_factory=list)
    prices: dict[str, ModelPrice] = Field(default_factory=dict)
    http: HttpSettings | None = None  # no [http]: no listener

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs (see load_settings); environment variables win.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _sink_names_unique(self) -> Settings:
        names = [sink.name for sink in self.sinks]
        for name in names:
            if names.count(name) > 1 or name == "outbox":
                raise ValueError(f"sinks: name {name!r} is used twice or reserved")
        return self

    @model_validator(mode="after")
    def _routes_name_profiles(self) -> Settings:
        for index, route in enumerate(self.routes):
            if route.provider not in self.providers:
                raise ValueError(
                    f"routes[{index}].provider {route.provider!r} is not a profile in [providers]"
                    f" (known: {', '.join(sorted(self.providers))})"
                )
        return self

    def profile_for(self, kind: ProviderKind, model: str) -> str | None:
        """The profile that takes `model` for a line of the API family `kind`, or None."""
        for route in self.routes:
            if fnmatch.fnmatchcase(model, route.model) and self.providers[route.provider].kind == kind:
                return route.provider
        if kind in self.providers and self.providers[kind].kind == kind:
            return kind
        for name, profile in self.providers.items():
            if profile.kind == kind:
                return name
        return None

    @property
    def store_url(self) -> str:
        """`[store] url`, or the SQLite database in the state directory (daemon.database_path)."""
        return self.store.url or "sqlite:///" + str(self.daemon.database_path.absolute())

    def node_id(self, create: bool = False) -> str | None:
        """`[store] node`, else the id kept in STATE_DIR/node-id (made once, 0600, when `create`).

        None when there is none yet and `create` is false (a read-only command before the first start).
        """
        if self.store.node:
            return self.store.node
        path = self.daemon.state_dir / NODE_ID_FILE
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            text = ""
        except OSError:
            if create:
                raise
            return None  # a reader that may not read the daemon's state directory: only "this node" is unknown
        if text:
            return text
        if not create:
            return None
        node = secrets.token_hex(6)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return path.read_text().strip() or node  # made concurrently: theirs wins
        with os.fdopen(fd, "w") as handle:
            handle.write(node + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return node

    def price_table(self) -> PriceTable:
        return PriceTable(self.prices)

    @property
    def max_line_bytes(self) -> int:
        """No single request may be larger than the largest batch any profile accepts."""
        return max((profile.byte_limit for profile in self.providers.values()), default=256_000_000)


def resolve_secret(
    inline: SecretStr | None,
    env_name: str | None,
    credential_names: tuple[str | None, ...],
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """A secret: inline, else from a systemd credential file, else from an environment variable."""
    env = os.environ if environ is None else environ
    if inline is not None:
        return inline.get_secret_value()
    credentials_dir = env.get("CREDENTIALS_DIRECTORY")
    if credentials_dir:
        for candidate in credential_names:
            if candidate:
                path = Path(credentials_dir) / candidate
                if path.is_file():
                    return path.read_text().strip()
    if env_name and env.get(env_name):
        return env[env_name]
    return None


def resolve_api_key(name: str, profile: ProviderProfile, environ: Mapping[str, str] | None = None) -> str | None:
    """The profile's API key: inline, from a systemd credential, or from an environment variable."""
    return resolve_secret(
        profile.api_key, profile.api_key_env, (profile.api_key_credential, f"{name}_api_key", name), environ
    )


def _format_location(location: tuple[int | str, ...]) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


DEFAULT_CONFIG = Path("/etc/batchd/batchd.toml")


def config_path(path: Path | str | None = None, environ: Mapping[str, str] | None = None) -> Path | None:
    """Where the configuration is: `path` (--config), else $BATCHD_CONFIG, else /etc/batchd/batchd.toml
    if it exists, else None (defaults and BATCHD_* variables only).

    A path given explicitly must exist (load_settings says so); the system-wide default is only
    used when it is there, so a development checkout runs without one.
    """
    env = os.environ if environ is None else environ
    if path is not None and str(path) != "":
        return Path(path)
    if env.get("BATCHD_CONFIG"):
        return Path(env["BATCHD_CONFIG"])
    try:
        os.stat(DEFAULT_CONFIG)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        pass  # there but unreachable (/etc/batchd is the service's): load_settings says so, exit 78
    return DEFAULT_CONFIG


def load_settings(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Read the TOML file found by config_path(`path`), apply BATCHD_* variables and `overrides`."""
    path = config_path(path)
    data: dict[str, Any] = {}
    source = str(path) if path is not None else "(defaults and environment)"
    if path is not None:
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such file") from None
        except IsADirectoryError:
            raise ConfigError(f"{source}: is a directory, not a config file") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    try:
        return Settings(**data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = _format_location(tuple(error["loc"]))
            if error["type"] == "extra_forbidden":
                problems.append(f"{source}: unknown key {key}")
            else:
                problems.append(f"{source}: {key}: {error['msg']}")
        raise ConfigError("\n".join(problems)) from None


def configured_secrets(settings: Settings, environ: Mapping[str, str] | None = None) -> list[str]:
    """Every secret the configuration resolves to (API keys, webhook secrets), for log redaction."""
    resolvers: list[Any] = [
        lambda name=name, profile=profile: resolve_api_key(name, profile, environ)
        for name, profile in settings.providers.items()
    ]
    resolvers += [lambda sink=sink: sink.resolve_secret(environ) for sink in settings.sinks]
    if settings.http is not None:
        resolvers.append(lambda http=settings.http: http.resolve_webhook_secret(environ))
    found: set[str] = set()
    for resolve in resolvers:
        try:
            secret = resolve()
        except OSError:  # an unreadable credential: the adapter that needs it reports that itself
            continue
        if secret:
            found.add(secret)
    return sorted(found)
