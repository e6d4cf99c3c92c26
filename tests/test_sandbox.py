"""Correctness of the sandbox pool: results, final-expression printing, limits, queueing, CLI."""

import json
import os
from pathlib import Path

import pytest
import trio

from tools_sandbox import (ExecResult, SandboxConfig, SandboxError, SandboxPool, SandboxUnavailable,
                           ThreadedPool, format_for_model, truncate_text)


@pytest.fixture(scope="module")
def tp():
    try:
        with ThreadedPool(SandboxConfig(slots=2, timeout_s=5.0)) as tp:
            yield tp
    except SandboxUnavailable as e:  # e.g. not root: the attack suite cannot mean anything
        pytest.skip(f"sandbox isolation unavailable here: {e}")


def run_or_skip(main) -> None:
    """``trio.run(main)``, skipping the test where the sandbox cannot isolate (not root)."""
    try:
        trio.run(main)
    except SandboxUnavailable as e:
        pytest.skip(str(e))


def test_all_isolation_features_active(tp):
    assert all(tp.pool.features.values()), tp.pool.feature_errors


def test_stdout_and_final_expression(tp):
    r = tp.execute("print('hello')\nx = 6 * 7\nx")
    assert (r.status, r.stdout, r.stderr, r.exit_code, r.signal) == ("ok", "hello\n42\n", "", 0, None)
    assert r.duration_s > 0


@pytest.mark.parametrize("code, stdout", [
    ("None", ""),                         # None is not printed, as in a notebook
    ("'a' + 'b'", "'ab'\n"),              # repr, not str
    ("x = 1", ""),                        # an assignment is not an expression
    ("def f():\n    return 3\nf()", "3\n"),
    ("import sympy\nsympy.factor(sympy.Symbol('x')**2 - 1)", "(x - 1)*(x + 1)\n"),
    ("", ""),
    ("x = 1; x", "1\n"),                   # the source split cannot settle these two:
    ("x = (2 +\n3)\nx", "5\n"),             # the AST decides
    ("print(\n1)", "1\n"),                  # an expression over several lines
    ("s = '''\n2\n'''\nlen(s)", "3\n"),     # a column-0 line inside a string
    ("if True:\n    7\n# done\n", ""),      # the last statement is the if
])
def test_final_expression_printing(tp, code, stdout):
    r = tp.execute(code)
    assert r.status == "ok" and r.stdout == stdout


def test_exception_is_error_with_traceback_of_user_code_only(tp):
    r = tp.execute("def f():\n    return 1 / 0\nf()")
    assert r.status == "error" and r.exit_code == 1
    assert "ZeroDivisionError" in r.stderr and 'File "<code>", line 2' in r.stderr
    assert "_zygote" not in r.stderr


def test_syntax_error(tp):
    r = tp.execute("def f(:\n")
    assert r.status == "error" and "SyntaxError" in r.stderr


@pytest.mark.parametrize("code, status, exit_code", [
    ("import sys; sys.exit(0)", "ok", 0),
    ("import sys; sys.exit()", "ok", 0),
    ("import sys; sys.exit(4)", "error", 4),
    ("import sys; sys.exit('bye')", "error", 1),
    ("import os; os._exit(3)", "error", 3),
])
def test_exit_codes(tp, code, status, exit_code):
    r = tp.execute(code)
    assert (r.status, r.exit_code) == (status, exit_code)


def test_stderr_and_stdin(tp):
    r = tp.execute("import sys\nprint(sys.stdin.read().upper(), file=sys.stderr)", stdin="abc")
    assert r.status == "ok" and r.stderr == "ABC\n" and r.stdout == ""


@pytest.mark.parametrize("size", [300_000, 20 << 20])  # (more than max_file_bytes, 16 MiB)
def test_large_stdin_arrives_whole(tp, size):
    r = tp.execute("import sys\nprint(len(sys.stdin.read()))", stdin="x" * size)
    assert r.stdout == f"{size}\n"


def test_timeout_and_per_call_override(tp):
    r = tp.execute("while True: pass", timeout_s=0.5)
    assert r.status == "timeout" and r.signal == 9 and r.exit_code is None


def test_memory_limit_per_call(tp):
    r = tp.execute("import numpy as np\na = np.ones(400 * 2**20 // 8)\nprint(a.sum())", memory_mb=128)
    assert r.status == "memory" and "MemoryError" in r.stderr
    assert tp.execute("import numpy as np\nnp.ones(10 * 2**20 // 8).sum()", memory_mb=128).status == "ok"


def test_calls_do_not_share_state(tp):
    # Sequential calls go round the slots, so with 2 slots the reading calls run on the same
    # slots (and in the same, re-emptied temp dir) as the writing ones.
    writes = [tp.execute("import os\nx = 5\nopen('f', 'w').write('1')\nos.getcwd()") for _ in range(2)]
    reads = [tp.execute("import os\nprint('x' in globals(), os.listdir('.'), os.listdir(os.environ['HOME']))\n"
                        "os.getcwd()") for _ in range(2)]
    assert all(r.status == "ok" for r in writes + reads)
    assert [r.stdout.splitlines()[0] for r in reads] == ["False [] []"] * 2
    # the same two directories: each was emptied between its calls
    assert {r.stdout.splitlines()[-1] for r in reads} == {r.stdout.strip() for r in writes}


def test_rng_is_reseeded_per_call(tp):
    # numpy's global RNG, random's, and sympy's own (sympy.core.random.rng, behind randprime
    # and friends): each differs from call to call.
    code = ("import numpy as np, random\nfrom sympy.core.random import rng\n"
            "print(np.random.randint(1 << 30), random.getrandbits(30), rng.getrandbits(30))")
    columns = zip(*(tp.execute(code).stdout.split() for _ in range(4)))
    assert [len(set(column)) for column in columns] == [4, 4, 4]


@pytest.mark.parametrize("code, stdout", [
    ("import threading\nt = threading.Thread(target=print, args=('t',))\nt.start(); t.join()", "t\n"),
    # The zygote skips threading's after-fork hook (single-threaded parents): the registry a
    # call starts with must still be that of a live main thread, and pools must work.
    ("import threading\nprint(threading.current_thread() is threading.main_thread(), "
     "threading.active_count(), threading.main_thread().is_alive())", "True 1 True\n"),
    ("from concurrent.futures import ThreadPoolExecutor\n"
     "with ThreadPoolExecutor(4) as ex:\n    print(sum(ex.map(abs, range(-5, 5))))", "25\n"),
    ("import threading, time\nt = threading.Thread(target=time.sleep, args=(0.2,))\nt.start()\n"
     "print('main done')", "main done\n"),  # a non-daemon thread is waited for at exit
])
def test_threads_work(tp, code, stdout):
    r = tp.execute(code)
    assert r.status == "ok" and r.stdout == stdout, r


def test_queueing_beyond_slots():
    async def main():
        async with SandboxPool(SandboxConfig(slots=2)) as pool:
            assert (pool.total_slots, pool.free_slots, pool.queued) == (2, 2, 0)
            seen = []

            async def call():
                seen.append(await pool.execute("import time; time.sleep(0.4)"))

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(call)
                await trio.sleep(0.2)
                assert (pool.free_slots, pool.queued) == (0, 2)
            assert [r.status for r in seen] == ["ok"] * 4
            assert pool.free_slots == 2

    run_or_skip(main)


def test_cancelled_call_replaces_its_slot():
    async def main():
        async with SandboxPool(SandboxConfig(slots=1, huge_pages=False)) as pool:
            assert pool.huge_pages_mb == 0
            with trio.move_on_after(0.5):
                await pool.execute("import time; time.sleep(30)")
            r = await pool.execute("1 + 1")
            assert r.stdout == "2\n" and pool.stats["slot_restarts"] == 1
        with pytest.raises(SandboxError):
            await pool.execute("1")

    run_or_skip(main)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.parametrize("when", ["idle", "mid_call"])
def test_a_dead_slot_costs_at_most_its_call_and_is_replaced(when):
    """A slot process forks its calls; if it dies (the OOM killer, say), the call it had is
    ended, nothing of it runs on, and the pool replaces the slot."""
    import signal

    async def main():
        async with SandboxPool(SandboxConfig(slots=1)) as pool:
            assert (await pool.execute("1 + 1")).stdout == "2\n"
            (slot,) = pool._slots.values()
            with trio.fail_after(10):
                while not _children(slot.pid):  # the next call's child, forked ahead
                    await trio.sleep(0.01)
            (child,) = _children(slot.pid)
            if when == "idle":
                os.kill(slot.pid, signal.SIGKILL)
                # The waiting child dies with its slot, before any request reaches it (the
                # pool holds the request pipe: an orphan would take the next request).
                with trio.fail_after(10):
                    while os.path.exists(f"/proc/{child}"):
                        await trio.sleep(0.01)
                r = await pool.execute("print('ran')")
            else:
                async with trio.open_nursery() as nursery:
                    results = []

                    async def call():
                        results.append(await pool.execute("import time\nprint('start', flush=True)\n"
                                                          "time.sleep(30)\nprint('ran')"))

                    nursery.start_soon(call)
                    await trio.sleep(0.5)
                    os.kill(slot.pid, signal.SIGKILL)
                (r,) = results
            assert r.status == "killed" and "replaced" in r.stderr and "ran" not in r.stdout, r
            with trio.fail_after(10):  # the waiting (or running) child died with its slot
                while os.path.exists(f"/proc/{child}"):
                    await trio.sleep(0.01)
            assert (await pool.execute("6 * 7")).stdout == "42\n"
            assert pool.stats["slot_restarts"] == 1
            # nothing the dead slot's call left is in the /tmp its replacement's calls see
            (new,) = pool._slots.values()
            assert new.pid != slot.pid
            left = [p.name for p in Path(f"/proc/{new.pid}/root/tmp").iterdir()]
            assert not [n for n in left if n.startswith(f"call-0-{slot.pid}")], left

    run_or_skip(main)


def test_bad_input_is_refused_before_a_slot_is_taken():
    async def main():
        async with SandboxPool(SandboxConfig(slots=1)) as pool:
            for _ in range(3):  # a slot lost per refusal would hang the third call
                with pytest.raises(ValueError, match="stdin is not valid Unicode"):
                    await pool.execute("print(1)", stdin="\ud800")
                with pytest.raises(ValueError, match="finite"):
                    await pool.execute("print(1)", timeout_s=float("inf"))
            with trio.fail_after(10):
                assert (await pool.execute("print(1)")).stdout == "1\n"

    run_or_skip(main)


def test_bad_arguments():
    pool = SandboxPool()
    with pytest.raises(TypeError):
        trio.run(pool.execute, b"print(1)")
    with pytest.raises(ValueError, match="timeout_s"):
        trio.run(pool.execute, "1", "", -1.0)
    with pytest.raises(Exception, match="slots"):
        SandboxConfig(slots=0)


def test_format_for_model_follows_release():
    ok = ExecResult("ok", "42\n", "", 0, None, 0.0123)
    assert format_for_model(ok) == "Tool call success\nstdout: 42\n\nexecution time: 0.01s"
    bad = ExecResult("error", "", "Traceback...\nValueError: x\n", 1, None, 1.5)
    assert format_for_model(bad) == ("Tool call failure\nreason: error (exit code 1)\n"
                                     "stderr: Traceback...\nValueError: x\n\nexecution time: 1.50s")
    seg = ExecResult("killed", "", "", None, 11, 0.1)
    assert "reason: killed by SIGSEGV" in format_for_model(seg)
    long = ExecResult("ok", "y" * 5000, "", 0, None, 0.1)
    text = format_for_model(long, max_chars=100)
    assert "...(truncated)..." in text and len(text) == 100 + len("...(truncated)...")
    assert ExecResult.from_dict(json.loads(json.dumps(ok.to_dict()))) == ok


def test_truncate_text_sides():
    assert truncate_text("abcdef", 10) == "abcdef"
    assert truncate_text("abcdef", 2, "left") == "ab...(truncated)"
    assert truncate_text("abcdef", 2, "right") == "(truncated)...ef"
    assert truncate_text("abcdef", 2, "middle") == "a...(truncated)...f"
    with pytest.raises(ValueError, match="side"):
        truncate_text("abc", 1, "top")


def test_cli_exec_prints_one_json_line():
    from typer.testing import CliRunner

    from tools_sandbox.cli import app

    if os.geteuid() != 0:
        pytest.skip("sandbox isolation needs root")
    out = CliRunner().invoke(app, ["exec", "--timeout", "2"], input="print(1)\n2 + 2\n")
    assert out.exit_code == 0, out.output
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["stdout"] == "1\n4\n"


@pytest.mark.parametrize("code", [
    "x = 1", "1 + 1", "print(1)\n", "def f():\n    return 3\nf()", "f(\n1)", "x = [1,\n2]\nx",
    's = """\nabc\n"""\ns', 's = """\n1 + 1\n"""', 'print("""\na\n""")', "if x:\n    y\nelse:\n    z",
    "x\n# c\n\n", "x = 1; x", "@dec\ndef f(): pass\nf", "x = 1 + \\\n2\nx", "  x = 1", "",
    "from __future__ import annotations\nx", "x = (\n1)\n", "a = 1\r\nb = 2\r\na + b\r\n",
    "class A:\n    pass\nA()", "x = '''\n'''\n'''\nhi'''", "f(1,\n  2,\n3)", "x = 1 if y \\\nelse 2",
    "x = 1\n  y = 2", "def f(:\n", "'doc'", "x = 'a;b'\nx",
])
def test_compile_fast_path_matches_the_ast(code):
    """The call child's source-split compile gives the AST path's bytecode, or its error."""
    import ast

    from tools_sandbox._zygote import _compile_user_code

    def same(a, b):
        return (a is None) == (b is None) and (a is None or (
            a.co_code == b.co_code and a.co_names == b.co_names and list(a.co_lines()) == list(b.co_lines())))

    try:
        tree = ast.parse(code, "<code>", "exec")
    except SyntaxError:
        with pytest.raises(SyntaxError):
            _compile_user_code(code, "<code>")
        return
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = compile(ast.Expression(tree.body.pop().value), "<code>", "eval", dont_inherit=True)
    body = compile(tree, "<code>", "exec", dont_inherit=True)
    got_body, got_last = _compile_user_code(code, "<code>")
    assert same(got_body, body) and same(got_last, last)


def test_a_timeout_before_the_call_started_still_kills_it(tp):
    # The deadline can pass before the slot's report of the child's pid has come: the kill
    # is retried until it is sent, not dropped.
    for _ in range(6):
        r = tp.execute("import time\ntime.sleep(1.5)\nprint('done')", timeout_s=1e-6)
        assert r.status == "timeout" and "done" not in r.stdout and r.duration_s < 1.0, r


def test_uids_in_use_are_refused():
    # The slots kill whatever runs under their uids (a call's leftovers): a pool must not
    # start on uids that another process already has.
    import subprocess

    uid = 1_500_000_000 + os.getpid() % 1000 * 64
    if os.geteuid() != 0:
        pytest.skip("needs root (to run a process under that uid)")
    squatter = subprocess.Popen(["sleep", "30"], user=uid)
    try:
        with pytest.raises(SandboxError, match="are in use"):
            with ThreadedPool(SandboxConfig(slots=1, uid_base=uid)):
                pass
        assert squatter.poll() is None  # and it was not killed
    finally:
        squatter.kill()
        squatter.wait()
