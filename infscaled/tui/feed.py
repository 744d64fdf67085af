"""The `/v1/watch` subscription, independent of Textual: connect, decode frames, apply the
snapshot and its deltas (protocol.watch.WatchState), hand the sink whole snapshots and events,
and reconnect with backoff when the controller goes away or a delta does not follow (a lost
frame: the next connection starts from a fresh snapshot).

The sink is called on the event loop that runs `subscribe`; the app's sink only posts messages
(see app.py), so drawing never happens on this path.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import NoReturn, Protocol

import aiohttp

from infscaled.errors import WireError
from infscaled.protocol import watch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchTimeouts:
    """Named timeouts and backoff of the subscription, in seconds."""

    connect_s: float = 5.0  # TCP connect plus the websocket handshake
    ping_s: float = 5.0  # websocket ping period: aiohttp drops a link whose pong does not come
    # No frame for this long (plus three snapshot intervals) means a stuck controller: reconnect.
    stale_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 5.0  # a restarted controller is seen within this (plus jitter)


class WatchSink(Protocol):
    def connected(self, url: str) -> None: ...

    def disconnected(self, reason: str, retry_in_s: float) -> None: ...

    def message(self, msg: watch.Snapshot | watch.Event) -> None: ...

    def bad_frame(self, problem: str) -> None: ...


def watch_url(controller: str, interval_s: float | None = None) -> str:
    url = controller.rstrip("/") + "/v1/watch"
    return url + (f"?interval_s={interval_s:g}" if interval_s else "")


async def subscribe(controller: str, token: str, sink: WatchSink, *, interval_s: float | None = None,
                    timeouts: WatchTimeouts | None = None) -> NoReturn:
    """Forever: hold one subscription, then tell the sink why it ended and retry after a backoff
    (doubling from backoff_initial_s to backoff_max_s, jittered; reset by every good connection)."""
    t = timeouts or WatchTimeouts()
    url = watch_url(controller, interval_s)
    backoff = t.backoff_initial_s
    async with aiohttp.ClientSession() as http:
        while True:
            reason, was_up = await _one_connection(http, url, token, sink, interval_s or 1.0, t)
            if was_up:
                backoff = t.backoff_initial_s
            delay = min(backoff, t.backoff_max_s) * random.uniform(0.8, 1.2)
            backoff = min(backoff * 2, t.backoff_max_s)
            log.info("watch %s: %s; retrying in %.1f s", url, reason, delay)
            sink.disconnected(reason, delay)
            await asyncio.sleep(delay)


async def _one_connection(http: aiohttp.ClientSession, url: str, token: str, sink: WatchSink,
                          interval_s: float, t: WatchTimeouts) -> tuple[str, bool]:
    """Run one websocket until it ends; returns (why it ended, whether it had connected)."""
    try:
        async with asyncio.timeout(t.connect_s):
            ws = await http.ws_connect(url, headers={"Authorization": f"Bearer {token}"}, heartbeat=t.ping_s,
                                       max_msg_size=watch.MAX_WATCH_BYTES)
    except aiohttp.WSServerHandshakeError as exc:
        return _refused(exc.status), False
    except TimeoutError:
        return f"no answer within {t.connect_s:g} s", False
    except (aiohttp.ClientError, OSError) as exc:
        return f"cannot reach the controller ({exc.__class__.__name__}: {exc})", False
    sink.connected(url)
    try:
        return await _read(ws, sink, t.stale_s + 3 * interval_s), True
    finally:
        await ws.close()


async def _read(ws: aiohttp.ClientWebSocketResponse, sink: WatchSink, stale_s: float) -> str:
    state = watch.WatchState()
    while True:
        try:
            frame = await ws.receive(timeout=stale_s)
        except TimeoutError:
            return f"no frame for {stale_s:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return f"connection lost ({exc.__class__.__name__}: {exc})"
        if frame.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            try:
                msg = watch.decode(frame.data)
            except WireError as exc:
                # If it was a delta, the next one will not follow and the link starts over.
                sink.bad_frame(str(exc))
                continue
            if isinstance(msg, watch.Event):
                sink.message(msg)
                continue
            snap = state.apply(msg)
            if snap is None:
                return f"delta for tick {msg.base} does not follow the picture held; starting over"
            sink.message(snap)
        elif frame.type == aiohttp.WSMsgType.ERROR:
            return f"connection lost ({ws.exception()})"
        elif frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            return f"the controller closed the connection (code {ws.close_code})"


def _refused(status: int) -> str:
    if status == 401:
        return "unauthorized (HTTP 401): check --token / $INFSCALED_TOKEN"
    if status == 404:
        return "the controller has no /v1/watch (HTTP 404): is it an older version?"
    return f"the controller refused the watch (HTTP {status})"
