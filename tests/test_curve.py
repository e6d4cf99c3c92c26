"""CurveZMQ (network.curve): run keys in RUN_DIR/keys, only holders of a run key get events in."""

from __future__ import annotations

import os
import stat

import pytest
import trio
import zmq

from actors.config import Config
from actors.runtime import Context
from protocol.codec import encode
from protocol.curve import (
    CurveError,
    ZapAuthenticator,
    generate_keys,
    keys_dir,
    load_keypair,
    load_public_key,
    load_public_keys,
)
from protocol.events import Envelope, Heartbeat, new_event_id
from protocol.transport import Inbox, Link


def _env(i: int, run_id: str = "run-1") -> Envelope:
    return Envelope(new_event_id(), "Heartbeat", 1, run_id, "test", i, 0.0, None, Heartbeat(uptime_s=float(i), state="ok"))


def test_keys_are_made_once_per_actor_and_private(tmp_path):
    d = generate_keys(tmp_path, ["recorder", "generator-0"])
    assert d == keys_dir(tmp_path)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "recorder.secret").stat().st_mode) == 0o600
    first = load_keypair(tmp_path, "generator-0")
    assert len(first.public) == len(first.secret) == 40 and first.public != first.secret
    generate_keys(tmp_path, ["recorder", "generator-0", "generator-1"])  # a restart keeps existing keys
    assert load_keypair(tmp_path, "generator-0") == first
    assert set(load_public_keys(tmp_path).values()) == {"recorder", "generator-0", "generator-1"}


def test_missing_or_exposed_keys_are_refused_by_name(tmp_path):
    with pytest.raises(CurveError, match="verifier-0.public does not exist"):
        load_public_key(tmp_path, "verifier-0")
    generate_keys(tmp_path, ["learner"])
    os.chmod(keys_dir(tmp_path) / "learner.secret", 0o644)
    with pytest.raises(CurveError, match="learner.secret: a secret key must be readable by its owner only"):
        load_keypair(tmp_path, "learner")
    (keys_dir(tmp_path) / "learner.public").write_text("short")
    with pytest.raises(CurveError, match="learner.public: expected a 40-character Z85 CURVE key"):
        load_public_key(tmp_path, "learner")


def test_a_curve_inbox_needs_an_authenticator(tmp_path):
    zctx = zmq.Context()
    try:
        with pytest.raises(CurveError, match="needs a ZapAuthenticator"):
            Inbox(zctx, f"ipc://{tmp_path}/in", curve_server_key=zmq.curve_keypair()[1])
    finally:
        zctx.destroy(0)


def _plain_text_refused(reason: str) -> bool:
    """The plain-text peer's refusal as the server logs it: whichever side reads the other's
    greeting first sees the mechanism mismatch; when that is the peer, it hangs up."""
    return "mechanism mismatch" in reason or "hung up mid-handshake" in reason


def test_only_holders_of_a_run_key_get_events_in(tmp_path):
    """A run key delivers; a foreign key, a forged secret for a run key, and plain text are refused."""
    generate_keys(tmp_path, ["recorder", "generator-0"])
    server = load_keypair(tmp_path, "recorder")
    good = load_keypair(tmp_path, "generator-0")
    foreign_public, foreign_secret = zmq.curve_keypair()
    _, forged_secret = zmq.curve_keypair()
    addr = f"ipc://{tmp_path}/recorder"

    server_ctx, client_ctx = zmq.Context(), zmq.Context()

    async def main():
        zap = ZapAuthenticator(server_ctx, load_public_keys(tmp_path))
        inbox = Inbox(server_ctx, addr, run_id="run-1", curve_server_key=server.secret)
        links = {
            "good": Link(client_ctx, "recorder", addr, identity=b"good", curve=(server.public, good.public, good.secret)),
            "foreign": Link(client_ctx, "recorder", addr, identity=b"foreign",
                            curve=(server.public, foreign_public, foreign_secret)),
            "forged": Link(client_ctx, "recorder", addr, identity=b"forged",
                           curve=(server.public, good.public, forged_secret)),
            "plain": Link(client_ctx, "recorder", addr, identity=b"plain"),
        }
        got: list[tuple[bytes, Envelope]] = []
        async with trio.open_nursery() as n:
            n.start_soon(zap.run)
            n.start_soon(inbox.pump)
            for link in links.values():
                n.start_soon(link.pump)
            for name, link in links.items():
                for i in range(5):
                    e = _env(i)
                    link.send(e.event_id, encode(e))
            def refused_all() -> bool:
                # Kinds, not the latest reasons: a client with a forged secret keeps
                # reconnecting, and its refusals would push the others out of ``recent``.
                reasons = list(inbox.refusals.kinds)
                return (zap.refused >= 1 and inbox.refused_connections >= 3
                        and any(r.startswith("authentication refused") for r in reasons)
                        and any(_plain_text_refused(r) for r in reasons)
                        and any("cryptographic" in r for r in reasons))

            with trio.fail_after(60):  # generous: a loaded CI box
                while len(got) < 5:
                    got.append(await inbox.receive())
                await links["good"].wait_acked()
                # Every refused sender has tried.
                while not refused_all():
                    await trio.sleep(0.05)
            last = _env(99)
            links["good"].send(last.event_id, encode(last))
            with trio.fail_after(60):
                got.append(await inbox.receive())
            n.cancel_scope.cancel()
        assert {identity for identity, _ in got} == {b"good"}
        assert [env.seq for _, env in got] == [0, 1, 2, 3, 4, 99]
        assert inbox.received == 6 and inbox.rejected == 0
        for name in ("foreign", "forged", "plain"):
            assert len(links[name].unacked) == 5, name
        assert zap.admitted >= 1 and zap.refused >= 1
        # Every refusal is logged with a reason naming what was wrong, one kind each.
        reasons = list(inbox.refusals.kinds)
        assert any(r.startswith("authentication refused") for r in reasons), reasons  # foreign key
        assert any(_plain_text_refused(r) for r in reasons), reasons  # plain text
        assert any("cryptographic" in r for r in reasons), reasons  # forged secret for a run key
        assert inbox.refused_connections >= 3
        for link in links.values():
            link.close()
        inbox.close()
        zap.close()

    try:
        trio.run(main)
    finally:  # also when an assertion failed: a live context would hang the garbage collector later
        server_ctx.destroy(0)
        client_ctx.destroy(0)


def test_actors_use_the_run_keys_when_curve_is_on(tmp_path):
    """The runtime wiring: with network.curve, a Context's inbox is a CURVE server and its links
    authenticate with the actor's key pair."""
    cfg = Config.model_validate({"run": {"run_dir": str(tmp_path), "run_id": "run-1"}, "network": {"curve": True}})
    (tmp_path / "sock").mkdir()
    generate_keys(tmp_path, cfg.actor_names())

    zrec, zsch = zmq.Context(), zmq.Context()

    async def main():
        async with trio.open_nursery() as n:
            recorder = Context("recorder", cfg, "run-1", zrec, n)
            scheduler = Context("scheduler", cfg, "run-1", zsch, n)
            assert recorder.zap is not None and recorder.inbox.curve
            n.start_soon(recorder.zap.run)
            n.start_soon(recorder.inbox.pump)
            sent = scheduler.emit(Heartbeat(uptime_s=1.0, state="ok"))  # every event goes to the recorder
            with trio.fail_after(10):
                got = await recorder.receive()
            assert got.event_id == sent.event_id
            assert recorder.zap.admitted >= 1
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        zrec.destroy(0)
        zsch.destroy(0)


def test_the_launcher_makes_the_run_keys_when_curve_is_on(tmp_path):
    from actors.launcher import prepare_run

    cfg = Config.model_validate({"run": {"run_dir": str(tmp_path / "run")}, "model": {"path": str(tmp_path)},
                                 "network": {"curve": True}})
    cfg = prepare_run(cfg)
    names = cfg.actor_names()
    assert sorted(load_public_keys(cfg.run.run_dir).values()) == sorted(names)
    for name in names:
        load_keypair(cfg.run.run_dir, name)  # present, well-formed, private
    off = prepare_run(Config.model_validate({"run": {"run_dir": str(tmp_path / "off")}, "model": {"path": str(tmp_path)}}))
    assert not keys_dir(off.run.run_dir).exists()


def test_keys_for_actors_started_alone_come_from_one_command(tmp_path, capsys):
    from protocol.curve import main

    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[run]\nrun_dir = "{tmp_path / "run"}"\n[network]\ncurve = true\n')
    assert main([str(cfg), "--set", "generator.count=2"]) == 0
    assert "CURVE keys of 7 actors" in capsys.readouterr().out
    assert {"generator-0", "generator-1"} <= set(load_public_keys(tmp_path / "run").values())
    (tmp_path / "norun.toml").write_text("[network]\ncurve = true\n")
    assert main([str(tmp_path / "norun.toml")]) == 2
