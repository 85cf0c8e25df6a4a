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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .exits import EX_CONFIG, OperatorError
from .pricing import ModelPrice, PriceTable

if TYPE_CHECKING:
    from .schedule import Window

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
    # Deadlines (issue 11), defaults for every route and profile that sets none. From a request's
    # deadline less deadline_lead on, a request still without a result leaves its batch (cancelled
    # at the provider) for the real-time API; the fallback waits cancel_wait_fraction of the lead
    # for the cancelled batch to end, then sends the rest anyway. expected_turnaround is how long a
    # batch is planned to take: work with a deadline flushes once waiting longer would leave less
    # than lead + turnaround.
    deadline_lead: Duration = 3600.0
    cancel_wait_fraction: float = Field(default=0.25, ge=0, le=1)
    expected_turnaround: Duration = 3600.0

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
    # The batch window sent on create; OpenAI itself accepts only "24h", some OpenAI-compatible
    # hosts offer others. Its length is the window after which an unfinished batch is overdue.
    completion_window: str = Field(default="24h", pattern=r"^\d+[smhd]$")
    # Submission window, deadline lead and turnaround for this profile's routes (a route's own win).
    window: list[str] = Field(default_factory=list)  # e.g. ["22:00-06:00"]
    window_cron: str | None = None  # e.g. "0 22 * * *" with window_duration "8h"
    window_duration: Duration | None = None
    timezone: str = "UTC"
    deadline_lead: Duration | None = None  # None: [batching] deadline_lead
    expected_turnaround: Duration | None = None  # None: [batching] expected_turnaround
    # The organisation's limits at the provider (None: not declared). enqueued_tokens is per model
    # (OpenAI): one number for every model, or a table {"gpt-4o-mini" = 2000000, "*" = 90000}.
    enqueued_tokens: int | dict[str, int] | None = None
    queued_requests: int | None = Field(default=None, ge=1)  # Anthropic: requests in live batches
    # OpenAI: embedding inputs per /v1/embeddings batch (an embeddings request may carry many).
    max_embedding_inputs: int = Field(default=50_000, ge=1, le=50_000)
    batches_per_hour: int | None = Field(default=None, ge=1)
    # Kept free below each declared limit: batchd's token estimate is not the provider's count.
    capacity_margin: float = Field(default=0.1, ge=0, lt=1)
    # The real-time fallback's pacing (realtime.RealtimeLimits); flex: OpenAI's flex tier first.
    realtime_concurrency: int = Field(default=8, ge=1)
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    flex: bool = False

    @field_validator("window")
    @classmethod
    def _window_ranges(cls, value: list[str]) -> list[str]:
        from .schedule import DailyRange

        for text in value:
            DailyRange.parse(text)  # a ScheduleError (ValueError) names what is wrong
        return value

    @model_validator(mode="after")
    def _window_cron_duration(self) -> ProviderProfile:
        _check_window(self.window, self.window_cron, self.window_duration, self.timezone)
        return self

    @property
    def completion_seconds(self) -> float:
        value = parse_duration(self.completion_window)
        return float(value)

    def token_limit(self, model: str) -> int | None:
        """The declared enqueued-token limit for `model` (exact name, then globs, then "*")."""
        limits = self.enqueued_tokens
        if limits is None or isinstance(limits, int):
            return limits
        if model in limits:
            return limits[model]
        for pattern, limit in limits.items():
            if pattern != "*" and fnmatch.fnmatchcase(model, pattern):
                return limit
        return limits.get("*")

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


def _check_window(window: list[str], cron: str | None, duration: float | None, timezone: str) -> None:
    from .schedule import zone

    zone(timezone)  # a ScheduleError names an unknown zone
    if window and cron:
        raise ValueError("give window or window_cron, not both")
    if (cron is None) != (duration is None):
        raise ValueError("window_cron and window_duration go together")
    if cron is not None:
        from datetime import timedelta

        from .schedule import Window

        Window.from_cron(cron, timedelta(seconds=duration or 0), timezone)


class Route(_Section):
    """`[[routes]]`: requests whose model matches `model` (a glob) go to profile `provider`.

    `name` (default: the profile's name) is what `batchd pause|resume|flush ROUTE` address; several
    routes may share a name. A route's window, deadline default and lead win over its profile's.
    """

    model: str
    provider: str
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    window: list[str] = Field(default_factory=list)
    window_cron: str | None = None
    window_duration: Duration | None = None
    timezone: str | None = None  # None: the profile's
    # The deadline of a file that gives none: relative to its arrival ("8h") or a fixed ISO time.
    deadline: str | None = None
    deadline_lead: Duration | None = None

    @field_validator("window")
    @classmethod
    def _window_ranges(cls, value: list[str]) -> list[str]:
        from .schedule import DailyRange

        for text in value:
            DailyRange.parse(text)
        return value

    @field_validator("deadline")
    @classmethod
    def _deadline_readable(cls, value: str | None) -> str | None:
        if value is not None:
            from .deadlines import parse_deadline

            parse_deadline(value, 0.0)  # a DeadlineError (ValueError) names what is wrong
        return value

    @model_validator(mode="after")
    def _window_cron_duration(self) -> Route:
        _check_window(self.window, self.window_cron, self.window_duration, self.timezone or "UTC")
        return self


@dataclass(frozen=True)
class RoutePlan:
    """What one (profile, model) is submitted under: its route's name, window, deadline rules."""

    name: str
    profile: str
    window: Window | None
    deadline: str | None  # the default deadline of a file that gives none
    deadline_lead: float
    expected_turnaround: float


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
    _plans: dict[tuple[str, str], RoutePlan] = PrivateAttr(default_factory=dict)

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

    def route_plan(self, profile: str, model: str) -> RoutePlan:
        """The route (profile, model) falls under, resolved: the first [[routes]] entry of this profile
        whose glob matches, else the profile itself (name = the profile's name)."""
        key = (profile, model)
        cached = self._plans.get(key)
        if cached is not None:
            return cached
        from datetime import timedelta

        from .schedule import Window

        prof = self.providers[profile]
        route = next((r for r in self.routes if r.provider == profile and fnmatch.fnmatchcase(model, r.model)), None)
        tz = (route.timezone if route is not None and route.timezone else None) or prof.timezone
        source: Route | ProviderProfile = route if route is not None and (route.window or route.window_cron) else prof
        window: Window | None = None
        if source.window:
            window = Window.daily(source.window, tz)
        elif source.window_cron is not None:
            window = Window.from_cron(source.window_cron, timedelta(seconds=source.window_duration or 0), tz)
        lead = route.deadline_lead if route is not None and route.deadline_lead is not None else None
        plan = RoutePlan(
            name=(route.name if route is not None and route.name else profile),
            profile=profile,
            window=window,
            deadline=route.deadline if route is not None else None,
            deadline_lead=lead if lead is not None else (
                prof.deadline_lead if prof.deadline_lead is not None else self.batching.deadline_lead
            ),
            expected_turnaround=(
                prof.expected_turnaround if prof.expected_turnaround is not None else self.batching.expected_turnaround
            ),
        )  # fmt: skip
        self._plans[key] = plan
        return plan

    def route_names(self) -> list[str]:
        """Every route name commands may address: each [[routes]] name (or its profile's), and each profile."""
        names = {route.name or route.provider for route in self.routes} | set(self.providers)
        return sorted(names)

    def route_matches(self, name: str, profile: str, model: str) -> bool:
        """Whether (profile, model) falls under the route called `name` ('*': every route)."""
        return name == "*" or self.route_plan(profile, model).name == name

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
