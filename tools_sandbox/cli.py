"""``reckon sandbox ...``: run code in the sandbox from the command line.

- ``exec``: code on stdin, ONE JSON result line on stdout (exit status 0 whatever the code
  did; 2 when the sandbox cannot start, with the reason on stderr).
- ``serve``: a standalone pool speaking JSON lines. Each stdin line is
  ``{"id": any, "code": str, "stdin": str?, "timeout_s": float?, "memory_mb": int?}``;
  each stdout line is the result dict plus the request's ``id``, written when the call ends
  (so not necessarily in request order). The active isolation features go to stderr once
  ready. Malformed lines get ``{"id": null, "error": "..."}``. EOF on stdin drains and exits.
- ``bench``: the benchmark of ``bench/sandbox.py``.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import trio
import typer

from tools_sandbox.config import SandboxConfig
from tools_sandbox.pool import SandboxError, SandboxPool, run_once

app = typer.Typer(help="Isolated Python execution pool (tools_sandbox).", no_args_is_help=True)


@app.command("exec")
def exec_(
    timeout: Optional[float] = typer.Option(None, "--timeout", help="wall-clock limit, seconds"),
    memory_mb: Optional[int] = typer.Option(None, "--memory-mb", help="extra address space, MiB"),
    insecure: bool = typer.Option(False, "--insecure", help="run even if isolation features are missing"),
) -> None:
    """Run the Python code read from stdin; print one JSON result line."""
    code = sys.stdin.read()
    try:
        result = run_once(code, config=SandboxConfig(insecure=insecure), timeout_s=timeout,
                          memory_mb=memory_mb)
    except SandboxError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result.to_dict()))


async def _serve(cfg: SandboxConfig) -> None:
    out_lock = trio.Lock()
    stdout = trio.wrap_file(sys.stdout)

    async def emit(obj: dict) -> None:
        async with out_lock:
            await stdout.write(json.dumps(obj) + "\n")
            await stdout.flush()

    async def handle(pool: SandboxPool, line: str) -> None:
        req = None
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("code"), str):
                raise ValueError('each line must be a JSON object with a string "code"')
            result = await pool.execute(req["code"], req.get("stdin", ""), req.get("timeout_s"),
                                        req.get("memory_mb"))
        except (ValueError, TypeError) as e:
            await emit({"id": req.get("id") if isinstance(req, dict) else None, "error": str(e)})
            return
        await emit({"id": req.get("id"), **result.to_dict()})

    async with SandboxPool(cfg) as pool:
        print(json.dumps({"ready": True, "slots": pool.total_slots, "features": pool.features}),
              file=sys.stderr, flush=True)
        stdin = trio.wrap_file(sys.stdin)
        async with trio.open_nursery() as nursery:
            async for line in stdin:
                if line.strip():
                    nursery.start_soon(handle, pool, line)


@app.command()
def serve(
    slots: int = typer.Option(2, "--slots", help="calls running at once"),
    timeout: float = typer.Option(5.0, "--timeout", help="default wall-clock limit, seconds"),
    memory_mb: int = typer.Option(1024, "--memory-mb", help="default extra address space, MiB"),
    insecure: bool = typer.Option(False, "--insecure", help="run even if isolation features are missing"),
) -> None:
    """Run a pool that reads JSON-line requests on stdin and writes JSON-line results."""
    cfg = SandboxConfig(slots=slots, timeout_s=timeout, memory_mb=memory_mb, insecure=insecure)
    try:
        trio.run(_serve, cfg)
    except SandboxError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command()
def bench(
    calls: int = typer.Option(400, "--calls", help="calls for the throughput figure"),
    slots: int = typer.Option(2, "--slots", help="concurrent callers (the pool gets one more slot for attacks)"),
    insecure: bool = typer.Option(False, "--insecure", help="run even if isolation features are missing"),
) -> None:
    """Throughput/latency vs. bare fork, sympy vs. fresh python, p99 under attack."""
    from tools_sandbox.benchmark import run_benchmark

    run_benchmark(n=calls, slots=slots, insecure=insecure)


if __name__ == "__main__":
    app()
