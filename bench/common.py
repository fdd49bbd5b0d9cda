"""What the harness and the processes it starts share: keys, events, /proc, latency.

Everything here is small and deterministic: the harness and every child process derive
the same access keys and the same events from the same numbers, so nothing but
numbers crosses a process boundary.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from proxy._pb.kernel_events.v1 import events_pb2 as pb

EVENTS_PATH: Final = "/stream/kernel/_/events"
HOST: Final = "127.0.0.1"  # every process in the benchmark is on loopback

# One superadmin key signs every "sees everything" connection to this proxy.
SUPER_KEY: Final = "AKBENCHSUPER"
SUPER_SECRET: Final = "bench-superadmin-secret"  # noqa: S105 - a benchmark-only key
# Events of the fan-out and ingest scenarios belong to this owner.
ALL_OWNER: Final = "AKBENCHOWNER"
ALL_USER_ID: Final = "bench-owner"
DOMAIN: Final = "default"
GROUP: Final = "g1"

LIFECYCLE: Final = (
    "kernel_preparing",
    "kernel_pulling",
    "kernel_creating",
    "kernel_started",
    "kernel_terminated",
)
# Counting deliveries: every event the upstream sends is a lifecycle event.
DELIVERY_MARK: Final = b"event: kernel_"
OVERFLOW_MARK: Final = b"event: stream_overflow"
# A dashboard (initialState=true) is live once its state has ended.
STATE_END_MARK: Final = b"event: stream_state_end"
# The dashboard storm's sessions: a group of their own, which its dashboards filter on.
STORM_GROUP: Final = "storm"

Json = dict[str, Any]


def user_key(i: int) -> str:
    return f"AKBU{i:05d}"


def user_secret(i: int) -> str:
    return f"bench-user-secret-{i:05d}"


def user_id(i: int) -> str:
    return f"bench-u{i:05d}"


def lifecycle_event(i: int, owner: str, uid: str, reason: str | None = None) -> pb.LifecycleEvent:
    """The ``i``-th event of a generated set: names cycle through a lifecycle."""
    name = LIFECYCLE[i % len(LIFECYCLE)]
    event = pb.LifecycleEvent(
        name=name,
        session_id=f"sess-{owner[-5:]}-{(i // len(LIFECYCLE)) % 1000}",
        kernel_id=f"k{i % 100_000:05d}",
        owner_access_key=owner,
        user_id=uid,
        domain_name=DOMAIN,
        group_name=GROUP,
    )
    if name == "kernel_terminated":
        event.result = pb.RESULT_SUCCESS
        event.exit_code = 0
    if reason is not None:
        event.reason = reason
    return event


def storm_event(i: int) -> pb.LifecycleEvent:
    """The ``i``-th session of the dashboard storm, at some step of its lifecycle: one
    event per session, so the upstream's state holds exactly that many."""
    event = lifecycle_event(i, ALL_OWNER, ALL_USER_ID)
    event.session_id = f"storm-{i:06d}"
    event.kernel_id = f"ks{i:06d}"
    event.group_name = STORM_GROUP
    return event


def scenario_event(kind: str, i: int, users: int, reason: str | None) -> pb.LifecycleEvent:
    """``all``: one owner everybody sees; ``users``: spread round-robin over ``users``
    users; ``one``: all for user 0."""
    if kind == "all":
        return lifecycle_event(i, ALL_OWNER, ALL_USER_ID, reason)
    u = i % users if kind == "users" else 0
    return lifecycle_event(i, user_key(u), user_id(u), reason)


def ingest_line(i: int, users: int = 200) -> str:
    """One line of the generated replay file (the protobuf JSON mapping)."""
    u = (i * 7919) % users  # spread over users, deterministic
    event = lifecycle_event(i, user_key(u), user_id(u), reason="replayed")
    obj: dict[str, Any] = {
        "name": event.name,
        "sessionId": event.session_id,
        "kernelId": event.kernel_id,
        "ownerAccessKey": event.owner_access_key,
        "userId": event.user_id,
        "domainName": event.domain_name,
        "groupName": event.group_name,
        "reason": event.reason,
    }
    if event.HasField("exit_code"):
        obj["result"] = "SUCCESS"
        obj["exitCode"] = 0
    return json.dumps(obj, separators=(",", ":"))


def write_replay_file(path: Path, count: int) -> Path:
    """The fixed, generated ingest set; rewritten only when its size changes."""
    marker = path.with_suffix(".count")
    if path.is_file() and marker.is_file() and marker.read_text().strip() == str(count):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(count):
            f.write(ingest_line(i))
            f.write("\n")
    marker.write_text(str(count))
    return path


# -- /proc ------------------------------------------------------------------------

_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/PID/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_kib(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def child_pids(pid: int) -> list[int]:
    """Direct children (nginx workers of a master), from /proc/PID/task/*/children."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return out
    for task in tasks:
        try:
            out.extend(int(p) for p in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE to the hard limit (inherited by child processes)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- latency: a log-bucketed histogram (2 % resolution), mergeable across processes --

_BUCKETS_PER_E: Final = 1.0 / math.log(1.02)


def latency_bucket(seconds: float) -> int:
    micros = seconds * 1e6
    return int(math.log(micros) * _BUCKETS_PER_E) if micros > 1.0 else 0


def bucket_seconds(bucket: int) -> float:
    return math.exp((bucket + 0.5) / _BUCKETS_PER_E) / 1e6


def merge_histograms(hists: Iterable[Mapping[str, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for hist in hists:
        for key, count in hist.items():
            out[int(key)] = out.get(int(key), 0) + count
    return out


def percentile(hist: Mapping[int, int], q: float) -> float | None:
    """The q-quantile (0..1) in seconds, to the histogram's 2 % resolution."""
    total = sum(hist.values())
    if not total:
        return None
    rank = q * total
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return bucket_seconds(bucket)
    return bucket_seconds(max(hist))


# -- the control protocol of child processes: one JSON object per line -------------


def reply(obj: Json) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def command_loop(handle: Callable[[Json], Json]) -> None:
    """Answer commands from stdin until ``quit`` or EOF (the harness went away)."""
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd: Json = json.loads(line)
        if cmd.get("op") == "quit":
            reply({"ok": True})
            return
        try:
            reply(handle(cmd))
        except Exception as exc:  # report, keep serving: the harness decides
            reply({"error": f"{type(exc).__name__}: {exc}"})


def start_daemon(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread
