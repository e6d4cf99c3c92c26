"""Attack suite (issue 4): each attack is contained, the pool keeps serving, nothing is left over."""

import os
import pathlib

import pytest
import trio

from tools_sandbox import SandboxConfig, SandboxUnavailable, ThreadedPool

SECRET = "reckon-test-secret-7f3a"
SLOTS = 2


@pytest.fixture(scope="module")
def tp():
    os.environ["RECKON_SANDBOX_TEST_SECRET"] = SECRET  # must not reach any call
    try:
        with ThreadedPool(SandboxConfig(slots=SLOTS, timeout_s=3.0, memory_mb=256)) as tp:
            yield tp
    except SandboxUnavailable as e:
        pytest.skip(f"sandbox isolation unavailable here: {e}")
    finally:
        os.environ.pop("RECKON_SANDBOX_TEST_SECRET", None)


def call_processes(tp):
    """Pids of live processes running under any slot's uid (calls and whatever they left)."""
    uids = {str(tp.pool.uid_base + i) for i in range(SLOTS)}
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        if set(uid_line.split()[1:]) & uids:
            found.append(int(entry.name))
    return found


def check_contained(tp, result, *statuses):
    assert result.status in statuses, result
    assert call_processes(tp) == []
    assert tp.execute("6 * 7").stdout == "42\n"  # the pool still serves


FORK_BOMBS = {
    "os_fork": "import os\nwhile True:\n    os.fork()",
    "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'sleep 100'])",
    "multiprocessing": "import multiprocessing as mp, time\np = mp.Process(target=time.sleep, args=(100,))\np.start()",
    "os_system": "import os\nassert os.system('sleep 100') == 0",
    "posix_spawn": "import os\nos.posix_spawn('/bin/sleep', ['sleep', '100'], {})",
    "raw_clone": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                 "assert libc.syscall(56, 17, 0, 0, 0, 0) < 0\nassert libc.syscall(57) < 0\n"
                 "assert libc.syscall(58) < 0\nraise SystemExit(9)",
    "x32_abi_fork": "import ctypes\nprint(ctypes.CDLL(None).syscall(0x40000000 | 57))",
    "thread_bomb": "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(100,)).start()",
}


@pytest.mark.parametrize("name", list(FORK_BOMBS))
def test_fork_bombs(tp, name):
    r = tp.execute(FORK_BOMBS[name], timeout_s=2.0)
    # killed: the x32 syscall is rejected by seccomp's bad-architecture action;
    # timeout: the thread bomb's threads (capped by RLIMIT_NPROC) are waited for at exit
    check_contained(tp, r, "error", "killed", "timeout")
    assert r.status == "killed" or any(sign in r.stderr for sign in (
        "Operation not permitted", "AssertionError", "can't start new thread")) or r.exit_code == 9, r


@pytest.mark.parametrize("code", [
    "a = []\nwhile True:\n    a.append(bytearray(32 << 20))",
    "import numpy as np\nnp.zeros((1 << 40,))",
    "x = ' ' * (1 << 40)",
])
def test_memory_bombs(tp, code):
    check_contained(tp, tp.execute(code), "memory")


@pytest.mark.parametrize("code", [
    "while True:\n    pass",
    "import time\ntime.sleep(1000)",
    "import signal, time\nfor s in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGXCPU):\n"
    "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass",
    "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)",
    "import os\nos.close(1); os.close(2)\nwhile True:\n    pass",
    "import threading\nthreading.Thread(target=lambda: [0 for _ in iter(int, 1) if False]).start()",  # spins, no memory
])
def test_infinite_loops_and_sleeps(tp, code):
    r = tp.execute(code, timeout_s=0.7)
    check_contained(tp, r, "timeout")
    assert r.duration_s < 3


@pytest.mark.parametrize("code", [
    "while True:\n    print('x' * 10000)",
    "import sys\nwhile True:\n    sys.stderr.write('y' * 10000)",
    "import os\nos.write(1, b'z' * (10 << 20))",
])
def test_output_floods(tp, code):
    r = tp.execute(code)
    check_contained(tp, r, "output_limit")
    assert max(len(r.stdout), len(r.stderr)) == tp.config.max_output_bytes


@pytest.mark.parametrize("path", ["/tmp/evil", "/var/tmp/evil", "/dev/shm/evil", "/root/evil",
                                  "/etc/evil", str(pathlib.Path.cwd() / "evil_from_sandbox")])
def test_writes_outside_temp_dir(tp, path):
    r = tp.execute(f"open({path!r}, 'w').write('x')")
    check_contained(tp, r, "error")
    assert not os.path.exists(path)


def test_big_file_hits_fsize_limit(tp):
    r = tp.execute("open('big', 'wb').write(b'x' * (64 << 20))")
    check_contained(tp, r, "error")
    assert "File too large" in r.stderr or "No space left" in r.stderr


@pytest.mark.parametrize("opened_up", [False, True])
def test_reading_other_calls_files(tp, opened_up):
    # opened_up: the victim makes its temp dir and file world-readable (a call owns its dir),
    # which the thief, in another slot, must still not reach: each slot has its own /tmp.
    async def scenario(pool):
        results = {}
        chmod = "os.chmod('.', 0o777)\nos.chmod('secret', 0o666)\n" if opened_up else ""

        async def victim():
            results["victim"] = await pool.execute(
                "import os, time\nopen('secret', 'w').write('v1ct1m')\n" + chmod + "print(os.getcwd())\n"
                "import sys; sys.stdout.flush()\ntime.sleep(1.5)")

        async def thief():
            await trio.sleep(0.5)
            # every slot's temp dir by its real name (call-<slot>-<slot pid>), and guesses
            dirs = results["dirs"] = [f"/tmp/call-{s.index}-{s.pid}" for s in pool._slots.values()]
            results["thief"] = await pool.execute(
                f"dirs = {dirs!r}\n"
                "import glob, os\nfound = []\n"
                "try:\n    found += os.listdir('/tmp')\nexcept OSError as e:\n    print('listdir', e.errno)\n"
                "for d in glob.glob('/tmp/*/secret') + [f'{d}/secret' for d in dirs] + [f'/tmp/call-{s}-{n}/secret' for s in range(4) for n in range(50)]:\n"
                "    try:\n        found.append(open(d).read())\n    except OSError:\n        pass\n"
                "print(found)")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(victim)
            nursery.start_soon(thief)
        return results

    results = tp.run(scenario)
    assert results["victim"].status == "ok"
    assert results["victim"].stdout.strip() in results["dirs"]  # the thief knew where to look
    assert results["thief"].status == "ok" and "v1ct1m" not in results["thief"].stdout
    assert results["thief"].stdout.endswith("[]\n")
    check_contained(tp, results["thief"], "ok")


def test_reading_parent_environment_and_secrets(tp):
    code = (
        "import os, glob\nleak = []\n"
        "leak.append(str(dict(os.environ)))\n"
        f"paths = ['/proc/{os.getpid()}/environ', '/proc/{os.getpid()}/cmdline', '/proc/1/environ',\n"
        f"         '/proc/{tp.pool._proc.pid}/environ', '/root/.bash_history', '/etc/shadow']\n"
        "paths += glob.glob('/proc/*/environ')\n"
        "for p in paths + ['/proc/%d/environ' % os.getppid()]:\n"
        "    try:\n        leak.append(open(p, 'rb').read().decode(errors='replace'))\n"
        "    except OSError:\n        pass\n"
        "print(leak)\nprint(sorted(os.listdir('/proc'))[:50])")
    r = tp.execute(code)
    check_contained(tp, r, "ok")
    assert SECRET not in r.stdout
    visible_pids = [p for p in eval(r.stdout.splitlines()[1]) if p.isdigit()]
    assert len(visible_pids) <= 1  # hidepid: only the call itself


@pytest.mark.parametrize("code", [
    "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)",
    "import socket\nsocket.socket(socket.AF_UNIX).connect('/tmp/x')",
    "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)",
    "import socket\nsocket.socketpair()",
])
def test_network(tp, code):
    r = tp.execute(code)
    check_contained(tp, r, "error")
    assert "Operation not permitted" in r.stderr or "URLError" in r.stderr


def test_kill_parent_zygote_and_test_process(tp):
    code = (
        "import os, signal\nout = []\n"
        f"for pid in (os.getppid(), {tp.pool._proc.pid}, {os.getpid()}, 1):\n"
        "    try:\n        os.kill(pid, signal.SIGKILL)\n        out.append('killed %d' % pid)\n"
        "    except OSError as e:\n        out.append(e.errno)\n"
        "os.kill(-1, signal.SIGKILL)\nprint(out)")
    r = tp.execute(code)
    # kill(-1) reaches only the call's own uid, i.e. the call itself
    check_contained(tp, r, "killed", "ok")
    assert "killed" not in r.stdout


def test_kill_sibling_call(tp):
    async def scenario(pool):
        results = {}

        async def victim():
            results["victim"] = await pool.execute("import time\ntime.sleep(1.5)\nprint('alive')")

        async def attacker():
            await trio.sleep(0.5)
            pids = await trio.to_thread.run_sync(call_processes, tp)
            results["attacker"] = await pool.execute(
                f"import os\nfor pid in {pids}:\n    try:\n        os.kill(pid, 9)\n"
                "    except OSError as e:\n        print(e.errno)")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(victim)
            nursery.start_soon(attacker)
        return results

    results = tp.run(scenario)
    assert results["victim"].stdout == "alive\n"
    check_contained(tp, results["attacker"], "ok")


@pytest.mark.parametrize("code", [
    "import os\nos.setsid()",
    "import os\nos.setpgid(0, 0)\nwhile True:\n    pass",
    "import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        import time; time.sleep(100)",
    "import os\nos.setuid(0)",
])
def test_session_and_privilege_tampering(tp, code):
    check_contained(tp, tp.execute(code, timeout_s=0.7), "error", "timeout")


@pytest.mark.parametrize("code", [
    "import ctypes\nctypes.string_at(0)",
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "print(libc.unshare(0x40000000), libc.mount(b'none', b'/', None, 0, None), libc.syscall(425, 8, 0))",
    "import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.prctl(22, 0, 0, 0, 0), libc.ptrace(16, 1, 0, 0))",
    "import os\nos.chroot('/tmp')",
    "import os\nos.execv('/bin/sh', ['sh', '-c', 'echo pwned'])",
])
def test_ctypes_and_syscall_tricks(tp, code):
    r = tp.execute(code)
    check_contained(tp, r, "error", "killed", "ok")
    if r.status == "ok":  # every privileged call failed
        assert r.stdout.strip() in ("-1 -1 -1", "-1 -1"), r.stdout
    assert "pwned" not in r.stdout


def test_os_exit_in_the_middle(tp):
    r = tp.execute("import os, sys\nprint('partial'); sys.stdout.flush()\nos._exit(0)\nprint('never')")
    check_contained(tp, r, "ok")
    assert r.stdout == "partial\n"


def print_libc_calls(tp, expr: str) -> str:
    """Run ``print(expr)`` in a call where ``libc`` (ctypes, errno kept) and ``ctypes`` are
    at hand; check the call is contained and return what it printed."""
    r = tp.execute(f"import ctypes, signal\nlibc = ctypes.CDLL(None, use_errno=True)\nprint({expr})")
    check_contained(tp, r, "ok")
    return r.stdout


def test_sysv_ipc_is_no_channel_between_calls(tp):
    # All slots share one IPC namespace: a segment (or a queue) one call made, another could
    # open. The syscalls are denied (EPERM).
    assert print_libc_calls(tp, "libc.shmget(0x5eed, 1 << 20, 0o1666), libc.msgget(0x5eed, 0o1666), "
                                "libc.semget(0x5eed, 1, 0o1666), ctypes.get_errno()") == "-1 -1 -1 1\n"


def test_output_pipe_flags_do_not_reach_the_next_call(tp):
    # fds 1 and 2 are pipes the slot keeps for all its calls; a call must not leave them
    # non-blocking (or shrunk) for the next one.
    evil = ("import fcntl, os\nfor fd in (1, 2):\n"
            "    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)\n"
            "    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 4096)")
    for _ in range(SLOTS):  # every slot
        check_contained(tp, tp.execute(evil), "ok")
    for _ in range(SLOTS):
        r = tp.execute("import sys\nsys.stdout.write('z' * 200_000)\n_ = sys.stderr.write('e' * 100_000)")
        assert r.status == "ok" and len(r.stdout) == 200_000 and len(r.stderr) == 100_000, r.stderr[-300:]


def test_a_deep_directory_tree_is_removed(tp):
    # Deeper than Python's recursion limit (shutil.rmtree recurses) and than PATH_MAX.
    code = ("import os\nfor i in range(3000):\n    os.mkdir('d')\n    os.chdir('d')\n"
            "open('f', 'w').write('x' * 1000)")
    for _ in range(SLOTS):
        check_contained(tp, tp.execute(code, timeout_s=20.0), "ok")
    r = tp.execute("import os\nprint(os.listdir('.'))")
    assert r.stdout == "[]\n"


PRCTL_NR = {"x86_64": 157, "aarch64": 167}.get(os.uname().machine)


@pytest.mark.skipif(PRCTL_NR is None, reason="prctl's syscall number on this architecture")
def test_a_call_cannot_clear_its_parent_death_signal_or_become_dumpable(tp):
    # The parent-death signal is what ends a call whose slot dies (else an orphan would run
    # on, unsupervised); dumpable would let a crash send its memory to a host core handler.
    # The raw syscalls set the option's high bits, which the kernel ignores (32-bit int).
    assert print_libc_calls(tp, "libc.prctl(1, 0, 0, 0, 0), ctypes.get_errno(), "
                                "libc.prctl(1, int(signal.SIGTERM), 0, 0, 0), "
                                f"libc.syscall({PRCTL_NR}, ctypes.c_long((1 << 32) | 1), 0, 0, 0, 0), "
                                f"libc.syscall({PRCTL_NR}, ctypes.c_long(-(1 << 32) | 1), 0, 0, 0, 0), "
                                "libc.prctl(1, int(signal.SIGKILL), 0, 0, 0), "
                                f"libc.prctl(4, 1, 0, 0, 0), libc.syscall({PRCTL_NR}, ctypes.c_long((1 << 32) | 4), 1, 0, 0, 0), "
                                "libc.prctl(4, 0, 0, 0, 0), "
                                "(lambda sig: (libc.prctl(2, ctypes.byref(sig), 0, 0, 0), sig.value)[1])(ctypes.c_int())"
                            ) == "-1 1 -1 -1 -1 0 -1 -1 0 9\n"  # (the last: PR_GET_PDEATHSIG)


def test_a_call_sees_only_harmless_devices(tp):
    # No GPU, pty, disk or shared-memory device of the host: a /dev of the sandbox's own.
    r = tp.execute("import os\nprint(sorted(os.listdir('/dev')))\nopen('/dev/null', 'w').write('x')\n"
                   "print(len(open('/dev/urandom', 'rb').read(8)), open('/dev/zero', 'rb').read(2))\n"
                   "print(os.path.exists('/dev/ptmx'), os.path.exists('/dev/shm'))")
    check_contained(tp, r, "ok")
    assert r.stdout == ("['fd', 'full', 'null', 'random', 'stderr', 'stdin', 'stdout', 'urandom', 'zero']\n"
                        "8 b'\\x00\\x00'\nFalse False\n"), r


def test_file_locks_end_with_their_call_and_are_not_listed(tp):
    # A lock on a file every call opens (/dev/null, a library) would otherwise outlive the
    # call or be readable by others through /proc/locks: a channel between calls.
    for _ in range(SLOTS):
        r = tp.execute("import fcntl, os\nfor fd in (0, 1, 2):\n    fcntl.flock(fd, fcntl.LOCK_EX)\n"
                       "fcntl.flock(os.open('/usr/lib/os-release', os.O_RDONLY), fcntl.LOCK_SH)\n"
                       "print(repr(open('/proc/locks').read()))")
        check_contained(tp, r, "ok")
        assert r.stdout == "''\n", r
    r = tp.execute("import fcntl, os\nfcntl.flock(os.open('/dev/null', os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                   "print('free')")
    assert r.stdout == "free\n", r


def test_no_zombies_or_strays_after_suite(tp):
    assert call_processes(tp) == []
    assert tp.pool.free_slots == SLOTS  # (last: after every attack above)
    assert tp.pool.stats["leftover_processes"] == 0  # no fork bomb made a single process
