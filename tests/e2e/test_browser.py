"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright.

These are plain (not async) tests: Playwright's sync API cannot run inside the Trio
loop, so each proxy runs ``run_proxy`` under its own ``trio.run`` in a thread
(``ProxyThread``) and the test thread drives the browser. Events come from the
in-process upstream's ``EventLog``. Everything is bounded by timeouts.

Chromium comes from ``make system-deps`` (apt-get install chromium), never from
``playwright install``; without it these tests fail, they do not skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    Request,
    expect,
    sync_playwright,
)

from proxy._pb.kernel_events.v1 import events_pb2 as pb
from proxy._pb.kernel_events.v1.events_pb2_grpc import KernelEventsServiceServicer
from proxy.config import Settings
from proxy.server import RunningProxy, run_proxy
from proxy.upstream_server import EventLog, KernelEventsServicer, UpstreamServer

from ..helpers import ADMIN, RESEARCH_USER, SUPER, USER1, USER1B, USER2, Key, lifecycle
from .test_login import browser_settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
DOCS_SCREENSHOT = ROOT / "docs" / "dashboard.png"
TIMEOUT_MS = 15_000
T = TypeVar("T")


# --- The proxy in a thread ------------------------------------------------------------


class ProxyThread:
    """``run_proxy`` under its own ``trio.run`` in a thread, stoppable from the test."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self.running: RunningProxy | None = None
        self._thread = threading.Thread(target=self._run, name="proxy-under-test", daemon=True)

    def start(self) -> ProxyThread:
        self._thread.start()
        if not self._ready.wait(20):
            raise TimeoutError("the proxy did not start within 20 s")
        if self._error is not None:
            raise RuntimeError("the proxy failed to start") from self._error
        return self

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the test thread by start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            running: RunningProxy = await nursery.start(run_proxy, self.settings)
            self.running = running
            self._token = trio.lowlevel.current_trio_token()
            with trio.fail_after(10):
                while not running.bridge.live:
                    await trio.sleep(0.01)
            self._ready.set()

    @property
    def url(self) -> str:
        assert self.running is not None
        return self.running.url

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the proxy's Trio thread (the hub is not thread-safe)."""
        return trio.from_thread.run_sync(fn, trio_token=self._token)

    def clients(self) -> int:
        return self.call(lambda: self.running.hub.clients if self.running else 0)

    def stop(self) -> None:
        if self._thread.is_alive() and self.running is not None:
            self.call(self.running.shutdown)
        self._thread.join(20)
        assert not self._thread.is_alive(), "the proxy did not stop within 20 s"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        time.sleep(0.05)


# --- Fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium is not installed ({CHROMIUM} is missing). Run `make system-deps` "
            "(it runs `apt-get install -y --no-install-recommends chromium`). "
            "Do not use `playwright install`: browser downloads are not possible here.",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def proxies() -> Iterator[list[ProxyThread]]:
    started: list[ProxyThread] = []
    yield started
    for proxy in started:
        proxy.stop()


@pytest.fixture
def start_proxy(upstream: UpstreamServer, proxies: list[ProxyThread]) -> Callable[..., ProxyThread]:
    def start(sections: dict[str, dict[str, Any]] | None = None) -> ProxyThread:
        proxy = ProxyThread(browser_settings(upstream.target, sections)).start()
        proxies.append(proxy)
        return proxy

    return start


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    # Reduced motion: no row flashes or pulsing dots in screenshots.
    ctx = browser.new_context(viewport={"width": 1280, "height": 760}, reduced_motion="reduce")
    ctx.set_default_timeout(TIMEOUT_MS)
    try:
        yield ctx
    finally:
        ctx.close()


def sign_in(context: BrowserContext, url: str, key: Key, path: str = "/ui/") -> Page:
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{url}{path}")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("Access key", exact=True).fill(key.access_key)
    page.get_by_label("Secret key", exact=True).fill(key.secret_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#dash-view")).to_be_visible()
    expect(status(page)).to_have_attribute("data-state", "live")
    expect(page.locator("#who-key")).to_have_text(key.access_key)
    assert not errors, errors
    return page


def status(page: Page) -> Any:
    return page.locator("#status")


def row(page: Page, session: str) -> Any:
    return page.locator(f'#rows tr[data-session="{session}"]')


def emit(upstream: UpstreamServer, *events: pb.LifecycleEvent) -> None:
    upstream.log.append(events)


def save_screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


# --- Tests ----------------------------------------------------------------------------


def test_user_sees_only_their_sessions_change_state(
    start_proxy: Callable[..., ProxyThread], upstream: UpstreamServer, context: BrowserContext
) -> None:
    proxy = start_proxy()
    # A browser asking for "/" gets the dashboard (the SDK's */* keeps the JSON).
    page = sign_in(context, proxy.url, USER1, path="/")
    expect(page.locator("#f-owner")).to_be_disabled()
    emit(
        upstream,
        lifecycle("kernel_preparing", "mine", USER1, reason="scheduled"),
        lifecycle("kernel_preparing", "theirs", USER2),
        lifecycle("kernel_preparing", "admins", ADMIN),
        lifecycle("kernel_preparing", "elsewhere", RESEARCH_USER),
        lifecycle("kernel_started", "other-key-same-user", USER1B),
    )
    expect(row(page, "mine")).to_have_attribute("data-event", "kernel_preparing")
    expect(row(page, "other-key-same-user")).to_have_attribute("data-event", "kernel_started")
    expect(row(page, "mine").locator("td.reason")).to_have_text("scheduled")
    expect(row(page, "mine").locator("td.owner")).to_have_text(USER1.access_key)

    emit(upstream, lifecycle("kernel_pulling", "mine", USER1))
    expect(row(page, "mine")).to_have_attribute("data-event", "kernel_pulling")
    emit(upstream, lifecycle("kernel_started", "mine", USER1))
    expect(row(page, "mine").locator("td.state")).to_have_text("started")
    emit(
        upstream,
        lifecycle(
            "kernel_terminated",
            "mine",
            USER1,
            reason="user-requested",
            result=pb.RESULT_SUCCESS,
            exit_code=0,
        ),
    )
    expect(row(page, "mine").locator("td.state")).to_have_text("terminated")
    expect(row(page, "mine").locator("td.result")).to_have_text("SUCCESS · exit 0")
    # Everything above was delivered in order: the others would have arrived by now.
    expect(page.locator("#rows tr")).to_have_count(2)
    expect(page.locator("#meta")).to_have_text("2 sessions · 5 events received")
    expect(status(page)).to_have_attribute("data-state", "live")


def test_superadmin_sees_everything_and_filters_reconnect(
    start_proxy: Callable[..., ProxyThread], upstream: UpstreamServer, context: BrowserContext
) -> None:
    proxy = start_proxy()
    page = sign_in(context, proxy.url, SUPER)
    expect(page.locator("#who-role")).to_have_text("superadmin")
    emit(
        upstream,
        lifecycle("kernel_preparing", "train-resnet50", USER1, group="vision", reason="scheduled"),
        lifecycle("kernel_pulling", "llm-finetune-7b", USER2, group="nlp"),
        lifecycle("kernel_started", "notebook-jhkim", ADMIN, group="vision", kernel_id="4f2c9e"),
        lifecycle(
            "kernel_terminated",
            "etl-nightly",
            RESEARCH_USER,
            group="data",
            reason="self-terminated",
            result=pb.RESULT_SUCCESS,
            exit_code=0,
        ),
        lifecycle(
            "kernel_terminated",
            "sweep-lr-0.3",
            USER1B,
            group="vision",
            reason="failed-to-start",
            result=pb.RESULT_FAILURE,
            exit_code=137,
        ),
        lifecycle("kernel_cancelled", "bigmem-job", USER2, group="nlp", reason="no-resources"),
        lifecycle("kernel_creating", "render-blender", RESEARCH_USER, group="data"),
        lifecycle("session_started", "inference-api", SUPER, group="serving"),
    )
    for name in ("train-resnet50", "llm-finetune-7b", "etl-nightly", "inference-api"):
        expect(row(page, name)).to_be_visible()
    expect(page.locator("#rows tr")).to_have_count(8)
    # A name the dashboard has never heard of still shows (session_* and new names).
    expect(row(page, "inference-api").locator("td.state")).to_have_text("started")
    expect(row(page, "sweep-lr-0.3").locator("td.result")).to_have_text("FAILURE · exit 137")
    expect(row(page, "etl-nightly").locator("td.group")).to_have_text("data")
    shot = save_screenshot(page, "dashboard-superadmin.png")
    if os.environ.get("KEP_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, DOCS_SCREENSHOT)

    # A group filter: a new stream with ?group=nlp: that group's sessions as they stand
    # (from the state), then its changes.
    page.get_by_label("Group", exact=True).fill("nlp")
    page.get_by_role("button", name="Apply").click()
    expect(status(page)).to_have_attribute("data-state", "live")
    expect(page.locator("#rows tr")).to_have_count(2)
    expect(row(page, "bigmem-job").locator("td.state")).to_have_text("cancelled")
    wait_for(lambda: proxy.clients() == 1)
    emit(
        upstream,
        lifecycle("kernel_started", "train-resnet50", USER1, group="vision"),
        lifecycle("kernel_started", "llm-finetune-7b", USER2, group="nlp"),
    )
    expect(row(page, "llm-finetune-7b").locator("td.state")).to_have_text("started")
    expect(row(page, "llm-finetune-7b").locator("td.group")).to_have_text("nlp")
    expect(page.locator("#rows tr")).to_have_count(2)
    save_screenshot(page, "dashboard-filtered.png")


NINE_SESSIONS = [
    ("train-resnet50", USER1, "vision", ["kernel_preparing", "kernel_pulling", "kernel_started"]),
    ("llm-finetune-7b", USER2, "nlp", ["session_enqueued", "session_scheduled", "kernel_pulling"]),
    ("notebook-jhkim", ADMIN, "vision", ["kernel_creating", "kernel_started", "session_started"]),
    ("etl-nightly", RESEARCH_USER, "data", ["kernel_started", "kernel_terminated"]),
    ("bigmem-job", USER2, "nlp", ["session_enqueued", "session_cancelled"]),
    ("render-blender", RESEARCH_USER, "data", ["kernel_preparing", "kernel_creating"]),
    ("inference-api", SUPER, "serving", ["session_started"]),
    ("sweep-lr-0.3", USER1B, "vision", ["kernel_started", "session_failure"]),
    ("shell-tmp", USER1, "scratch", ["session_started", "session_terminating"]),
]


def test_a_page_opened_after_sessions_ran_shows_where_each_stands(
    start_proxy: Callable[..., ProxyThread],
    upstream: UpstreamServer,
    browser: Browser,
    context: BrowserContext,
) -> None:
    # The first report: nine sessions ran, and a page opened afterwards was empty.
    emit(
        upstream,
        *(
            lifecycle(name, session, owner, group=group, reason="oom" if "fail" in name else None,
                      exit_code=1 if "fail" in name else None)
            for session, owner, group, names in NINE_SESSIONS
            for name in names
        ),
    )  # fmt: skip
    proxy = start_proxy()
    page = sign_in(context, proxy.url, SUPER)
    expect(page.locator("#rows tr")).to_have_count(9)
    for session, owner, group, names in NINE_SESSIONS:
        expect(row(page, session)).to_have_attribute("data-event", names[-1])
        expect(row(page, session).locator("td.group")).to_have_text(group)
        expect(row(page, session).locator("td.owner")).to_have_text(owner.access_key)
        expect(row(page, session).locator("td.updated")).to_have_text("earlier")
    expect(row(page, "sweep-lr-0.3").locator("td.result")).to_have_text("exit 1")
    # Newest change first, as live rows are.
    expect(page.locator("#rows tr").first).to_have_attribute("data-session", "shell-tmp")
    expect(page.locator("#meta")).to_have_text("9 sessions · 0 events received")
    expect(page.locator("#empty")).to_be_hidden()
    save_screenshot(page, "dashboard-state.png")
    # Then changes, on top of the state.
    emit(upstream, lifecycle("kernel_started", "render-blender", RESEARCH_USER, group="data"))
    expect(row(page, "render-blender").locator("td.state")).to_have_text("started")
    expect(page.locator("#meta")).to_have_text("9 sessions · 1 event received")
    # A user's page: only their own user's sessions, from the state too.
    theirs = browser.new_context(viewport={"width": 1280, "height": 760})
    try:
        theirs.set_default_timeout(TIMEOUT_MS)
        other = sign_in(theirs, proxy.url, USER1)
        expect(other.locator("#rows tr")).to_have_count(3)  # USER1's two, USER1B's one
    finally:
        theirs.close()


def test_proxy_restart_resumes_without_losing_a_change(
    upstream: UpstreamServer, proxies: list[ProxyThread], context: BrowserContext
) -> None:
    settings = browser_settings(upstream.target, {"server": {"bind": f"127.0.0.1:{free_port()}"}})
    emit(upstream, lifecycle("kernel_started", "before", USER1, group="g-before"))
    first = ProxyThread(settings).start()
    proxies.append(first)
    page = sign_in(context, first.url, USER1)
    expect(row(page, "before").locator("td.group")).to_have_text("g-before")  # the state
    streams: list[Request] = []
    page.on("request", lambda r: streams.append(r) if r.resource_type == "eventsource" else None)
    emit(upstream, lifecycle("kernel_preparing", "survivor", USER1))
    expect(row(page, "survivor")).to_have_attribute("data-event", "kernel_preparing")

    started = time.monotonic()
    first.stop()  # clients get server_close; the browser will reconnect by itself
    expect(status(page)).not_to_have_attribute("data-state", "live")
    # While the proxy is down, the session changes state and another one appears.
    emit(
        upstream,
        lifecycle("kernel_started", "survivor", USER1),
        lifecycle("kernel_started", "not-mine", USER2),
        lifecycle("kernel_creating", "newcomer", USER1),
    )
    second = ProxyThread(settings).start()  # same port, same session key, empty history
    proxies.append(second)
    # The browser reconnects with Last-Event-ID; the proxy catches up from the upstream.
    expect(status(page)).to_have_attribute("data-state", "resumed", timeout=20_000)
    expect(row(page, "survivor")).to_have_attribute("data-event", "kernel_started")
    expect(row(page, "newcomer")).to_have_attribute("data-event", "kernel_creating")
    resumed_after = time.monotonic() - started
    # The browser's own reconnect: the same URL, with the Last-Event-ID it kept.
    assert streams, "the browser made no new stream request"
    reconnect = streams[-1]
    assert reconnect.url == f"{first.url}/stream/kernel/_/events?withGroup=true&initialState=true"
    assert reconnect.all_headers().get("last-event-id", "").count(":") == 1
    expect(page.locator("#gap-banner")).to_be_hidden()
    expect(page.locator("#rows tr")).to_have_count(3)
    # Nothing twice, no state resent: one preparing, then the two changes made while it
    # was down.
    expect(page.locator("#meta")).to_have_text("3 sessions · 3 events received")
    expect(row(page, "before").locator("td.updated")).to_have_text("earlier")
    emit(upstream, lifecycle("kernel_terminated", "survivor", USER1, result=pb.RESULT_SUCCESS))
    expect(row(page, "survivor")).to_have_attribute("data-event", "kernel_terminated")
    save_screenshot(page, "dashboard-resumed.png")
    print(f"proxy stopped and restarted: page resumed after {resumed_after:.1f} s")


def test_a_new_upstream_log_replaces_the_table_rather_than_adding_to_it(
    start_proxy: Callable[..., ProxyThread], upstream: UpstreamServer, context: BrowserContext
) -> None:
    emit(upstream, lifecycle("kernel_started", "old-one", ADMIN),
         lifecycle("kernel_started", "old-two", ADMIN))  # fmt: skip
    proxy = start_proxy()
    page = sign_in(context, proxy.url, ADMIN)
    expect(page.locator("#rows tr")).to_have_count(2)
    # The upstream comes back with a new log (a rebuilt cluster manager): the proxy
    # sends a resync, and the page shows that state instead of the one it had.
    upstream.stop(0)
    fresh = UpstreamServer(EventLog(), f"127.0.0.1:{upstream.port}")
    emit(fresh, lifecycle("session_started", "new-one", ADMIN, group="g-new"))
    fresh.start()
    try:
        expect(row(page, "new-one")).to_have_attribute("data-event", "session_started")
        expect(page.locator("#rows tr")).to_have_count(1)
        expect(status(page)).to_have_attribute("data-state", "live")
        expect(page.locator("#status-text")).to_have_text(
            "Reloaded: the table shows where every session stands now."
        )
        expect(page.locator("#gap-banner")).to_be_hidden()
        save_screenshot(page, "dashboard-resync.png")
        emit(fresh, lifecycle("session_terminated", "new-one", ADMIN))
        expect(row(page, "new-one").locator("td.state")).to_have_text("terminated")
        expect(page.locator("#meta")).to_have_text("1 session · 1 event received")
        assert proxy.clients() == 1
    finally:
        fresh.stop(0)


def test_a_gap_notice_shows_a_banner_where_the_upstream_has_no_state(
    monkeypatch: pytest.MonkeyPatch, proxies: list[ProxyThread], context: BrowserContext
) -> None:
    # An upstream from before the Snapshot rpc: the page falls back to changes only,
    # and a gap is a banner again.
    monkeypatch.setattr(KernelEventsServicer, "Snapshot", KernelEventsServiceServicer.Snapshot)
    old = UpstreamServer(EventLog(), "127.0.0.1:0")
    old.start()
    try:
        proxy = ProxyThread(browser_settings(old.target)).start()
        proxies.append(proxy)
        page = sign_in(context, proxy.url, ADMIN)
        wait_for(lambda: proxy.clients() == 1)
        emit(old, lifecycle("kernel_started", "no-state", ADMIN))
        expect(row(page, "no-state")).to_have_attribute("data-event", "kernel_started")
        hub = proxy.call(lambda: proxy.running.hub if proxy.running else None)
        assert hub is not None
        proxy.call(lambda: hub.publish_gap("upstream-log-changed", "a:1", "b:1"))
        expect(status(page)).to_have_attribute("data-state", "gap")
        expect(page.locator("#gap-banner")).to_be_visible()
        expect(page.locator("#gap-text")).to_contain_text("upstream-log-changed")
        save_screenshot(page, "dashboard-gap.png")
        page.get_by_role("button", name="Dismiss").click()
        expect(page.locator("#gap-banner")).to_be_hidden()
        expect(status(page)).to_have_attribute("data-state", "live")
    finally:
        old.stop(0)


def test_a_refused_stream_says_why(
    start_proxy: Callable[..., ProxyThread], context: BrowserContext
) -> None:
    proxy = start_proxy()
    page = sign_in(context, proxy.url, ADMIN)
    page.get_by_label("Group", exact=True).fill("g" * 300)
    page.get_by_role("button", name="Apply").click()
    expect(status(page)).to_have_attribute("data-state", "closed")
    expect(page.locator("#error-banner")).to_contain_text("longer than 256")
    save_screenshot(page, "dashboard-refused.png")


def test_wrong_secret_shows_an_error_and_no_session(
    start_proxy: Callable[..., ProxyThread], context: BrowserContext
) -> None:
    proxy = start_proxy()
    page = context.new_page()
    page.goto(f"{proxy.url}/ui/")
    page.get_by_label("Access key", exact=True).fill(USER1.access_key)
    page.get_by_label("Secret key", exact=True).fill("not-the-secret")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert").first).to_have_text("The access key or secret key is wrong.")
    save_screenshot(page, "login-refused.png")
    expect(page.locator("#dash-view")).to_be_hidden()
    assert not [c for c in context.cookies() if c["name"] == "kep_session"]


def test_logout_stops_the_stream(
    start_proxy: Callable[..., ProxyThread], upstream: UpstreamServer, context: BrowserContext
) -> None:
    proxy = start_proxy()
    page = sign_in(context, proxy.url, USER1)
    cookie = next(c for c in context.cookies() if c["name"] == "kep_session")
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Lax", "/")
    wait_for(lambda: proxy.clients() == 1)
    emit(upstream, lifecycle("kernel_started", "before-logout", USER1))
    expect(row(page, "before-logout")).to_be_visible()

    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(status(page)).to_have_attribute("data-state", "closed")
    wait_for(lambda: proxy.clients() == 0)  # the server dropped the stream
    assert not [c for c in context.cookies() if c["name"] == "kep_session"]
    assert page.evaluate("fetch('/server/session').then(r => r.status)") == 401
    emit(upstream, lifecycle("kernel_terminated", "before-logout", USER1))
    time.sleep(0.5)
    expect(page.locator("#rows tr")).to_have_count(0)
    assert proxy.clients() == 0
    # A reload stays signed out.
    page.reload()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


def test_sign_in_turned_off_says_so_instead_of_a_form(
    start_proxy: Callable[..., ProxyThread], context: BrowserContext
) -> None:
    proxy = start_proxy({"session": {"enabled": False}})
    page = context.new_page()
    page.goto(f"{proxy.url}/ui/")
    expect(page.get_by_role("heading", name="Browser sign-in is off")).to_be_visible()
    expect(page.locator("#login-view")).to_be_hidden()
    expect(page.locator("#dash-view")).to_be_hidden()


def test_sign_in_works_without_a_configured_key(
    start_proxy: Callable[..., ProxyThread], upstream: UpstreamServer, context: BrowserContext
) -> None:
    proxy = start_proxy({"session": {"secret_key": None}})
    page = sign_in(context, proxy.url, USER1)
    wait_for(lambda: proxy.clients() == 1)
    emit(upstream, lifecycle("kernel_started", "generated-key", USER1))
    expect(row(page, "generated-key")).to_be_visible()
