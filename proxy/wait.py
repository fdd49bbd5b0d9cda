"""The ``wait`` subcommand: exit once a session has reached one of some events.

Like ``kubectl wait``: ``kernel-events-proxy wait SESSION --for session_started``
returns 0 as soon as the session has reached the event, also when it did so before
the command started, because it reads the state first (``initialState=true`` on
``GET /events/session``: every kernel is an entity of its own there, and the UUID
filter exists). It returns non-zero, saying why, when the session ended otherwise or
the time ran out. The decision is ``Waiter``, a pure fold of the stream's events;
this module's shell only feeds it and maps its outcome to output and exit codes.

What "reached" means, for each event name in ``--for``:

- an event of that name is the latest of one of the session's entities (the session
  itself, or any of its kernels), in the state or live;
- or the same family (``session_*``, ``kernel_*``) is at a later step of the way up,
  ``enqueued`` < ``scheduled`` < ``checking_precondition`` < ``preparing`` <
  ``pulling`` < ``creating`` < ``started``: a kernel already ``started`` has been
  ``pulling``. Nothing is inferred from what comes after ``started``: a session that
  is terminating, or has ended, may never have started.

The session has ended when its latest ``session_*`` event ends it (``*_terminated``,
``*_success``, ``*_failure``, ``*_cancelled``), or, for an upstream that sends no
``session_*`` events, when its main kernel's does; with several sessions of one name
(a name reused), when all of them have.
"""

from __future__ import annotations

import argparse
import enum
import json
from collections.abc import Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

import httpx
import trio

from .client import ClientError, StreamEvent, stream_events
from .tail import add_connection_args, connection, positive, refused, run_command

_PREFIX: Final = "wait: "
ENDINGS: Final = ("_terminated", "_success", "_failure", "_cancelled")
# The way up, in order: reaching a later step implies every earlier one.
PROGRESS: Final = (
    "enqueued",
    "scheduled",
    "checking_precondition",
    "preparing",
    "pulling",
    "creating",
    "started",
)
_RANK: Final = {step: rank for rank, step in enumerate(PROGRESS)}
_FAMILIES: Final = ("session", "kernel")


class Exit(enum.IntEnum):
    """``wait``'s exit codes (documented in README.md)."""

    REACHED = 0
    REFUSED = 1  # the server refused for another reason (a 404, a 5xx without retry)
    USAGE = 2  # bad arguments or credentials, or the server refused them (400/401/403)
    FAILED = 3  # the session ended in failure (*_failure, or terminated with exit code != 0)
    CANCELLED = 4  # the session was cancelled (*_cancelled)
    ENDED = 5  # the session ended otherwise (terminated, success) without reaching it
    TIMEOUT = 124  # --timeout passed first (as timeout(1) exits)


def _family_step(name: str) -> tuple[str, str]:
    family, _, step = name.partition("_")
    return family, step


def implies(seen: str, target: str) -> bool:
    """Does the latest event ``seen`` mean the session has reached ``target``?"""
    if seen == target:
        return True
    family, step = _family_step(seen)
    target_family, target_step = _family_step(target)
    return (
        family == target_family
        and family in _FAMILIES
        and step in _RANK
        and target_step in _RANK
        and _RANK[step] > _RANK[target_step]
    )


def ending(name: str) -> bool:
    return name.endswith(ENDINGS)


def _main_kernel(event: StreamEvent) -> bool:
    return event.data.get("clusterRole") in (None, "main")


@dataclass(frozen=True)
class Outcome:
    code: Exit
    event: StreamEvent


@dataclass
class _Session:
    """One session's latest events: its own (``session_*`` and other families), and
    each kernel's."""

    latest: StreamEvent | None = None
    kernels: dict[str | None, StreamEvent] = field(default_factory=dict)
    updated: int = 0  # when it last changed, in events applied

    def end(self) -> StreamEvent | None:
        """The event that ended it, if it has ended."""
        if self.latest is not None:
            return self.latest if ending(self.latest.name) else None
        mains = [e for e in self.kernels.values() if _main_kernel(e)]
        return next((e for e in reversed(mains) if ending(e.name)), None)


class Waiter:
    """The wait as a pure fold: ``apply`` each event of the stream (state first), and
    it says when the wait is over (an ``Outcome``), else None."""

    def __init__(self, targets: Iterable[str]) -> None:
        self.targets = frozenset(targets)
        self._sessions: dict[str | None, _Session] = {}  # by UUID (None: unknown)
        self._in_state = False
        self._applied = 0
        self.last: StreamEvent | None = None  # the newest event of the session seen

    def apply(self, event: StreamEvent) -> Outcome | None:
        if event.is_state_begin:
            self._sessions.clear()  # what follows replaces everything
            self._in_state = True
            return None
        if event.is_state_end:
            self._in_state = False
            return self._ended()
        if event.name.startswith("stream_") or event.session_name is None:
            return None  # no lifecycle event (a gap cannot come with a state)
        session = self._sessions.setdefault(event.session_id, _Session())
        self._applied += 1
        session.updated = self._applied
        if event.name.startswith("kernel_"):
            session.kernels.pop(event.kernel_id, None)
            session.kernels[event.kernel_id] = event  # newest last
        else:
            session.latest = event
        self.last = event
        if any(implies(event.name, target) for target in self.targets):
            return Outcome(Exit.REACHED, event)
        # Mid-state the view is partial: an ending is decided at the state's end.
        return None if self._in_state else self._ended()

    def _ended(self) -> Outcome | None:
        sessions = self._sessions.values()
        if not sessions or any(session.end() is None for session in sessions):
            return None
        # The one that ended last (events, the state's too, arrive in log order).
        last = max(sessions, key=lambda session: session.updated).end()
        assert last is not None
        return Outcome(_code(last), last)


def _code(end: StreamEvent) -> Exit:
    if end.name.endswith("_failure") or end.result == "FAILURE":
        return Exit.FAILED
    if end.name.endswith("_cancelled"):
        return Exit.CANCELLED
    if end.exit_code not in (None, 0):
        return Exit.FAILED
    return Exit.ENDED


def describe(event: StreamEvent) -> str:
    """``session_failure (reason=..., exit code 1)``, as safe terminal text."""
    details = []
    if event.reason is not None:
        details.append(f"reason={event.reason}")
    if event.exit_code is not None:
        details.append(f"exit code {event.exit_code}")
    if event.kernel_id:
        details.append(f"kernel {event.kernel_id}")
    text = event.name + (f" ({', '.join(details)})" if details else "")
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


# --- the command ----------------------------------------------------------------------


def _events(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names) or any(not name.isprintable() or " " in name for name in names):
        raise argparse.ArgumentTypeError(f"not a comma-separated list of event names: {text!r}")
    return names


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "wait",
        help="wait until a session has reached an event (also if it did before)",
        description="Exit 0 as soon as SESSION has reached one of the --for events, "
        "also if it did before this command started; exit 3 (failure), 4 (cancelled) or "
        "5 (ended otherwise) when it ended without reaching them, 124 on --timeout, 2 "
        "for bad arguments or credentials. Reads GET /events/session?initialState=true.",
    )
    parser.add_argument("session", metavar="SESSION", help="the session's name (or UUID: --uuid)")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--owner", help="the session owner's access key (admins only)")
    who.add_argument("--uuid", action="store_true", help="SESSION is the session's UUID")
    parser.add_argument(
        "--for",
        dest="events",
        required=True,
        type=_events,
        metavar="EVENT[,EVENT...]",
        help="e.g. session_started, or kernel_started,session_started",
    )
    parser.add_argument(
        "--timeout",
        type=positive(float, "a number of seconds"),
        metavar="S",
        help="give up after S seconds (default: never)",
    )
    add_connection_args(parser)
    parser.add_argument(
        "--json", action="store_true", help="print the deciding event as a JSON line"
    )
    parser.set_defaults(func=run)


def _target(args: argparse.Namespace) -> dict[str, Any]:
    if args.uuid:
        return {"session_uuid": args.session, "api": "v5", "initial_state": True}
    return {"session": args.session, "owner": args.owner, "api": "v5", "initial_state": True}


async def wait(
    args: argparse.Namespace,
    out: TextIO,
    err: TextIO,
    *,
    http_client: httpx.AsyncClient | None = None,
) -> int:
    """Follow the session until the wait is over; return the exit code."""
    target = _target(args)
    credentials = connection(args, err, _PREFIX, **target)
    if credentials is None:
        return Exit.USAGE
    waiter = Waiter(args.events)
    outcome: Outcome | None = None
    events = stream_events(args.url, credentials, http_client=http_client, **target)
    try:
        with trio.move_on_after(args.timeout if args.timeout is not None else float("inf")):
            async with aclosing(events):
                async for event in events:
                    outcome = waiter.apply(event)
                    if outcome is not None:
                        break
    except ClientError as exc:
        return refused(exc, err, _PREFIX)
    name = args.session
    wanted = " or ".join(args.events)
    if outcome is None:  # the time ran out (the stream itself never ends)
        where = f"it is at {describe(waiter.last)}" if waiter.last else "it has not been seen"
        if waiter.last is None and not args.uuid and args.owner is None:
            where += f" (a name without --owner means {credentials.access_key}'s session)"
        print(f"{_PREFIX}timed out after {args.timeout or 0:g} s waiting for {name} to reach "
              f"{wanted}; {where}", file=err)  # fmt: skip
        return Exit.TIMEOUT
    event = outcome.event
    if args.json:
        line = {"id": event.id, "event": event.name, "data": event.data, "exit": outcome.code}
        print(json.dumps(line, ensure_ascii=False, separators=(",", ":")), file=out)
    if outcome.code is Exit.REACHED:
        if not args.json:
            print(f"{name}: {describe(event)}", file=out)
        return Exit.REACHED
    if event.from_state:  # its latest events say how it ended, not all it went through
        why = {Exit.FAILED: "had already failed", Exit.CANCELLED: "had already been cancelled"}
        how = f"{why.get(outcome.code, 'had already ended')}, not at {wanted}"
    else:
        why = {Exit.FAILED: "failed", Exit.CANCELLED: "was cancelled"}
        how = f"{why.get(outcome.code, 'ended')} without reaching {wanted}"
    print(f"{_PREFIX}{name} {how}: {describe(event)} [exit {int(outcome.code)}]", file=err)
    return outcome.code


def run(args: argparse.Namespace) -> int:
    return run_command(wait, args, _PREFIX)
