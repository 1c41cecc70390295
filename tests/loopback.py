"""An aiohttp server on 127.0.0.1 that runs in a thread (for pytest) or in the foreground (as a
subprocess): the plumbing the loopback stand-ins share.

A subclass adds its routes in `routes(app)`. In a thread, `start()` returns once listening and
`stop()` cancels handlers still running (a hung one included). In the foreground,
`serve_until_signal()` prints ``listening on http://127.0.0.1:PORT`` once ready and returns on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import Any, Self

from aiohttp import web

HOST = "127.0.0.1"


class LoopbackServer:
    name = "loopback"

    def __init__(self, *, port: int = 0) -> None:
        self.port = port
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def middlewares(self) -> list[Any]:
        return []

    def start(self) -> Self:
        """Serve from a background thread with its own event loop; return once listening."""
        if self._thread is not None:
            raise RuntimeError("the server is already running")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(self._start_async())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._stop_async())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread = thread
        thread.start()
        ready.wait()
        if failure:
            self._thread = None
            raise RuntimeError(f"the {self.name} server failed to start") from failure[0]
        return self

    def stop(self) -> None:
        """Stop serving; handlers still running (e.g. hung by a "timeout" fault) are cancelled."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._thread = None
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _start_async(self) -> None:
        app = web.Application(middlewares=self.middlewares(), client_max_size=64 * 2**20)
        self.routes(app)
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await runner.setup()
        site = web.TCPSite(runner, HOST, self.port)
        await site.start()
        self._runner = runner
        address = runner.addresses[0]
        self.url = f"http://{HOST}:{address[1]}"

    async def _stop_async(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()

    async def serve_until_signal(self) -> None:
        await self._start_async()
        print(f"listening on {self.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await self._stop_async()
