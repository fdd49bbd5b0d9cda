"""Child processes of the harness: started, spoken to over JSON lines, always stopped."""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Final

from .common import HOST, Json

ROOT: Final = Path(__file__).resolve().parents[1]


class ChildError(RuntimeError):
    pass


class Child:
    """A process whose stdout (when ``control``) carries one JSON object per line."""

    def __init__(
        self, name: str, argv: Sequence[str], log_dir: Path, *, control: bool = True
    ) -> None:
        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = (log_dir / f"{name}.log").open("ab")
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            stdin=subprocess.PIPE if control else subprocess.DEVNULL,
            stdout=subprocess.PIPE if control else self._log,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        if control:
            threading.Thread(target=self._read, daemon=True, name=f"read-{name}").start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, cmd: Json) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise ChildError(f"{self.name} is gone ({exc})") from None

    def expect(self, timeout: float) -> Json:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise ChildError(f"{self.name}: no answer within {timeout:.0f}s") from None
        if line is None:
            raise ChildError(f"{self.name} exited ({self.proc.poll()}); see its log")
        answer: Json = json.loads(line)
        if "error" in answer:
            raise ChildError(f"{self.name}: {answer['error']}")
        return answer

    def call(self, cmd: Json, timeout: float = 60.0) -> Json:
        self.send(cmd)
        return self.expect(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        self._log.close()


def call_all(children: Sequence[Child], cmds: Sequence[Json], timeout: float = 60.0) -> list[Json]:
    """Send one command to each child at once, then collect every answer."""
    for child, cmd in zip(children, cmds, strict=True):
        child.send(cmd)
    return [child.expect(timeout) for child in children]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def listening_ports(pid: int) -> list[int]:
    """TCP ports a process listens on (its socket inodes matched in /proc/PID/net/tcp)."""
    inodes: set[str] = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = fd.readlink().name
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        table = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return []
    ports = []
    for line in table:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
            ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listening(proc: subprocess.Popen[str], timeout: float) -> int:
    """The port a process bound itself (to port 0), once it listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ChildError(f"process {proc.pid} exited with {proc.returncode}")
        ports = listening_ports(proc.pid)
        if ports:
            return ports[0]
        time.sleep(0.05)
    raise ChildError(f"process {proc.pid} listens on nothing after {timeout:.0f}s")


def wait_http(port: int, path: str, timeout: float, proc: subprocess.Popen[str] | None) -> None:
    """Until GET ``path`` answers 200 (raises if the process died or time ran out)."""
    deadline = time.monotonic() + timeout
    url = f"http://{HOST}:{port}{path}"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ChildError(f"process for port {port} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise ChildError(f"{url} not ready within {timeout:.0f}s")


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise ChildError(f"nothing listens on {HOST}:{port} after {timeout:.0f}s")
