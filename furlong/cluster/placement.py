"""Placement: how many trainer ranks and engines a run has, and on which devices.

A pure function of the cluster flags and the devices this machine has:
  - no cluster flag given: one process (the first GPU, else the CPU), no Ray;
  - otherwise `--actor-num-nodes x --actor-num-gpus-per-node` trainer ranks and
    engines of `--rollout-num-gpus-per-engine` devices each: sharing the trainer's
    devices with `--colocate`, else on `--rollout-num-gpus` devices of their own.
Colocated (Miles' standard layout), trainer rank i sits on device i, and engine e takes
devices e*N .. e*N+N-1 (N = `--rollout-num-gpus-per-engine`, its tensor-parallel size;
an engine never straddles two nodes): the trainer rank on each of them feeds that TP
rank's weights (`engine_feeders`). Apart, engines follow the trainer's devices.
On a machine without GPUs the same layout is made of CPU processes (gloo), which is
how multi-process runs are tested without GPUs; there furlong's server stands in for a
colocated engine of N devices as its TP rank 0. The trainer ranks form a dp x cp x tp
mesh (`describe_mesh`); layouts the model or the ranks cannot take are refused here,
before Ray starts and under --dry-run, naming the flag and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass

from furlong.config import Config, ConfigError
from furlong.config.model_check import read_hf_config
from furlong.train.context_parallel import check_heads
from furlong.train.expert_parallel import check_expert_layout, groups_beyond_data_parallel
from furlong.train.pipeline_layout import PipelineLayout, check_pipeline_layout

CLUSTER_FLAGS = ("cluster.actor_num_nodes", "cluster.actor_num_gpus_per_node",
                 "cluster.rollout_num_gpus", "cluster.colocate")


@dataclass(frozen=True)
class Placement:
    trainer_ranks: int
    num_engines: int
    devices_per_engine: int
    device: str           # "cuda" or "cpu"
    colocate: bool
    in_process: bool      # one process, no Ray

    @property
    def engine_devices(self) -> list[list[int]]:
        """Device indices of each engine, in its TP order (colocated engines reuse the
        trainer's; with several nodes, node k holds devices k*G .. k*G+G-1)."""
        first = 0 if self.colocate else self.trainer_ranks
        return [list(range(first + e * self.devices_per_engine,
                           first + (e + 1) * self.devices_per_engine))
                for e in range(self.num_engines)]

    @property
    def engine_feeders(self) -> list[list[int]]:
        """Colocated: the trainer ranks whose payloads make each engine's weight request,
        in its TP order (rank i sits on device i, so these are its devices). Apart: none
        (rank 0 broadcasts)."""
        return self.engine_devices if self.colocate else []

    def engine_bundle(self, engine: int) -> int:
        """The placement-group bundle of engine `engine`'s actor: colocated, that of its
        first device (trainer rank e*N's); apart, the engine's own bundle."""
        if self.colocate:
            return engine * self.devices_per_engine
        return self.trainer_ranks + engine

    def describe(self) -> str:
        if self.in_process:
            return f"one process on {self.device}: trainer and engine together"
        where = "sharing the trainer's devices" if self.colocate else "on devices of their own"
        return (f"{self.trainer_ranks} trainer ranks and {self.num_engines} engine(s) of "
                f"{self.devices_per_engine} {self.device} device(s) each, {where} (Ray)")

    def describe_engines(self) -> str:
        """Which devices each engine takes and who feeds it weights (--dry-run)."""
        groups = [",".join(map(str, devices)) for devices in self.engine_devices]
        if len(groups) > 8:
            groups = [*groups[:4], "...", *groups[-2:]]
        feed = ("each TP rank's weights from the trainer rank on its device, one request "
                "per engine" if self.colocate else "weights broadcast from trainer rank 0")
        return (f"engines: {self.num_engines} x tp {self.devices_per_engine} on devices "
                f"[{'] ['.join(groups)}]; {feed}")


def cluster_flags_given(config: Config) -> bool:
    """Whether the command line lays out trainer ranks and engines (then Ray runs them).
    `--rollout-num-gpus-per-engine` sizes the engines but places nothing: Miles' scripts
    give it, often with its default of 1, whatever the layout."""
    return any(config.given(flag) for flag in CLUSTER_FLAGS)


def plan_placement(config: Config, gpus_available: int) -> Placement:
    c, per_engine = config.cluster, config.sglang.rollout_num_gpus_per_engine
    device = "cuda" if gpus_available else "cpu"
    if not cluster_flags_given(config):
        _check_one_process(config)
        return Placement(1, 1, 1, device, True, True)
    ranks = c.actor_num_nodes * c.actor_num_gpus_per_node
    engine_devices = ranks if c.colocate else (c.rollout_num_gpus or 0)
    if engine_devices % per_engine:
        raise ConfigError(f"--rollout-num-gpus-per-engine {per_engine} does not divide the "
                          f"{engine_devices} engine devices (--rollout-num-gpus, or the trainer's "
                          "with --colocate)")
    engines = engine_devices // per_engine
    if c.colocate and c.actor_num_gpus_per_node % per_engine:
        raise ConfigError(f"--rollout-num-gpus-per-engine {per_engine} does not divide "
                          f"--actor-num-gpus-per-node {c.actor_num_gpus_per_node}: with "
                          "--colocate an engine takes the GPUs of trainer ranks on one node; "
                          f"give a divisor of {c.actor_num_gpus_per_node}")
    if per_engine > c.num_gpus_per_node and not config.rollout.rollout_external:
        # An engine placed here is one Ray bundle, so one node's devices (running servers
        # are not placed).
        raise ConfigError(f"--rollout-num-gpus-per-engine {per_engine} is more than "
                          f"--num-gpus-per-node {c.num_gpus_per_node}: an engine's GPUs must be "
                          "on one node; lower --rollout-num-gpus-per-engine (or raise "
                          "--num-gpus-per-node if the nodes have more GPUs)")
    if engines == 0 and not (config.debug.debug_train_only or config.rollout.rollout_external):
        raise ConfigError("no engine devices: give --rollout-num-gpus N or --colocate (or "
                          "--rollout-external with running servers)")
    needed = ranks if c.colocate else ranks + engine_devices
    if gpus_available and c.actor_num_nodes == 1 and needed > gpus_available:
        raise ConfigError(f"the run needs {needed} GPUs ({ranks} trainer"
                          f"{'' if c.colocate else f' + {engine_devices} engine'}) and this "
                          f"machine has {gpus_available}: lower --actor-num-gpus-per-node / "
                          "--rollout-num-gpus, or use --colocate")
    _check_trainer_split(config, ranks)
    single = ranks == 1 and c.colocate and engines == 1 and c.actor_num_nodes == 1
    return Placement(ranks, engines, per_engine, device, c.colocate, single)


def _check_one_process(config: Config) -> None:
    per_engine = config.sglang.rollout_num_gpus_per_engine
    if per_engine > 1 and not config.rollout.rollout_external:
        raise ConfigError(f"--rollout-num-gpus-per-engine {per_engine} without cluster flags: "
                          "one process runs its engine on one device; give "
                          "--actor-num-gpus-per-node with --colocate or --rollout-num-gpus to "
                          "place engines of several GPUs, or drop the flag")
    for flag, size in (("--expert-model-parallel-size", config.perf.expert_model_parallel_size),
                       ("--context-parallel-size", config.perf.context_parallel_size),
                       ("--pipeline-model-parallel-size",
                        config.perf.pipeline_model_parallel_size)):
        if size > 1:
            raise ConfigError(f"{flag} {size} needs {size} trainer ranks, and without cluster "
                              "flags the trainer is one process: give --actor-num-gpus-per-node "
                              "(and --colocate or --rollout-num-gpus)")


def describe_mesh(config: Config, trainer_ranks: int) -> str:
    """The trainer's mesh as --dry-run prints it: dp x cp x tp x pp, and where the
    expert groups come from."""
    p = config.perf
    tp, cp, ep = p.tensor_model_parallel_size, p.context_parallel_size, \
        p.expert_model_parallel_size
    pp = p.pipeline_model_parallel_size
    dp = trainer_ranks // (tp * cp * pp)
    source = "dp" if not groups_beyond_data_parallel(ep, dp) \
        else "dp x cp x tp" if cp > 1 else "dp x tp"
    return (f"mesh: dp {dp} x cp {cp} x tp {tp} x pp {pp} "
            f"(ep {ep}, carved from {source}) = {trainer_ranks} trainer rank(s), one device each")


def _check_trainer_split(config: Config, ranks: int) -> None:
    """Tensor-parallel groups tile the ranks; each step's samples split over the rest;
    expert groups tile those, or the stage's (dp, cp, tp) grid (train/expert_parallel.py)."""
    p = config.perf
    tp, cp, ep = p.tensor_model_parallel_size, p.context_parallel_size, \
        p.expert_model_parallel_size
    pp = p.pipeline_model_parallel_size
    if pp > 1:
        _check_pipeline(config, ranks)
        ranks //= pp  # one stage's ranks
    if ranks % tp:
        raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide the {ranks} "
                          "trainer ranks (--actor-num-nodes x --actor-num-gpus-per-node)")
    if ranks % (tp * cp):
        raise ConfigError(f"--context-parallel-size {cp} x --tensor-model-parallel-size {tp} "
                          f"does not divide the {ranks} trainer ranks (--actor-num-nodes x "
                          "--actor-num-gpus-per-node): the trainer is dp x cp x tp ranks; "
                          f"give a multiple of {tp * cp} ranks or smaller sizes")
    dp, batch = ranks // (tp * cp), config.rollout.global_batch_size
    shares = f"({ranks} trainer ranks / tensor-parallel {tp} / context-parallel {cp})"
    if ep > 1:
        try:
            check_expert_layout(ep, dp, tp, p.sequence_parallel, cp)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if batch % dp:
        raise ConfigError(f"--global-batch-size {batch} does not split over {dp} data-parallel "
                          f"ranks {shares}: make it a multiple of {dp}")
    if cp > 1:
        _check_context_parallel(config)


def _check_pipeline(config: Config, ranks: int) -> None:
    """Pipeline stages (train/pipeline_parallel.py) tile the ranks and split the layers as
    train/pipeline_layout.py can."""
    p, directory = config.perf, config.ckpt.hf_checkpoint
    pp = p.pipeline_model_parallel_size
    if ranks % pp:
        raise ConfigError(f"--pipeline-model-parallel-size {pp} does not divide the {ranks} "
                          "trainer ranks (--actor-num-nodes x --actor-num-gpus-per-node): the "
                          f"trainer is pp x dp x cp x tp ranks; give a multiple of {pp} ranks or "
                          "fewer stages")
    hf = read_hf_config(directory)
    try:
        check_pipeline_layout(hf["num_hidden_layers"], PipelineLayout.from_perf(p))
    except ValueError as error:
        raise ConfigError(f"{error} ({directory}/config.json)") from None


def _check_context_parallel(config: Config) -> None:
    """Context parallelism splits each tensor-parallel rank's heads (train/context_parallel.py)."""
    cp, directory = config.perf.context_parallel_size, config.ckpt.hf_checkpoint
    hf = read_hf_config(directory)
    try:
        check_heads(hf["num_attention_heads"], config.perf.tensor_model_parallel_size, cp)
    except ValueError as error:
        raise ConfigError(f"{error} ({directory}/config.json)") from None


def check_engine_devices(placement: Placement, backend: str) -> None:
    """Engines of several devices run on SGLang (the one backend that spans devices);
    without GPUs, furlong's server stands in for a colocated one (as its TP rank 0, fed
    one payload per TP rank). Checked before Ray starts, and by `--dry-run` with the
    backend `auto` picks on the machine it runs on."""
    per_engine = placement.devices_per_engine
    if per_engine == 1 or backend == "sglang":
        return
    if placement.device == "cpu" and placement.colocate:
        return
    where = ("" if placement.device == "cuda" else
             "; without GPUs only colocated engines of several devices have a stand-in")
    raise ConfigError(f"--rollout-num-gpus-per-engine {per_engine} with --rollout-backend "
                      f"{backend}: the built-in engine runs on one device; use "
                      "--rollout-backend sglang (on GPUs, with sglang installed) for "
                      f"tensor-parallel engines, or one GPU per engine{where}")
