"""The HTTP protocol uvicorn would pick (httptools, else h11), with a deadline for each request's head.

uvicorn closes a connection left idle between requests (its keep-alive timeout), but never one that connects and
sends its headers slowly or not at all: each such connection is held until the client lets go, so a few hundred
of them (slowloris) hold the server's file descriptors for as long as they like. Here a connection whose next
request head has not arrived `seconds` after it connected, or after its last response, is closed. The body's own
deadline is the app's (server/app.py, `_json`), which can answer it with a 408.
"""

from __future__ import annotations

from uvicorn.protocols.http.auto import AutoHTTPProtocol


def with_head_deadline(seconds: float) -> type:
    """uvicorn's HTTP protocol class, closing connections whose request head takes longer than `seconds`."""

    class HeadDeadline(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            before = self.cycle  # a request head that arrives starts a new cycle

            def expire() -> None:
                if self.cycle is before and not self.transport.is_closing():
                    self.transport.close()

            self._head_timer = self.loop.call_later(seconds, expire)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

    return HeadDeadline
