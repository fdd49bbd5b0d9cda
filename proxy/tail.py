"""The ``tail`` subcommand: follow the event stream and print one line per event.

This module owns the command line face of ``proxy.client``: options and their
environment defaults (shared with ``wait``: ``add_connection_args``, ``connection``,
``refused``, ``run_command``), the two output formats, and exit codes (0 after
``--count`` events, 2 for refused credentials or parameters, 1 for other refusals, 130
on Ctrl-C). Reconnecting and resuming are the client's job, not this module's.
``--state`` prints the state first (``initialState=true``), its events marked.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from datetime import datetime
from typing import Any, Final, TextIO, TypeVar

import httpx
import trio

from .client import ClientError, Credentials, StreamEvent, build_target, stream_events

DEFAULT_URL: Final = "http://127.0.0.1:8080"
_NAME_WIDTH: Final = 19  # fits session_terminating, the longest common name
_PREFIX: Final = "tail: "


N = TypeVar("N", int, float)


def positive(convert: Callable[[str], N], noun: str) -> Callable[[str], N]:
    """An argparse type: ``convert``'s number, above 0 and finite (``noun``: what it is,
    for the messages)."""

    def parse(text: str) -> N:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {noun}: {text!r}") from None
        if not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"must be {noun} above 0")
        return value

    return parse


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "tail",
        help="follow the event stream and print events as they come",
        description="Follow GET /stream/kernel/_/events, resuming after interruptions, "
        "and print one line per event (stream_gap lines say events may be missing).",
    )
    add_connection_args(parser)
    parser.add_argument("--session", help="only this session (by name; default: all visible)")
    parser.add_argument("--owner", help="owner access key of --session (admins only)")
    parser.add_argument("--group", help="only sessions of this group (project) name")
    parser.add_argument("--last-event-id", help="resume after this event id")
    parser.add_argument(
        "--state",
        action="store_true",
        help="print where every session stands first (initialState=true), then changes",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='print JSON lines: {"id": ..., "event": ..., "data": ...}',
    )
    parser.add_argument(
        "--count",
        type=positive(int, "a whole number"),
        metavar="N",
        help="exit 0 after N events (gaps and the state's begin and end count)",
    )
    parser.set_defaults(func=run)


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """Where the proxy is and whose keypair signs: the same for every client command."""
    parser.add_argument(
        "--url",
        default=os.environ.get("KEP_URL", DEFAULT_URL),
        help="the proxy's base URL (env KEP_URL; default %(default)s)",
    )
    parser.add_argument(
        "--access-key",
        default=os.environ.get("BACKEND_ACCESS_KEY"),
        help="access key (env BACKEND_ACCESS_KEY)",
    )
    # No %(default)s here: --help must never print the secret.
    parser.add_argument(
        "--secret-key",
        default=os.environ.get("BACKEND_SECRET_KEY"),
        help="secret key (env BACKEND_SECRET_KEY; prefer the variable: "
        "arguments are visible to other users in the process list)",
    )


def _clean(value: object) -> str:
    """Event text as safe terminal output: control characters escaped, not obeyed."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def format_human(event: StreamEvent, now: datetime) -> str:
    stamp = now.strftime("%Y-%m-%dT%H:%M:%S")
    name = _clean(event.name).ljust(_NAME_WIDTH)
    if event.is_gap:
        return (
            f"{stamp} {name}  events may be missing: reason={_clean(event.reason)}"
            f"  after={_clean(event.gap_after)}  before={_clean(event.gap_before)}"
        )
    if event.is_state_begin:
        what = "replaces everything before" if event.is_resync else "where every session stands"
        return f"{stamp} {name}  {_clean(event.reason)}: {what}"
    if event.is_state_end:
        return f"{stamp} {name}  {event.entities} in the state; changes from {_clean(event.id)}"
    fields = [f"{stamp} {name}", _clean(event.session_name or "-")]
    fields.append(f"owner={_clean(event.owner_access_key or '-')}")
    if event.reason is not None:
        fields.append(f"reason={_clean(event.reason)}")
    if event.result is not None:
        fields.append(f"result={_clean(event.result)}")
    if event.exit_code is not None:
        fields.append(f"exit={event.exit_code}")
    if event.kernel_id is not None:
        fields.append(f"kernel={_clean(event.kernel_id)}")
    if event.from_state:
        fields.append("(state)")
    return "  ".join(fields)


def format_json(event: StreamEvent) -> str:
    return json.dumps(
        {"id": event.id, "event": event.name, "data": event.data},
        ensure_ascii=False,
        separators=(",", ":"),
    )


def credentials_from(args: argparse.Namespace) -> Credentials | None:
    if not args.access_key or not args.secret_key:
        return None
    return Credentials(args.access_key, args.secret_key)


def describe_error(exc: ClientError) -> str:
    what = {
        400: "bad request",
        401: "authentication failed",
        403: "not allowed",
    }.get(exc.status, "the server refused the stream")
    message = f"{what} (HTTP {exc.status} {exc.error})"
    if exc.detail or exc.title:
        message += f": {exc.detail or exc.title}"
    if exc.status == 401:
        message += " [check --access-key/--secret-key and this machine's clock]"
    return _clean(message)


def connection(
    args: argparse.Namespace, err: TextIO, prefix: str, **target: Any
) -> Credentials | None:
    """The credentials, once the arguments are known to make a request (else a line on
    ``err``, and None: exit 2)."""
    credentials = credentials_from(args)
    if credentials is None:
        print(
            f"{prefix}no credentials: pass --access-key and --secret-key, "
            "or set BACKEND_ACCESS_KEY and BACKEND_SECRET_KEY",
            file=err,
        )
        return None
    try:
        build_target(args.url, **target)
    except ValueError as exc:
        print(f"{prefix}bad --url: {exc}", file=err)
        return None
    return credentials


def refused(exc: ClientError, err: TextIO, prefix: str) -> int:
    """Say why the server refused; the exit code (2: credentials or parameters)."""
    print(f"{prefix}{describe_error(exc)}", file=err)
    return 2 if exc.status in (400, 401, 403) else 1


async def follow(
    args: argparse.Namespace,
    out: TextIO,
    err: TextIO,
    *,
    http_client: httpx.AsyncClient | None = None,
) -> int:
    """Print events until ``--count`` is reached; return the exit code."""
    target = {"session": args.session, "owner": args.owner, "group": args.group,
              "initial_state": args.state}  # fmt: skip
    credentials = connection(args, err, _PREFIX, **target)
    if credentials is None:
        return 2
    seen = 0
    events = stream_events(
        args.url,
        credentials,
        last_event_id=args.last_event_id,
        http_client=http_client,
        **target,
    )
    try:
        async with aclosing(events):
            async for event in events:
                line = format_json(event) if args.json else format_human(event, datetime.now())
                out.write(line + "\n")
                # Per line, so that a pipe reader (grep, a test) sees each event now.
                out.flush()
                seen += 1
                if args.count is not None and seen >= args.count:
                    return 0
    except ClientError as exc:
        return refused(exc, err, _PREFIX)
    return 0


def _only_interrupts(group: BaseExceptionGroup[BaseException]) -> bool:
    _, rest = group.split(KeyboardInterrupt)
    return rest is None


class _StderrNotices(logging.StreamHandler[TextIO]):
    """Marks the handler this module installed, so a second run adds no duplicate."""


def _quiet_client_logging(prefix: str = _PREFIX) -> None:
    # Reconnect notices go to stderr as one-liners, not through the root logger's
    # format: they are the user's only sign that the stream was interrupted.
    logger = logging.getLogger("proxy.client")
    handler = next((h for h in logger.handlers if isinstance(h, _StderrNotices)), None)
    if handler is None:
        handler = _StderrNotices(sys.stderr)
        logger.addHandler(handler)
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # httpx logs every request at INFO: one line per reconnect that says less than
    # ours. Kept when the root level asks for DEBUG.
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    return run_command(follow, args, _PREFIX)


Command = Callable[[argparse.Namespace, TextIO, TextIO], Awaitable[int]]


def run_command(command: Command, args: argparse.Namespace, prefix: str) -> int:
    """A client command under Trio, printing to stdout and stderr: its exit code, 130
    on Ctrl-C, 141 when the reader of stdout went away."""
    _quiet_client_logging(prefix)
    try:
        return trio.run(command, args, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:
        if _only_interrupts(group):
            return 130
        raise
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep the interpreter's
        # final flush of stdout from failing loudly too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
