"""Keypairs from a file of their own, reloaded without dropping other connections."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import trio

from proxy.config import Settings
from proxy.server import RunningProxy, run_proxy
from proxy.upstream_server import UpstreamServer

from ..conftest import ProxyUnderTest, make_settings
from ..helpers import EVENTS_PATH, SUPER, Key, lifecycle, signed_headers, wait_for_http, wait_until
from .test_cli import BIN, free_port
from .test_shutdown_keepalive import config_file

FILE_KEY = Key("AKFILE1", "file-secret-0001", "superadmin", "f1", "default")
NEW_KEY = Key("AKFILE2", "file-secret-0002", "user", "f2", "default")


def write_keys(path: Path, *keys: Key) -> None:
    text = "".join(
        f'[[keypairs]]\naccess_key = "{k.access_key}"\nsecret_key = "{k.secret_key}"\n'
        f'role = "{k.role}"\nuser_id = "{k.user_id}"\ndomain = "{k.domain}"\n'
        for k in keys
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic, as an operator's tooling should do it


async def test_revoked_key_streams_close_others_keep_streaming(
    tmp_path: Path, upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    keys_file = tmp_path / "keys.toml"
    write_keys(keys_file, FILE_KEY)
    settings = make_settings(upstream.target)
    data = settings.model_dump(mode="python")
    data["auth"]["keypairs_file"] = keys_file
    data["keypairs"] = [
        kp.model_dump() | {"secret_key": kp.secret_key.get_secret_value()}
        for kp in settings.keypairs
    ] + [
        {
            "access_key": FILE_KEY.access_key,
            "secret_key": FILE_KEY.secret_key,
            "role": FILE_KEY.role,
            "user_id": FILE_KEY.user_id,
            "domain": FILE_KEY.domain,
        }
    ]
    settings = type(settings).model_validate(data)
    running: RunningProxy = await nursery.start(run_proxy, settings)
    await wait_until(lambda: running.bridge.live)
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client:
        proxy = ProxyUnderTest(running, client)
        assert (await proxy.get(NEW_KEY)).status_code == 401
        async with proxy.stream(FILE_KEY) as revoked, proxy.stream(SUPER) as kept:
            await wait_until(lambda: running.hub.clients == 2)
            write_keys(keys_file, NEW_KEY)  # FILE_KEY removed, NEW_KEY added
            running.reload_keys()
            last = await revoked.next()
            assert last.event == "server_close"
            assert last.data == {"reason": "credentials-revoked"}
            upstream.log.append([lifecycle("kernel_started", "s1", SUPER)])
            (event,) = await kept.take(1)
            assert event.data["sessionId"] == "s1"
        assert (await proxy.get(FILE_KEY)).status_code == 401
        async with proxy.stream(NEW_KEY):
            pass
        # A change on disk is noticed without a signal, too.
        write_keys(keys_file)
        with trio.fail_after(5):
            while (await proxy.get(NEW_KEY)).status_code != 401:
                await trio.sleep(0.2)
        # A broken file keeps the keys in force.
        keys_file.write_text("this is not toml [")
        running.reload_keys()
        await trio.sleep(0.3)
        async with proxy.stream(SUPER):
            pass
    running.shutdown()


async def stream_status(client: httpx.AsyncClient, url: str, key: Key) -> int:
    async with client.stream("GET", url, headers=signed_headers(url, key)) as response:
        return response.status_code


async def test_sighup_reloads_keys_in_a_real_process(
    tmp_path: Path, upstream: UpstreamServer
) -> None:
    keys_file = tmp_path / "keys.toml"
    write_keys(keys_file)
    bind = f"127.0.0.1:{free_port()}"
    config = config_file(tmp_path, bind, upstream.target)
    config.write_text(
        config.read_text().replace(
            "[upstream]", f'[auth]\nkeypairs_file = "{keys_file}"\n[upstream]'
        )
    )
    proc = await trio.lowlevel.open_process([str(BIN), "serve", "--config", str(config)])
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client:
            await wait_for_http(client, f"http://{bind}/")
            url = f"http://{bind}/stream/kernel/_/events"
            assert await stream_status(client, url, NEW_KEY) == 401
            write_keys(keys_file, NEW_KEY)
            proc.send_signal(signal.SIGHUP)
            with trio.fail_after(10):
                while await stream_status(client, url, NEW_KEY) == 401:
                    await trio.sleep(0.1)
            assert await stream_status(client, url, NEW_KEY) == 200
    finally:
        proc.terminate()
        with trio.fail_after(10):
            await proc.wait()


async def test_a_reload_request_rereads_the_file_even_when_its_mtime_did_not_change(
    tmp_path: Path, upstream: UpstreamServer, nursery: trio.Nursery
) -> None:
    """SIGHUP means "read it now": a file replaced with its old mtime kept (``cp -p``,
    config management) is reloaded on request, not only when the poll sees a change."""
    keys_file = tmp_path / "keys.toml"
    write_keys(keys_file)
    before = keys_file.stat()
    data = make_settings(upstream.target).model_dump(mode="python")
    data["auth"]["keypairs_file"] = keys_file
    for kp in data["keypairs"]:
        kp["secret_key"] = kp["secret_key"].get_secret_value()
    running: RunningProxy = await nursery.start(run_proxy, Settings.model_validate(data))
    await wait_until(lambda: running.bridge.live)
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client:
        proxy = ProxyUnderTest(running, client)
        write_keys(keys_file, NEW_KEY)
        os.utime(keys_file, ns=(before.st_atime_ns, before.st_mtime_ns))
        await trio.sleep(1.5)  # a poll or more: the unchanged mtime alone reloads nothing
        assert (await proxy.get(NEW_KEY)).status_code == 401
        running.reload_keys()
        url = f"{proxy.url}{EVENTS_PATH}"
        with trio.fail_after(5):
            while await stream_status(client, url, NEW_KEY) == 401:
                await trio.sleep(0.05)
    running.shutdown()
