"""CurveZMQ for reckon (``network.curve = true``): per-run keys and a trio ZAP authenticator.

Every actor of a run has one CURVE key pair in ``RUN_DIR/keys/``, made by the launcher
(:func:`generate_keys`) before any actor starts, or, for actors started alone (``reckon
actor`` on a cluster), once by ``python -m protocol.curve CONFIG [--set K=V ...]``:

* ``NAME.public``: the actor's public key (Z85 text, 40 characters);
* ``NAME.secret``: its secret key (Z85 text), mode 0600; the directory is 0700.

An actor's inbox is a CURVE server with the actor's secret key; its links are CURVE
clients that authenticate with the same key pair and know each peer's public key. A CURVE
server in libzmq admits any client that knows the server's public key unless a ZAP
handler says otherwise, so every process with a CURVE inbox runs a
:class:`ZapAuthenticator` on its zmq context: it admits exactly the run's public keys and
refuses (and logs, rate-limited) everything else. Traffic is encrypted and every frame an
inbox receives comes from a holder of one of the run's secret keys; a plain-text (NULL)
client cannot complete the handshake with a CURVE server at all.
"""

from __future__ import annotations

import os
import stat
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import zmq
from zmq.utils import z85

KEYS_DIR = "keys"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"reckon"

_AUTHENTICATORS: weakref.WeakKeyDictionary[zmq.Context, ZapAuthenticator] = weakref.WeakKeyDictionary()


class CurveError(Exception):
    """Missing, malformed or unprotected CURVE keys; the message says which file."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 bytes
    secret: bytes  # Z85, 40 bytes


def keys_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir, KEYS_DIR)


def generate_keys(run_dir: str | os.PathLike, names: Iterable[str]) -> Path:
    """Create a key pair for each actor name that has none yet (existing keys are kept, so
    a restarted actor keeps its identity). Returns the keys directory."""
    d = keys_dir(run_dir)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    for name in names:
        _check_name(name)
        pub, sec = d / f"{name}.public", d / f"{name}.secret"
        if pub.exists() and sec.exists():
            continue
        public, secret = zmq.curve_keypair()
        _write(sec, secret, 0o600)
        _write(pub, public, 0o644)
    return d


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith("."):
        raise CurveError(f"cannot make a key file for actor name {name!r}")


def _write(path: Path, key: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, key + b"\n")
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _read_key(path: Path, *, secret: bool) -> bytes:
    try:
        text = path.read_bytes().strip()
    except FileNotFoundError:
        raise CurveError(
            f"network.curve is on but {path} does not exist (`reckon run` makes the run's keys; for actors "
            "started alone, make them once with `python -m protocol.curve CONFIG`)"
        ) from None
    if len(text) != 40:
        raise CurveError(f"{path}: expected a 40-character Z85 CURVE key, found {len(text)} bytes")
    try:
        z85.decode(text)
    except Exception:
        raise CurveError(f"{path}: not a Z85 CURVE key") from None
    if secret and stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise CurveError(f"{path}: a secret key must be readable by its owner only (chmod 600)")
    return text


def load_keypair(run_dir: str | os.PathLike, name: str) -> KeyPair:
    d = keys_dir(run_dir)
    return KeyPair(public=_read_key(d / f"{name}.public", secret=False), secret=_read_key(d / f"{name}.secret", secret=True))


def load_public_key(run_dir: str | os.PathLike, name: str) -> bytes:
    return _read_key(keys_dir(run_dir) / f"{name}.public", secret=False)


def load_public_keys(run_dir: str | os.PathLike) -> dict[bytes, str]:
    """Every public key of the run (Z85) -> the actor it belongs to."""
    d = keys_dir(run_dir)
    keys = {_read_key(p, secret=False): p.name[: -len(".public")] for p in sorted(d.glob("*.public"))}
    if not keys:
        raise CurveError(f"network.curve is on but {d} holds no *.public keys")
    return keys


def require_authenticator(ctx: zmq.Context) -> ZapAuthenticator:
    """The ZAP authenticator of ``ctx``; a CURVE server without one would admit anyone."""
    auth = _AUTHENTICATORS.get(ctx)
    if auth is None or auth.closed:
        raise CurveError("a CURVE inbox needs a ZapAuthenticator on its zmq context (create it first)")
    return auth


class ZapAuthenticator:
    """libzmq's ZAP handler for one zmq context, driven from trio: admits CURVE clients whose
    public key is one of ``allowed`` (Z85), refuses everything else with a logged reason.

    Create it before the CURVE inbox and run :meth:`run` in the actor's nursery; libzmq
    holds each handshake until it answers.
    """

    def __init__(self, ctx: zmq.Context, allowed: Iterable[bytes] | dict[bytes, str]):
        from protocol.transport import RejectLog, _Pump

        self.allowed: dict[bytes, str] = dict(allowed) if isinstance(allowed, dict) else {k: "" for k in allowed}
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self.closed = False
        self.admitted = 0
        self.refusals = RejectLog("connection refused")
        self._pump = _Pump(self.sock, self._on_message)
        _AUTHENTICATORS[ctx] = self

    @property
    def refused(self) -> int:
        return self.refusals.total

    def _on_message(self, parts: list[bytes]) -> None:
        # [routing id, b"", version, request id, domain, address, identity, mechanism, *credentials]
        if len(parts) < 8 or parts[1] != b"":
            self.refusals(f"malformed ZAP request ({len(parts)} parts)")
            if len(parts) >= 4:
                self._reply(parts[0], parts[3], b"400", b"malformed request")
            return
        route, _, version, request_id, domain, address, _identity, mechanism, *credentials = parts
        peer = address.decode("utf-8", "replace")
        if version != b"1.0":
            self.refusals(f"ZAP version {version!r}", peer=peer)
            self._reply(route, request_id, b"400", b"bad ZAP version")
            return
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            self.refusals(f"mechanism {mechanism.decode('ascii', 'replace')} is not CURVE", peer=peer)
            self._reply(route, request_id, b"400", b"CURVE required")
            return
        key = z85.encode(credentials[0])
        name = self.allowed.get(key)
        if name is None:
            self.refusals(f"unknown CURVE key {key[:8].decode()}... is not one of this run's", peer=peer)
            self._reply(route, request_id, b"400", b"unknown key")
            return
        self.admitted += 1
        self._reply(route, request_id, b"200", b"OK", (name or key.decode()).encode())

    def _reply(self, route: bytes, request_id: bytes, code: bytes, text: bytes, user: bytes = b"") -> None:
        self._pump.send([route, b"", b"1.0", request_id, code, text, user, b""])

    async def run(self) -> None:
        try:
            await self._pump.run()
        finally:
            self.refusals.flush()

    def close(self) -> None:
        self.closed = True
        self._pump.closed = True
        self._pump.kick()
        self.sock.close(linger=0)


def main(argv: list[str] | None = None) -> int:
    """``python -m protocol.curve CONFIG [--set K=V ...]``: make the run's keys (idempotent)."""
    import argparse

    from actors.config import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="python -m protocol.curve", description=main.__doc__)
    ap.add_argument("config", help="the run's config (TOML or config.json) with run.run_dir set")
    ap.add_argument("--set", action="append", default=[], metavar="K=V", help="config override")
    a = ap.parse_args(argv)
    try:
        cfg = load_config(a.config, a.set)
    except ConfigError as e:
        print(e)
        return 2
    if not cfg.run.run_dir:
        print("run.run_dir is empty: the keys go to RUN_DIR/keys")
        return 2
    d = generate_keys(cfg.run.run_dir, cfg.actor_names())
    print(f"CURVE keys of {len(cfg.actor_names())} actors in {d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
