"""SandboxPool: run untrusted Python in isolated, pre-forked workers from trio.

The pool starts the zygote (``_zygote.py``, see its docstring for the process tree and the
isolation steps), asks it for ``config.slots`` slot workers, and hands each ``execute`` call
to an idle slot. The trio loop never blocks: all process work (fork, reap, clean up)
happens in the zygote's processes, and the pool supervises each call through its slot's
pipes: it writes the request, reads the output, enforces the wall clock and builds the
result, without a trip through another process of ours.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import marshal
import math
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tools_sandbox._zygote import MEMORY_EXIT, REPORT
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
    "ipc_namespace", "mount_namespace", "private_proc", "private_dev", "readonly_root",
    "private_tmp",
)


class SandboxError(RuntimeError):
    """The pool cannot serve: it failed to start, or its zygote died."""


class SandboxUnavailable(SandboxError):
    """Isolation this machine cannot provide was required (see ``missing``)."""

    def __init__(self, message: str, missing: dict[str, str]):
        super().__init__(message)
        self.missing = missing


# The largest request (code and stdin, marshalled) a call may get: the call child holds it
# as root, before its memory limit is set.
MAX_REQUEST_BYTES = 64 << 20


def _bytes_in_pipe(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


@dataclass(eq=False)
class _Slot:
    """The pool's end of one slot: the slot process and the pipes of its calls.

    The pool supervises each call itself: it writes the request into ``req_w`` (the slot's
    call child, forked ahead, is waiting on it), reads the child's output from ``out_r`` and
    ``err_r`` as it comes, kills the child at the wall-clock limit or the output cap, and
    takes the slot's "S" report (child reaped, leftovers killed, temp dir removed) as the
    end of the call. All of it is driven by one epoll instance per slot that trio waits on,
    so a call costs a few syscalls here and no process of the slot's but the forking loop
    and the call itself.
    """

    index: int
    pid: int
    pidfd: int
    go_w: int
    report_r: int
    req_w: int
    req_r: int  # only to drop a request that no child read (its child died first)
    out_r: int
    err_r: int
    epoll: select.epoll = field(default_factory=select.epoll)
    reports: bytearray = field(default_factory=bytearray)
    child_pid: int = 0  # the pid of the last "P" report: the call child, until its "S"
    child_pidfd: int = -1  # a pidfd on it, opened when its "P" report is read
    end: tuple[int, int] | None = None  # the "S" report of the running call: (wait status, leftovers)
    leftovers: int = 0  # of the last call that ended

    def __post_init__(self) -> None:
        for fd in (self.go_w, self.report_r, self.req_w, self.out_r, self.err_r):
            os.set_blocking(fd, False)  # (not req_r: the child's blocking read shares it)
        for fd in (self.report_r, self.out_r, self.err_r):
            self.epoll.register(fd, select.EPOLLIN)

    def _read_reports(self) -> None:
        """Take the reports that arrived: "P" sets ``child_pid`` and opens ``child_pidfd``,
        "S" sets ``end``. EOF (the slot died) raises EOFError, after what came before it."""
        eof = False
        while True:
            try:
                chunk = os.read(self.report_r, 4096)
            except BlockingIOError:
                break
            if not chunk:
                eof = True
                break
            self.reports += chunk
        while len(self.reports) >= REPORT.size:
            kind, a, b = REPORT.unpack_from(self.reports)
            del self.reports[:REPORT.size]
            if kind == b"P":
                self._close_child()
                self.child_pid, self.end = a, None
                self.child_pidfd = self._pin_child(a)
            elif kind == b"S":
                self.end = (a, b)
                self._close_child()
        if eof:
            raise EOFError("the slot process exited")

    def _pin_child(self, pid: int) -> int:
        """A pidfd on ``pid`` if that process is this slot's child, else -1.

        Opened as soon as the slot reports the fork, and checked then: the slot may already
        have reaped the child (its "S" report follows) and the pid been taken by another
        process; a pidfd pins the one process, and only a child of the slot (which has one
        child at a time) is ours. Kept until the "S" report, so the child can be killed
        even after its slot died.
        """
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return -1
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            if ppid == self.pid:
                return pidfd
        except (OSError, ValueError, IndexError):
            pass
        os.close(pidfd)
        return -1

    def _close_child(self) -> None:
        if self.child_pidfd >= 0:
            os.close(self.child_pidfd)
            self.child_pidfd = -1

    def _kill_child(self) -> bool:
        """SIGKILL the running call's child; False when that cannot be done yet (its "P"
        report has not come: try again later)."""
        try:
            self._read_reports()  # (its "P" report may be in the pipe)
        finally:
            if self.child_pidfd >= 0:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(self.child_pidfd, signal.SIGKILL)
        return self.end is not None or self.child_pid != 0

    async def run(self, request: bytes, timeout: float, grace: float, cap: int) -> ExecResult | None:
        """Run one call on this slot; None when the slot stopped answering (replace it).

        Returns once the slot has reaped the call's process, killed its leftovers and
        removed its temp dir; raises EOFError or OSError when the slot died.
        """
        start = trio.current_time()
        view = memoryview(request)
        out_r, err_r, report_r, req_w = self.out_r, self.err_r, self.report_r, self.req_w
        bufs = {out_r: bytearray(), err_r: bytearray()}
        reason = None  # why we killed it: "timeout" | "output_limit"
        killed = False  # (a kill waits for the child's "P" report: it is retried until sent)
        deadline = start + timeout
        self.end = None

        def take(fd: int) -> bool:
            """Read what ``fd`` holds into its buffer (at most ``cap``); False if nothing."""
            nonlocal reason
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return False
            room = cap - len(bufs[fd])
            bufs[fd] += chunk[:room]
            if len(chunk) > room and reason is None:
                reason = "output_limit"
            return bool(chunk)

        try:  # a request bigger than the pipe goes in as the child reads it
            view = view[os.write(req_w, view):]
        except BlockingIOError:
            pass
        if view:
            self.epoll.register(req_w, select.EPOLLOUT)
        try:
            while self.end is None:
                if reason is None and trio.current_time() >= deadline:
                    reason = "timeout"
                if reason is not None and not killed:
                    killed = self._kill_child()
                if trio.current_time() >= deadline + grace:
                    return None  # killed, and still not reaped: the slot is stuck
                with trio.move_on_at(deadline if reason is None else deadline + grace):
                    await trio.lowlevel.wait_readable(self.epoll.fileno())
                for fd, _events in self.epoll.poll(0):
                    if fd == report_r:
                        self._read_reports()
                    elif fd == req_w:
                        with contextlib.suppress(BlockingIOError):
                            view = view[os.write(req_w, view):]
                        if not view:
                            self.epoll.unregister(req_w)
                    else:
                        take(fd)
        finally:
            if view:
                self.epoll.unregister(req_w)
        duration = trio.current_time() - start
        wstatus, self.leftovers = self.end
        self.child_pid = 0
        self._close_child()
        # The call's processes are gone: what they wrote is in the pipes, and nothing can
        # write more. A request that no child read is dropped. Then the next child.
        for fd in (out_r, err_r):
            while take(fd):
                pass
        while waiting := _bytes_in_pipe(self.req_r):  # (req_r blocks: it is the child's too)
            os.read(self.req_r, waiting)
        os.write(self.go_w, b"g")

        exit_code = os.WEXITSTATUS(wstatus) if os.WIFEXITED(wstatus) else None
        sig = os.WTERMSIG(wstatus) if os.WIFSIGNALED(wstatus) else None
        if reason is not None:
            status = reason
        elif sig is not None:
            status = "timeout" if sig == signal.SIGXCPU else "killed"
        elif exit_code == MEMORY_EXIT:
            status = "memory"
        elif exit_code == 0:
            status = "ok"
        else:
            status = "error"
        return ExecResult(status, bufs[out_r].decode("utf-8", "replace"),
                          bufs[err_r].decode("utf-8", "replace"), exit_code, sig, duration)

    def kill(self) -> None:
        """SIGKILL the slot and its call (which would also die with it: PR_SET_PDEATHSIG)."""
        with contextlib.suppress(EOFError, OSError):
            self._kill_child()
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def close(self) -> None:
        self._close_child()
        for name in ("pidfd", "go_w", "report_r", "req_w", "req_r", "out_r", "err_r"):
            fd = getattr(self, name)
            setattr(self, name, -1)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if not self.epoll.closed:
            trio.lowlevel.notify_closing(self.epoll.fileno())  # a waiting task gets ClosedResourceError
            self.epoll.close()


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
        # leftover_processes: processes calls left behind that their slot killed (none
        # where seccomp is on: a call cannot make any)
        self.stats = {"calls": 0, "slot_restarts": 0, "leftover_processes": 0}
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
            "max_file_bytes": cfg.max_file_bytes,
            "max_open_files": cfg.max_open_files,
            "max_threads": cfg.max_threads,
            "uid_base": cfg.uid_base,
            "slots": cfg.slots,
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
        """Receive slots (their pipes) from the zygote; on zygote death, fail the pool."""
        fd_space = socket.CMSG_SPACE(6 * array.array("i", [0]).itemsize)
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
            if msg.get("op") != "slot" or len(fds) != 6:
                for fd in fds:
                    os.close(fd)
                continue
            slot = _Slot(msg["slot"], msg["pid"], os.pidfd_open(msg["pid"]), *fds)
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
        if not 0 < timeout < 1e7:
            raise ValueError(f"timeout_s must be > 0 and finite, got {timeout_s!r}")
        if memory < 16:
            raise ValueError(f"memory_mb must be >= 16, got {memory_mb!r}")
        try:
            stdin_bytes = stdin.encode()
        except UnicodeEncodeError as e:
            raise ValueError(f"stdin is not valid Unicode text: {e}") from None
        body = marshal.dumps((int(timeout) + 2, memory, stdin_bytes, code))
        if len(body) > MAX_REQUEST_BYTES:
            raise ValueError(f"code and stdin together are {len(body)} bytes; at most "
                             f"{MAX_REQUEST_BYTES} can be sent to a call")
        request = struct.pack(">I", len(body)) + body
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
        result = None
        failure = "killed"
        try:
            result = await slot.run(request, timeout, self.config.grace_s, self.config.max_output_bytes)
            if result is None:
                failure = "timeout"
        except (trio.ClosedResourceError, EOFError, OSError):
            result = None
        finally:
            if result is not None:
                self.stats["leftover_processes"] += slot.leftovers
                self._idle_send.send_nowait(slot)
            elif self._nursery is not None and not self._closed:
                self._nursery.start_soon(self._respawn, slot)
            else:
                slot.kill()
                slot.close()
        if result is None:
            if self._closed:
                raise SandboxError(self._closed_reason)
            return ExecResult(failure, "", "sandbox: the worker running this call stopped "
                              "responding and was replaced", None, signal.SIGKILL, timeout)
        return result


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
