"""The agent's websocket link to the controller, kept up for the agent's whole life.

One session: connect to `{controller}/v1/agents/ws` with `Authorization: Bearer TOKEN`
(connect_timeout_s) -> send Register -> await Welcome (handshake_timeout_s) -> resend the
state of every local worker -> run a reader, a heartbeat (Welcome's interval) and a sender
until the link drops. Then reconnect: the first attempt after losing a working link waits a
uniform random 0..Welcome.reconnect_spread_s (the controller sizes it to its fleet, so a
restarted controller is not hit by every agent in the same instant); each failed attempt
after that waits backoff_initial_s doubling up to backoff_max_s, jittered over its upper half
(`reconnect_delay`). Liveness of an idle link is aiohttp's ping/pong (ping_interval_s):
waiting for the controller's next message has no timeout by design.

Outgoing messages go through an outbox and leave it only once sent, so none is lost to a
dropped link. Worker states are resent as a snapshot on every (re)connect, and stale queued
ones are dropped then, so the controller never sees an older state after a newer one.

A malformed or unexpected message from the controller is answered with an ErrorMsg and
logged; it never ends the session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import deque
from collections.abc import Callable

import aiohttp

from infscaled.agent.config import AgentConfig
from infscaled.errors import InfscaledError, WireError
from infscaled.protocol.messages import (
    MAX_MESSAGE_BYTES,
    ChangeTopology,
    Deploy,
    ErrorMsg,
    Heartbeat,
    HostMetrics,
    Inspect,
    Message,
    Metrics,
    Register,
    StopJob,
    Welcome,
    WorkerState,
    decode,
    encode,
)

log = logging.getLogger(__name__)

# Messages a controller may send after Welcome; anything else is answered with an ErrorMsg.
CONTROLLER_MESSAGES = (Deploy, StopJob, Inspect, ErrorMsg, Welcome, ChangeTopology)
# Bound on messages waiting for a link (worker states are also resent on reconnect).
MAX_OUTBOX = 10_000


class LinkDown(InfscaledError):
    """The websocket failed or closed; the session ends and the link reconnects."""


class HandshakeError(InfscaledError):
    """The controller did not answer Register with Welcome."""


class ControllerLink:
    """`run()` is the link's task; `post()` queues a message from any code on the loop's thread."""

    def __init__(self, cfg: AgentConfig, register: Callable[[], Register], handle: Callable[[Message], None],
                 snapshot: Callable[[], list[WorkerState]], workers_alive: Callable[[], int],
                 on_welcome: Callable[[Welcome], None] | None = None) -> None:
        self.cfg = cfg
        self._on_welcome = on_welcome  # e.g. keeps a credential issued at the first registration
        self._register = register
        self._handle = handle
        self._snapshot = snapshot
        self._workers_alive = workers_alive
        self._outbox: deque[Message] = deque()
        self._mail = asyncio.Event()  # set while the outbox is non-empty
        self._emptied = asyncio.Event()  # set when the sender empties the outbox
        self._send_lock = asyncio.Lock()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._closing = False
        self.welcome: Welcome | None = None
        self.sessions = 0  # completed handshakes, for tests and logs
        self._spread_s = cfg.backoff_initial_s  # the latest Welcome's reconnect_spread_s

    # -- API for the rest of the agent -----------------------------------------------------------

    def post(self, msg: Message) -> None:
        if isinstance(msg, Metrics | HostMetrics):
            # Only the newest snapshot matters: a link that is down must not pile them up.
            self._outbox = deque(m for m in self._outbox if not _same_snapshot(m, msg))
        if len(self._outbox) >= MAX_OUTBOX:
            dropped = self._outbox.popleft()
            log.warning("outbox full (%d): dropping the oldest message (%s)", MAX_OUTBOX, dropped.type)
        self._outbox.append(msg)
        self._mail.set()

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed and self.welcome is not None

    async def flush(self, timeout_s: float) -> bool:
        """Wait until everything posted so far was sent (False if the link is down or too slow)."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._outbox and self.connected:
                    self._emptied.clear()
                    await self._emptied.wait()
        except TimeoutError:
            log.warning("%d message(s) to the controller not sent within %g s", len(self._outbox), timeout_s)
        return not self._outbox

    async def close(self) -> None:
        """Close the websocket cleanly (a close frame) and stop reconnecting."""
        self._closing = True
        ws = self._ws
        if ws is not None and not ws.closed:
            try:
                async with asyncio.timeout(self.cfg.send_timeout_s):
                    await ws.close()
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                log.warning("closing the controller link: %s", exc)

    # -- the link's task -------------------------------------------------------------------------

    async def run(self, http: aiohttp.ClientSession | None = None) -> None:
        """Keep the link up until `close()`. `http`: a session to share (the fleet simulator runs
        thousands of links on one); its connector must not cap connections, each link holds one."""
        if http is not None:
            await self._run(http)
            return
        async with aiohttp.ClientSession() as own:
            await self._run(own)

    async def _run(self, http: aiohttp.ClientSession) -> None:
        failures = 0
        while not self._closing:
            before = self.sessions
            try:
                await self._session(http)
            except* (aiohttp.ClientError, OSError, WireError, LinkDown, HandshakeError) as group:
                # OSError covers TimeoutError: a connect, handshake or send timeout.
                errors = "; ".join(_describe(e) for e in group.exceptions)
                (log.info if self._closing else log.warning)("controller link %s: %s", self.cfg.ws_url, errors)
            except* Exception as group:  # noqa: BLE001 - task boundary: a bug must not end the link
                log.error("controller link: unexpected error", exc_info=group)
            if self._closing:
                return
            if self.sessions > before:  # this attempt got as far as Welcome: a fresh start
                failures = 0
                delay = random.uniform(0.0, self._spread_s)
            else:
                delay = reconnect_delay(failures, self.cfg.backoff_initial_s, self.cfg.backoff_max_s)
                failures += 1
            log.info("reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)

    async def _session(self, http: aiohttp.ClientSession) -> None:
        cfg = self.cfg
        async with asyncio.timeout(cfg.connect_timeout_s):
            ws = await http.ws_connect(cfg.ws_url, headers={"Authorization": f"Bearer {cfg.token}"},
                                       heartbeat=cfg.ping_interval_s, max_msg_size=MAX_MESSAGE_BYTES)
        self._ws = ws
        self.welcome = None
        try:
            await self._send(ws, self._register())
            async with asyncio.timeout(cfg.handshake_timeout_s):
                welcome = await self._await_welcome(ws)
            self._welcomed(welcome)
            log.info("registered with the controller at %s as %s", cfg.controller, welcome.agent_id)
            async with asyncio.TaskGroup() as tg:
                beat = tg.create_task(self._heartbeat(ws, welcome), name="heartbeat")
                sender = tg.create_task(self._sender(ws), name="sender")
                try:
                    await self._reader(ws)
                finally:
                    beat.cancel()
                    sender.cancel()
        finally:
            self._ws = None
            self.welcome = None
            if not ws.closed:
                try:
                    async with asyncio.timeout(cfg.send_timeout_s):
                        await ws.close()
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    log.info("closing a dropped link: %s", exc)

    def _welcomed(self, welcome: Welcome) -> None:
        """Handshake done: drop queued worker states, queue the current ones first (no await here,
        so nothing is posted in between)."""
        self.welcome = welcome
        self._spread_s = welcome.reconnect_spread_s
        self.sessions += 1
        if self._on_welcome is not None:
            self._on_welcome(welcome)
        rest = [m for m in self._outbox if not isinstance(m, WorkerState)]
        self._outbox = deque([*self._snapshot(), *rest])
        if self._outbox:
            self._mail.set()

    async def _await_welcome(self, ws: aiohttp.ClientWebSocketResponse) -> Welcome:
        frame = await ws.receive()
        if frame.type != aiohttp.WSMsgType.TEXT:
            raise HandshakeError(f"expected welcome, got a {frame.type.name} frame "
                                 f"(close code {ws.close_code}, {ws.exception() or 'no error'})")
        msg = decode(frame.data)
        if isinstance(msg, ErrorMsg):
            raise HandshakeError(f"controller refused registration: {msg.message}")
        if not isinstance(msg, Welcome):
            raise HandshakeError(f"expected welcome, got {msg.type}")
        return msg

    async def _reader(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            frame = await ws.receive()  # idle by design; ws ping/pong (ping_interval_s) detects a dead link
            if frame.type == aiohttp.WSMsgType.TEXT:
                self._dispatch(frame.data)
            elif frame.type == aiohttp.WSMsgType.BINARY:
                self._reply_error("binary frames are not part of the protocol; send JSON text", "")
            elif frame.type == aiohttp.WSMsgType.ERROR:
                raise LinkDown(f"websocket error: {ws.exception()}")
            elif frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                raise LinkDown(f"controller closed the link (code {ws.close_code})")

    def _dispatch(self, text: str) -> None:
        try:
            msg = decode(text)
        except WireError as exc:
            self._reply_error(str(exc), _peek_type(text))
            return
        if not isinstance(msg, CONTROLLER_MESSAGES):
            self._reply_error(f"unexpected message type {msg.type!r} from a controller; "
                              f"expected one of {', '.join(c.type for c in CONTROLLER_MESSAGES)}", msg.type)
            return
        if isinstance(msg, ErrorMsg):
            log.warning("controller reports an error (re %s): %s", msg.in_reply_to or "-", msg.message)
            return
        if isinstance(msg, Welcome):
            log.info("ignoring a repeated welcome")
            return
        try:
            self._handle(msg)
        except Exception as exc:  # noqa: BLE001 - boundary: one bad request must not end the session
            log.exception("handling %s failed", msg.type)
            self._reply_error(f"{msg.type}: {type(exc).__name__}: {exc}", msg.type)

    def _reply_error(self, message: str, in_reply_to: str) -> None:
        log.warning("bad message from the controller (%s): %s", in_reply_to or "?", message)
        self.post(ErrorMsg(message[:4096], in_reply_to))

    async def _heartbeat(self, ws: aiohttp.ClientWebSocketResponse, welcome: Welcome) -> None:
        interval = max(0.05, welcome.heartbeat_interval_s)
        while True:
            await self._send(ws, Heartbeat(welcome.agent_id, self._workers_alive()))
            await asyncio.sleep(interval)

    async def _sender(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            while not self._outbox:
                self._mail.clear()
                self._emptied.set()
                await self._mail.wait()
            msg = self._outbox[0]
            try:
                await self._send(ws, msg)
            except WireError as exc:  # too big to ever send: drop it, keep the link
                log.error("dropping %s: %s", msg.type, exc)
            if self._outbox and self._outbox[0] is msg:
                self._outbox.popleft()  # only once sent: a dropped link keeps it queued

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, msg: Message) -> None:
        text = encode(msg)
        async with self._send_lock:
            try:
                async with asyncio.timeout(self.cfg.send_timeout_s):
                    await ws.send_str(text)
            except TimeoutError:
                raise LinkDown(f"sending {msg.type} took longer than {self.cfg.send_timeout_s:g} s") from None
            except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
                raise LinkDown(f"sending {msg.type} failed: {exc}") from exc


def reconnect_delay(failures: int, initial_s: float, max_s: float) -> float:
    """The wait before the next attempt after `failures` failed ones in a row: initial_s doubling
    up to max_s, drawn uniformly from the upper half, so agents that failed together drift apart
    yet none retries sooner than half its step."""
    step = min(max_s, initial_s * 2.0 ** min(failures, 30))
    return random.uniform(step / 2, step)


def _peek_type(text: str) -> str:
    """The `type` of a frame that failed to decode, when it has a readable one."""
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return ""
    value = raw.get("type") if isinstance(raw, dict) else None
    return value if isinstance(value, str) else ""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _same_snapshot(queued: Message, new: Metrics | HostMetrics) -> bool:
    """Whether `new` supersedes `queued` (the same job's stats, or the host's usage)."""
    if isinstance(new, Metrics):
        return isinstance(queued, Metrics) and queued.job_id == new.job_id
    return isinstance(queued, HostMetrics)
