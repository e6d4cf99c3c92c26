"""Multi-host deployment: actors on separate hosts over tcp://, the event log on PostgreSQL.

The fast tests check the per-host configuration (``network.hosts``, ``bind_host``), the
checks an actor started alone makes, and the one-command-per-host entry point (several
actors in one ``reckon actor`` command, stopped with the recorder last).

The netns test builds a small cluster inside this machine: three network namespaces
(the generator's, the tool executor's and the learner's hosts), each joined by a veth
link to a bridge in the root namespace, which is the head host (scheduler, recorder,
verifier; it reaches PostgreSQL on 127.0.0.1). Every host runs one ``reckon actor``
command against the same config, as docs/deploy.md says; the test then checks in
PostgreSQL that each actor ran in its own namespace and that trajectories, tool calls and
train steps came from the separate hosts. It needs root and iproute2, and skips with the
reason where either is missing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from actors.config import ConfigError, load_config, parse_config
from actors.main import check_actor, start

ROOT = Path(__file__).resolve().parents[1]
PG_BASE = "postgresql+psycopg://{user}@127.0.0.1:5432/test"
PG = {"store": {"url": "postgresql+psycopg://u@db/reckon"}}


# ---------------------------------------------------------------- configuration


def test_hosts_place_actors_and_ports_follow_the_actor_order() -> None:
    cfg = parse_config({**PG, "network": {"transport": "tcp", "host": "head", "base_port": 5000,
                                          "hosts": {"learner": "gpu1", "generator-0": "gpu2"}}})
    assert cfg.actor_names() == ["recorder", "scheduler", "learner", "verifier-0", "tool-0", "generator-0"]
    assert [cfg.address(n) for n in cfg.actor_names()] == [
        "tcp://head:5000", "tcp://head:5001", "tcp://gpu1:5002", "tcp://head:5003", "tcp://head:5004", "tcp://gpu2:5005",
    ]
    assert cfg.run_hosts() == {"head", "gpu1", "gpu2"}
    # Without bind_host an actor binds where its peers connect.
    assert cfg.bind_address("learner") == "tcp://gpu1:5002"


def test_bind_host_binds_every_interface_at_the_actor_port() -> None:
    cfg = parse_config({**PG, "network": {"transport": "tcp", "hosts": {"tool-0": "cpu1"}, "bind_host": "0.0.0.0",
                                          "addresses": {"generator-0": "tcp://gpu9:6001"}}})
    assert cfg.address("tool-0") == "tcp://cpu1:47104"
    assert cfg.bind_address("tool-0") == "tcp://0.0.0.0:47104"
    assert cfg.address("generator-0") == "tcp://gpu9:6001"  # an explicit address wins over hosts
    assert cfg.bind_address("generator-0") == "tcp://0.0.0.0:6001"
    ipc = parse_config({"run": {"run_dir": "/tmp/r"}, "network": {"bind_host": "0.0.0.0"}})
    assert ipc.bind_address("recorder") == ipc.address("recorder")


@pytest.mark.parametrize(
    "network, store, message",
    [
        ({"transport": "tcp", "hosts": {"generator-7": "gpu1"}}, PG["store"], "network.hosts names 'generator-7'"),
        ({"transport": "tcp", "addresses": {"tools": "tcp://a:1"}}, PG["store"], "network.addresses names 'tools'"),
        ({"hosts": {"learner": "gpu1"}}, PG["store"], 'network.hosts needs network.transport = "tcp"'),
        ({"transport": "tcp", "addresses": {"learner": "gpu1:5000"}}, PG["store"], "expected tcp://HOST:PORT"),
        ({"transport": "tcp", "hosts": {"learner": "gpu1"}}, {}, "store.url is empty but the actors run on several"),
    ],
)
def test_bad_network_config_is_refused_with_the_field_named(network, store, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_config({"network": network, "store": store})


def test_cluster_example_is_a_multi_host_postgresql_run() -> None:
    cfg = load_config(ROOT / "configs" / "cluster_example.toml")
    assert cfg.network.transport == "tcp" and len(cfg.run_hosts()) == 5
    assert cfg.store.url.startswith("postgresql")
    assert cfg.run.run_id and cfg.run.run_dir and cfg.model.path
    for name in cfg.actor_names():
        check_actor(name, cfg)
    # Per-host overrides on the command line, as docs/deploy.md shows.
    cfg = load_config(ROOT / "configs" / "cluster_example.toml", ['network.bind_host="10.0.0.7"'])
    assert cfg.bind_address("learner") == "tcp://10.0.0.7:47102"


@pytest.mark.parametrize(
    "run, model, names, message",
    [
        ({"run_id": "r"}, {"path": "/m"}, ["learner"], "run.run_dir is empty"),
        ({"run_id": "r", "run_dir": "/tmp/x"}, {}, ["generator-0"], "model.path is empty"),
        ({"run_dir": "/tmp/x"}, {"path": "/m"}, ["recorder"], "run.run_id is empty"),
        ({"run_id": "r", "run_dir": "/tmp/x"}, {"path": "/m"}, ["generator-3"], "not part of this run"),
        ({"run_id": "r", "run_dir": "/tmp/x"}, {"path": "/m"}, ["recorder", "recorder"], "named twice"),
    ],
)
def test_actor_started_alone_needs_what_the_launcher_would_have_made(tmp_path, run, model, names, message) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"run": run, "model": model}))
    with pytest.raises(ConfigError, match=message):
        start(names, str(path))


def _wait_for(predicate, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{p.args} exited with {p.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


# three processes that each import torch: ~10 s on a quiet machine, 50 s on a busy one
def test_one_command_runs_several_actors_and_stops_the_recorder_last(tmp_path) -> None:
    from store import EventLog, NotAnEventLogError

    run_dir = tmp_path / "run"
    cfg = {"run": {"run_id": f"multi-{uuid.uuid4().hex[:8]}", "run_dir": str(run_dir)},
           "network": {"transport": "tcp", "base_port": random.randrange(20000, 60000, 10)},
           "verifier": {"pool": {"workers": 1}}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "actors.main", "recorder", "verifier-0", "--config", str(path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    db = run_dir / "events.db"

    def started() -> set[str]:
        try:
            log = EventLog.open(str(db), readonly=True)
        except NotAnEventLogError:  # not created yet
            return set()
        try:
            return {r[0] for r in log.query("SELECT source FROM events WHERE type = 'ActorStarted'")[1]}
        finally:
            log.close()

    try:
        _wait_for(lambda: started() == {"recorder", "verifier-0"}, 300, "both actors to start", [proc])
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    log = EventLog.open(str(db), readonly=True)
    rows = log.query("SELECT source, position FROM events WHERE type = 'ActorStopped' ORDER BY position")[1]
    # Both stopped on the signal, and the recorder only after the verifier (it logged its stop).
    assert [r[0] for r in rows] == ["verifier-0", "recorder"], rows


# ---------------------------------------------------------------- the netns cluster


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _free_subnet() -> int:
    """A third octet x such that no interface here has an address in 10.231.x.0/24."""
    used = _ip("-4", "-o", "addr").stdout
    for x in random.sample(range(1, 255), 254):
        if f"10.231.{x}." not in used:
            return x
    raise RuntimeError("no free 10.231.x.0/24 subnet")


@pytest.fixture
def cluster():
    """Hosts ``gen``, ``tool``, ``learn``: network namespaces bridged to the root namespace (``head``).

    Yields {host: (namespace or None, address)}. Everything created is removed afterwards,
    processes left in the namespaces included, also when the test fails.
    """
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed (no `ip` command): cannot create network namespaces")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces and veth links needs root")
    tag = uuid.uuid4().hex[:5]
    bridge = f"rkb{tag}"
    namespaces: list[str] = []
    probe = _ip("netns", "add", f"rk{tag}-gen", check=False)
    if probe.returncode != 0:
        pytest.skip(f"`ip netns add` is not permitted here: {probe.stderr.strip()}")
    namespaces.append(f"rk{tag}-gen")
    try:
        x = _free_subnet()
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"10.231.{x}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        hosts = {"head": (None, f"10.231.{x}.1")}
        for i, host in enumerate(["gen", "tool", "learn"]):
            ns = f"rk{tag}-{host}"
            if ns not in namespaces:
                _ip("netns", "add", ns)
                namespaces.append(ns)
            outside, inside = f"rk{tag}h{i}", f"rk{tag}n{i}"
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", ns)
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", ns, "addr", "add", f"10.231.{x}.{2 + i}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")  # torch.distributed (learner) talks to 127.0.0.1
            hosts[host] = (ns, f"10.231.{x}.{2 + i}")
        yield hosts
    finally:
        for ns in namespaces:
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", ns, check=False)  # removes its veth ends, and so their peers
        _ip("link", "del", bridge, check=False)


@pytest.fixture
def pg_url():
    """A URL of a fresh schema in the local PostgreSQL's ``test`` database (dropped afterwards)."""
    for user in ("root", "postgres"):
        admin = PG_BASE.format(user=user)
        engine = sa.create_engine(admin, connect_args={"connect_timeout": 2})
        try:
            with engine.connect():
                break
        except sa.exc.OperationalError:
            engine.dispose()
    else:
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (database 'test', user root or postgres)")
    schema = f"reckon_multihost_{uuid.uuid4().hex[:12]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    yield f"{admin}?options=-csearch_path%3D{schema}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


CLUSTER_TOML = """
[run]
name = "multihost"
run_id = "{run_id}"
run_dir = "{run_dir}"
[model]
path = "{model}"
[data]
train = "{problems}"
eval = "{problems}"
[demo]
n_sft = 32
[sft]
epochs = 1.0
batch_size = 16
lr = 1e-7
warmup_ratio = 0.0
schedule = "constant"
[[stages]]
name = "rl1"
steps = 1
max_tokens = 192
max_turns = 3
prompts_per_step = 1
rollouts_per_prompt = 2
group_size = 2
lr = 1e-6
[generator]
count = 1
engine = {{ kind = "hf", max_running = 8, max_model_len = 512 }}
[tools]
count = 1
sandbox = {{ slots = 2, timeout_s = 5.0 }}
[verifier]
count = 1
pool = {{ workers = 1 }}
[learner]
zero_stage = 0
[eval]
at_stage_end = false
[store]
url = "{store}"
[network]
transport = "tcp"
host = "{head}"
base_port = {port}
hosts = {{ "generator-0" = "{gen}", "tool-0" = "{tool}", learner = "{learn}" }}
"""

#: Which host runs which actors: one ``reckon actor`` command each.
PLACEMENT = {"head": ["recorder", "scheduler", "verifier-0"], "gen": ["generator-0"], "tool": ["tool-0"],
             "learn": ["learner"]}


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _netns_inode(ns: str | None) -> int:
    return os.stat(f"/run/netns/{ns}" if ns else "/proc/self/ns/net").st_ino


@pytest.mark.postgres  # in the default suite: 42 s on a quiet 2-core box (skips where netns is not permitted)
@pytest.mark.timeout(1200)
def test_actors_on_separate_hosts_run_sft_and_rl_into_postgresql(cluster, pg_url, tmp_path) -> None:
    from tests._tiny import PROBLEM, build_tool_use_model

    model = build_tool_use_model(tmp_path / "model")  # writes a tool call, deterministically
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"problem": PROBLEM, "answer": "42"}) + "\n")
    run_id = f"multihost-{uuid.uuid4().hex[:10]}"
    config = tmp_path / "cluster.toml"
    config.write_text(CLUSTER_TOML.format(
        run_id=run_id, run_dir=tmp_path / "run", model=model, problems=problems, store=pg_url,
        port=random.randrange(20000, 60000, 10), **{h: addr for h, (_, addr) in cluster.items()},
    ))
    cfg = load_config(config)
    assert len(cfg.run_hosts()) == 4

    procs: dict[str, subprocess.Popen] = {}
    logs = tmp_path / "logs"
    logs.mkdir()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    engine = sa.create_engine(pg_url)

    def sql(query: str) -> list[tuple]:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(query), {"r": run_id})]

    def events(type_: str) -> list[tuple]:
        try:
            return sql(f"SELECT source, payload FROM events WHERE run_id = :r AND type = '{type_}' ORDER BY position")
        except sa.exc.ProgrammingError:  # the recorder has not created the tables yet
            return []

    def tails() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*.log")))

    try:
        # One command per host, the same config everywhere; the learner's host starts first.
        for host in ["learn", "gen", "tool", "head"]:
            ns = cluster[host][0]
            cmd = [sys.executable, "-m", "actors.cli", "actor", *PLACEMENT[host], "--config", str(config)]
            with open(logs / f"{host}.log", "wb") as out:
                procs[host] = subprocess.Popen((["ip", "netns", "exec", ns] if ns else []) + cmd, cwd=ROOT, env=env,
                                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        placed = {name: host for host, names in PLACEMENT.items() for name in names}
        try:
            _wait_for(lambda: {s for s, _ in events("ActorStarted")} == set(placed), 420, "every actor to start",
                      procs.values())
            # Each actor runs in its host's network namespace, and listens at that host's address.
            for source, payload in events("ActorStarted"):
                ns, addr = cluster[placed[source]]
                assert payload["address"] == cfg.address(source) and f"//{addr}:" in payload["address"]
                assert os.stat(f"/proc/{payload['pid']}/ns/net").st_ino == _netns_inode(ns), source
            _wait_for(lambda: events("RunCompleted"), 420, "RunCompleted", [p for h, p in procs.items() if h != "head"])
        except AssertionError as e:
            raise AssertionError(f"{e}\n{tails()}") from None
    finally:
        for host in ["gen", "tool", "learn", "head"]:  # the head (recorder) last
            p = procs.get(host)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
        for p in procs.values():
            for pid in [p.pid, *_descendants(p.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()

    count = lambda type_, source: sum(1 for s, _ in events(type_) if s == source)  # noqa: E731
    assert not events("ActorError"), events("ActorError")
    # Rollouts were generated on the gen host, their tool calls ran on the tool host, and
    # every step was trained on the learn host, which published weights the generator loaded.
    trajectories = count("TrajectoryCompleted", "generator-0")
    assert trajectories >= 2
    assert count("RewardAssigned", "verifier-0") == trajectories
    calls = sql("SELECT executor, status, stdout FROM tool_calls WHERE run_id = :r")
    assert calls and all(executor == "tool-0" for executor, _, _ in calls), calls
    assert any(status == "ok" and stdout.strip() == "42" for _, status, stdout in calls), calls
    assert count("ToolCallRequested", "generator-0") == count("ToolCallCompleted", "tool-0") == len(calls)
    steps = sql("SELECT kind, weights_version FROM train_steps WHERE run_id = :r ORDER BY step")
    assert [k for k, _ in steps][:2] == ["sft", "sft"] and count("TrainStepCompleted", "learner") == len(steps)
    assert count("WeightsPublished", "learner") == len(steps)
    assert all(p["path"].startswith(cfg.run.run_dir) for _, p in events("WeightsPublished"))
    # The generator served the RL rollouts with weights the learner published (shared run_dir).
    from store import EventLog

    log = EventLog.open(pg_url, readonly=True)
    versions = [int(env.payload.versions.max()) for _, env in log.read(run_id=run_id, types=["TrajectoryCompleted"])]
    log.close()
    assert versions and min(versions) >= 1, versions
    # Everyone stopped on the signal; the head's recorder logged its own stop last.
    stopped = [s for s, _ in events("ActorStopped")]
    assert sorted(stopped) == sorted(placed) and stopped[-1] == "recorder", stopped
    assert all(p.returncode == 0 for p in procs.values()), ({h: p.returncode for h, p in procs.items()}, tails())
    engine.dispose()
