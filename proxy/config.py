"""Settings: a frozen, validated object loaded from TOML.

Unknown keys and invalid values are errors that name the key (``server.bnd: unknown
key``), never silently ignored. Durations are in seconds.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from .policy import Principal, Role
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
    # Serve /metrics on this separate HOST:PORT only (None: on the main bind).
    metrics_bind: HostPort | None = None
    # How long clients get to read their final events at shutdown.
    graceful_timeout: Seconds = 5.0


class UpstreamSettings(_Section):
    target: HostPort = "127.0.0.1:50051"
    # gRPC keepalive pings: a dead connection is noticed within about time + timeout.
    keepalive_time: Seconds = 5.0
    keepalive_timeout: Seconds = 3.0
    # The upstream must answer a subscription within this long, or it is retried.
    connect_timeout: Seconds = 5.0
    reconnect_min: Seconds = 0.1
    reconnect_max: Seconds = 10.0


class AuthSettings(_Section):
    max_clock_skew: Seconds = 900.0


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
    server: ServerSettings = ServerSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    auth: AuthSettings = AuthSettings()
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


def _describe(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{key}: {msg}")
    return "; ".join(lines)


def settings_from_mapping(data: dict[str, Any]) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def load_settings(path: Path) -> Settings:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        return settings_from_mapping(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
