"""Who may see which event: the visibility policy, as pure functions.

The rule (from the original manager):
- user: sessions owned by the caller's user (any of that user's keys), in the caller's
  domain; admin: every session in the caller's domain; superadmin: everything.
- then the request's filters narrow further: ``group`` must equal the session's group,
  the session's name and ``ownerAccessKey`` the owner's key (naming a session without
  an owner means the caller's own key, as in the original), or the session's UUID;
  ``scope`` keeps only ``session_*`` or ``kernel_*`` events.

Each API generation has a parameter parser here (``resolve_filters`` for v4,
``resolve_filters_v5`` for ``/events/session``): query parameters -> ``Filters``,
sharing one set of checks. ``visible`` is the only decision. ``index_key``/
``event_keys`` let the hub find candidate recipients without asking every client;
they are proven (by property tests) never to hide an event that ``visible`` allows.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from .events import Event
from .payloads import KERNEL_PREFIX, SESSION_PREFIX, Payload

ANY: Final = "*"
MAX_PARAM_LENGTH: Final = 256


class Role(enum.StrEnum):
    USER = "user"
    ADMIN = "admin"
    SUPERADMIN = "superadmin"


@dataclass(frozen=True, slots=True)
class Principal:
    access_key: str
    role: Role
    user_id: str
    domain: str


@dataclass(frozen=True, slots=True)
class Filters:
    """Narrowing filters; None means "any". Also how the events are rendered."""

    session: str | None = None  # the session's name
    owner: str | None = None
    group: str | None = None
    session_uuid: str | None = None  # the session's UUID (v5's sessionId)
    prefix: str | None = None  # scope: only events whose name starts with this
    # A cluster session's sub-kernels' kernel_* events are not sent: v4 (the
    # defaults are v4's) forwarded the main kernel's only; v5 sends every kernel's.
    main_only: bool = True
    payload: Payload = Payload.V4


class PolicyError(Exception):
    """A request the policy refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# A generation's parameters: canonical name -> accepted spellings (the SDK sends
# owner_access_key in snake case; v5 keeps the original's aliases).
ParamTable = Mapping[str, tuple[str, ...]]
V4_PARAMS: Final[ParamTable] = {
    "sessionId": ("sessionId",),
    "ownerAccessKey": ("ownerAccessKey", "owner_access_key"),
    "group": ("group", "groupName"),
}
V5_PARAMS: Final[ParamTable] = {
    "sessionName": ("sessionName", "name"),
    "ownerAccessKey": ("ownerAccessKey", "owner_access_key"),
    "sessionId": ("sessionId",),
    "group": ("group", "groupName"),
    "scope": ("scope",),
}
SCOPES: Final = {"*": None, "session": SESSION_PREFIX, "kernel": KERNEL_PREFIX}
_V5: Final[dict[str, Any]] = {"main_only": False, "payload": Payload.V5}


def _check_known(
    params: Mapping[str, Sequence[str]], table: ParamTable, extra_allowed: frozenset[str]
) -> None:
    """Unknown parameters are refused: a misspelt filter that is silently ignored
    would stream more than the client asked for."""
    spellings = {alias for aliases in table.values() for alias in aliases}
    unknown = sorted(k for k in params if k not in spellings and k not in extra_allowed)
    if unknown:
        raise PolicyError(400, f"unknown query parameter(s): {', '.join(unknown)}")


def _single(params: Mapping[str, Sequence[str]], table: ParamTable, name: str) -> str | None:
    values = [v for alias in table[name] for v in params.get(alias, ())]
    if not values:
        return None
    if len(set(values)) > 1:
        raise PolicyError(400, f"parameter {name!r} was given more than once with different values")
    value = values[0]
    if value == "":
        raise PolicyError(400, f"parameter {name!r} is empty (use '*' for any)")
    if len(value) > MAX_PARAM_LENGTH:
        raise PolicyError(400, f"parameter {name!r} is longer than {MAX_PARAM_LENGTH} characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise PolicyError(400, f"parameter {name!r} contains control characters")
    return None if value == ANY else value


def _owner(principal: Principal, owner: str | None) -> str | None:
    if owner is not None and owner != principal.access_key and principal.role is Role.USER:
        raise PolicyError(403, "only domain admins and superadmins may name another owner's key")
    return owner


def resolve_filters(
    principal: Principal,
    params: Mapping[str, Sequence[str]],
    extra_allowed: frozenset[str] = frozenset(),
) -> Filters:
    """v4 (``/stream/kernel/_/events``): query parameters -> filters, or PolicyError."""
    _check_known(params, V4_PARAMS, extra_allowed)
    session = _single(params, V4_PARAMS, "sessionId")
    owner = _single(params, V4_PARAMS, "ownerAccessKey")
    group = _single(params, V4_PARAMS, "group")
    owner = _owner(principal, owner)
    if session is not None and owner is None:
        owner = principal.access_key
    return Filters(session=session, owner=owner, group=group)


def resolve_filters_v5(
    principal: Principal,
    params: Mapping[str, Sequence[str]],
    extra_allowed: frozenset[str] = frozenset(),
) -> Filters:
    """v5 and later (``/events/session``): query parameters -> filters, or PolicyError.

    ``sessionId`` is a UUID and, when given, overrides ``sessionName`` and
    ``ownerAccessKey`` (a user naming another owner is refused all the same).
    """
    _check_known(params, V5_PARAMS, extra_allowed)
    name = _single(params, V5_PARAMS, "sessionName")
    owner = _single(params, V5_PARAMS, "ownerAccessKey")
    group = _single(params, V5_PARAMS, "group")
    raw_uuid = _single(params, V5_PARAMS, "sessionId")
    scope = _single(params, V5_PARAMS, "scope") or ANY
    owner = _owner(principal, owner)
    if scope not in SCOPES:
        raise PolicyError(400, "parameter 'scope' must be one of '*', 'session', 'kernel'")
    prefix = SCOPES[scope]
    if raw_uuid is not None:
        try:
            session_uuid = str(uuid.UUID(raw_uuid))
        except ValueError:
            raise PolicyError(400, "parameter 'sessionId' is not a UUID") from None
        return Filters(group=group, session_uuid=session_uuid, prefix=prefix, **_V5)
    if name is not None and owner is None:
        owner = principal.access_key
    return Filters(session=name, owner=owner, group=group, prefix=prefix, **_V5)


# The roles as module constants: visible() runs per event and recipient, and looking a
# member up on the enum class (Role.USER) costs several times a global's lookup.
_USER: Final = Role.USER
_ADMIN: Final = Role.ADMIN
_SUPERADMIN: Final = Role.SUPERADMIN
_MAIN_ROLE: Final = "main"


def visible(principal: Principal, filters: Filters, event: Event) -> bool:
    """May this principal, with these filters, receive this event?"""
    role = principal.role
    if role is _USER:
        if event.user_id != principal.user_id or event.domain_name != principal.domain:
            return False
    elif role is _ADMIN:
        if event.domain_name != principal.domain:
            return False
    elif role is not _SUPERADMIN:  # pragma: no cover - deny anything unforeseen
        return False
    return (
        (filters.group is None or filters.group == event.group_name)
        and (filters.session is None or filters.session == event.session_id)
        and (filters.owner is None or filters.owner == event.owner_access_key)
        and (filters.session_uuid is None or filters.session_uuid == event.session_uuid)
        and (filters.prefix is None or event.name.startswith(filters.prefix))
        and not (filters.main_only and _sub_kernel(event))
    )


def _sub_kernel(event: Event) -> bool:
    """A kernel event of a cluster session's kernel other than its main one."""
    role = event.cluster_role
    return bool(role) and role != _MAIN_ROLE and event.name.startswith(KERNEL_PREFIX)


IndexKey = tuple[str, str]


def index_key(principal: Principal, filters: Filters) -> IndexKey:
    """The most selective bucket a subscriber can be found under."""
    if filters.session_uuid is not None:
        return ("uuid", filters.session_uuid)
    if filters.session is not None:
        return ("session", filters.session)
    if filters.owner is not None:
        return ("owner", filters.owner)
    if principal.role is Role.USER:
        return ("user", principal.user_id)
    if filters.group is not None:
        return ("group", filters.group)
    if principal.role is Role.ADMIN:
        return ("domain", principal.domain)
    return ("all", "")


def event_keys(event: Event) -> tuple[IndexKey, ...]:
    """Every bucket whose subscribers might see this event."""
    return (
        ("uuid", event.session_uuid),
        ("session", event.session_id),
        ("owner", event.owner_access_key),
        ("user", event.user_id),
        ("group", event.group_name),
        ("domain", event.domain_name),
        ("all", ""),
    )
