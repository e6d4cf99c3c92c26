"""SandboxPool: run untrusted Python in isolated, pre-forked workers from trio.

The pool starts the zygote (``_zygote.py``, see its docstring for the process tree and the
isolation steps), asks it for ``config.slots`` slot workers, and hands each ``execute`` call
to an idle slot. The trio loop never blocks: all process work happens in the zygote's
processes, and the pool only moves small frames (JSON on the control socket, ``marshal``
on the slot sockets) over Unix sockets.
"""

from __future__ import annotations

import array
import contextlib
import json
import marshal
import math
import os
import signal
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tools_sandbox.config import SandboxConfig
from tools_sandbox.result import ExecResult

ZYGOTE_PATH = Path(__file__).with_name("_zygote.py")
# The zygote's whole environment: nothing of the caller's (tokens, paths, credentials)
# reaches untrusted code, not even through /proc/<pid>/environ. One BLAS thread: forked
# children cannot use a thread pool that was started before the fork.
ZYGOTE_ENV = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
# Isolation the pool requires unless config.insecure is set.
REQUIRED_FEATURES = (
    "uid_drop", "no_new_privs", "seccomp", "subreaper", "pidfd", "net_namespace",
    "ipc_namespace", "mount_namespace", "private_proc", "readonly_root", "private_tmp",
)


class SandboxError(RuntimeError):
    """The pool cannot serve: it failed to start, or its zygote died."""


class SandboxUnavailable(SandboxError):
    """Isolation this machine cannot provide was required (see ``missing``)."""

    def __init__(self, message: str, missing: dict[str, str]):
        super().__init__(message)
        self.missing = missing


@dataclass(eq=False)
class _Slot:
    """The pool's end of one slot worker.

    ``sock`` is a plain non-blocking socket driven with trio's wait_readable/wait_writable
    directly: a request frame always fits in the socket buffer, so sending is one syscall
    and no trip through trio's scheduler, and the reply is waited for before the first
    ``recv`` (a trio socket's ``recv`` first tries, fails with EAGAIN, then waits).
    """

    index: int
    pid: int
    pidfd: int
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)

    async def send(self, obj) -> None:
        data = marshal.dumps(obj)
        view = memoryview(struct.pack(">I", len(data)) + data)
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)

    async def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                continue
            if not chunk:
                raise EOFError("slot worker closed its socket")
            self.buf += chunk

    async def receive(self) -> dict:
        await self._fill(4)
        (n,) = struct.unpack(">I", self.buf[:4])
        await self._fill(4 + n)
        body = bytes(self.buf[4:4 + n])
        del self.buf[:4 + n]
        return marshal.loads(body)

    def kill(self) -> None:
        """SIGKILL the slot (its running call dies with it: PR_SET_PDEATHSIG)."""
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.pidfd)
        self.pidfd = -1
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)  # a task waiting on it gets ClosedResourceError
        with contextlib.suppress(OSError):
            self.sock.close()


class SandboxPool:
    """A pool of isolated Python workers, used as ``async with SandboxPool(cfg) as pool``.

    Entering starts the zygote and all slots (seconds: the zygote imports ``preload``) and
    raises ``SandboxUnavailable`` when an isolation feature is missing and
    ``config.insecure`` is False, or ``SandboxError`` when the zygote cannot start. Leaving
    kills every worker and call. ``features`` maps each isolation feature to whether it is
    active; ``feature_errors`` says why one is not.
    """

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        self.features: dict[str, bool] = {}
        self.feature_errors: dict[str, str] = {}
        self.uid_base: int | None = None  # slot i runs its calls as uid_base + i
        self.huge_pages_mb = 0  # how much of the zygote's heap is backed by huge pages
        self.stats = {"calls": 0, "slot_restarts": 0}
        self._queued = 0
        self._idle_send, self._idle_recv = trio.open_memory_channel[_Slot](math.inf)
        self._slots: dict[int, _Slot] = {}
        self._stack = contextlib.AsyncExitStack()
        self._nursery: trio.Nursery | None = None
        self._proc: trio.Process | None = None
        self._ctl: trio.socket.SocketType | None = None
        self._closed = False
        self._all_spawned = trio.Event()

    # ------------------------------------------------------------------ public state

    @property
    def total_slots(self) -> int:
        return self.config.slots

    @property
    def free_slots(self) -> int:
        """Slots idle right now (a new call would start without waiting)."""
        return self._idle_recv.statistics().current_buffer_used

    @property
    def queued(self) -> int:
        """Calls waiting for a free slot."""
        return self._queued

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> "SandboxPool":
        try:
            self._nursery = await self._stack.enter_async_context(trio.open_nursery())
            await self._start()
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._shutdown()

    async def _start(self) -> None:
        cfg = self.config
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        zcfg = {
            "control_fd": child_sock.fileno(),
            "parent_pid": os.getpid(),
            "preload": cfg.preload,
            "tmpfs_mb": cfg.tmpfs_mb,
            "max_output_bytes": cfg.max_output_bytes,
            "max_file_bytes": cfg.max_file_bytes,
            "max_open_files": cfg.max_open_files,
            "max_threads": cfg.max_threads,
            "uid_base": cfg.uid_base,
            "huge_pages": cfg.huge_pages,
        }
        argv = [cfg.python or sys.executable, "-I", str(ZYGOTE_PATH), json.dumps(zcfg)]
        try:
            self._proc = await trio.lowlevel.open_process(
                argv, env=ZYGOTE_ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                pass_fds=(child_sock.fileno(),))
        finally:
            child_sock.close()
        self._ctl = trio.socket.from_stdlib_socket(parent_sock)
        try:
            with trio.fail_after(cfg.start_timeout_s):
                raw = await self._ctl.recv(65536)
        except trio.TooSlowError:
            raise SandboxError(
                f"sandbox zygote did not start within start_timeout_s={cfg.start_timeout_s}s "
                "(importing the preload modules); raise start_timeout_s or trim preload") from None
        if not raw:
            code = await self._proc.wait()
            raise SandboxError(f"sandbox zygote exited with code {code} before it was ready "
                               f"(interpreter {argv[0]}); its stderr is above")
        hello = json.loads(raw)
        self.features = hello["features"]
        self.uid_base = hello.get("uid_base")
        self.huge_pages_mb = hello.get("huge_pages_mb", 0)
        self.feature_errors = hello["errors"]
        if hello.get("fatal"):
            raise SandboxError(f"sandbox cannot run here: {hello['fatal']}")
        if hello.get("preload_errors"):
            names = ", ".join(f"{k} ({v})" for k, v in hello["preload_errors"].items())
            raise SandboxError(f"sandbox preload failed: {names}; install them in "
                               f"{argv[0]}'s environment or remove them from config.preload")
        if self.features.get("interpreter_visible") is False:
            raise SandboxError("sandbox calls could not be given read access to the Python "
                               f"installation: {self.feature_errors.get('interpreter_visible')}")
        missing = {k: self.feature_errors.get(k, "unavailable")
                   for k in REQUIRED_FEATURES if not self.features.get(k)}
        if missing and not cfg.insecure:
            listed = "; ".join(f"{k}: {v}" for k, v in missing.items())
            raise SandboxUnavailable(
                f"sandbox isolation unavailable ({listed}). Run as root on Linux >= 5.12 with "
                "libseccomp2 installed, or pass insecure=True (CLI: --insecure) to run "
                "without these protections.", missing)
        self._nursery.start_soon(self._read_control)
        for i in range(cfg.slots):
            await self._ctl.send(json.dumps({"op": "spawn", "slot": i}).encode())
        with trio.fail_after(cfg.start_timeout_s):
            await self._all_spawned.wait()

    async def _read_control(self) -> None:
        """Receive slot sockets from the zygote; on zygote death, fail the pool."""
        fd_space = socket.CMSG_SPACE(array.array("i", [0]).itemsize)
        while True:
            try:
                data, ancdata, _flags, _addr = await self._ctl.recvmsg(65536, fd_space)
            except (OSError, trio.ClosedResourceError):
                data, ancdata = b"", []
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            if not data:
                for fd in fds:
                    os.close(fd)
                self._fail_all("sandbox zygote exited")
                return
            msg = json.loads(data)
            if msg.get("op") != "slot" or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                continue
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(False)
            slot = _Slot(msg["slot"], msg["pid"], os.pidfd_open(msg["pid"]), sock)
            self._slots[slot.index] = slot
            self._idle_send.send_nowait(slot)
            if len(self._slots) == self.config.slots:
                self._all_spawned.set()

    def _fail_all(self, why: str) -> None:
        self._closed = True
        self._closed_reason = why
        self._idle_send.close()

    async def _respawn(self, slot: _Slot) -> None:
        slot.kill()
        slot.close()
        self._slots.pop(slot.index, None)
        self.stats["slot_restarts"] += 1
        if self._closed:
            return
        with contextlib.suppress(OSError, trio.ClosedResourceError):
            await self._ctl.send(json.dumps({"op": "spawn", "slot": slot.index}).encode())

    async def _shutdown(self) -> None:
        self._closed = True
        self._closed_reason = "sandbox pool is closed"
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        # The nursery was opened before any scope here, so it must close first (and outside
        # the shield below); its only tasks are control reads and respawns, already cancelled.
        await self._stack.aclose()
        with trio.CancelScope(shield=True):
            self._idle_send.close()
            for slot in list(self._slots.values()):
                slot.kill()
                slot.close()
            self._slots.clear()
            if self._ctl is not None:
                self._ctl.close()  # EOF: the zygote kills its slots and exits
            if self._proc is not None:
                with trio.move_on_after(5):
                    await self._proc.wait()
                if self._proc.returncode is None:
                    self._proc.kill()
                    await self._proc.wait()

    # ------------------------------------------------------------------ calls

    async def execute(self, code: str, stdin: str = "", timeout_s: float | None = None,
                      memory_mb: int | None = None) -> ExecResult:
        """Run ``code`` (Python source) in a fresh isolated process and return its result.

        ``stdin`` is fed to the code's standard input; ``timeout_s`` and ``memory_mb``
        override the config for this call. Waits (``queued``) while all slots are busy.
        Never raises for anything the code does; raises TypeError/ValueError for bad
        arguments and SandboxError when the pool is closed or its zygote died. If the
        caller is cancelled mid-call, the call is killed and its slot replaced.
        """
        if not isinstance(code, str) or not isinstance(stdin, str):
            raise TypeError("code and stdin must be str")
        timeout = self.config.timeout_s if timeout_s is None else float(timeout_s)
        memory = self.config.memory_mb if memory_mb is None else int(memory_mb)
        if not timeout > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if memory < 16:
            raise ValueError(f"memory_mb must be >= 16, got {memory_mb!r}")
        if self._closed:
            raise SandboxError(self._closed_reason)
        await trio.lowlevel.checkpoint_if_cancelled()
        self._queued += 1
        try:
            try:  # an idle slot: no trip through the scheduler
                slot = self._idle_recv.receive_nowait()
            except trio.WouldBlock:
                slot = await self._idle_recv.receive()
        except trio.EndOfChannel:
            raise SandboxError(self._closed_reason) from None
        finally:
            self._queued -= 1
        self.stats["calls"] += 1
        request = (code, stdin, timeout, memory)
        reply = None
        failure = "killed"
        try:
            await slot.send(request)
            with trio.move_on_after(timeout + self.config.grace_s):
                reply = await slot.receive()
            if reply is None:
                failure = "timeout"
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError, OSError):
            reply = None
        finally:
            if reply is not None and not reply.get("retire"):
                self._idle_send.send_nowait(slot)
            elif self._nursery is not None and not self._closed:
                self._nursery.start_soon(self._respawn, slot)
            else:
                slot.kill()
                slot.close()
        if reply is None:
            if self._closed:
                raise SandboxError(self._closed_reason)
            return ExecResult(failure, "", "sandbox: the worker running this call stopped "
                              "responding and was replaced", None, signal.SIGKILL, timeout)
        return ExecResult.from_dict(reply)


def run_once(code: str, stdin: str = "", config: SandboxConfig | None = None,
             timeout_s: float | None = None, memory_mb: int | None = None) -> ExecResult:
    """Synchronous convenience: start a one-slot pool, run one call, stop the pool.

    Costs the zygote start (about a second for numpy+sympy); use SandboxPool for many calls.
    Raises what ``SandboxPool`` raises.
    """
    cfg = (config or SandboxConfig()).model_copy(update={"slots": 1})

    async def main() -> ExecResult:
        async with SandboxPool(cfg) as pool:
            return await pool.execute(code, stdin, timeout_s, memory_mb)

    return trio.run(main)
