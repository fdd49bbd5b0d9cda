"""Who may see which event: the visibility policy, as pure functions.

The rule (from the original manager):
- user: sessions owned by the caller's user (any of that user's keys), in the caller's
  domain; admin: every session in the caller's domain; superadmin: everything.
- then the request's filters narrow further: ``group`` must equal the session's group,
  ``sessionId`` the session's name, and ``ownerAccessKey`` the owner's key. Naming a
  session without an owner means the caller's own key, as in the original.

``visible`` is the only decision. ``index_key``/``event_keys`` let the hub find
candidate recipients without asking every client; they are proven (by property tests)
never to hide an event that ``visible`` allows.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from .events import Event

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
    """Narrowing filters; None means "any"."""

    session: str | None = None
    owner: str | None = None
    group: str | None = None


class PolicyError(Exception):
    """A request the policy refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# Query parameter -> (canonical name, accepted spellings). The SDK sends snake case.
_PARAMS: Final = {
    "sessionId": ("sessionId",),
    "ownerAccessKey": ("ownerAccessKey", "owner_access_key"),
    "group": ("group", "groupName"),
}
_SPELLINGS: Final = {alias: name for name, aliases in _PARAMS.items() for alias in aliases}


def _single(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = [v for alias in _PARAMS[name] for v in params.get(alias, ())]
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


def resolve_filters(
    principal: Principal,
    params: Mapping[str, Sequence[str]],
    extra_allowed: frozenset[str] = frozenset(),
) -> Filters:
    """Turn query parameters into filters for this principal, or raise PolicyError.

    Unknown parameters are refused: a misspelt filter that is silently ignored would
    stream more than the client asked for.
    """
    unknown = sorted(k for k in params if k not in _SPELLINGS and k not in extra_allowed)
    if unknown:
        raise PolicyError(400, f"unknown query parameter(s): {', '.join(unknown)}")
    session = _single(params, "sessionId")
    owner = _single(params, "ownerAccessKey")
    group = _single(params, "group")
    if owner is not None and owner != principal.access_key and principal.role is Role.USER:
        raise PolicyError(403, "only domain admins and superadmins may name another owner's key")
    if session is not None and owner is None:
        owner = principal.access_key
    return Filters(session=session, owner=owner, group=group)


# The roles as module constants: visible() runs per event and recipient, and looking a
# member up on the enum class (Role.USER) costs several times a global's lookup.
_USER: Final = Role.USER
_ADMIN: Final = Role.ADMIN
_SUPERADMIN: Final = Role.SUPERADMIN


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
    )


IndexKey = tuple[str, str]


def index_key(principal: Principal, filters: Filters) -> IndexKey:
    """The most selective bucket a subscriber can be found under."""
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
        ("session", event.session_id),
        ("owner", event.owner_access_key),
        ("user", event.user_id),
        ("group", event.group_name),
        ("domain", event.domain_name),
        ("all", ""),
    )
