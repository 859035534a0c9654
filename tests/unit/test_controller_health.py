"""The controller's liveness endpoint (netfence.controller.health): alive while the event loop answers."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netfence.controller.health import ENV_PORT, LivenessConfigError, LoopHeartbeat, liveness_port, liveness_server
from netfence_lab.process import free_port


def test_liveness_port_is_optional() -> None:
    assert liveness_port({}) is None
    assert liveness_port({ENV_PORT: ""}) is None
    assert liveness_port({ENV_PORT: " 8081 "}) == 8081


@given(st.integers(min_value=1, max_value=65535))
def test_liveness_port_accepts_every_port(port: int) -> None:
    assert liveness_port({ENV_PORT: str(port)}) == port


@pytest.mark.parametrize(("raw", "message"), [("http", "must be a port number, not 'http'"),
                                              ("0", "between 1 and 65535, not 0"),
                                              ("70000", "between 1 and 65535, not 70000")])
def test_liveness_port_rejects_nonsense(raw: str, message: str) -> None:
    with pytest.raises(LivenessConfigError, match=message):
        liveness_port({ENV_PORT: raw})


def test_heartbeat_measures_how_late_the_loop_ran() -> None:
    now = [100.0]
    beat = LoopHeartbeat(interval=1.0, clock=lambda: now[0])
    beat.started = 90.0
    now[0] = 101.0
    beat.tick(expected=101.0)
    assert (beat.lag, beat.max_lag) == (0.0, 0.0)
    now[0] = 104.5
    beat.tick(expected=102.0)
    assert (beat.lag, beat.max_lag) == (2.5, 2.5)
    now[0] = 105.0
    beat.tick(expected=105.0)
    assert (beat.lag, beat.max_lag) == (0.0, 2.5)
    assert beat.body() == {"uptimeSeconds": 15.0, "loopLagSeconds": 0.0, "maxLoopLagSeconds": 2.5}


def get(port: int, path: str) -> tuple[int, dict[str, object]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return int(resp.status), json.loads(resp.read())


async def test_liveness_server_answers_livez_only_while_open() -> None:
    port = free_port()
    async with liveness_server({ENV_PORT: str(port)}, host="127.0.0.1") as served:
        assert served == port
        status, body = await asyncio.to_thread(get, port, "/livez")
        assert status == 200 and body["alive"] is True
        assert {"uptimeSeconds", "loopLagSeconds", "maxLoopLagSeconds"} <= set(body)
        with pytest.raises(urllib.error.HTTPError) as missing:
            await asyncio.to_thread(get, port, "/healthz")
        assert missing.value.code == 404
    with pytest.raises(OSError):
        await asyncio.to_thread(get, port, "/livez")


async def test_no_port_no_server() -> None:
    async with liveness_server({}) as served:
        assert served is None
