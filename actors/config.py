"""The run configuration: one pydantic model, loaded from TOML, defaults declared once.

Each component owns the model of its own section (the sandbox's, the verifier's, the
learner's, the engine's); this module composes them with the run-level sections and the
recipe (a list of stages). A bad value raises :class:`ConfigError` naming the field, the
value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from actors.dispatch import DispatchConfig
from actors.engines import EngineConfig
from tools_sandbox import SandboxConfig
from training.data import DataConfig
from training.demo_tasks import DemoConfig
from training.learner import LearnerConfig
from training.rewards import VerifierConfig
from training.roc import RocConfig


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message names the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSection(Section):
    name: str = "run"  # run name; the run directory is runs_dir/name-<timestamp>
    runs_dir: str = "runs"  # parent directory of run directories
    run_dir: str = ""  # explicit run directory (overrides runs_dir/name); set by the launcher
    run_id: str = ""  # set by the launcher; actors started alone read it from the run's config.json
    seed: int = 0  # seeds data order, sampling and initialization
    log_level: str = "info"  # structlog level for actor logs


class ModelSection(Section):
    path: str = ""  # a local Hugging Face model directory; empty = build the tiny demo model
    tiny_layers: int = 4  # tiny model: transformer layers
    tiny_hidden: int = 128  # tiny model: hidden size
    tiny_heads: int = 4  # tiny model: attention heads (head_dim = hidden / heads)
    tiny_kv_heads: int = 2  # tiny model: key/value heads
    tiny_vocab: int = 512  # tiny model: BPE vocabulary size (before added tokens)
    tiny_pretrain_steps: int = Field(0, ge=0)  # tiny model: copy-corpus pretraining steps, making it a base model (0 = random init)


class SFTSection(Section):
    enabled: bool = True  # run the non-reasoning SFT stage before RL
    data: str = "builtin:demo"  # demonstrations: builtin:demo, or a JSONL with a "messages" list per line
    epochs: float = 3.0  # passes over the demonstrations (paper: 3)
    batch_size: int = 32  # sequences per optimizer step (paper: 128)
    lr: float = 5e-6  # peak learning rate (paper: 5e-6)
    warmup_ratio: float = 0.04  # fraction of steps warming up (paper: 4%)
    schedule: Literal["cosine", "constant"] = "cosine"  # lr schedule after warmup


class StageSection(Section):
    name: str  # stage name, e.g. "rl1"
    steps: int = Field(gt=0)  # optimizer steps in this stage
    max_tokens: int = Field(gt=0)  # token budget per trajectory (model + tool tokens)
    max_turns: int = Field(gt=0)  # assistant turns per trajectory
    prompts_per_step: int = Field(gt=0)  # problems per step (paper: 512)
    rollouts_per_prompt: int = Field(ge=2)  # 2G, oversampled (paper: 32)
    group_size: int = Field(ge=2)  # G, kept after RoC (paper: 16)
    lr: float = Field(gt=0)  # learning rate (paper: 1e-6)
    optimizer_reset: bool = False  # reset the optimizer at the start (paper: stage 3)
    hard_filter_k: int = 0  # keep only problems the current policy fails k/k (0 = off; paper stage 3: 8)

    @model_validator(mode="after")
    def _check(self) -> StageSection:
        if self.group_size > self.rollouts_per_prompt:
            raise ValueError(
                f"group_size ({self.group_size}) must be <= rollouts_per_prompt ({self.rollouts_per_prompt})"
            )
        return self


class RolloutSection(Section):
    temperature: float = Field(default=1.0, ge=0)  # sampling temperature for training rollouts (paper: 1.0)
    staleness: int = Field(default=0, ge=0, le=1)  # weight versions generation may run ahead (0 = on-policy; 1 needs learner.old_logprobs = "generator")
    roc: RocConfig = Field(default_factory=RocConfig)  # Resample-on-Correct down-sampling (mode none = plain GRPO)
    dispatch: DispatchConfig = Field(default_factory=DispatchConfig)  # where and when rollouts start


class GeneratorSection(Section):
    count: int = Field(default=1, ge=1)  # generator processes
    engine: EngineConfig = Field(default_factory=EngineConfig)  # inference engine settings
    capacity_interval_s: float = 0.5  # cadence of CapacityReported
    max_tool_calls_in_flight: int = Field(default=32, ge=1)  # per generator: further calls wait for one to end
    # What rollouts in flight do when new weights are published (docs/generator.md):
    # continue = reload between two engine steps, running sequences go on with the new
    # weights (their KV recomputed; each token tagged with its version); finish = new
    # rollouts wait, those in flight finish on the old weights, then reload (every rollout
    # sampled by one version); abort = rollouts in flight end as "aborted" (the scheduler
    # places them again), then reload.
    on_weights: Literal["continue", "finish", "abort"] = "continue"


class ToolsSection(Section):
    count: int = Field(default=1, ge=1)  # tool executor processes
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)  # sandbox pool settings
    max_output_chars: int = 1024  # tool output shown to the model, truncated


class VerifierSection(Section):
    count: int = Field(default=1, ge=1)  # verifier processes
    pool: VerifierConfig = Field(default_factory=VerifierConfig)  # worker pool settings


class EvalSection(Section):
    k: int = 4  # samples per problem for avg pass@1 (paper: 16)
    temperature: float = 0.6  # eval temperature (paper: 0.6)
    max_tokens: int = 256  # eval token budget (paper: 30K)
    max_turns: int = 4  # eval turn budget (paper: 30)
    max_problems: int = 0  # cap per eval set (0 = all)
    at_stage_end: bool = True  # evaluate after SFT and after every RL stage


class StoreSection(Section):
    url: str = ""  # SQLAlchemy URL of the event log; empty = sqlite in the run directory
    batch_max: int = 500  # recorder: events per transaction at most
    flush_s: float = 0.05  # recorder: longest wait before a partial batch is written


class NetworkSection(Section):
    transport: Literal["ipc", "tcp"] = "ipc"  # ipc sockets under the run dir, or tcp
    host: str = "127.0.0.1"  # tcp: default host for actors without an explicit address
    base_port: int = 47100  # tcp: first port; actors take consecutive ports
    hosts: dict[str, str] = Field(default_factory=dict)  # tcp: actor name -> its host (port still base_port + index)
    addresses: dict[str, str] = Field(default_factory=dict)  # actor name -> zmq address override (wins over hosts)
    bind_host: str = ""  # tcp: interface inboxes bind on ("" = the actor's own host, "*" = all interfaces)
    curve: bool = False  # CurveZMQ encryption + authentication (keys in run_dir/keys)
    heartbeat_s: float = 2.0  # heartbeat period
    resend_after_s: float = 5.0  # resend unacknowledged events after this long


class LauncherSection(Section):
    max_restarts: int = 5  # restarts per actor before the run is failed
    restart_backoff_s: float = 1.0  # first restart delay; doubles each time
    ready_timeout_s: float = 300.0  # seconds for all actors to report started
    # OpenMP/torch threads per actor process (OMP_NUM_THREADS, MKL_NUM_THREADS), unless already
    # set in the environment; 0 = leave it to the libraries. Many actors share a CPU host's cores:
    # with one spinning OpenMP thread per core each, a vLLM CPU step took 300-430 ms instead of
    # 4-6 ms on 2 shared cores (docs/generator.md).
    cpu_threads: int = Field(1, ge=0)
    # The learner's threads (0 = cpu_threads). At staleness 0 the learner trains while the
    # generators wait for its weights, so it may take every core: an SFT step of the demo took
    # 0.25 s on 2 threads against ~0.5 s on 1.
    learner_threads: int = Field(0, ge=0)


class Config(Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataConfig = Field(default_factory=DataConfig)  # training and held-out problems
    demo: DemoConfig = Field(default_factory=DemoConfig)  # the builtin synthetic demo data
    sft: SFTSection = Field(default_factory=SFTSection)
    stages: list[StageSection] = Field(default_factory=list)
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    generator: GeneratorSection = Field(default_factory=GeneratorSection)
    tools: ToolsSection = Field(default_factory=ToolsSection)
    verifier: VerifierSection = Field(default_factory=VerifierSection)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    eval: EvalSection = Field(default_factory=EvalSection)
    store: StoreSection = Field(default_factory=StoreSection)
    network: NetworkSection = Field(default_factory=NetworkSection)
    launcher: LauncherSection = Field(default_factory=LauncherSection)

    # ---------------------------------------------------------------- derived

    def actor_names(self) -> list[str]:
        """Every actor instance of the run, in start order (the recorder first)."""
        return (
            ["recorder", "scheduler", "learner"]
            + [f"verifier-{i}" for i in range(self.verifier.count)]
            + [f"tool-{i}" for i in range(self.tools.count)]
            + [f"generator-{i}" for i in range(self.generator.count)]
        )

    def generators(self) -> list[str]:
        return [f"generator-{i}" for i in range(self.generator.count)]

    def tool_executors(self) -> list[str]:
        return [f"tool-{i}" for i in range(self.tools.count)]

    def verifiers(self) -> list[str]:
        return [f"verifier-{i}" for i in range(self.verifier.count)]

    def address(self, name: str) -> str:
        """The zmq address of actor ``name``'s inbox: where its peers connect."""
        net = self.network
        if name in net.addresses:
            return net.addresses[name]
        if net.transport == "tcp":
            return f"tcp://{net.hosts.get(name, net.host)}:{net.base_port + self.actor_names().index(name)}"
        return f"ipc://{socket_dir(self.run.run_dir)}/{name}"

    def bind_address(self, name: str) -> str:
        """The zmq address actor ``name``'s inbox binds: its :meth:`address`, on ``network.bind_host``
        when that is set (a host name that resolves to a loopback or NAT address cannot be bound)."""
        address = self.address(name)
        if not (self.network.bind_host and address.startswith("tcp://")):
            return address
        port = address.rsplit(":", 1)[1]
        return f"tcp://{self.network.bind_host}:{port}"

    def run_hosts(self) -> set[str]:
        """The distinct hosts the run's actors are on (tcp); {"local"} for ipc."""
        if self.network.transport != "tcp" and not self.network.addresses:
            return {"local"}
        hosts = set()
        for name in self.actor_names():
            address = self.address(name)
            hosts.add(address.split("://", 1)[1].rsplit(":", 1)[0] if address.startswith("tcp://") else "local")
        return hosts

    @model_validator(mode="after")
    def _check_network(self) -> Config:
        net, names = self.network, self.actor_names()
        for field in ("hosts", "addresses"):
            unknown = [k for k in getattr(net, field) if k not in names]
            if unknown:
                raise ValueError(
                    f"network.{field} names {', '.join(map(repr, unknown))}, not actors of this run "
                    f"(they are {', '.join(names)})"
                )
        if net.hosts and net.transport != "tcp":
            raise ValueError('network.hosts needs network.transport = "tcp"')
        for k, a in net.addresses.items():
            if not a.startswith(("tcp://", "ipc://")) or (a.startswith("tcp://") and not a.rsplit(":", 1)[1].isdigit()):
                raise ValueError(f"network.addresses[{k!r}] = {a!r}: expected tcp://HOST:PORT or ipc://PATH")
        if not self.store.url and len(self.run_hosts()) > 1:
            raise ValueError(
                f"store.url is empty but the actors run on several hosts ({', '.join(sorted(self.run_hosts()))}): "
                "set it to a PostgreSQL URL the recorder's host reaches, e.g. postgresql+psycopg://USER@DBHOST/DB"
            )
        return self

    @model_validator(mode="after")
    def _check_staleness(self) -> Config:
        if self.rollout.staleness and self.learner.old_logprobs != "generator":
            raise ValueError(
                'rollout.staleness = 1 needs learner.old_logprobs = "generator": rollouts of weights one version '
                "behind need the generator's own logprobs in the PPO ratio (recomputed ones would make it 1)"
            )
        return self

    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{Path(self.run.run_dir, 'events.db').resolve()}"


def role_of(name: str) -> str:
    """Actor instance name -> role ("generator-3" -> "generator", "tool-0" -> "tool_executor")."""
    base = name.rsplit("-", 1)[0] if name[-1:].isdigit() and "-" in name else name
    return {"tool": "tool_executor"}.get(base, base)


def socket_dir(run_dir: str) -> str:
    """Directory for ipc sockets; unix socket paths are limited to ~107 bytes."""
    path = Path(run_dir, "sock").resolve()
    if len(str(path)) > 80:
        path = Path("/tmp", "reckon-" + hashlib.sha1(str(path).encode()).hexdigest()[:12])
    return str(path)


def _format_error(e: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        value = err.get("input")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; configs/demo.toml and actors/config.py list the fields)"
        if not err["loc"]:  # a check across sections: the message names the fields
            lines.append(f"  {msg.removeprefix('Value error, ')}")
            continue
        lines.append(f"  {loc} = {value!r:.60}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict, source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a TOML config; ``overrides`` are ``section.field=value`` (TOML values)."""
    path = Path(path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid {path.suffix.lstrip('.').upper() or 'TOML'}: {e}") from None
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # bare strings
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[leaf] = value
    return parse_config(data, str(path))


def actor_environment(cfg: Config, restarts: int = 0, base: dict[str, str] | None = None, name: str = "") -> dict[str, str]:
    """The environment actor ``name`` starts with: ``base`` (default: this process's), the
    restart count, and thread limits from ``launcher.cpu_threads`` (the learner's from
    ``launcher.learner_threads`` when set) where the user set none."""
    env = dict(os.environ if base is None else base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["RECKON_RESTARTS"] = str(restarts)
    threads = cfg.launcher.cpu_threads
    if role_of(name) == "learner" and cfg.launcher.learner_threads:
        threads = cfg.launcher.learner_threads
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env.setdefault("MKL_NUM_THREADS", str(threads))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # vLLM CPU otherwise pins one thread per core
    return env
