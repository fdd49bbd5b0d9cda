"""The visibility policy against an independent, obviously-correct reference."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.events import Event
from proxy.policy import (
    Filters,
    PolicyError,
    Principal,
    Role,
    event_keys,
    index_key,
    resolve_filters,
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
filters = st.builds(
    Filters,
    session=st.none() | st.sampled_from(SESSIONS),
    owner=st.none() | st.sampled_from(KEYS),
    group=st.none() | st.sampled_from(GROUPS),
)
events = st.builds(
    Event,
    sequence=st.integers(1, 10**6),
    name=st.sampled_from(["kernel_started", "kernel_terminated", "x_new"]),
    session_id=st.sampled_from(SESSIONS),
    kernel_id=st.just("k"),
    owner_access_key=st.sampled_from(KEYS),
    user_id=st.sampled_from(USERS),
    domain_name=st.sampled_from(DOMAINS),
    group_name=st.sampled_from(GROUPS),
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
        )
    )
    return mine and wanted


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
    field = data.draw(st.sampled_from(["session", "owner", "group"]))
    pool = {"session": SESSIONS, "owner": KEYS, "group": GROUPS}[field]
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


def _as_dict(f: Filters) -> dict[str, str | None]:
    return {"session": f.session, "owner": f.owner, "group": f.group}


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
