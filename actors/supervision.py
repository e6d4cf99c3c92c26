"""Supervision helpers: work is acknowledged only when it is done, and re-issued work is recorded.

A work request (RolloutRequested to a generator, ToolCallRequested to a tool executor,
TrajectoryCompleted to a verifier, BatchFormed to the learner) is acknowledged by the actor
that does the work only after the result has reached the requester (the requester's
inbox acknowledged it). Until then the requester's link keeps the request and resends it,
so when the worker dies with the work, its restarted incarnation receives the request again
and does the work: the requester re-issues it without knowing the worker died.

Receivers stay idempotent: a result for work already settled (a late original after a
re-issue) is ignored by the requester, keyed by rollout id, call id or step.
"""

from __future__ import annotations

import re
from pathlib import Path

import trio

from actors.runtime import RECORDER, Context
from protocol.events import Envelope, WorkReissued

#: Longest wait for the requester to acknowledge a result before the request is acked anyway
#: (the requester died: nobody will resend it, and holding it serves no one).
SETTLE_TIMEOUT_S = 60.0

_WEIGHTS_DIR = re.compile(r"^v(\d+)$")


async def settle(ctx: Context, request: Envelope, result: Envelope | None, timeout: float = SETTLE_TIMEOUT_S) -> None:
    """Acknowledge ``request`` once every non-recorder peer ``result`` was sent to has acked it."""
    if result is not None:
        eid = result.event_id.encode()
        with trio.move_on_after(timeout):
            while True:
                waiting = [link for peer, link in ctx.net.links.items() if peer != RECORDER and eid in link.unacked]
                if not waiting:
                    break
                await trio.sleep(0.02)
    ctx.ack(request)


def note_reissue(ctx: Context, request: Envelope, kind: str, work_id: str) -> bool:
    """Record (WorkReissued) a request that reached a restarted actor but predates its start:
    it was outstanding at the actor's dead predecessor. True when it was one."""
    if ctx.restarts == 0 or request.ts >= ctx.started_wall:
        return False
    ctx.emit(WorkReissued(kind=kind, work_id=str(work_id), request_id=request.event_id, holder=ctx.name,
                          reason="restarted"), cause=request)
    return True


def latest_weights(run_dir: str | Path) -> tuple[int, Path] | None:
    """(version, directory) of the newest complete ``RUN_DIR/weights/vNNNNN``, or None."""
    best = None
    for d in Path(run_dir, "weights").glob("v*"):
        m = _WEIGHTS_DIR.match(d.name)
        if m and (d / "reckon_weights.json").is_file() and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), d)
    return best
