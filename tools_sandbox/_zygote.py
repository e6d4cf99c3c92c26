"""The sandbox zygote: a warm interpreter that forks slot workers, which fork one child per call.

This file runs as its own program (``python -I _zygote.py CONFIG_JSON``), started by
``tools_sandbox.pool`` with an almost empty environment. It imports only the standard library
and the modules named in the config's ``preload`` list, so nothing of the parent (its
environment, its open files, its imported packages) is visible to untrusted code.

Process tree and who does what::

    pool (trio, the caller's process): writes each request to a slot's request pipe, reads
     │  the call's stdout/stderr pipes, enforces the wall clock, builds the result
     └─ zygote (root): preload numpy/sympy, gc.freeze(), unshare NET|IPC|NS, private /proc
        (hidepid), whole file tree read-only, fresh tmpfs on /tmp, compile the seccomp filter
         └─ slot i (root, subreaper, one per concurrent call): forks the call children one
            │  at a time, reaps them, kills leftovers, removes the temp dir; a loop so small
            │  that its heap stays on huge pages
            └─ call child (uid = slot uid): setsid, fds closed, temp dir, rlimits,
               no_new_privs, seccomp, reads its request, runs the code, exits with os._exit

Wire formats:
- zygote control socket (SOCK_SEQPACKET, one JSON message per packet): the pool sends
  ``{"op": "spawn", "slot": i}``; the zygote answers ``{"op": "slot", "slot": i, "pid": p}``
  with the pool's ends of the slot's pipes attached (SCM_RIGHTS): go (write), report (read),
  request (write, and read to drop a request no child took), stdout and stderr (read). The
  first packet the zygote sends is ``{"op": "hello", "pid": p, "features": {...},
  "errors": {...}, ...}``. EOF on the control socket makes the zygote
  kill its slots and exit.
- request pipe: 4-byte big-endian length + ``marshal``ed ``(cpu_seconds, memory_mb,
  stdin bytes, code)``, read by the slot's waiting call child before anything untrusted runs.
- report pipe: ``REPORT`` records, "P" (pid of the child just forked) and "S" (its wait
  status and the count of leftover processes killed) once it is reaped and its temp dir
  removed. The pool answers each "S", once it has drained the call's pipes, with one byte
  on the go pipe, and the slot forks the next child.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl as fcntl_mod
import gc
import importlib
import json
import marshal
import os
import random
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

# Exit code the call child uses to say "MemoryError" (the pool, which imports it, derives statuses).
MEMORY_EXIT = 199

# Linux constants (x86_64 / aarch64 share these values).
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_THREAD = 0x00010000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REC, MS_PRIVATE = 0x4000, 0x40000
MS_BIND, MS_MOVE = 0x1000, 0x2000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP = 1, 4, 22
PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 38, 36
PR_SET_NAME = 15
SECCOMP_MODE_FILTER = 2
SCMP_FLTATR_CTL_OPTIMIZE = 8  # libseccomp's enum scmp_filter_attr
MADV_COLLAPSE = 25
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = {"x86_64": 442, "aarch64": 442}

# Syscalls the call child may not make (EPERM), beyond the clone rule below. A deny list,
# not an allow list: numpy/sympy/stdlib use a wide and version-dependent set of syscalls,
# and everything dangerous left after the namespaces, uid drop and rlimits is named here.
DENIED_SYSCALLS = (
    # new processes and programs
    "fork", "vfork", "execve", "execveat",
    # network and local sockets
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    # looking into or signalling other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_open",
    "pidfd_getfd", "pidfd_send_signal", "move_pages", "migrate_pages",
    # file systems and namespaces
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "unshare", "setns",
    "open_by_handle_at", "name_to_handle_at", "quotactl", "swapon", "swapoff",
    # kernel attack surface
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "keyctl", "add_key", "request_key", "personality", "acct",
    "syslog", "iopl", "ioperm", "uselib", "vhangup", "lookup_dcookie", "reboot",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "fanotify_init", "seccomp",
    # System V IPC and POSIX message queues: all slots share the zygote's IPC namespace, so
    # a segment or queue would be a channel between calls (and memory no call owns)
    "shmget", "shmat", "shmdt", "shmctl", "msgget", "msgsnd", "msgrcv", "msgctl",
    "semget", "semop", "semtimedop", "semctl", "mq_open", "mq_unlink", "mq_timedsend",
    "mq_timedreceive", "mq_notify", "mq_getsetattr",
)

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    """Raise OSError with errno when a libc call returned -1."""
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


# A prctl of our own (not the cached _libc.prctl) with fixed argument types: a call child
# makes four of these, and converting plain ints is cheaper than building ctypes objects.
_prctl_fn = _libc["prctl"]
_prctl_fn.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl_fn.restype = ctypes.c_int


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    if _prctl_fn(option, arg2, arg3, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


# ----------------------------------------------------------------------------- seccomp


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8),
                ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


class _ScmpArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def build_seccomp_program() -> _SockFprog:
    """Compile the call child's filter once with libseccomp and return it as raw BPF.

    The child then installs it with one prctl (microseconds), instead of asking libseccomp
    to recompile per call. Raises OSError when libseccomp is missing or rejects a rule.
    """
    path = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    lib = ctypes.CDLL(path, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ScmpArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    act_allow = 0x7FFF0000

    def act_errno(code: int) -> int:
        return 0x00050000 | (code & 0xFFFF)

    ctx = lib.seccomp_init(act_allow)
    if not ctx:
        raise OSError(errno.EINVAL, "seccomp_init failed")
    try:
        # A binary tree of syscall numbers instead of one long chain of comparisons
        # (libseccomp >= 2.5; older versions keep the chain). The kernel runs the filter
        # once per syscall number when it is loaded, to cache which syscalls are always
        # allowed: with the chain, that took ~100 us per call child.
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_OPTIMIZE, 2)
        def add(name: str, action: int, *cmps: _ScmpArgCmp) -> None:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:  # not a syscall on this architecture (e.g. fork on aarch64)
                return
            arr = (_ScmpArgCmp * len(cmps))(*cmps) if cmps else None
            ret = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
            if ret < 0:
                raise OSError(-ret, f"seccomp_rule_add({name}): {os.strerror(-ret)}")

        for name in DENIED_SYSCALLS:
            add(name, act_errno(errno.EPERM))
        # clone is allowed only for threads; clone3 passes its flags in memory, which BPF
        # cannot inspect, so it reports ENOSYS and glibc falls back to clone for threads.
        masked_eq = 7
        add("clone", act_errno(errno.EPERM), _ScmpArgCmp(0, masked_eq, CLONE_THREAD, 0))
        add("clone3", act_errno(errno.ENOSYS))
        # A call's parent-death signal is what ends it if its slot dies: it may set it again
        # (to SIGKILL, as the child itself does after its uid drop), never clear or change
        # it. Nor may it make itself dumpable again (a core piped to a host handler ignores
        # RLIMIT_CORE). The kernel reads prctl's option as a 32-bit int: compare only those
        # bits, or an option with high bits set would slip past the rule.
        cmp_ne, low32 = 1, 0xFFFFFFFF
        add("prctl", act_errno(errno.EPERM), _ScmpArgCmp(0, masked_eq, low32, PR_SET_PDEATHSIG),
            _ScmpArgCmp(1, cmp_ne, signal.SIGKILL, 0))
        add("prctl", act_errno(errno.EPERM), _ScmpArgCmp(0, masked_eq, low32, PR_SET_DUMPABLE),
            _ScmpArgCmp(1, cmp_ne, 0, 0))
        fd = os.memfd_create("seccomp-bpf")
        try:
            ret = lib.seccomp_export_bpf(ctx, fd)
            if ret < 0:
                raise OSError(-ret, f"seccomp_export_bpf: {os.strerror(-ret)}")
            os.lseek(fd, 0, os.SEEK_SET)
            raw = b""
            while chunk := os.read(fd, 65536):
                raw += chunk
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
    n = len(raw) // ctypes.sizeof(_SockFilter)
    filters = (_SockFilter * n).from_buffer_copy(raw)
    prog = _SockFprog(n, filters)
    prog._keepalive = filters  # the struct only points at the array
    return prog


# ----------------------------------------------------------------------------- zygote setup


def _blocking_ancestor(path: str) -> str | None:
    """The first directory on ``path`` that other users cannot traverse (no o+x), or None."""
    parts = os.path.abspath(path).split("/")[1:]
    current = ""
    for part in parts:
        current += "/" + part
        try:
            mode = os.stat(current).st_mode
        except OSError:
            return None
        if not mode & 0o001:
            return current
    return None


def _stage_root(paths: list[str]) -> str:
    """An existing directory, not holding any of ``paths``, to cover with a staging tmpfs
    (only inside the zygote's own mount namespace)."""
    for cand in ("/mnt", "/media", "/srv", "/opt", "/home", "/boot"):
        if os.path.isdir(cand) and not any(
            os.path.abspath(p) == cand or os.path.abspath(p).startswith(cand + "/") for p in paths
        ):
            return cand
    raise OSError(errno.ENOENT, "no directory to stage mounts in (tried /mnt, /media, /srv, /opt, /home, /boot)")


def _private_tmp(opts: bytes, paths: list[str]) -> None:
    """Mount a fresh tmpfs on /tmp, keeping interpreter paths that live under /tmp visible
    (e.g. a virtual environment in a checkout under /tmp): they are bind-staged elsewhere
    and moved back onto the new /tmp."""
    keep = sorted({os.path.abspath(p).split("/")[2] for p in paths if os.path.abspath(p).startswith("/tmp/")})
    staged = []
    stage_root = None
    if keep:
        stage_root = _stage_root(paths)
        _check(_libc.mount(b"tmpfs", stage_root.encode(), b"tmpfs", 0, b"size=1m,mode=0700"), "mount staging tmpfs")
    try:
        for i, name in enumerate(keep):
            stage = f"{stage_root}/t{i}"
            os.mkdir(stage)
            _check(_libc.mount(f"/tmp/{name}".encode(), stage.encode(), None, MS_BIND | MS_REC, None),
                   f"bind /tmp/{name}")
            staged.append((name, stage))
        _check(_libc.mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, opts), "mount tmpfs on /tmp")
        for name, stage in staged:
            os.mkdir(f"/tmp/{name}", 0o755)
            _check(_libc.mount(stage.encode(), f"/tmp/{name}".encode(), None, MS_MOVE, None),
                   f"move {stage} to /tmp/{name}")
    finally:
        if stage_root is not None:
            _libc.umount2(stage_root.encode(), 0)


def _expose_interpreter(paths: list[str]) -> None:
    """Let calls (another uid) read the interpreter and its libraries, and nothing beside them.

    Typical case: Python under /root/.pyenv with /root mode 0700. In this zygote's private
    mount namespace, each such blocking directory is covered by an empty tmpfs (mode 0711,
    hiding e.g. /root/.ssh) and only the needed child directory is bind-mounted back.
    """
    stage_root = _stage_root(paths)
    _check(_libc.mount(b"tmpfs", stage_root.encode(), b"tmpfs", 0, b"size=1m,mode=0700"),
           "mount staging tmpfs")
    try:
        for _ in range(8):  # each pass fixes the outermost blocking directory of each path
            todo: dict[str, set[str]] = {}
            for p in paths:
                blocked = _blocking_ancestor(p)
                if blocked is not None:
                    rel = os.path.relpath(os.path.abspath(p), blocked).split("/")[0]
                    todo.setdefault(blocked, set())
                    if rel != ".":
                        todo[blocked].add(rel)
            if not todo:
                return
            for blocked, children in todo.items():
                staged = []
                for i, child in enumerate(sorted(children)):
                    stage = f"{stage_root}/s{len(blocked)}-{i}"
                    os.mkdir(stage)
                    _check(_libc.mount(os.path.join(blocked, child).encode(), stage.encode(),
                                       None, MS_BIND | MS_REC, None), f"bind {blocked}/{child}")
                    staged.append((child, stage))
                _check(_libc.mount(b"tmpfs", blocked.encode(), b"tmpfs", 0, b"size=1m,mode=0711"),
                       f"cover {blocked}")
                for child, stage in staged:
                    target = os.path.join(blocked, child)
                    os.mkdir(target, 0o755)
                    _check(_libc.mount(stage.encode(), target.encode(), None, MS_MOVE, None),
                           f"move {stage} to {target}")
        raise OSError(errno.ELOOP, f"could not make {paths} readable to other users")
    finally:
        _libc.umount2(stage_root.encode(), 0)


def _isolate_zygote(cfg: dict, features: dict, errors: dict) -> None:
    """Unshare namespaces, privatize /proc, make the tree read-only, mount a fresh /tmp.

    Each step records success in ``features`` and its error text in ``errors``; a failed
    step never raises, because the pool decides (insecure or not) whether to go on.
    """
    def step(name, fn):
        try:
            fn()
            features[name] = True
        except OSError as e:
            features[name] = False
            errors[name] = str(e)

    step("net_namespace", lambda: _check(_libc.unshare(CLONE_NEWNET), "unshare(NET)"))
    step("ipc_namespace", lambda: _check(_libc.unshare(CLONE_NEWIPC), "unshare(IPC)"))

    step("mount_namespace", _own_mount_namespace)
    if not features["mount_namespace"]:
        for name in ("private_proc", "private_dev", "readonly_root", "private_tmp"):
            features[name] = False
            errors[name] = "needs the mount namespace"
        return
    # A fresh proc instance with hidepid: a call sees only its own uid's processes, so the
    # parent's environ/cmdline and other calls' /proc entries are invisible to it.
    def private_proc():
        _check(_libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                           b"hidepid=invisible"), "mount proc hidepid")
        # /proc/locks lists every file lock on the host: a lock on a file all calls can
        # open (a shared library, say) would be a channel between concurrent calls.
        _check(_libc.mount(b"/dev/null", b"/proc/locks", None, MS_BIND, None), "mask /proc/locks")

    step("private_proc", private_proc)

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    def readonly_root():
        nr = SYS_MOUNT_SETATTR.get(os.uname().machine)
        if nr is None:
            raise OSError(errno.ENOSYS, "mount_setattr number unknown on this architecture")
        attr = MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
        _check(_libc.syscall(nr, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr),
                             ctypes.sizeof(attr)), "mount_setattr(/, RDONLY, recursive)")

    paths = _interpreter_paths()
    if features.get("uid_drop"):
        step("interpreter_visible", lambda: _expose_interpreter(paths))
    step("private_dev", lambda: _private_dev(paths))
    step("readonly_root", readonly_root)
    # The only writable place: a tmpfs that only this zygote's mount namespace sees. Each
    # slot then mounts a tmpfs of its own over it (_slot_main), so calls never write here;
    # this one proves the mount works and is what a slot's namespace starts from.
    step("private_tmp", lambda: _private_tmp(_tmpfs_options(cfg), paths))


# The devices a call may use; every other device of the host (GPUs, ptys, disks) is out of
# its sight. Plus the usual links into /proc/self/fd.
CALL_DEVICES = ("null", "zero", "full", "random", "urandom")
CALL_DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
                  "stderr": "/proc/self/fd/2"}


def _private_dev(paths: list[str]) -> None:
    """Cover /dev with a tmpfs holding only ``CALL_DEVICES`` (bind mounts of the host's
    nodes) and ``CALL_DEV_LINKS``, built in a staging directory and moved onto /dev."""
    stage = _stage_root(paths)
    _check(_libc.mount(b"tmpfs", stage.encode(), b"tmpfs", MS_NOSUID | MS_NOEXEC, b"size=64k,mode=0755"),
           "mount tmpfs for /dev")
    try:
        for name in CALL_DEVICES:
            if not os.path.exists(f"/dev/{name}"):
                continue
            os.close(os.open(f"{stage}/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
            _check(_libc.mount(f"/dev/{name}".encode(), f"{stage}/{name}".encode(), None, MS_BIND, None),
                   f"bind /dev/{name}")
        for name, target in CALL_DEV_LINKS.items():
            os.symlink(target, f"{stage}/{name}")
        _check(_libc.mount(stage.encode(), b"/dev", None, MS_MOVE, None), "move the new /dev onto /dev")
    except OSError:
        _libc.umount2(stage.encode(), 2)  # MNT_DETACH
        raise


def _interpreter_paths() -> list[str]:
    """Where the interpreter and its packages live (calls must be able to read them)."""
    return [sys.base_prefix, sys.prefix, sys.exec_prefix, *(p for p in sys.path if p and os.path.isdir(p))]


def _tmpfs_options(cfg: dict) -> bytes:
    return f"size={int(cfg['tmpfs_mb'])}m,nr_inodes=65536,mode=0711".encode()


def _no_op(*args, **kwargs) -> None:
    pass


def _own_mount_namespace() -> None:
    """Move this process into a mount namespace of its own, with no mount events shared back."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(NS)")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")


def skip_threading_after_fork() -> None:
    """Make ``threading``'s after-fork hook a no-op in the children of this process, which
    must have only its main thread and start none (checked here; otherwise it does nothing).

    CPython runs ``threading._after_fork`` in every fork child (``os.register_at_fork``) to
    rebuild the thread registry and its locks, which matters only when other threads were
    running at the fork. In a warm numpy+sympy image it is ~430 us of a call child's CPU
    (fresh copies of every page it touches), the biggest single cost before the first line
    of the call. A hook cannot be unregistered, so its function's code is replaced. A call
    may still start threads: the registry, unchanged, is that of a single-threaded process.
    """
    threading = sys.modules.get("threading")
    hook = getattr(threading, "_after_fork", None)
    if hook is None or threading.active_count() != 1 or hook.__code__.co_freevars:
        return
    hook.__code__ = _no_op.__code__


def collapse_huge_pages() -> int:
    """Back the warm heap with transparent huge pages (MADV_COLLAPSE, Linux >= 6.1); returns MiB.

    A fork copies one page-table entry per 4 KiB page, and an exit frees them again: for a
    numpy+sympy image that is most of the cost of a call. A 2 MiB huge page is one entry.
    Only memory that exists now is collapsed (no MADV_HUGEPAGE, so later faults stay 4 KiB),
    and a child's first write to a huge page splits its mapping and copies 4 KiB, as usual.
    Best effort: returns 0 where the kernel cannot do it.
    """
    huge = 2 << 20
    done = 0
    madvise = _libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in lines:
        fields = line.split()
        path = fields[5] if len(fields) > 5 else ""
        if fields[1][:2] != "rw" or fields[1][3] != "p" or path not in ("", "[heap]"):
            continue
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        lo, hi = (lo + huge - 1) & ~(huge - 1), hi & ~(huge - 1)
        if hi > lo and madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
            done += hi - lo
    return done >> 20


# ----------------------------------------------------------------------------- call child


def _compile_user_code(code: str, filename: str):
    """Compile ``code`` into (module code, code of its final bare expression or None).

    Fast path, from source: split at the last line that starts in column 0; if that tail
    compiles as one expression and the head as statements, the tail is the final
    expression statement (a split that cuts a statement apart cannot compile on both
    sides). Anything the split cannot settle (a multi-line construct it cuts wrong, ``;``,
    ``from __future__``, a syntax error) goes through the AST, which is always right but
    builds Python objects for every node: several times slower in a fresh child.
    """
    lines = code.splitlines(True)
    i = len(lines) - 1
    while i >= 0 and (not lines[i].strip() or lines[i][0] in " \t#"):
        i -= 1
    if i >= 0 and "__future__" not in code:
        tail = "\n" * i + "".join(lines[i:])
        try:
            last = compile(tail, filename, "eval", dont_inherit=True)
            body = compile("".join(lines[:i]), filename, "exec", dont_inherit=True)
            return body, last
        except (SyntaxError, ValueError):
            pass
        # Not an expression: if the tail is one whole statement (it compiles alone, no ";"),
        # there is no final expression. (Compiled whole, so even a wrong split could only
        # lose the printing of a final value, never change what runs.)
        if ";" not in tail:
            try:
                compile(tail, filename, "exec", dont_inherit=True)
                return compile(code, filename, "exec", dont_inherit=True), None
            except (SyntaxError, ValueError):
                pass
    import ast

    tree = ast.parse(code, filename, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = compile(ast.Expression(tree.body.pop().value), filename, "eval", dont_inherit=True)
    return compile(tree, filename, "exec", dont_inherit=True), last


def _run_user_code(code: str) -> int:
    """Execute ``code`` as ``__main__``; print a final bare expression's repr. Returns exit code."""
    import builtins
    import linecache
    import traceback

    filename = "<code>"
    # Registered so tracebacks show the offending source line.
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        body, last = _compile_user_code(code, filename)
    except BaseException as e:  # SyntaxError (like python does: no traceback), or no memory
        try:
            traceback.print_exception(type(e), e, None, file=sys.stderr)
        except BaseException:
            pass
        return MEMORY_EXIT if isinstance(e, MemoryError) else 1
    try:
        exec(body, namespace)
        if last is not None:
            value = eval(last, namespace)
            if value is not None:
                print(repr(value))
        return 0
    except SystemExit as e:
        if e.code is None:
            return 0
        if isinstance(e.code, int):
            return e.code & 0xFF
        print(e.code, file=sys.stderr)
        return 1
    except BaseException as e:  # the user's error is the result, not ours
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None  # drop this frame
        try:
            traceback.print_exception(type(e), e, tb, file=sys.stderr)
        except BaseException:
            pass
        return MEMORY_EXIT if isinstance(e, MemoryError) else 1


def _read_exact(fd: int, n: int) -> bytearray:
    """``n`` bytes from ``fd`` (fewer only at EOF), read in place."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if not k:
            break
        got += k
    del view
    if got < n:
        del buf[got:]
    return buf


def _child(cfg: dict, features: dict, seccomp_prog, uid: int, tmpdir: str, vm_bytes: int,
           slot_pid: int, fds: tuple[int, int], req_fd: int) -> None:
    """Become the call process, wait for the call on ``req_fd``, confine itself, run it.

    Forked ahead of its request: everything that does not depend on the request is done
    before it arrives, while the process is still root and runs nothing untrusted
    (no_new_privs and the seccomp filter included); the uid drop and the CPU and AS limits
    come right after the request is read and before the first line of its code. The
    request is ``marshal``ed ``(cpu_seconds, memory_mb, stdin, code)`` behind a 4-byte
    length; EOF before it (the pool is gone) ends the process, and so does the slot's death
    (PDEATHSIG). ``vm_bytes`` is the address space it was forked with. Never returns.

    Every page a call child writes is copied from its parent first (copy-on-write): the
    costliest part of a call is such faults, so the child does as little as it can; what
    can be done once (in the zygote or the slot) is not done here.
    """
    try:
        def bind_to_slot() -> None:
            # The slot's death must end us: PDEATHSIG, which every uid or gid change clears,
            # so it is armed again after each; and if the slot died before it was armed, we
            # are an orphan already. (The pool holds the request pipe's other end: without
            # this, an orphan would run the next request sent to a new slot, unsupervised.)
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != slot_pid:
                os._exit(0)

        os.setsid()
        # fds 0, 1, 2: /dev/null and the slot's stdout and stderr pipes, each an open file of
        # our own (the slot's are shared by all its calls: a lock or a flag a call set on
        # them would outlive it and reach the next call).
        own = (os.open("/dev/null", os.O_RDONLY),
               *(os.open(f"/proc/self/fd/{fd}", os.O_WRONLY) for fd in fds))
        for target, fd in enumerate(own):
            os.dup2(fd, target)
        if req_fd != 3:
            os.dup2(req_fd, 3)
            req_fd = 3
        os.closerange(4, 1 << 16)
        os.mkdir(tmpdir, 0o700)  # this call's temp dir (the slot removes it after the call)
        if features.get("uid_drop"):
            os.chown(tmpdir, uid, uid)
        os.chdir(tmpdir)
        os.umask(0o077)
        # The environment, tempfile.tempdir and sys.argv were set by the slot, the RNGs
        # reseeded by the slot and by CPython's own at-fork hook (random). The limits that
        # do not depend on the request, and the groups, are set now; as root they could
        # still be undone, but nothing untrusted runs before the uid drop, which makes
        # them final.
        resource.setrlimit(resource.RLIMIT_NOFILE, (cfg["max_open_files"], cfg["max_open_files"]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if features.get("uid_drop"):
            # Counted per real uid, so it is only meaningful once we have our own uid
            # (and ignored for root anyway). Threads count too.
            resource.setrlimit(resource.RLIMIT_NPROC, (cfg["max_threads"], cfg["max_threads"]))
            os.setgroups([])
            os.setresgid(uid, uid, uid)
        # The syscall filter too: it does not depend on the call, denies nothing the rest
        # of this setup needs, and loading it costs ~60 us (the kernel compiles the BPF and
        # runs it once per syscall number to build its cache), so it is in place before the
        # request, not after. no_new_privs first: it is what lets a non-root slot load it.
        if features.get("no_new_privs"):
            _prctl(PR_SET_NO_NEW_PRIVS, 1)
        if seccomp_prog is not None:
            _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(seccomp_prog))

        # ---- wait for the call
        bind_to_slot()
        head = _read_exact(req_fd, 4)
        if len(head) < 4:  # the pool is shutting down
            os._exit(0)
        cpu, memory_mb, stdin, code = marshal.loads(_read_exact(req_fd, struct.unpack(">I", head)[0]))
        os.close(req_fd)
        if stdin:  # a memory file of our own in place of /dev/null: reads see it, then EOF
            stdin_fd = os.memfd_create("stdin")
            view = memoryview(stdin)
            while view:
                view = view[os.write(stdin_fd, view):]
            del view, stdin  # (not held for the whole call)
            os.lseek(stdin_fd, 0, os.SEEK_SET)
            os.dup2(stdin_fd, 0)
            os.close(stdin_fd)
        # (the file size limit after stdin is in: it is not the call's own file)
        resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["max_file_bytes"], cfg["max_file_bytes"]))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        as_bytes = vm_bytes + memory_mb * (1 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
        if features.get("uid_drop"):
            os.setresuid(uid, uid, uid)
        bind_to_slot()  # (the uid change cleared it)
        _prctl(PR_SET_DUMPABLE, 0)
        code = _run_user_code(code)
        threading = sys.modules.get("threading")
        if threading is not None and threading.active_count() > 1:
            # like interpreter exit: wait for non-daemon threads
            for thread in threading.enumerate():
                if thread is not threading.main_thread() and not thread.daemon:
                    thread.join()
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(code)
    except BaseException as e:  # setup failed: report on stderr, never fall back to the slot
        try:
            os.write(2, f"sandbox setup failed: {type(e).__name__}: {e}\n".encode())
        finally:
            os._exit(70)


# ----------------------------------------------------------------------------- slot worker


def _children_of_self() -> list[int]:
    """Live children of this process (orphans are reparented here: we are a subreaper)."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _processes_of_uids(uids: range) -> list[int]:
    """Pids of the processes whose real, effective or saved uid is in ``uids``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                line = next(line for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if any(int(u) in uids for u in line.split()[1:4]):
            found.append(int(name))
    return found


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid`` (from a child that takes that uid: kill(-1) as a user
    reaches exactly that user's processes). A killer that does not finish within a second
    (stopped by a process of that uid, say) is killed itself."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    pidfd = os.pidfd_open(pid)
    try:
        done = select.poll()
        done.register(pidfd, select.POLLIN)
        if not done.poll(1000):
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(pidfd)
    os.waitpid(pid, 0)


def _sweep(uid: int, features: dict) -> int:
    """Kill every process left by the call (all run as ``uid``, unique to this slot); reap them.

    Called once the call's own process is reaped, so any child of ours now is a leftover.
    Returns how many were found. With seccomp active a call cannot create processes, so
    this is a safety net for insecure mode and for kernel surprises.
    """
    try:  # the common case, in one syscall: no children at all
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return 0
    found = 0
    for _ in range(50):
        while True:  # reap whatever already died
            try:
                pid, _st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        left = _children_of_self()
        if not left:
            return found
        found += len(left)
        if features.get("uid_drop"):
            _kill_uid(uid)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.001)
    return found


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _read_vm_bytes() -> int:
    fd = os.open("/proc/self/statm", os.O_RDONLY)
    try:
        return int(os.read(fd, 256).split()[0]) * _PAGE_SIZE
    finally:
        os.close(fd)


def _reseeder():
    """A function that gives the preloaded libraries' global RNGs a fresh state from the
    kernel, for the slot to call right before each fork, so no two calls (children of one
    zygote) share one: numpy's, and sympy's own ``random.Random`` (``sympy.core.random``).

    It reads random bytes straight into the MT19937 key of ``numpy.random``'s global
    RandomState (found through the bit generator's public ``ctypes.state_address``): one
    ``readv`` that writes one page, where ``numpy.random.seed`` would touch dozens of pages
    of Python objects, each a copy-on-write fault in a process that forks per call. The key
    position stays at its end (nothing in the slot draws numbers), so the first draw of a
    call generates from the new key. (``random`` needs nothing: CPython reseeds it in every
    fork child from os.urandom.)
    """
    steps = []
    sympy_random = sys.modules.get("sympy.core.random")
    if sympy_random is not None and isinstance(getattr(sympy_random, "rng", None), random.Random):
        rng_seed, urandom = sympy_random.rng.seed, os.urandom
        steps.append(lambda: rng_seed(urandom(32)))
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        import numpy.random  # noqa: F401 -- (preloaded)

        gen = numpy.random.mtrand._rand._bit_generator
        seed = numpy.random.seed
        if type(gen).__name__ != "MT19937":  # not the layout read below: the slow, sure way
            steps.append(lambda: seed(int.from_bytes(os.urandom(4), "little")))
        else:
            seed(int.from_bytes(os.urandom(4), "little"))  # a key position at its end
            key = (ctypes.c_uint32 * 624).from_address(gen.ctypes.state_address)  # mt19937_state.key
            fd = os.open("/dev/urandom", os.O_RDONLY | os.O_CLOEXEC)
            bufs, readv = [key], os.readv

            def numpy_key() -> None:
                if readv(fd, bufs) != ctypes.sizeof(key):
                    seed(int.from_bytes(os.urandom(4), "little"))

            steps.append(numpy_key)
    if len(steps) == 1:
        return steps[0]

    def all_steps() -> None:
        for step in steps:
            step()

    return all_steps


def _remove_tree(path: str) -> bool:
    """Remove ``path`` and all under it; False if it is still there.

    A call can leave a tree deeper than Python's recursion limit (``shutil.rmtree``
    recurses, and its RecursionError is not an OSError) or than PATH_MAX: then ``rm -rf``,
    which walks any depth, does it.
    """
    try:
        shutil.rmtree(path)
    except BaseException:
        try:
            subprocess.run(["rm", "-rf", "--one-file-system", "--", path], env={"PATH": "/usr/bin:/bin"},
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60, check=False)
        except (OSError, subprocess.SubprocessError):
            pass
    return not os.path.lexists(path)


# What a slot tells the pool on its report pipe: "P" + the pid of the call child it forked,
# or "S" + that child's wait status and how many leftover processes it killed after it.
REPORT = struct.Struct(">cii")


def _slot_main(cfg: dict, features: dict, seccomp_prog, slot: int, uid: int,
               go_fd: int, report_fd: int, req_fd: int, out_fd: int, err_fd: int) -> None:
    """Fork call children, one at a time, until the pool closes ``go_fd``; never returns.

    Each child is forked ahead of its call and waits for the request, which the pool writes
    into ``req_fd`` (the child reads it before running anything untrusted); its stdout and
    stderr are ``out_fd`` and ``err_fd``, which the pool reads. The slot reports the child's
    pid, reaps it, kills what it left, removes its temp dir, reports its status, and forks
    the next child when the pool has taken the call's output and sends a byte on ``go_fd``.

    Deliberately tiny: a fork write-protects every page of the forking process, so each page
    it writes afterwards costs a fault (and a copy, while the child lives, which also splits
    a huge page). This loop writes a few dozen pages per call, its heap stays on huge pages,
    and that keeps the fork and the exit of every call cheap (docs/sandbox.md).
    """
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _prctl(PR_SET_NAME, ctypes.addressof(ctypes.create_string_buffer(b"sandbox-slot")))  # ps/top
    if features.get("subreaper"):
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    if features.get("private_tmp"):
        # A /tmp of this slot's own (a mount namespace of its own): no call sees another
        # slot's temp dirs, even one a call opened up (chmod 0777), and no call can fill
        # the space or the inodes of another slot's calls. It goes with the slot.
        try:
            _own_mount_namespace()
            _private_tmp(_tmpfs_options(cfg), _interpreter_paths())
        except OSError as e:  # (the zygote did the same once: this is not expected)
            print(f"sandbox slot {slot}: cannot make its own /tmp: {e}", file=sys.stderr, flush=True)
            os._exit(1)
    # Every call of this slot gets the same, freshly emptied temp dir (made by each child,
    # removed after it), so what the children inherit is set here once.
    tmpdir = f"/tmp/call-{slot}-{os.getpid()}"
    if not features.get("private_tmp") and os.path.lexists(tmpdir):  # an earlier slot's, same pid
        _remove_tree(tmpdir)
    os.environ.clear()
    os.environ.update({"HOME": tmpdir, "TMPDIR": tmpdir, "PATH": "/usr/bin:/bin",
                       "LANG": "C.UTF-8"})
    tempfile.tempdir = tmpdir
    sys.argv = ["<code>"]
    if cfg.get("huge_pages", True):
        collapse_huge_pages()  # our own copy: what we wrote since the zygote forked us split it
    # The address space every child starts with: ours, which this loop does not grow.
    vm_bytes = _read_vm_bytes()
    slot_pid = os.getpid()
    pack, write, read, fork, waitpid = REPORT.pack, os.write, os.read, os.fork, os.waitpid
    reseed = _reseeder()
    fcntl, F_GETPIPE_SZ, F_SETPIPE_SZ = fcntl_mod.fcntl, fcntl_mod.F_GETPIPE_SZ, fcntl_mod.F_SETPIPE_SZ
    pipe_sizes = {fd: fcntl(fd, F_GETPIPE_SZ) for fd in (out_fd, err_fd)}
    while True:
        # The size of a pipe is the pipe's, not of an open file: undo a call's change.
        for fd, size in pipe_sizes.items():
            if fcntl(fd, F_GETPIPE_SZ) != size:
                fcntl(fd, F_SETPIPE_SZ, size)
        reseed()
        try:
            pid = fork()
        except OSError as e:  # e.g. out of memory: the call gets the error, we try again
            write(err_fd, f"sandbox: cannot fork the call: {e}\n".encode())
            write(report_fd, pack(b"S", 70 << 8, 0))
        else:
            if pid == 0:
                _child(cfg, features, seccomp_prog, uid, tmpdir, vm_bytes, slot_pid, (out_fd, err_fd), req_fd)
            write(report_fd, pack(b"P", pid, 0))
            wstatus = waitpid(pid, 0)[1]
            leftovers = _sweep(uid, features)
            try:
                os.rmdir(tmpdir)  # usually empty
            except FileNotFoundError:
                pass
            except OSError:
                if not _remove_tree(tmpdir):  # the next child could not make its temp dir
                    write(err_fd, b"sandbox: could not remove the call's temp dir\n")
                    os._exit(1)  # no "S": this call ends as killed, and the pool replaces us
            write(report_fd, pack(b"S", wstatus, leftovers))
        if not read(go_fd, 1):
            os._exit(0)


# ----------------------------------------------------------------------------- zygote main


def main() -> None:
    cfg = json.loads(sys.argv[1])
    ctl = socket.socket(fileno=int(cfg["control_fd"]))
    # The pool's death closes the control socket, which ends the loop below. (Not
    # PR_SET_PDEATHSIG: it fires when the *thread* that spawned us exits, and trio spawns
    # processes from short-lived worker threads.) If the pool is already gone, do not start.
    if os.getppid() != int(cfg["parent_pid"]):
        os._exit(1)
    # Ctrl-C in the caller's terminal reaches its whole process group; the pool, not the
    # keyboard, decides when the zygote and its slots stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    features: dict[str, bool] = {}
    errors: dict[str, str] = {}
    preload_errors = {}
    # What every call child uses itself: imported here once, not per call.
    for name in ("ast", "builtins", "linecache", "traceback", "resource", "tempfile", "random"):
        importlib.import_module(name)
    for name in cfg["preload"]:
        try:
            importlib.import_module(name)
        except ImportError as e:
            preload_errors[name] = str(e)
    root = os.geteuid() == 0
    features["uid_drop"] = root
    if not root:
        errors["uid_drop"] = "the sandbox must start as root to run calls under their own uid"
    try:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        _prctl(PR_SET_CHILD_SUBREAPER, 0)
        features["subreaper"] = True
    except OSError as e:
        features["subreaper"], errors["subreaper"] = False, str(e)
    try:
        # no_new_privs is irreversible: probe it in a throwaway child.
        pid = os.fork()
        if pid == 0:
            try:
                _prctl(PR_SET_NO_NEW_PRIVS, 1)
                os._exit(0)
            except BaseException:
                os._exit(1)
        features["no_new_privs"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    except OSError as e:
        features["no_new_privs"], errors["no_new_privs"] = False, str(e)
    seccomp_prog = None
    try:
        seccomp_prog = build_seccomp_program()
        features["seccomp"] = True
    except OSError as e:
        features["seccomp"], errors["seccomp"] = False, str(e)
    try:
        os.close(os.pidfd_open(os.getpid()))
        features["pidfd"] = True
    except (OSError, AttributeError) as e:
        features["pidfd"], errors["pidfd"] = False, str(e)
    if root:
        _isolate_zygote(cfg, features, errors)
    else:
        for name in ("net_namespace", "ipc_namespace", "mount_namespace", "private_proc",
                     "private_dev", "readonly_root", "private_tmp"):
            features[name] = False
            errors[name] = "needs root (CAP_SYS_ADMIN)"
    def fatal(why: str) -> None:
        ctl.send(json.dumps({"op": "hello", "pid": os.getpid(), "features": features,
                             "errors": errors, "fatal": why}).encode())
        os._exit(1)

    if not features["pidfd"]:
        fatal("pidfd_open is required (Linux >= 5.3)")
    # One uid per slot, unique among live pools on this host (pids are unique), so a call
    # can signal or read nothing but itself, and the leftover sweep hits only its own call.
    uid_base = cfg["uid_base"]
    if uid_base is None:
        uid_base = 1_000_000_000 + (os.getpid() % (1 << 22)) * 64
    if features["uid_drop"]:
        # The slots kill every process of their uids (leftovers of calls): none may be
        # anybody else's.
        n_slots = int(cfg["slots"])
        busy = _processes_of_uids(range(uid_base, uid_base + n_slots))
        if busy:
            fatal(f"uids {uid_base}..{uid_base + n_slots - 1} are in use on this "
                  f"host (pids {busy[:5]}): choose another uid_base")

    # Run the call path here, so what it initializes lazily (compiler and AST state, caches)
    # is part of the shared image instead of being redone in every call child; and often
    # enough that the adaptive interpreter has specialized it, instead of every child
    # rewriting the same bytecode (a copy-on-write fault per page it writes).
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # (no core dumps of the zygote either)
    for _ in range(100):
        _run_user_code("x = [i * i for i in range(3)]\ny = {'a': x}\nNone")
        _run_user_code("x = 1")
    # The zygote and its slots stay single-threaded (numpy's BLAS is pinned to one thread by
    # the environment): their fork children need not rebuild threading's registry.
    skip_threading_after_fork()
    # Everything imported so far is shared copy-on-write with every slot and call: keep the
    # collector from touching (and so copying) those pages.
    gc.collect()
    gc.freeze()
    huge_mb = collapse_huge_pages() if cfg.get("huge_pages", True) else 0
    ctl.send(json.dumps({"op": "hello", "pid": os.getpid(), "features": features,
                         "errors": errors, "preload_errors": preload_errors,
                         "uid_base": uid_base if features["uid_drop"] else None,
                         "huge_pages_mb": huge_mb}).encode())
    slots: dict[int, int] = {}  # pid -> slot index (a respawned index gets a new pid first)
    spawned: set[int] = set()
    poller = select.poll()
    poller.register(ctl, select.POLLIN)
    while True:
        ready = poller.poll(500)
        while slots:  # reap slots that died (killed by the pool, or crashed)
            try:
                pid, _st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            index = slots.pop(pid, None)
            if index is not None and not features.get("private_tmp"):
                # What its last call left, if it died (or was killed) mid-call. (With a /tmp
                # of its own, that went with its mount namespace.)
                _remove_tree(f"/tmp/call-{index}-{pid}")
        if not ready:
            continue
        msg = ctl.recv(65536)
        if not msg:
            break
        req = json.loads(msg)
        if req.get("op") != "spawn":
            continue
        slot = int(req["slot"])
        if features["uid_drop"] and slot in spawned:  # whatever a dead slot of this index left running
            _kill_uid(uid_base + slot)  # (a first spawn's uid was checked free at start)
        spawned.add(slot)
        go_r, go_w = os.pipe()
        report_r, report_w = os.pipe()
        req_r, req_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pools_ends = (go_w, report_r, req_w, req_r, out_r, err_r)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                ctl.close()
                for fd in pools_ends:
                    if fd != req_r:
                        os.close(fd)
                _slot_main(cfg, features, seccomp_prog, slot, uid_base + slot,
                           go_r, report_w, req_r, out_w, err_w)
            finally:
                os._exit(0)
        for fd in (go_r, report_w, out_w, err_w):
            os.close(fd)
        slots[pid] = slot
        socket.send_fds(ctl, [json.dumps({"op": "slot", "slot": slot, "pid": pid}).encode()],
                        list(pools_ends))
        for fd in pools_ends:
            os.close(fd)
    for pid in slots:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for _ in slots:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    if features["uid_drop"]:  # (a call whose slot died with us, should one be left)
        for index in spawned:
            _kill_uid(uid_base + index)
    os._exit(0)


if __name__ == "__main__":
    main()
