"""reckon: tools_sandbox — isolated, fork-speed execution of untrusted Python (DESIGN §5)."""

from tools_sandbox.config import SandboxConfig
from tools_sandbox.pool import SandboxError, SandboxPool, SandboxUnavailable, run_once
from tools_sandbox.result import ExecResult, format_for_model, truncate_text
from tools_sandbox.threaded import ThreadedPool

__all__ = [
    "ExecResult", "SandboxConfig", "SandboxError", "SandboxPool", "SandboxUnavailable", "ThreadedPool",
    "format_for_model", "run_once", "truncate_text",
]
