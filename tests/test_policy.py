"""The visibility policy against an independent, obviously-correct reference."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.events import Event
from proxy.payloads import Payload
from proxy.policy import (
    Filters,
    PolicyError,
    Principal,
    Role,
    event_keys,
    index_key,
    resolve_filters,
    resolve_filters_v5,
    visible,
)

# Small alphabets so that principals, filters and events collide often.
USERS = ["u1", "u2", "u3"]
DOMAINS = ["default", "research"]
KEYS = ["AK1", "AK2", "AK3", "AK4"]
GROUPS = ["g1", "g2"]
SESSIONS = ["s1", "s2", "s3"]

principals = st.builds(
    Principal,
    access_key=st.sampled_from(KEYS),
    role=st.sampled_from(list(Role)),
    user_id=st.sampled_from(USERS),
    domain=st.sampled_from(DOMAINS),
)
UUIDS = [str(uuid.UUID(int=i)) for i in (1, 2, 3)]
NAMES = ["kernel_started", "kernel_terminated", "session_started", "session_failure", "x_new"]
# Filters' fields, drawn: v4's three, then v5's two more.
V4_FILTER_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "session": st.none() | st.sampled_from(SESSIONS),
    "owner": st.none() | st.sampled_from(KEYS),
    "group": st.none() | st.sampled_from(GROUPS),
}
V5_FILTER_FIELDS: dict[str, st.SearchStrategy[Any]] = V4_FILTER_FIELDS | {
    "session_uuid": st.none() | st.sampled_from(UUIDS),
    "prefix": st.sampled_from([None, "session_", "kernel_"]),
}
filters = st.builds(
    Filters,
    **V5_FILTER_FIELDS,
    main_only=st.booleans(),
    payload=st.sampled_from(list(Payload)),
)
# An event's session, owner, tenancy and cluster role, drawn from small alphabets.
SESSION_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "session_id": st.sampled_from(SESSIONS),
    "owner_access_key": st.sampled_from(KEYS),
    "user_id": st.sampled_from(USERS),
    "domain_name": st.sampled_from(DOMAINS),
    "group_name": st.sampled_from(GROUPS),
    "session_uuid": st.sampled_from(["", *UUIDS]),
    "cluster_role": st.sampled_from(["", "main", "sub"]),
}
events = st.builds(
    Event,
    sequence=st.integers(1, 10**6),
    name=st.sampled_from(NAMES),
    kernel_id=st.just("k"),
    **SESSION_FIELDS,
    cluster_idx=st.integers(0, 3),
)


def reference_visible(p: Principal, f: Filters, e: Event) -> bool:
    """The compat page's rule, written as a table of the sessions each role owns."""
    if p.role == "superadmin":
        mine = True
    elif p.role == "admin":
        mine = e.domain_name == p.domain
    elif p.role == "user":
        mine = (e.user_id, e.domain_name) == (p.user_id, p.domain)
    else:
        mine = False
    wanted = all(
        want is None or want == have
        for want, have in (
            (f.group, e.group_name),
            (f.session, e.session_id),
            (f.owner, e.owner_access_key),
            (f.session_uuid, e.session_uuid),
        )
    )
    family = e.name.split("_", 1)[0] + "_"
    in_scope = f.prefix is None or f.prefix == family
    # v4 forwarded a cluster session's main kernel only: a kernel event of any other
    # kernel (one with a role that is not "main") is not v4's to send.
    sub_kernel = family == "kernel_" and e.cluster_role not in ("", "main")
    return mine and wanted and in_scope and not (f.main_only and sub_kernel)


@given(principals, filters, events)
def test_visible_matches_reference(p: Principal, f: Filters, e: Event) -> None:
    assert visible(p, f, e) == reference_visible(p, f, e)


@given(principals, filters, events)
def test_no_tenant_ever_sees_another_tenants_event(p: Principal, f: Filters, e: Event) -> None:
    if visible(p, f, e):
        if p.role is Role.USER:
            assert e.user_id == p.user_id
            assert e.domain_name == p.domain
        if p.role is Role.ADMIN:
            assert e.domain_name == p.domain


@given(principals, filters, events, st.data())
def test_every_filter_narrows_never_widens(
    p: Principal, f: Filters, e: Event, data: st.DataObject
) -> None:
    field = data.draw(st.sampled_from(["session", "owner", "group", "session_uuid", "prefix"]))
    pool = {
        "session": SESSIONS,
        "owner": KEYS,
        "group": GROUPS,
        "session_uuid": UUIDS,
        "prefix": ["session_", "kernel_"],
    }[field]
    narrower = Filters(**{**_as_dict(f), field: data.draw(st.sampled_from(pool))})
    if getattr(f, field) is None and visible(p, narrower, e):
        assert visible(p, f, e)
    # Removing a filter never hides an event.
    wider = Filters(**{**_as_dict(f), field: None})
    if visible(p, f, e):
        assert visible(p, wider, e)


@given(principals, filters, events)
def test_index_finds_every_recipient(p: Principal, f: Filters, e: Event) -> None:
    if visible(p, f, e):
        assert index_key(p, f) in event_keys(e)


def _as_dict(f: Filters) -> dict[str, Any]:
    return {field.name: getattr(f, field.name) for field in dataclasses.fields(f)}


USER = Principal("AK1", Role.USER, "u1", "default")
ADMIN = Principal("AK2", Role.ADMIN, "u2", "default")


def test_defaults_are_everything_visible() -> None:
    assert resolve_filters(USER, {}) == Filters()
    assert resolve_filters(USER, {"sessionId": ["*"], "group": ["*"]}) == Filters()


def test_named_session_defaults_owner_to_caller() -> None:
    assert resolve_filters(ADMIN, {"sessionId": ["s1"]}) == Filters(session="s1", owner="AK2")


@pytest.mark.parametrize("spelling", ["ownerAccessKey", "owner_access_key"])
def test_owner_aliases(spelling: str) -> None:
    got = resolve_filters(ADMIN, {"sessionId": ["s1"], spelling: ["AK9"]})
    assert got == Filters(session="s1", owner="AK9")


@pytest.mark.parametrize("spelling", ["group", "groupName"])
def test_group_aliases(spelling: str) -> None:
    assert resolve_filters(USER, {spelling: ["g1"]}) == Filters(group="g1")


def test_user_naming_another_owner_is_forbidden() -> None:
    with pytest.raises(PolicyError) as err:
        resolve_filters(USER, {"sessionId": ["s1"], "ownerAccessKey": ["AK9"]})
    assert err.value.status == 403


def test_user_naming_own_key_is_fine() -> None:
    got = resolve_filters(USER, {"owner_access_key": ["AK1"]})
    assert got == Filters(owner="AK1")


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"sesionId": ["s1"]}, "unknown query parameter(s): sesionId"),
        ({"sessionId": [""]}, "'sessionId' is empty"),
        ({"sessionId": ["a", "b"]}, "more than once"),
        ({"group": ["g1"], "groupName": ["g2"]}, "more than once"),
        ({"group": ["x" * 300]}, "longer than 256"),
        ({"sessionId": ["a\nb"]}, "control characters"),
    ],
)
def test_bad_parameters_are_400_naming_the_problem(
    params: dict[str, list[str]], fragment: str
) -> None:
    with pytest.raises(PolicyError) as err:
        resolve_filters(ADMIN, params)
    assert err.value.status == 400
    assert fragment in err.value.message


def test_same_value_repeated_is_accepted() -> None:
    assert resolve_filters(USER, {"group": ["g1"], "groupName": ["g1"]}) == Filters(group="g1")


def test_extra_allowed_parameters_pass() -> None:
    got = resolve_filters(USER, {"lastEventId": ["x:1"]}, extra_allowed=frozenset({"lastEventId"}))
    assert got == Filters()


# --- /events/session (v5 and later) -----------------------------------------------

V5_SPELLINGS = {
    "sessionName": "name",
    "name": "name",
    "ownerAccessKey": "owner",
    "owner_access_key": "owner",
    "sessionId": "uuid",
    "group": "group",
    "groupName": "group",
    "scope": "scope",
}
v5_values = st.sampled_from(["*", "s1", "AK1", "AK2", "g1", "session", "kernel", "bogus", *UUIDS])
v5_params = st.dictionaries(
    st.sampled_from([*V5_SPELLINGS, "sesionName", "lastEventId"]),
    st.lists(v5_values, min_size=1, max_size=2),
    max_size=4,
)


def reference_v5(p: Principal, params: dict[str, list[str]]) -> int | dict[str, Any]:
    """The generations page's rules, written out: an HTTP status, or the filters."""
    if any(k not in V5_SPELLINGS and k != "lastEventId" for k in params):
        return 400
    given: dict[str, set[str]] = {}
    for key, values in params.items():
        if key in V5_SPELLINGS:
            given.setdefault(V5_SPELLINGS[key], set()).update(values)
    if any(len(values) > 1 for values in given.values()):
        return 400
    one = {k: next(iter(v)) for k, v in given.items()}
    owner = one.get("owner", "*")
    if owner not in ("*", p.access_key) and p.role is Role.USER:
        return 403
    scope = one.get("scope", "*")
    if scope not in ("*", "session", "kernel"):
        return 400
    prefix = None if scope == "*" else scope + "_"
    group = None if one.get("group", "*") == "*" else one["group"]
    session_uuid = one.get("uuid", "*")
    common = {"group": group, "prefix": prefix, "main_only": False, "payload": Payload.V5}
    if session_uuid != "*":
        if session_uuid not in UUIDS:
            return 400
        return {"session": None, "owner": None, "session_uuid": session_uuid, **common}
    name = None if one.get("name", "*") == "*" else one["name"]
    owner_filter = None if owner == "*" else owner
    if name is not None and owner_filter is None:
        owner_filter = p.access_key
    return {"session": name, "owner": owner_filter, "session_uuid": None, **common}


@given(principals, v5_params)
def test_v5_parameters_match_the_reference(p: Principal, params: dict[str, list[str]]) -> None:
    expected = reference_v5(p, params)
    if isinstance(expected, int):
        with pytest.raises(PolicyError) as err:
            resolve_filters_v5(p, params, frozenset({"lastEventId"}))
        assert err.value.status == expected, err.value.message
    else:
        assert _as_dict(resolve_filters_v5(p, params, frozenset({"lastEventId"}))) == expected


def test_v5_session_uuid_overrides_name_and_owner_and_is_canonical() -> None:
    got = resolve_filters_v5(
        ADMIN, {"sessionId": [UUIDS[0].upper()], "sessionName": ["s1"], "ownerAccessKey": ["AK9"]}
    )
    assert (got.session_uuid, got.session, got.owner) == (UUIDS[0], None, None)


@pytest.mark.parametrize(
    ("params", "status", "fragment"),
    [
        ({"sessionId": ["mysession-01"]}, 400, "not a UUID"),
        ({"scope": ["kernels"]}, 400, "'scope' must be one of"),
        ({"sessionName": ["s1"], "name": ["s2"]}, 400, "more than once"),
        ({"session": ["s1"]}, 400, "unknown query parameter(s): session"),
        ({"owner_access_key": ["AK9"]}, 403, "another owner"),
    ],
)
def test_v5_bad_parameters_name_the_problem(
    params: dict[str, list[str]], status: int, fragment: str
) -> None:
    with pytest.raises(PolicyError) as err:
        resolve_filters_v5(USER, params)
    assert (err.value.status, fragment in err.value.message) == (status, True), err.value.message


def test_v5_defaults_see_everything_visible_in_v5_shape() -> None:
    got = resolve_filters_v5(USER, {"sessionName": ["*"], "scope": ["*"]})
    assert got == Filters(main_only=False, payload=Payload.V5)


def test_v4_hides_sub_kernels_and_v5_sends_them() -> None:
    sub = Event(1, "kernel_started", "s1", "k2", "AK1", "u1", "default", "g1", cluster_role="sub")
    session_event = dataclasses.replace(sub, name="session_started")
    v4 = resolve_filters(USER, {})
    v5 = resolve_filters_v5(USER, {})
    assert (visible(USER, v4, sub), visible(USER, v5, sub)) == (False, True)
    assert visible(USER, v4, session_event)
