"""ServerLauncher: the engine server processes of a run, from start to stop.

One server per engine: `python -m sglang.launch_server` with the exact argument list of
`furlong.config.sglang.launch_server_args` (model path, host, port, `--tp-size` from
`--rollout-num-gpus-per-engine`, seed, an `--nccl-port` of its own for an engine of
several GPUs, SGLang's LoRA flags under --lora-rank, then every `--sglang-X` flag as
`--X`, in order), on exactly the devices of
its placement (CUDA_VISIBLE_DEVICES, so TP rank 0 is device 0 of the server), with its
output in a log file.
A `ServerSpec.api_key` goes on the command line as SGLang's `--api-key`; logs and errors
show the command with the key hidden.
The module is configurable so that furlong's own server (`furlong.engine.serve`, which
accepts SGLang's launch flags) can stand in for SGLang, as the tests do.

`start` waits for every server's `/health` and, when one does not come up in time or
exits, raises an error holding the tail of its log. No server outlives the run: each runs
in a process group of its own (so SGLang's scheduler and detokenizer processes stop with
it), and every group is stopped by `stop`, at interpreter exit (atexit: normal exit, an
uncaught exception, Ctrl-C), on SIGTERM (made to raise SystemExit, so the same path
runs), and, on Linux, by the kernel when this process dies without running any of those
(the parent-death signal).
"""
from __future__ import annotations

import asyncio
import atexit
import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import requests

from furlong.config.groups import SglangArgs
from furlong.config.sglang import LoraServing, launch_server_args
from furlong.engine.api_key import redacted
from furlong.ports import free_ports

log = logging.getLogger(__name__)

SGLANG_SERVER = "sglang.launch_server"
BUILTIN_SERVER = "furlong.engine.serve"
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class ServerSpec:
    """What every engine server of a run is launched with.

    `mem_fraction_static` is added as `--mem-fraction-static` unless the passthrough
    flags already set it (the factory gives it when the trainer shares the devices).
    `memory_saver` (--offload-rollout) adds `--enable-memory-saver`: without it SGLang's
    /release_memory_occupation frees nothing. `api_key` is added as `--api-key` unless
    the passthrough flags set it (then it must be that value: the router sends it).
    """
    model_path: str
    sglang: SglangArgs
    seed: int
    host: str = "127.0.0.1"
    module: str = SGLANG_SERVER
    mem_fraction_static: float | None = None
    accept_ipc_weights: bool = False  # furlong's server only: a colocated trainer sends IPC
    memory_saver: bool = False
    api_key: str | None = None
    return_routed_experts: bool = False  # --use-rollout-routing-replay
    lora: LoraServing | None = None  # --lora-rank: the servers serve the run's adapter
    startup_timeout_s: float = 900.0
    log_dir: str | None = None


def server_command(spec: ServerSpec, port: int, nccl_port: int | None = None) -> list[str]:
    """The exact argv of the server listening on `port` (its TP ranks meeting on
    `nccl_port`, for an engine of several GPUs)."""
    argv = launch_server_args(spec.sglang, spec.model_path, spec.host, port, spec.seed,
                              return_routed_experts=spec.return_routed_experts,
                              nccl_port=nccl_port, lora=spec.lora)
    assert argv[1:3] == ["-m", SGLANG_SERVER], argv[:3]
    argv[2] = spec.module
    if (spec.mem_fraction_static is not None
            and spec.sglang.passthrough_value("mem-fraction-static") is None):
        argv += ["--mem-fraction-static", str(spec.mem_fraction_static)]
    if spec.memory_saver and spec.sglang.passthrough_value("enable-memory-saver") is None:
        argv.append("--enable-memory-saver")
    if spec.accept_ipc_weights and spec.module != SGLANG_SERVER:
        argv.append("--accept-ipc-weights")
    given = spec.sglang.passthrough_value("api-key")
    assert given is None or given == spec.api_key, "the clients must send the servers' key"
    if spec.api_key and given is None:
        argv += ["--api-key", spec.api_key]
    return argv


def server_env(devices: list[int] | None) -> dict[str, str]:
    """This process's environment, with CUDA_VISIBLE_DEVICES set to `devices` if given."""
    env = dict(os.environ)
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(device) for device in devices)
    return env


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGTERM the child when this thread dies (Linux).

    Servers are started from the thread that runs the event loop (the main thread), so
    the signal comes when the run is over whatever ended it, SIGKILL included.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the child
    set_parent_death_signal = 1  # PR_SET_PDEATHSIG
    return lambda: prctl(set_parent_death_signal, int(signal.SIGTERM), 0, 0, 0)


class ServerProcess:
    """One server process, leader of its own process group, output in `log_path`."""

    def __init__(self, command: list[str], env: dict[str, str], url: str, log_path: Path):
        self.command, self.url, self.log_path = command, url, log_path
        with open(log_path, "ab") as stream:
            stream.write(f"$ {' '.join(redacted(command))}\n".encode())
            stream.flush()
            self.process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env,
                                            start_new_session=True,
                                            preexec_fn=_parent_death_signal())

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, num_lines: int = LOG_TAIL_LINES) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-num_lines:])

    def wait_healthy(self, timeout_s: float) -> None:
        """Poll `/health` until it answers 200; RuntimeError with the log's tail if the
        process exits first or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(self._failure(f"exited with code {code} before answering "
                                                 "/health"))
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(self._failure(f"did not answer {self.url}/health within "
                                                 f"{timeout_s:.0f} s"))
            time.sleep(0.25)

    def _failure(self, what: str) -> str:
        return (f"engine server {self.url} {what}. Command: {' '.join(redacted(self.command))}\n"
                f"Last lines of {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL it after `timeout_s`; reaps the leader."""
        if self.process.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("engine server %s ignored SIGTERM for %.0f s; killing it",
                            self.url, timeout_s)
        # The leader is gone (or stuck); its workers must not outlive it.
        _signal_group(self.pid, signal.SIGKILL)
        self.process.wait()


def _signal_group(group_id: int, signum: int) -> None:
    try:
        os.killpg(group_id, signum)
    except ProcessLookupError:
        pass  # the whole group has exited


def _raise_system_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


class ServerLauncher:
    """One engine server per device group; `device_groups[i]` are the CUDA device ids of
    engine i (None: the devices this process sees, e.g. a CPU run).

    Each group must hold `--rollout-num-gpus-per-engine` devices. Logs go to
    `spec.log_dir` (default: a fresh temporary directory), one file per server start.
    """

    def __init__(self, spec: ServerSpec, device_groups: Sequence[list[int] | None]):
        if not device_groups:
            raise ValueError("ServerLauncher needs at least one device group (one per engine)")
        tp_size = spec.sglang.rollout_num_gpus_per_engine
        for devices in device_groups:
            if devices is not None and len(devices) != tp_size:
                raise ValueError(f"engine devices {devices}: each engine takes "
                                 f"--rollout-num-gpus-per-engine {tp_size} devices")
        self.spec = spec
        self.device_groups = list(device_groups)
        self.log_dir = Path(spec.log_dir or tempfile.mkdtemp(prefix="furlong-engines-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.servers: list[ServerProcess | None] = [None] * len(device_groups)
        self._num_starts = 0
        self._restore_sigterm: Callable[[], None] | None = None

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers if server is not None]

    def start(self) -> list[str]:
        """Start every server, wait until each answers /health; their URLs in order.
        On any failure every server is stopped before the error is raised."""
        atexit.register(self.stop)
        self._exit_on_sigterm()
        try:
            ports = free_ports(self.spec.host, len(self.servers) * self._ports_per_server)
            for index in range(len(self.servers)):
                first = index * self._ports_per_server
                self.servers[index] = self._spawn(
                    index, *ports[first:first + self._ports_per_server])
            for server in self.servers:
                server.wait_healthy(self.spec.startup_timeout_s)  # they boot in parallel
        except BaseException:
            self.stop()
            raise
        log.info("engine servers up: %s (logs in %s)", " ".join(self.urls), self.log_dir)
        return self.urls

    async def restart(self, index: int) -> str:
        """Stop server `index` (whatever its state), start it again on its devices and
        a new port, wait for /health; returns its new URL."""
        old = self.servers[index]
        if old is not None:
            await asyncio.to_thread(old.stop)
        # Popen here, on the event loop's thread, not a pool thread: see _parent_death_signal.
        # The other servers hold their ports, so a free one is not theirs.
        server = self.servers[index] = self._spawn(
            index, *free_ports(self.spec.host, self._ports_per_server))
        try:
            await asyncio.to_thread(server.wait_healthy, self.spec.startup_timeout_s)
        except BaseException:
            await asyncio.to_thread(server.stop)
            self.servers[index] = None
            raise
        return server.url

    def stop(self) -> None:
        """Stop every server (idempotent)."""
        for index, server in enumerate(self.servers):
            if server is not None:
                server.stop()
                self.servers[index] = None
        atexit.unregister(self.stop)
        if self._restore_sigterm is not None:
            self._restore_sigterm()
            self._restore_sigterm = None

    @property
    def _ports_per_server(self) -> int:
        """The HTTP port, and for an engine of several GPUs the NCCL port of its TP group."""
        return 2 if self.spec.sglang.rollout_num_gpus_per_engine > 1 else 1

    def _spawn(self, index: int, port: int, nccl_port: int | None = None) -> ServerProcess:
        self._num_starts += 1
        devices = self.device_groups[index]
        log_path = self.log_dir / f"engine{index}-start{self._num_starts}.log"
        server = ServerProcess(server_command(self.spec, port, nccl_port), server_env(devices),
                               f"http://{self.spec.host}:{port}", log_path)
        log.info("engine %d: pid %d, %s, devices %s, log %s", index, server.pid, server.url,
                 "inherited" if devices is None else devices, log_path)
        return server

    def _exit_on_sigterm(self) -> None:
        """SIGTERM raises SystemExit while servers run (unless someone else handles it),
        so `finally` blocks and atexit stop them; `stop` puts the default back."""
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
            signal.signal(signal.SIGTERM, _raise_system_exit)
            self._restore_sigterm = _restore_default_sigterm


def _restore_default_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():  # only it may set handlers
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
