"""Admission and threads for the pair's generations: up to `slots` at once (the pair's parallel sequences,
batched together by its scheduler; 1: one generation at a time), the rest waiting in arrival order, at most
`max_queue` of them (Busy beyond). Each admitted generation is read in a worker thread of its own (llama.cpp
releases the GIL, so the event loop keeps serving /health, queueing and streaming meanwhile)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Iterator

from ..engine.loop import Event
from ..engine.stats import GenerationStats
from ..llama.backend import abort_hook


class Busy(Exception):
    """The queue is full (`waiting` requests wait)."""

    def __init__(self, waiting: int):
        super().__init__(f"{waiting} requests are waiting")
        self.waiting = waiting


class Stopped(Exception):
    """The server is shutting down: the generation was cut short."""


class Meter:
    """What /health and /metrics report: tokens delivered (in all, and over the last WINDOW seconds) and the
    figures of each generation under way."""

    WINDOW = 10.0

    def __init__(self):
        self.tokens = 0
        self.requests = 0
        self.prompt_tokens = 0  # prompt tokens of the generations started
        self.prompt_cached = 0  # ... that the target did not process (GenerationStats.n_prompt_cached)
        self.live: dict[object, GenerationStats] = {}  # per generation under way: its cumulative stats
        self._recent: deque[float] = deque()  # when each recent token was delivered
        self.started = time.monotonic()

    def record(self, ev: Event, key: object) -> None:
        if key not in self.live:  # its first event: the prompt is in
            self.requests += 1
            self.prompt_tokens += ev.stats.n_prompt
            self.prompt_cached += ev.stats.n_prompt_cached
        self.live[key] = ev.stats
        if ev.token is not None:
            self.tokens += 1
            self._recent.append(time.monotonic())

    def tokens_per_second(self) -> float:
        """Tokens delivered per second over the last WINDOW seconds (or since start)."""
        now = time.monotonic()
        while self._recent and self._recent[0] < now - self.WINDOW:
            self._recent.popleft()
        span = min(self.WINDOW, now - self.started)
        return len(self._recent) / span if span > 0 else 0.0


class Worker:
    def __init__(self, max_queue: int, slots: int = 1):
        self.max_queue = max_queue
        self.slots = slots
        self.stopping = threading.Event()  # set on Ctrl-C / SIGTERM: the generations end at their next token
        self._free = slots
        self._queue: deque[asyncio.Future] = deque()  # requests waiting for a slot, oldest first
        self._thread = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="dspark-generate")
        self.meter = Meter()

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._queue if not f.done())

    @property
    def active(self) -> int:
        """Requests holding a slot (generating, or about to)."""
        return self.slots - self._free

    @property
    def busy(self) -> bool:
        """A request holds the models (generating, or about to)."""
        return self.active > 0

    async def acquire(self) -> None:
        """Wait for a slot, first come first served (Busy right away when max_queue requests already wait)."""
        if self.stopping.is_set():
            raise Stopped()
        if self._free > 0 and not self._queue:
            self._free -= 1
            return
        if self.waiting >= self.max_queue:
            raise Busy(self.waiting)
        ticket = asyncio.get_running_loop().create_future()
        self._queue.append(ticket)
        try:
            await ticket
        except BaseException:  # the client left while waiting: its place goes to the next one
            if ticket.done() and not ticket.cancelled():
                self.release()  # it had been handed the slot in the meantime
            else:
                ticket.cancel()
            raise
        finally:
            try:
                self._queue.remove(ticket)
            except ValueError:
                pass

    def release(self) -> None:
        while self._queue:
            ticket = self._queue.popleft()
            if not ticket.done():
                ticket.set_result(None)  # the slot passes straight to the oldest waiting request
                return
        self._free += 1

    async def events(self, start: Callable[[], Iterator[Event]]) -> AsyncIterator[Event]:
        """The events of `start()`, generated in the worker thread. Closing this iterator (the client went away)
        stops the generation at its next token and returns once the models' caches are trimmed and free."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def lost(reason: str) -> None:  # llama.cpp is ending the process (an RPC server went away)
            from ..errors import RemoteError

            loop.call_soon_threadsafe(queue.put_nowait, ("fatal", RemoteError(reason)))
            time.sleep(1.0)  # time for the event loop to send the client its error before the process ends

        def run() -> None:
            with abort_hook(lost):
                try:
                    if self.stopping.is_set():  # handed a slot as the server stops: nothing was sent, so a 503
                        raise Stopped()
                    events = start()
                    try:
                        for ev in events:
                            loop.call_soon_threadsafe(queue.put_nowait, ("event", ev))
                            if cancel.is_set():
                                return
                            if self.stopping.is_set():
                                loop.call_soon_threadsafe(queue.put_nowait, ("error", Stopped()))
                                return
                    finally:
                        events.close()  # the engine's finally trims both caches
                    loop.call_soon_threadsafe(queue.put_nowait, ("end", None))
                except BaseException as e:  # noqa: BLE001 - handed to the request, which answers for it
                    loop.call_soon_threadsafe(queue.put_nowait, ("error", e))

        done = loop.run_in_executor(self._thread, run)
        fatal = False
        key = object()
        try:
            while True:
                kind, item = await queue.get()
                if kind == "event":
                    self.meter.record(item, key)
                    yield item
                elif kind == "error":
                    raise item
                elif kind == "fatal":  # the generation thread never returns: the process is ending
                    fatal = True
                    raise item
                else:
                    return
        finally:
            self.meter.live.pop(key, None)
            cancel.set()
            if not fatal:
                await asyncio.shield(done)  # the models are free only when the thread has let go of them

    def close(self) -> None:
        self.stopping.set()
        self._thread.shutdown(wait=True)
