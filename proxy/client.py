"""Client side of the event stream: SSE parsing, signed (re)connection, resume.

This module owns what a consumer of ``GET /stream/kernel/_/events`` (or
``/events/session``) has to get right: parsing the byte stream into events
(``SSEParser``, pure and I/O-free), signing every connection the way the Backend.AI SDK
does, resuming with ``Last-Event-ID`` after any interruption, backing off between
attempts, telling apart errors worth retrying (network trouble, 5xx, 429) from errors
that will not go away by retrying (4xx), and, with ``initial_state=True``, marking
the state and where it ends (never resuming from inside one).

Usage, under Trio (httpx runs on it through anyio)::

    async with aclosing(stream_events(url, creds, session="my-session")) as events:
        async for event in events:
            ...

``aclosing`` makes a ``break`` close the HTTP connection at once instead of whenever
the garbage collector finalizes the generator.
"""

from __future__ import annotations

import codecs
import json
import logging
import random
import re
import urllib.parse
from collections.abc import AsyncGenerator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypedDict, Unpack

import anyio
import httpx

from .signing import sign_headers

log = logging.getLogger(__name__)

STREAM_PATH: Final = "/stream/kernel/_/events"  # API v4
V5_STREAM_PATH: Final = "/events/session"  # API v5 and later
API_VERSION: Final = "v4.20190615"
GAP_EVENT: Final = "stream_gap"
OVERFLOW_EVENT: Final = "stream_overflow"
SERVER_CLOSE_EVENT: Final = "server_close"
STATE_BEGIN_EVENT: Final = "stream_state_begin"
STATE_END_EVENT: Final = "stream_state_end"
Api = Literal["v4", "v5"]

# The server sends a heartbeat every 15 s: three missed ones mean the connection is
# dead even if TCP has not noticed (a half-open connection never errors on its own).
DEFAULT_READ_TIMEOUT: Final = 45.0
_CONNECT_TIMEOUT: Final = 10.0
# One event is one short JSON line; anything near this is a broken or hostile server,
# and without a bound a line that never ends would grow without limit.
MAX_EVENT_SIZE: Final = 1 << 20
_MAX_ERROR_BODY: Final = 64 * 1024
_EOL_RE: Final = re.compile(r"[\r\n]")


# -- SSE parsing (pure) ------------------------------------------------------------


class SSEProtocolError(ValueError):
    """The byte stream cannot be a sane event stream (e.g. an unbounded line)."""


@dataclass(frozen=True, slots=True)
class SSEMessage:
    """One dispatched SSE event, before any interpretation of its data.

    ``id`` is the ``id:`` field of this event's own block (None if it had none);
    ``last_event_id`` is the stream's last-event-id buffer after it, which is what
    a reconnect must send (the standard makes ids sticky across id-less events).
    """

    event: str
    data: str
    id: str | None
    last_event_id: str


class SSEParser:
    """Incremental parser for ``text/event-stream`` (WHATWG HTML, "server-sent events").

    Feed it bytes as they arrive, split anywhere; it returns the events completed so
    far. Comments (heartbeats) and blocks without ``data`` dispatch nothing. An event
    not yet ended by a blank line when the stream stops is discarded, as the standard
    says: it may be truncated.
    """

    def __init__(self, last_event_id: str = "", *, max_event_size: int = MAX_EVENT_SIZE) -> None:
        # Always UTF-8 whatever the Content-Type says, and never an exception on bad
        # bytes: the standard's decoding rule.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._max = max_event_size
        self._line = ""  # text of the current line, not yet ended
        self._after_cr = False  # a CR ended the last line: a LF right after is its tail
        self._at_start = True  # a BOM is stripped only at the very start
        self._event = ""
        self._data: list[str] = []
        self._size = 0
        self._block_id: str | None = None
        # Starts from the id the connection resumed from, so that an id-less first
        # event (a gap notice) does not make the client forget where it was.
        self.last_event_id = last_event_id
        self.committed_id = last_event_id
        self.retry: int | None = None  # milliseconds, as the server last asked

    def feed(self, chunk: bytes) -> list[SSEMessage]:
        return self.feed_text(self._decoder.decode(chunk))

    def feed_text(self, text: str) -> list[SSEMessage]:
        if self._at_start and text:
            self._at_start = False
            if text[0] == "\ufeff":
                text = text[1:]
        out: list[SSEMessage] = []
        pos, end = 0, len(text)
        while pos < end:
            if self._after_cr:
                self._after_cr = False
                if text[pos] == "\n":
                    pos += 1
                    continue
            match = _EOL_RE.search(text, pos)
            if match is None:
                self._line += text[pos:]
                if len(self._line) + self._size > self._max:
                    raise SSEProtocolError(f"event larger than {self._max} characters")
                break
            eol = match.start()
            line = self._line + text[pos:eol] if self._line else text[pos:eol]
            self._line = ""
            self._after_cr = text[eol] == "\r"
            pos = eol + 1
            message = self._process_line(line)
            if message is not None:
                out.append(message)
        return out

    def _process_line(self, line: str) -> SSEMessage | None:
        if not line:
            return self._dispatch()
        if line[0] == ":":
            return None
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._size += len(value) + 1
            if self._size > self._max:
                raise SSEProtocolError(f"event larger than {self._max} characters")
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self.last_event_id = value
                self._block_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> SSEMessage | None:
        data, event, block_id = self._data, self._event, self._block_id
        self._data, self._event, self._block_id, self._size = [], "", None, 0
        # Every completed block commits its id, events or not: the server announces the
        # stream position in id-only blocks, so a client that has received no event yet
        # still resumes from where it was.
        self.committed_id = self.last_event_id
        if not data:
            # A block of only comments, `id:` or `event:` lines is not an event (a
            # heartbeat after an id'd event must not turn into a phantom event).
            return None
        return SSEMessage(event or "message", "\n".join(data), block_id, self.last_event_id)


# -- events, credentials, errors ----------------------------------------------------


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class StreamEvent:
    """An event as the caller sees it. ``id`` is None for stream notices (gaps) and
    for a state's events.

    With ``initial_state=True`` a state is ``stream_state_begin`` (``is_state_begin``:
    replace what you hold; ``is_resync`` when it replaces an earlier view), the latest
    event of every entity (``from_state``: where it stands, not a change), then
    ``stream_state_end`` (``is_state_end``; its ``id`` is the position, ``entities``
    how many there were); live changes follow.
    """

    name: str
    data: dict[str, Any]
    id: str | None
    from_state: bool = False

    @property
    def session_id(self) -> str | None:
        """The data's ``sessionId``: the session's name on v4, its UUID on v5."""
        return _str_or_none(self.data.get("sessionId"))

    @property
    def session_name(self) -> str | None:
        """The session's name, on either path (v5's ``sessionName``, v4's ``sessionId``)."""
        if "sessionName" in self.data:
            return _str_or_none(self.data["sessionName"])
        return self.session_id

    @property
    def is_state_begin(self) -> bool:
        """A state follows: replace your view with it (``initial_state=True``)."""
        return self.name == STATE_BEGIN_EVENT

    @property
    def is_resync(self) -> bool:
        """A state that replaces a view the stream gave before (instead of a gap)."""
        return self.is_state_begin and self.data.get("reason") == "resync"

    @property
    def is_state_end(self) -> bool:
        """The state is complete; live changes follow from ``id``."""
        return self.name == STATE_END_EVENT

    @property
    def entities(self) -> int | None:
        """On ``stream_state_end``: how many entities the state held."""
        value = self.data.get("entities") if self.is_state_end else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def owner_access_key(self) -> str | None:
        return _str_or_none(self.data.get("ownerAccessKey"))

    @property
    def kernel_id(self) -> str | None:
        return _str_or_none(self.data.get("kernelId"))

    @property
    def reason(self) -> str | None:
        return _str_or_none(self.data.get("reason"))

    @property
    def result(self) -> str | None:
        return _str_or_none(self.data.get("result"))

    @property
    def exit_code(self) -> int | None:
        value = self.data.get("exitCode")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def is_gap(self) -> bool:
        """Events between ``gap_after`` and ``gap_before`` may be missing."""
        return self.name == GAP_EVENT

    @property
    def gap_after(self) -> str | None:
        return _str_or_none(self.data.get("after")) if self.is_gap else None

    @property
    def gap_before(self) -> str | None:
        return _str_or_none(self.data.get("before")) if self.is_gap else None


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)  # never in logs or tracebacks


class ClientError(Exception):
    """The server refused the request (HTTP status other than 200, or not a stream).

    ``error`` and ``detail`` come from the JSON error body when there is one. Raised
    without retrying for 4xx answers (other than 429): retrying cannot fix bad
    credentials, a stale clock or bad parameters.
    """

    def __init__(self, status: int, error: str, title: str = "", detail: str = "") -> None:
        self.status = status
        self.error = error
        self.title = title
        self.detail = detail
        super().__init__(f"HTTP {status} {error}: {detail or title or 'request refused'}")

    @property
    def retryable(self) -> bool:
        return self.status >= 500 or self.status == 429


class StreamInterrupted(Exception):
    """The stream ended without ``server_close`` and ``reconnect`` was False.

    ``last_event_id`` is where to resume: pass it as ``last_event_id`` later.
    """

    def __init__(self, reason: str, last_event_id: str | None) -> None:
        super().__init__(f"stream interrupted: {reason}")
        self.reason = reason
        self.last_event_id = last_event_id


# -- connection details ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamTarget:
    """Where to connect: the full URL, the Host header, and the raw target to sign."""

    url: str
    host: str
    raw_target: str


class Selection(TypedDict, total=False):
    """What a stream is asked for (each optional): ``session`` (a name), ``owner``,
    ``group``; ``api``: ``v4`` (``/stream/kernel/_/events``, the default) or ``v5``
    (``/events/session``, which also takes ``session_uuid`` and ``scope``);
    ``initial_state``: the state first (``initialState=true``)."""

    session: str | None
    owner: str | None
    group: str | None
    session_uuid: str | None
    scope: str | None
    api: Api
    initial_state: bool


def build_target(url: str, **selection: Unpack[Selection]) -> StreamTarget:
    """The request for ``url`` (the server's base URL, or the full stream URL).

    The query is built here, once, and the URL passed to httpx is checked to keep it
    byte for byte: the signature covers the raw target, so any re-encoding on the way
    would make every request fail authentication.
    """
    session, owner, group = selection.get("session"), selection.get("owner"), selection.get("group")
    session_uuid, scope = selection.get("session_uuid"), selection.get("scope")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"URL must be http:// or https:// with a host, not {url!r}")
    if "@" in parts.netloc:
        raise ValueError("URL must not contain user info: use access and secret keys")
    if parts.query or parts.fragment:
        raise ValueError("URL must not have a query or fragment: pass filters as arguments")
    filters: tuple[tuple[str, str | None], ...]
    if selection.get("api") == "v5":
        stream_path = V5_STREAM_PATH
        filters = (("sessionName", session), ("ownerAccessKey", owner), ("sessionId", session_uuid),
                   ("group", group), ("scope", scope))  # fmt: skip
    elif session_uuid is not None or scope is not None:
        raise ValueError("a session UUID or a scope needs api='v5' (GET /events/session)")
    else:
        stream_path = STREAM_PATH
        filters = (("sessionId", session), ("ownerAccessKey", owner), ("group", group))
    path = parts.path.rstrip("/")
    if not path.endswith(stream_path):
        path += stream_path
    params = [(key, value) for key, value in filters if value is not None]
    if selection.get("initial_state"):
        params.append(("initialState", "true"))
    query = urllib.parse.urlencode(params, safe="*")
    raw_target = f"{path}?{query}" if query else path
    full = f"{parts.scheme}://{parts.netloc}{raw_target}"
    if httpx.URL(full).raw_path.decode("ascii") != raw_target:
        raise ValueError(f"URL path {parts.path!r} would not be sent as written")
    return StreamTarget(full, parts.netloc, raw_target)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def request_headers(
    target: StreamTarget, credentials: Credentials, last_event_id: str | None
) -> dict[str, str]:
    """Headers for one connection attempt, signed now (the server allows 15 min skew)."""
    headers = sign_headers(
        method="GET",
        raw_target=target.raw_target,
        host=target.host,
        access_key=credentials.access_key,
        secret_key=credentials.secret_key,
        date=_utcnow(),
        version=API_VERSION,
    )
    # Host is set explicitly so that it is exactly what was signed (httpx would drop
    # a default port that the URL spells out). No Content-Type, like the SDK: the
    # server takes a missing one as the application/octet-stream that was signed.
    headers["Host"] = target.host
    headers["Accept"] = "text/event-stream"
    headers["Cache-Control"] = "no-cache"
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    return headers


class Backoff:
    """Exponential reconnect delays with jitter; ``reset`` after a good connection.

    Jitter (each delay drawn from [delay/2, delay]) keeps the clients of a replica that
    just restarted from all reconnecting in the same instant.
    """

    def __init__(
        self, initial: float, maximum: float, *, rng: Callable[[], float] = random.random
    ) -> None:
        if initial < 0 or maximum < initial:
            raise ValueError("need 0 <= retry_delay <= max_retry_delay")
        self.initial = initial
        self.maximum = maximum
        self._rng = rng
        self._next = initial

    def reset(self, initial: float | None = None) -> None:
        if initial is not None:
            self.initial = min(initial, self.maximum)
        self._next = self.initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self.maximum, self._next * 2)
        return delay * (0.5 + self._rng() / 2)


async def _client_error(response: httpx.Response) -> ClientError:
    body = b""
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= _MAX_ERROR_BODY:
            break
    text = body[:_MAX_ERROR_BODY].decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        return ClientError(
            response.status_code,
            str(parsed.get("error") or response.reason_phrase or "error"),
            str(parsed.get("title") or ""),
            str(parsed.get("detail") or ""),
        )
    return ClientError(
        response.status_code, response.reason_phrase or "error", "", " ".join(text.split())[:200]
    )


def _to_event(message: SSEMessage, from_state: bool = False) -> StreamEvent | None:
    try:
        data = json.loads(message.data)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        log.warning("skipping event %r: data is not a JSON object", message.event)
        return None
    return StreamEvent(message.event, data, message.id, from_state)


# -- the stream -----------------------------------------------------------------------


async def stream_events(
    url: str,
    credentials: Credentials,
    *,
    last_event_id: str | None = None,
    reconnect: bool = True,
    retry_delay: float = 1.0,
    max_retry_delay: float = 30.0,
    read_timeout: float | None = DEFAULT_READ_TIMEOUT,
    http_client: httpx.AsyncClient | None = None,
    **selection: Unpack[Selection],
) -> AsyncGenerator[StreamEvent, None]:
    """Yield events (and ``stream_gap`` notices) from the server, resuming across drops.

    Every attempt is signed afresh and sends the id of the last event yielded (or
    ``last_event_id`` until there is one). With ``reconnect`` (the default) network
    errors, read timeouts, a stream that ends, ``stream_overflow``, ``server_close``
    (a replica takes over) and 5xx/429 answers all lead to a new attempt after a
    backoff delay; a 4xx answer raises ClientError at once. Without ``reconnect``:
    ``server_close`` ends the iteration, any other end raises StreamInterrupted, and
    an error answer raises ClientError. Heartbeats, ``stream_overflow`` and
    ``server_close`` are handled here and never yielded.

    ``selection``: what to stream (``Selection``: filters, API path, initial state).
    ``initial_state=True``: the current state first, then changes (see StreamEvent:
    ``is_state_begin``, ``from_state``, ``is_state_end``), and a resync instead of any
    gap. A reconnect resumes from the last id as before; one that interrupted a state
    before its end asks for a fresh state instead (so does StreamInterrupted's
    ``last_event_id``, None then): the caller replaces its view at the new begin.
    """
    target = build_target(url, **selection)
    backoff = Backoff(retry_delay, max_retry_delay)
    base_delay = backoff.initial
    timeout = httpx.Timeout(_CONNECT_TIMEOUT, read=read_timeout)
    cursor = last_event_id or None
    in_state = False  # between a stream_state_begin and its end
    failures = 0
    async with AsyncExitStack() as stack:
        client = http_client
        if client is None:
            client = await stack.enter_async_context(httpx.AsyncClient())
        while True:
            why = "the server ended the stream"
            parser: SSEParser | None = None
            if in_state:
                # Half a state is no view: resuming from before it would leave the
                # caller with what the begin told it to drop. A fresh state instead.
                cursor, in_state = None, False
            headers = request_headers(target, credentials, cursor)
            try:
                async with client.stream(
                    "GET", target.url, headers=headers, timeout=timeout
                ) as response:
                    if response.status_code != 200:
                        error = await _client_error(response)
                        if not (reconnect and error.retryable):
                            raise error
                        why = str(error)
                    elif not response.headers.get("content-type", "").startswith(
                        "text/event-stream"
                    ):
                        raise ClientError(
                            200,
                            "not-an-event-stream",
                            detail=f"{target.url} answered with Content-Type "
                            f"{response.headers.get('content-type')!r}; is this the proxy?",
                        )
                    else:
                        if failures:
                            log.info("connected to %s", target.url)
                        failures = 0
                        backoff.reset(base_delay)
                        parser = SSEParser(cursor or "")
                        stop = False
                        async for chunk in response.aiter_bytes():
                            for message in parser.feed(chunk):
                                if message.event == SERVER_CLOSE_EVENT:
                                    why, stop = SERVER_CLOSE_EVENT, True
                                    break
                                if message.event == OVERFLOW_EVENT:
                                    why, stop = "this client was too slow (stream_overflow)", True
                                    break
                                if message.event == STATE_BEGIN_EVENT:
                                    in_state = True
                                    event = _to_event(message)
                                elif message.event == STATE_END_EVENT:
                                    in_state = False
                                    event = _to_event(message)
                                else:
                                    event = _to_event(message, from_state=in_state)
                                cursor = message.last_event_id or None
                                if event is not None:
                                    yield event
                            if stop:
                                break
                            cursor = parser.committed_id or cursor
            except (httpx.TransportError, SSEProtocolError) as exc:
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if not reconnect:
                    raise StreamInterrupted(why, None if in_state else cursor) from exc
            else:
                if not reconnect:
                    if why == SERVER_CLOSE_EVENT:
                        return
                    raise StreamInterrupted(why, None if in_state else cursor)
            failures += 1
            if parser is not None and parser.retry is not None:
                # The standard's unit is milliseconds (the SDK's seconds are a bug), and
                # it stays in force for later connections, as in a browser.
                base_delay = min(parser.retry / 1000, backoff.maximum)
                backoff.reset(base_delay)
            delay = backoff.next()
            if why == SERVER_CLOSE_EVENT:
                log.info("the server is shutting down; reconnecting in %.1f s", delay)
            else:
                log.warning("%s; reconnecting in %.1f s", why, delay)
            await anyio.sleep(delay)
