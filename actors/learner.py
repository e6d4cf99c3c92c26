"""Learner: one GRPO-RoC (or SFT) optimizer step per BatchFormed, then new weights.

Consumes BatchFormed from the scheduler, runs the step on DeepSpeed (training/learner.py:
logprobs recomputed, PPO-clip with clip-higher and dual-clip, token-mean), reports
TrainStepCompleted, publishes the weights as a Hugging Face directory and announces them
(WeightsPublished) to the generators, which reload in place. Training runs in a worker
thread so the actor keeps heartbeating and receiving during a step.

Supervision: after every step the learner saves a checkpoint (model, optimizer, RNG, the
step, the weights version and the step's report) to ``RUN_DIR/checkpoints/step-NNNNNN``
(written beside, renamed into place, older ones removed), and only then publishes and
announces. A BatchFormed is acknowledged only once the scheduler has the step's report, so
the scheduler's link resends it to a restarted learner. A restarted learner resumes from
the latest checkpoint; a batch of a step the checkpoint already holds is not trained
again: its report and weights are announced again from the checkpoint. No step is trained
twice, none is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import trio

from actors.runtime import Context
from actors.supervision import note_reissue, settle
from protocol.events import BatchFormed, Envelope, TrainStepCompleted, WeightsPublished
from training.learner import Learner

#: Requests acknowledged only once done (actors/supervision.py).
ACK_WHEN_DONE = ("BatchFormed",)

_STEP_DIR = re.compile(r"^step-(\d+)$")
_META = "reckon_step.json"


def latest_checkpoint(run_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """(directory, step report) of the newest complete learner checkpoint of a run, or None."""
    best = None
    for d in Path(run_dir, "checkpoints").glob("step-*"):
        m = _STEP_DIR.match(d.name)
        if m and (d / _META).is_file() and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), d)
    if best is None:
        return None
    return best[1], json.loads((best[1] / _META).read_text())


def save_checkpoint(learner: Learner, run_dir: Path, report: dict) -> Path:
    """Checkpoint the learner after step ``report["step"]``; atomic (tmp dir + rename)."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{report['step']:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    learner.save_checkpoint(tmp, step=report["step"], stage=report["stage"], log_position=report["step"])
    (tmp / _META).write_text(json.dumps(report))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in root.iterdir():  # keep the newest only; drop leftovers of killed saves
        if old != final and (old.name.startswith(".tmp-") or _STEP_DIR.match(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    return final


async def run(ctx: Context, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    cfg = ctx.config
    run_dir = Path(cfg.run.run_dir)
    work_dir = str(run_dir / "learner")
    resumed = latest_checkpoint(run_dir)
    last: dict | None = None  # the report of the newest checkpointed step
    if resumed is None:
        learner: Learner = await trio.to_thread.run_sync(lambda: Learner(cfg.learner, cfg.model.path, work_dir))
    else:
        learner, _ = await trio.to_thread.run_sync(lambda: Learner.resume(cfg.learner, resumed[0], work_dir))
        # Its model dir is inside the checkpoint, which the next save replaces: take the config
        # and tokenizer files for publishing from the run's model instead (the same files).
        learner.model_dir = Path(cfg.model.path)
        last = resumed[1]
        ctx.log.info("resumed from checkpoint", step=last["step"], weights_version=last["weights_version"])
    version = last["weights_version"] if last else 0
    task_status.started()

    def announce(env: Envelope, report: dict, path: str, sha: str) -> Envelope:
        done = ctx.emit(
            TrainStepCompleted(
                step=report["step"], stage=report["stage"], kind=report["kind"], loss=report["loss"],
                metrics=report["metrics"], n_sequences=report["n_sequences"], n_tokens=report["n_tokens"],
                seconds=report["seconds"], weights_version=report["weights_version"],
            ),
            to=["scheduler"],
            cause=env,
        )
        ctx.emit(
            WeightsPublished(version=report["weights_version"], step=report["step"], path=path, sha256=sha),
            to=ctx.config.generators() + ["scheduler"],
            cause=env,
        )
        return done

    async def publish(v: int) -> tuple[str, str]:
        out = run_dir / "weights" / f"v{v:05d}"
        meta = out / "reckon_weights.json"
        if meta.is_file():  # published before a crash: the same weights (they come from the checkpoint)
            info = json.loads(meta.read_text())
            if info.get("version") == v:
                return str(out), info["sha256"]
        return await trio.to_thread.run_sync(learner.publish, v, str(out))

    while True:
        env: Envelope = await ctx.receive()
        batch = env.payload
        if not isinstance(batch, BatchFormed):
            continue
        note_reissue(ctx, env, "train_step", batch.step)
        if last is not None and batch.step <= last["step"]:
            # Trained before a crash (the checkpoint holds it): announce it again, never train it twice.
            done = None
            if batch.step == last["step"]:
                path, sha = await publish(last["weights_version"])
                done = announce(env, last, path, sha)
                ctx.log.info("step already trained; announced again from the checkpoint", step=batch.step)
            await settle(ctx, env, done)
            continue
        t0 = time.monotonic()
        ctx.state = f"training step {batch.step}"
        metrics = await trio.to_thread.run_sync(learner.train_step, batch)
        version += 1
        report = {
            "step": batch.step, "stage": batch.stage, "kind": batch.kind, "loss": float(metrics["loss"]),
            "metrics": {k: float(v) for k, v in metrics.items()}, "n_sequences": len(batch.rollout_ids),
            "n_tokens": int(batch.loss_mask.sum()), "weights_version": version, "batch_event_id": env.event_id,
        }
        report["seconds"] = time.monotonic() - t0
        await trio.to_thread.run_sync(save_checkpoint, learner, run_dir, report)
        last = report
        path, sha = await publish(version)
        done = announce(env, report, path, sha)
        ctx.state = f"idle after step {batch.step}"
        await settle(ctx, env, done)
