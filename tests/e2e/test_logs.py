"""Structured logs from a real process: one JSON object per line, no secrets."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import trio

from proxy.upstream_server import UpstreamServer

from ..helpers import (
    ALL_KEYS,
    EVENTS_PATH,
    USER1,
    lifecycle,
    query,
    signed_headers,
    wait_for_http,
)
from .test_cli import BIN, free_port
from .test_shutdown_keepalive import config_file


async def test_json_logs_record_each_stream_with_its_principal_and_counts(
    tmp_path: Path, upstream: UpstreamServer
) -> None:
    bind = f"127.0.0.1:{free_port()}"
    config = config_file(tmp_path, bind, upstream.target)
    stderr = tmp_path / "stderr.log"
    with stderr.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            [str(BIN), "--log-format", "json", "serve", "--config", str(config)], stderr=err
        )
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client:
                await wait_for_http(client, f"http://{bind}/readyz")
                url = f"http://{bind}{EVENTS_PATH}{query(group='g1')}"
                async with client.stream("GET", url, headers=signed_headers(url, USER1)) as r:
                    upstream.log.append(
                        [lifecycle("kernel_started", f"s{i}", USER1) for i in range(3)]
                    )
                    received = 0
                    async for chunk in r.aiter_raw():
                        received += chunk.count(b"event: kernel_started")
                        if received == 3:
                            break
                await client.get(f"http://{bind}{EVENTS_PATH}")  # unsigned: an auth failure
                await trio.sleep(0.3)
        finally:
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                await proc.wait()
    text = stderr.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert records, "no log lines"
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    opened = [r for r in records if r.get("event") == "stream_open"]
    closed = [r for r in records if r.get("event") == "stream_close"]
    assert len(opened) == len(closed) == 1
    assert opened[0]["access_key"] == USER1.access_key
    assert opened[0]["role"] == "user"
    assert opened[0]["filters"] == {
        "sessionId": None,
        "ownerAccessKey": None,
        "group": "g1",
        "sessionUuid": None,
        "scope": None,
    }
    assert opened[0]["api"] == "v4"
    assert closed[0]["events_sent"] == 3
    assert closed[0]["reason"] == "client-gone"
    assert closed[0]["duration_s"] > 0
    for key in ALL_KEYS:
        assert key.secret_key not in text
