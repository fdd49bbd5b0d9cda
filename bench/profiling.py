"""Where this proxy's time goes during a phase: py-spy, summarised by frame and package.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``).
py-spy leaves out idle threads, but not threads blocked in C calls it cannot see
into; those samples (``WAIT_FRAMES``) are counted apart as waiting. Percentages are of
the remaining (working) samples: self time per package (what the leaf frame belongs
to), the top frames by self time and by inclusive time. Cyclic garbage collection
shows up as self time of whichever frame allocated when a collection ran.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Final

from .common import Json

RATE: Final = 250  # samples per second
TOP: Final = 15
# Leaf frames that are waiting, not working, though py-spy samples them as active: a
# thread blocked in a C call it cannot see into (Trio's epoll wait, grpcio's
# completion-queue poll, a condition variable).
WAIT_FRAMES: Final = (
    "EpollIOManager.get_events",
    "Condition.wait",
    "channel_spin",
    "_MultiThreadedRendezvous._next",
)


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def package(frame: str) -> str:
    """``func (hypercorn/protocol/h11.py)`` -> ``hypercorn``; this project's modules
    are kept apart (``proxy/hub.py`` -> ``proxy.hub``); absolute paths (tracemalloc's)
    are cut after ``site-packages`` or the standard library's folder."""
    start, end = frame.rfind("("), frame.rfind(")")
    path = frame[start + 1 : end] if 0 <= start < end else frame
    path = path.split(":")[0]
    parts = [p for p in path.split("/") if p]
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    elif "proxy" in parts:
        parts = parts[parts.index("proxy") :]
    else:
        stdlib = [i for i, p in enumerate(parts) if p.startswith("python3")]
        if stdlib:
            parts = parts[stdlib[-1] + 1 :]
    if not parts:
        return "?"
    if parts[0] == "proxy" and len(parts) > 1:
        return "proxy." + parts[1].removesuffix(".py")
    return parts[0].removesuffix(".py")


def summarise(raw: str) -> Json:
    self_frames: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = waiting = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        leaf = frames[-1]
        if any(leaf.startswith(w) or f".{w}" in leaf for w in WAIT_FRAMES):
            waiting += count
            continue
        total += count
        self_frames[leaf] += count
        packages[package(leaf)] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(items: list[tuple[str, int]]) -> list[list[object]]:
        return [[name, round(100.0 * n / total, 1)] for name, n in items]

    if not total:
        return {"samples": 0, "waiting_samples": waiting}
    return {
        "samples": total,
        "waiting_samples": waiting,
        "self_by_package_pct": share(packages.most_common(TOP)),
        "self_top_pct": share(self_frames.most_common(TOP)),
        "inclusive_top_pct": share(inclusive.most_common(TOP * 2)),
    }


class Profiler:
    def __init__(self, out: Path, native: bool = False) -> None:
        self.out = out
        self.native = native
        self.exe = _py_spy()
        self.summaries: dict[str, Json] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._name = ""

    def start(self, pid: int, name: str) -> None:
        if self.exe is None:
            self.summaries[name] = {"error": "py-spy is not installed (pip install py-spy)"}
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._name = name
        self._proc = subprocess.Popen(
            [
                self.exe,
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--nolineno",
                # C frames need the process paused while sampled; Python frames do not.
                *(["--native"] if self.native else ["--nonblocking"]),
                "--rate",
                str(RATE),
                "-o",
                str(self.out / f"{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        path = self.out / f"{self._name}.txt"
        self.summaries[self._name] = (
            summarise(path.read_text()) if path.is_file() else {"error": "no profile written"}
        )
