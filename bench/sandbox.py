"""Sandbox pool benchmark (issue 4): ``python -m bench.sandbox [N] [SLOTS]``.

Prints (a) trivial-call throughput/latency vs. the bare-fork ceiling, (b) a sympy snippet vs.
a fresh python subprocess per call, (c) honest p99 under attack vs. unattacked; see
tools_sandbox/benchmark.py for what each measures.
"""

import sys

from tools_sandbox.benchmark import run_benchmark

if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    slots = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    run_benchmark(n=n, slots=slots)
