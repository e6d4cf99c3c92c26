"""Suite-wide fixtures."""

from __future__ import annotations

import os

import pytest

#: torch.distributed's rendezvous variables. An in-process learner (tests of training/,
#: replay) sets them in this process, and its TCP store keeps MASTER_PORT bound; a
#: `reckon run` started by a later test would inherit the port and its learner could not
#: listen on it (EADDRINUSE).
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


_AT_START = {k: os.environ.get(k) for k in _DIST_ENV}


def _restore() -> None:
    for k, v in _AT_START.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _no_leaked_dist_env():
    """Each test starts and ends with the rendezvous variables the session started with
    (a test, or a fixture of wider scope, may have set them)."""
    _restore()
    yield
    _restore()
