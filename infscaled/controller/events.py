"""The controller's event log: agents joining and lost, workers' states, jobs' states.

Events are kept in a bounded ring (a watcher that connects gets the recent ones) and fanned out
to each `/v1/watch` subscriber through its own bounded queue. A subscriber too slow to keep up
loses its oldest queued events, never blocks the controller: snapshots carry the full state
anyway, events only say what happened in between.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from infscaled.protocol.watch import Event

log = logging.getLogger(__name__)

RECENT_EVENTS = 500  # kept for watchers that connect later
SUBSCRIBER_QUEUE = 1000


class EventLog:
    def __init__(self, keep: int = RECENT_EVENTS) -> None:
        self.recent: deque[Event] = deque(maxlen=keep)
        self._seq = itertools.count(1)
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self.sink: Callable[[Event], None] | None = None  # the database's writer (controller/store.py)

    def restore(self, events: list[Event]) -> None:
        """Start-up: the newest stored events, and numbering that goes on after them."""
        self.recent.extend(events)
        if events:
            self._seq = itertools.count(events[-1].seq + 1)

    def emit(self, kind: str, message: str, *, agent: str = "", job: str = "", node: str = "",
             state: str = "") -> Event:
        event = Event(next(self._seq), time.time(), kind, message, agent, job, node, state)
        self.recent.append(event)
        if self.sink is not None:
            self.sink(event)
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()  # the slow watcher loses its oldest event, not the newest
            queue.put_nowait(event)
        return event

    @contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[Event]]:
        """A queue receiving every event emitted while the context is open."""
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
