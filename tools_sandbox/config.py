"""Settings of the sandbox pool (one pydantic model, embeddable in the run config)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_PRELOAD = [
    "numpy", "numpy.random", "numpy.linalg", "numpy.fft", "numpy.polynomial", "sympy", "math", "cmath", "fractions", "decimal", "itertools", "functools",
    "collections", "statistics", "random", "re", "heapq", "bisect", "string",
]


class SandboxConfig(BaseModel):
    """How many calls run at once, what each may use, and what the zygote preloads."""

    model_config = ConfigDict(extra="forbid")

    slots: int = Field(2, ge=1, le=64)  # calls running at once (one forked worker each)
    timeout_s: float = Field(5.0, gt=0)  # wall-clock limit per call unless the call says otherwise
    memory_mb: int = Field(1024, ge=16)  # address space a call may add on top of the warm interpreter
    max_output_bytes: int = Field(262_144, ge=1024)  # bytes kept per stream; more ends the call (output_limit)
    max_file_bytes: int = Field(16 << 20, ge=0)  # largest file a call may write (RLIMIT_FSIZE)
    max_open_files: int = Field(64, ge=16)  # RLIMIT_NOFILE of a call
    max_threads: int = Field(16, ge=1)  # RLIMIT_NPROC of a call's own uid: threads it may run
    tmpfs_mb: int = Field(64, ge=16)  # size of each slot's own /tmp (its calls' temp dirs; RAM, so slots x this in all)
    preload: list[str] = Field(default_factory=lambda: list(DEFAULT_PRELOAD))  # modules imported once in the zygote
    huge_pages: bool = True  # back the zygote's warm heap with huge pages (cheaper fork and exit per call)
    # slot i runs calls as uid_base+i; None: unique per pool from the zygote pid. Above the
    # uids of users (and checked at start: no process may have one of these uids already)
    uid_base: int | None = Field(None, ge=65536)
    insecure: bool = False  # run even when a kernel feature is missing (reported in pool.features)
    start_timeout_s: float = Field(120.0, gt=0)  # how long the zygote may take to import and isolate
    grace_s: float = Field(5.0, gt=0)  # extra wait past a call's timeout before the pool kills its slot
    python: str | None = None  # interpreter for the zygote; None: the running one (sys.executable)
