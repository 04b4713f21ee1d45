"""One pair of models, so one generation at a time: requests take turns in arrival order (asyncio.Lock is
first-come first-served), at most `max_queue` of them waiting; each generation runs in one worker thread
(llama.cpp releases the GIL, so the event loop keeps serving /health, queueing and streaming meanwhile)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Iterator

from ..engine.loop import Event
from ..llama.backend import abort_hook


class Busy(Exception):
    """The queue is full (`waiting` requests wait)."""

    def __init__(self, waiting: int):
        super().__init__(f"{waiting} requests are waiting")
        self.waiting = waiting


class Stopped(Exception):
    """The server is shutting down: the generation was cut short."""


class Worker:
    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.stopping = threading.Event()  # set on Ctrl-C / SIGTERM: the current generation ends at its next token
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dspark-generate")

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def busy(self) -> bool:
        """A request holds the models (generating, or about to)."""
        return self._lock.locked()

    async def acquire(self) -> None:
        """Wait for the models (Busy right away when max_queue requests already wait)."""
        if self._lock.locked() and self._waiting >= self.max_queue:
            raise Busy(self._waiting)
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1

    def release(self) -> None:
        self._lock.release()

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
        try:
            while True:
                kind, item = await queue.get()
                if kind == "event":
                    yield item
                elif kind == "error":
                    raise item
                elif kind == "fatal":  # the generation thread never returns: the process is ending
                    fatal = True
                    raise item
                else:
                    return
        finally:
            cancel.set()
            if not fatal:
                await asyncio.shield(done)  # the models are free only when the thread has let go of them

    def close(self) -> None:
        self.stopping.set()
        self._thread.shutdown(wait=True)
