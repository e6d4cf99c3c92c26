"""A SandboxPool for synchronous code: the pool lives in a background thread's trio loop."""

from __future__ import annotations

import threading
from typing import Any, Awaitable, Callable

import trio

from tools_sandbox.config import SandboxConfig
from tools_sandbox.pool import SandboxPool
from tools_sandbox.result import ExecResult


class ThreadedPool:
    """``with ThreadedPool(cfg) as tp: tp.execute(code)`` — blocking calls into a pool.

    Entering starts a thread running trio with a SandboxPool and re-raises its start error
    (SandboxUnavailable, SandboxError); leaving stops the pool and joins the thread. ``pool``
    is the live SandboxPool (read its features, uid_base, free_slots); ``run(fn, *args)``
    runs ``await fn(pool, *args)`` in the pool's loop, for concurrent scenarios.
    """

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        self.pool: SandboxPool | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="sandbox-pool", daemon=True)

    def _main(self) -> None:
        async def serve() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with SandboxPool(self.config) as pool:
                self.pool = pool
                self._ready.set()
                await self._stop.wait()

        try:
            trio.run(serve)
        except BaseException as e:  # handed to the thread that entered us
            self._error = e
        finally:
            self._ready.set()

    def __enter__(self) -> "ThreadedPool":
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def __exit__(self, *exc_info) -> None:
        if self._token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join()

    def run(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return trio.from_thread.run(fn, self.pool, *args, trio_token=self._token)

    def execute(self, code: str, stdin: str = "", timeout_s: float | None = None,
                memory_mb: int | None = None) -> ExecResult:
        return trio.from_thread.run(self.pool.execute, code, stdin, timeout_s, memory_mb,
                                    trio_token=self._token)
