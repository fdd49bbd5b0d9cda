"""Settings: a frozen, validated object loaded from TOML.

Unknown keys and invalid values are errors that name the key (``server.bnd: unknown
key``), never silently ignored. Durations are in seconds.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    ValidationError,
    model_validator,
)

from .generations import DEFAULT_VERSION, check_version
from .policy import Principal, Role
from .sessions import min_key_bytes
from .signing import Keypair


class ConfigError(ValueError):
    """The configuration is unusable; the message names every offending key."""


def _check_host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not (sep and host and port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ValueError("must be HOST:PORT with a port from 0 to 65535")
    return value


HostPort = Annotated[str, AfterValidator(_check_host_port)]
Seconds = Annotated[float, Field(gt=0, le=86_400)]


def _check_origin(value: str) -> str:
    # Browsers send Origin as scheme://host[:port], lower case, no path.
    if value == "*":
        raise ValueError("'*' cannot be used with credentials: list the origins")
    parts = urlsplit(value)
    if (
        parts.scheme not in ("http", "https")
        or not parts.netloc
        or value != f"{parts.scheme}://{parts.netloc}"
    ):
        raise ValueError("must be an origin: scheme://host[:port], no path or trailing slash")
    return value.lower()


Origin = Annotated[str, AfterValidator(_check_origin)]

MAX_WORKERS: Final = 256


def _check_workers(value: object) -> int | Literal["auto"]:
    # A plain validator: "auto" or a whole number (an environment variable's "4" too),
    # with one message naming both forms, not a union's two errors.
    if value == "auto":
        return "auto"
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ValueError(
            f'must be a whole number of processes from 1 to {MAX_WORKERS}, or "auto" (one per core)'
        )
    return value


Workers = Annotated[int | Literal["auto"], PlainValidator(_check_workers)]


def resolve_workers(workers: int | Literal["auto"], cores: int) -> int:
    """How many worker processes to run: ``auto`` is one per available core."""
    return max(1, min(cores, MAX_WORKERS)) if workers == "auto" else workers


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    bind: HostPort = "127.0.0.1:8080"
    # A `: ping` comment after this long without events keeps intermediaries open.
    heartbeat_interval: Seconds = 15.0
    # Frames a client may have queued; past it the client is too slow and is dropped.
    outbox_limit: Annotated[int, Field(ge=1, le=1_000_000)] = 4096
    # Recent events kept for Last-Event-ID resume.
    history_size: Annotated[int, Field(ge=0, le=10_000_000)] = 10_000
    # Data sent to a client and not acknowledged for this long means it stopped
    # reading or is gone: the kernel aborts the connection (TCP_USER_TIMEOUT).
    write_timeout: Seconds = 30.0
    # TLS (and with it HTTP/2, negotiated by ALPN): both files, or neither.
    certfile: Path | None = None
    keyfile: Path | None = None
    # Serve /metrics on this separate HOST:PORT only (None: on the main bind).
    metrics_bind: HostPort | None = None
    # How long clients get to read their final events at shutdown.
    graceful_timeout: Seconds = 5.0
    # Browser origins (scheme://host[:port]) allowed to call with credentials (CORS).
    cors_origins: tuple[Origin, ...] = ()
    # Processes serving the same sockets (1: this process alone, no supervisor; "auto":
    # one per core). See ARCHITECTURE.md, "Several workers".
    workers: Workers = 1


class SessionSettings(_Section):
    """Browser sessions: ``POST /server/login`` sets a signed, expiring cookie."""

    # False turns browser sign-in off: the login answers 404 and the page says so.
    enabled: bool = True
    # Signs the cookies; every replica needs the same one. Unset: a random key made at
    # start-up (one replica only; sessions end when the process restarts).
    secret_key: Annotated[SecretStr, Field(min_length=32)] | None = None
    max_age: Annotated[int, Field(ge=60, le=30 * 86_400)] = 12 * 3600
    cookie_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "kep_session"
    # Secure cookies: unset means "when the request came over TLS"; set true when TLS
    # ends at a reverse proxy in front.
    cookie_secure: bool | None = None


class JwtSettings(_Section):
    """``Authorization: Bearer <JWT>`` signed with a shared HMAC key."""

    # Unset: bearer tokens are refused.
    key: Annotated[SecretStr, Field(min_length=32)] | None = None
    algorithms: Annotated[tuple[Literal["HS256", "HS384", "HS512"], ...], Field(min_length=1)] = (
        "HS256",
    )
    issuer: Annotated[str, Field(min_length=1)] | None = None
    audience: Annotated[str, Field(min_length=1)] | None = None
    # Clock difference tolerated for exp/nbf/iat, seconds.
    leeway: Annotated[float, Field(ge=0, le=300)] = 0.0

    @model_validator(mode="after")
    def _key_long_enough(self) -> JwtSettings:
        need = min_key_bytes(self.algorithms)
        if self.key is not None and len(self.key.get_secret_value().encode()) < need:
            raise ValueError(f"key: must be at least {need} bytes for {max(self.algorithms)}")
        return self


SessionMode = Literal["configured", "generated", "off"]


def session_mode(settings: SessionSettings) -> SessionMode:
    """How browser sign-in works under these settings (``config check`` says which)."""
    if not settings.enabled:
        return "off"
    return "generated" if settings.secret_key is None else "configured"


SESSION_MODE_TEXT: Final[dict[SessionMode, str]] = {
    "configured": "on, cookies signed with session.secret_key (shared by every replica "
    "that has the same key)",
    "generated": "on, cookies signed with a random key made at start-up: sessions end when "
    "this process restarts and other replicas do not accept them (set session.secret_key "
    "to share one)",
    "off": "off (session.enabled = false): POST /server/login answers 404 and the "
    "dashboard says so",
}


def _check_tls_pair(server: ServerSettings) -> ServerSettings:
    if (server.certfile is None) != (server.keyfile is None):
        raise ValueError("certfile and keyfile go together: set both or neither")
    return server


class UpstreamSettings(_Section):
    target: HostPort = "127.0.0.1:50051"
    # gRPC keepalive pings: a dead connection is noticed within about time + timeout.
    keepalive_time: Seconds = 5.0
    keepalive_timeout: Seconds = 3.0
    # The upstream must answer a subscription within this long, or it is retried.
    connect_timeout: Seconds = 5.0
    reconnect_min: Seconds = 0.1
    reconnect_max: Seconds = 10.0
    # The largest upstream message (one batch of events) accepted. A larger one is
    # stepped over with a stream_gap instead of failing the stream for good.
    max_message_bytes: Annotated[int, Field(ge=64 * 1024, le=1024**3)] = 64 * 1024 * 1024


class ApiSettings(_Section):
    # What GET / advertises: the official SDK uses min(this, its own version) and, from
    # v5 on, GET /events/session. Both paths are always served.
    version: Annotated[str, AfterValidator(check_version)] = DEFAULT_VERSION


class AuthSettings(_Section):
    max_clock_skew: Seconds = 900.0
    # More [[keypairs]] in a file of their own, re-read on SIGHUP or when it changes.
    keypairs_file: Path | None = None


def _check_network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError("must be an IP address or network (10.0.0.0/8, ::1)") from None


Network = Annotated[str, AfterValidator(_check_network)]


class LimitsSettings(_Section):
    """Abuse limits (proxy/limits.py): stream caps, request sizes, timeouts, login rates."""

    # Open event streams in total (past it: 503) and per access key (past it: 429).
    max_streams: Annotated[int, Field(ge=1, le=10_000_000)] = 10_000
    max_streams_per_key: Annotated[int, Field(ge=1, le=10_000_000)] = 100
    # A request's header names and values, in bytes (past it: 431), and its query
    # string (past it: 414). The HTTP layer refuses a request head larger than both
    # together plus 8 KiB outright.
    max_header_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 8192
    max_query_length: Annotated[int, Field(ge=256, le=64 * 1024)] = 2048
    # A connection without a request in progress (including one still sending its
    # request line and headers, as a slowloris does) is closed after this long.
    idle_timeout: Seconds = 5.0
    # The TLS handshake must finish within this.
    handshake_timeout: Seconds = 10.0
    # A request body (the login) must arrive within this (past it: 408).
    body_timeout: Seconds = 10.0
    # POST /server/login: attempts per client address, failed attempts per access key,
    # each refilling over login_window seconds (past them: 429 with Retry-After).
    login_attempts_per_address: Annotated[int, Field(ge=1, le=1_000_000)] = 20
    login_failures_per_key: Annotated[int, Field(ge=1, le=1_000_000)] = 5
    login_window: Seconds = 60.0
    # Reverse proxies whose X-Forwarded-For names the client (the login's address).
    trusted_proxies: tuple[Network, ...] = ()


class StateSettings(_Section):
    """What a stream that asks for ``initialState=true`` is shown first (state.py)."""

    # A session whose latest event ends it is forgotten this long after that event.
    retention: Annotated[float, Field(ge=0, le=30 * 86_400)] = 3600.0
    # Sessions held at most; past it the least recently updated one is forgotten.
    max_entities: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000
    # Keeping the state current costs every published event a fold (a few µs): it is
    # kept only while used, and dropped this many seconds after the last stream that
    # followed it or read of it; the next request reads the upstream's snapshot again.
    # 0: read it at start-up and keep it for good.
    idle_timeout: Annotated[float, Field(ge=0, le=30 * 86_400)] = 300.0


class KeypairSettings(_Section):
    access_key: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")]
    secret_key: Annotated[SecretStr, Field(min_length=8)]
    role: Literal["user", "admin", "superadmin"] = "user"
    user_id: Annotated[str, Field(min_length=1)]
    domain: Annotated[str, Field(min_length=1)] = "default"

    def to_keypair(self) -> Keypair:
        principal = Principal(self.access_key, Role(self.role), self.user_id, self.domain)
        return Keypair(self.access_key, self.secret_key.get_secret_value(), principal)


class Settings(_Section):
    server: Annotated[ServerSettings, AfterValidator(_check_tls_pair)] = ServerSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    api: ApiSettings = ApiSettings()
    auth: AuthSettings = AuthSettings()
    session: SessionSettings = SessionSettings()
    jwt: JwtSettings = JwtSettings()
    limits: LimitsSettings = LimitsSettings()
    state: StateSettings = StateSettings()
    keypairs: tuple[KeypairSettings, ...] = ()

    @model_validator(mode="after")
    def _unique_keys(self) -> Settings:
        seen: set[str] = set()
        for kp in self.keypairs:
            if kp.access_key in seen:
                raise ValueError(f"keypairs: access_key {kp.access_key!r} appears twice")
            seen.add(kp.access_key)
        return self

    def keypair_index(self) -> dict[str, Keypair]:
        return {kp.access_key: kp.to_keypair() for kp in self.keypairs}


ENV_PREFIX: Final = "KEP_"
_SECTIONS: Final[dict[str, type[BaseModel]]] = {
    "server": ServerSettings,
    "upstream": UpstreamSettings,
    "api": ApiSettings,
    "auth": AuthSettings,
    "session": SessionSettings,
    "jwt": JwtSettings,
    "limits": LimitsSettings,
    "state": StateSettings,
}


def env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Settings from ``KEP_<SECTION>__<KEY>`` variables, and which variable set each key.

    A variable that looks like a setting but names no key is an error, as in the file:
    ``KEP_SERVER__BND`` must not be silently ignored. Other ``KEP_`` names (no ``__``)
    are not settings (``KEP_URL`` is the tail command's).
    """
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        model = _SECTIONS.get(section)
        if model is None or key not in model.model_fields:
            raise ConfigError(f"{name}: unknown setting (expected KEP_<SECTION>__<KEY>)")
        data.setdefault(section, {})[key] = value
        origin[f"{section}.{key}"] = name
    return data, origin


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(error: ValidationError, origin: Mapping[str, str] | None = None) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        source = (origin or {}).get(key)
        lines.append(f"{key} (from {source}): {msg}" if source else f"{key}: {msg}")
    return "; ".join(lines)


def settings_from_mapping(
    data: dict[str, Any], origin: Mapping[str, str] | None = None
) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def settings_sources(
    path: Path | None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The file, the environment and ``overrides`` merged, not yet validated, and which
    variable set each key. Plain data: a supervisor hands it to its workers as it is,
    so each reads the keypairs file itself (``settings_from_sources``)."""
    data = _read_toml(path) if path is not None else {}
    env, origin = env_overrides(environ or {})
    return _merge(_merge(data, env), overrides or {}), origin


def settings_from_sources(
    merged: Mapping[str, Any], origin: Mapping[str, str] | None = None, path: Path | None = None
) -> Settings:
    """Validated settings from ``settings_sources``, with the keypairs file's keys."""
    data = dict(merged)
    keypairs_file = data.get("auth", {}).get("keypairs_file")
    if isinstance(keypairs_file, str) and keypairs_file:
        extra = load_keypairs_file(Path(keypairs_file))
        data["keypairs"] = [*data.get("keypairs", ()), *(_plain(kp) for kp in extra)]
    try:
        return settings_from_mapping(data, origin)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None


def load_settings(
    path: Path | None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Effective settings. Precedence: defaults < file < environment < ``overrides``."""
    merged, origin = settings_sources(path, environ, overrides)
    return settings_from_sources(merged, origin, path)


def _plain(kp: KeypairSettings) -> dict[str, Any]:
    return kp.model_dump() | {"secret_key": kp.secret_key.get_secret_value()}


class _KeypairsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    keypairs: tuple[KeypairSettings, ...] = ()


def load_keypairs_file(path: Path) -> tuple[KeypairSettings, ...]:
    """A separate file of ``[[keypairs]]`` (it can be reloaded without a restart)."""
    try:
        return _KeypairsFile.model_validate(_read_toml(path)).keypairs
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from None


def masked(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data, every secret masked."""
    return settings.model_dump(mode="json")
