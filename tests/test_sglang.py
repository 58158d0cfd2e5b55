"""SGLang as the rollout engine, on CPU: launch commands, server lifecycle, the router.

No SGLang here: a fake server module (records its argv and environment, answers /health)
checks the launcher's processes, and furlong's own server (`python -m
furlong.engine.serve`, which speaks SGLang's HTTP API and accepts its launch flags) runs
the whole path in SGLang's place: balancing, weight sync, abort, memory, engine failure
and external servers. Every test checks that no server process outlives it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from transformers import AutoTokenizer

from conftest import REPO
from furlong.config import ConfigError, load_config
from furlong.config.parser import parse_config
from furlong.config.sglang import launch_server_args
from furlong.engine.base import SamplingParams
from furlong.engine.client import HTTPEngine
from furlong.engine import factory
from furlong.engine.factory import EngineOptions, create_engine, engine_options
from furlong.engine.launcher import (BUILTIN_SERVER, ServerLauncher, ServerProcess, ServerSpec,
                                     server_command, server_env)
from furlong.engine.router import EngineRouter, EngineState, RouterOptions
from furlong.model.loading import load_hf_model
from furlong.ports import free_port

# A hang guard only: every wait below is on a condition, with generous deadlines.
pytestmark = pytest.mark.timeout(600)
CPU = torch.device("cpu")

FAKE_SERVER = '''
"""A stand-in for sglang.launch_server: records argv and devices, answers every GET."""
import json, os, signal, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

port = int(sys.argv[sys.argv.index("--port") + 1])
worker = subprocess.Popen(["sleep", "600"])  # as SGLang's scheduler process
record = {"argv": sys.argv[1:], "devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
          "pid": os.getpid(), "worker": worker.pid}
with open(os.path.join(os.environ["FAKE_RECORDS"], f"{port}.json"), "w") as stream:
    json.dump(record, stream)
mode = os.environ.get("FAKE_MODE", "serve")
if mode == "exit":
    print("boom: the model does not fit", flush=True)
    sys.exit(3)
# SGLang stops its process tree on SIGTERM; "stubborn" ignores it.
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn"
              else lambda *_: os.killpg(0, signal.SIGKILL))
if mode == "silent":
    time.sleep(600)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


COUNTING_SERVER = '''
"""furlong's server, whose engine appends one line per call it serves to
$ENGINE_CALLS/<port>.log: "<method>" for memory and cache calls, "start <seed>" when a
generation reaches the engine and "done <seed> <finish_reason>" when it returns."""
import os, sys
from furlong.engine.server import cli

log_path = os.path.join(os.environ["ENGINE_CALLS"],
                        sys.argv[sys.argv.index("--port") + 1] + ".log")


def record(line):
    with open(log_path, "a") as stream:
        stream.write(line + "\\n")


def counted(engine, name):
    method = getattr(engine, name)

    async def call(*args, **kwargs):
        record(name)
        return await method(*args, **kwargs)
    setattr(engine, name, call)


def build_engine(args, tokenizer, build=cli.build_engine):
    engine = build(args, tokenizer)
    for name in ("release_memory", "resume_memory", "flush_cache"):
        counted(engine, name)
    generate = engine.generate

    async def counted_generate(input_ids, params):
        record(f"start {params.sampling_seed}")
        output = await generate(input_ids, params)
        record(f"done {params.sampling_seed} {output.finish_reason}")
        return output
    engine.generate = counted_generate
    return engine


cli.build_engine = build_engine
cli.main()
'''
COUNTING_SERVER_MODULE = "counting_serve"


# ---- helpers --------------------------------------------------------------------------------

def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids, timeout_s: float = 60.0) -> list[int]:
    """The pids still running after `timeout_s` (an empty list is what tests want)."""
    deadline = time.monotonic() + timeout_s
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if running(pid)]


@pytest.fixture
def fake(tmp_path, monkeypatch) -> Path:
    """The fake server as module `fake_sglang`; its records land in the returned folder."""
    (tmp_path / "fake_sglang.py").write_text(FAKE_SERVER)
    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO)]))
    monkeypatch.setenv("FAKE_RECORDS", str(records))
    return records


def counting_servers(directory: Path, monkeypatch) -> Path:
    """Servers started from now on (module COUNTING_SERVER_MODULE) record their engine's
    calls in the returned folder; read them with `engine_calls`."""
    (directory / f"{COUNTING_SERVER_MODULE}.py").write_text(COUNTING_SERVER)
    calls = directory / "engine_calls"
    calls.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(directory), str(REPO)]))
    monkeypatch.setenv("ENGINE_CALLS", str(calls))
    return calls


def engine_calls(calls: Path, url: str) -> list[str]:
    """The lines the engine of the server at `url` recorded (see COUNTING_SERVER)."""
    path = calls / f"{url.rsplit(':', 1)[1]}.log"
    return path.read_text().splitlines() if path.exists() else []


async def wait_until(condition, timeout_s: float = 120.0) -> None:
    """Poll `condition()` until true; fail after `timeout_s` (a hang guard, not a bound)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {condition}"
        await asyncio.sleep(0.02)


def fake_spec(argv: list[str] = (), **kwargs) -> ServerSpec:
    return ServerSpec("/models/qwen", parse_config(list(argv)).sglang, 42,
                      module="fake_sglang", **kwargs)


def records_of(directory: Path) -> dict[int, dict]:
    return {int(path.stem): json.loads(path.read_text()) for path in directory.glob("*.json")}


def prompt_ids(tokenizer, text: str) -> list[int]:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(chat, add_special_tokens=False)["input_ids"]


def sampled(seed: int, max_new_tokens: int = 12, **extra) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, sampling_seed=seed,
                          **extra)


def run(coroutine_fn, *args):
    return asyncio.run(coroutine_fn(*args))


# ---- the launch command ---------------------------------------------------------------------

BASE = ["--model-path", "/models/qwen", "--host", "127.0.0.1", "--port", "30001"]


@pytest.mark.parametrize("argv, extra, tail", [
    ([], {}, ["--tp-size", "1", "--random-seed", "42"]),
    (["--rollout-num-gpus-per-engine", "2", "--sglang-mem-fraction-static", "0.7",
      "--sglang-enable-dp-attention", "--sglang-cuda-graph-bs", "1", "2", "4"], {},
     ["--tp-size", "2", "--random-seed", "42", "--mem-fraction-static", "0.7",
      "--enable-dp-attention", "--cuda-graph-bs", "1", "2", "4"]),
    # Colocated: the factory's fraction is added, unless the flags give one.
    (["--sglang-log-level", "warning"], {"mem_fraction_static": 0.3},
     ["--tp-size", "1", "--random-seed", "42", "--log-level", "warning",
      "--mem-fraction-static", "0.3"]),
    (["--sglang-mem-fraction-static=0.5"], {"mem_fraction_static": 0.3},
     ["--tp-size", "1", "--random-seed", "42", "--mem-fraction-static", "0.5"]),
    # Miles' router flags name the router, not the servers: never forwarded.
    (["--sglang-router-ip", "10.0.0.1", "--sglang-router-port", "3000",
      "--sglang-router-policy", "round_robin", "--sglang-log-level", "info"], {},
     ["--tp-size", "1", "--random-seed", "42", "--log-level", "info"]),
    (["--sglang-context-length", "4096"], {"module": BUILTIN_SERVER},
     ["--tp-size", "1", "--random-seed", "42", "--context-length", "4096"]),
    # --offload-rollout: SGLang's release frees nothing without the memory saver.
    ([], {"memory_saver": True},
     ["--tp-size", "1", "--random-seed", "42", "--enable-memory-saver"]),
    (["--sglang-enable-memory-saver"], {"memory_saver": True},
     ["--tp-size", "1", "--random-seed", "42", "--enable-memory-saver"]),
])
def test_server_command_is_exact(argv, extra, tail):
    spec = ServerSpec("/models/qwen", parse_config(argv).sglang, 42, **extra)
    module = extra.get("module", "sglang.launch_server")
    assert server_command(spec, 30001) == [sys.executable, "-m", module, *BASE, *tail]


def test_routing_replay_starts_servers_that_return_routed_experts():
    """--use-rollout-routing-replay: SGLang returns routes only with this flag, once."""
    sglang = parse_config([]).sglang
    argv = launch_server_args(sglang, "/m", "127.0.0.1", 30001, 42, return_routed_experts=True)
    assert argv[-1] == "--enable-return-routed-experts"
    assert "--enable-return-routed-experts" not in launch_server_args(sglang, "/m", "h", 1, 2)
    given = parse_config(["--sglang-enable-return-routed-experts"]).sglang
    assert launch_server_args(given, "/m", "h", 1, 2, return_routed_experts=True).count(
        "--enable-return-routed-experts") == 1


def test_server_env_sets_only_the_devices_of_the_engine():
    assert server_env([2, 3])["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert server_env(None).get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")


# ---- the launcher ---------------------------------------------------------------------------

def test_each_server_runs_that_command_on_its_devices_and_stops_with_its_workers(fake):
    spec = fake_spec(["--rollout-num-gpus-per-engine", "2", "--sglang-log-level", "info"])
    launcher = ServerLauncher(spec, [[0, 1], [2, 3]])
    try:
        urls = launcher.start()
        records = records_of(fake)
        assert sorted(records) == sorted(int(url.rsplit(":", 1)[1]) for url in urls)
        for url, devices in zip(urls, ["0,1", "2,3"], strict=True):
            port = int(url.rsplit(":", 1)[1])
            argv = records[port]["argv"]
            nccl_port = int(argv[argv.index("--nccl-port") + 1])  # engines of 2 GPUs
            assert argv == server_command(spec, port, nccl_port)[3:]
            assert records[port]["devices"] == devices
        pids = [pid for r in records.values() for pid in (r["pid"], r["worker"])]
        assert all(running(pid) for pid in pids)
    finally:
        launcher.stop()
    assert wait_gone(pids) == []
    assert launcher.urls == []


@pytest.mark.parametrize("mode, message", [("exit", "exited with code 3"),
                                           ("silent", "did not answer")])
def test_a_server_that_does_not_come_up_fails_with_its_log(fake, monkeypatch, mode, message):
    monkeypatch.setenv("FAKE_MODE", mode)
    # "exit" fails as soon as the process exits, whatever the deadline; "silent" waits
    # out the whole deadline, which must leave the fake time to start and write its record.
    launcher = ServerLauncher(fake_spec(startup_timeout_s=600 if mode == "exit" else 15),
                              [None, None])
    with pytest.raises(RuntimeError, match=message) as error:
        launcher.start()
    assert "fake_sglang --model-path /models/qwen" in str(error.value)
    if mode == "exit":
        assert "boom: the model does not fit" in str(error.value)  # the log's tail
    pids = [pid for r in records_of(fake).values() for pid in (r["pid"], r["worker"])]
    assert pids and wait_gone(pids) == []


def test_device_groups_must_match_the_engine_size():
    with pytest.raises(ValueError, match="--rollout-num-gpus-per-engine 2"):
        ServerLauncher(fake_spec(["--rollout-num-gpus-per-engine", "2"]), [[0, 1], [2]])


def test_stop_kills_a_server_that_ignores_sigterm_and_its_workers(fake, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_MODE", "stubborn")
    port = free_port()
    server = ServerProcess(server_command(fake_spec(), port), server_env(None),
                           f"http://127.0.0.1:{port}", tmp_path / "server.log")
    server.wait_healthy(120)
    record = records_of(fake)[port]
    server.stop(timeout_s=0.5)
    assert wait_gone([record["pid"], record["worker"]]) == []


LAUNCHING_SCRIPT = """
import sys, time
from furlong.config.groups import SglangArgs
from furlong.engine.launcher import ServerLauncher, ServerSpec
launcher = ServerLauncher(ServerSpec("/m", SglangArgs(), 0, module="fake_sglang"), [None, None])
launcher.start()
print("up", flush=True)
sys.stdin.readline()
if sys.argv[1] == "raise":
    raise RuntimeError("the run crashed")
time.sleep(600)
"""


def default_sigint() -> None:
    """SIGINT as in a terminal. A process started in the background by a non-interactive
    shell (CI runners, `make test &`) inherits SIGINT ignored, and Python then installs
    no KeyboardInterrupt handler: the signal was dropped and the test waited in vain
    (the 'process.wait(30) timed out' failure)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("how", ["raise", "SIGINT", "SIGTERM", "SIGKILL"])
def test_no_server_outlives_the_process_that_launched_it(fake, how):
    """A crash (uncaught exception), Ctrl-C, SIGTERM and even SIGKILL of the launching
    process stop its servers and their workers."""
    process = subprocess.Popen([sys.executable, "-c", LAUNCHING_SCRIPT, how], cwd=REPO,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        assert process.stdout.readline() == "up\n", process.stderr.read()
        pids = [pid for r in records_of(fake).values() for pid in (r["pid"], r["worker"])]
        assert len(pids) == 4 and all(running(pid) for pid in pids)
        if how == "raise":
            process.stdin.write("go\n")
            process.stdin.flush()
        else:
            process.send_signal(getattr(signal, how))
        process.wait(300)  # a hang guard: it exits at once unless the signal is lost
    finally:
        process.kill()
        process.communicate()
    assert wait_gone(pids) == []


# ---- built-in servers standing in for SGLang ------------------------------------------------

SERVER_FLAGS = ["--sglang-device", "cpu", "--sglang-dtype", "float32",
                "--sglang-context-length", "1024", "--sglang-log-level", "warning"]


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny / "model")


@pytest.fixture(scope="module")
def servers(tiny, tmp_path_factory):
    """Two furlong servers launched with SGLang's argv; `servers.calls` holds what their
    engines recorded (see COUNTING_SERVER)."""
    spec = ServerSpec(str(tiny / "model"), parse_config(SERVER_FLAGS).sglang, 7,
                      module=COUNTING_SERVER_MODULE)
    launcher = ServerLauncher(spec, [None, None])
    with pytest.MonkeyPatch.context() as monkeypatch:
        launcher.calls = counting_servers(tmp_path_factory.mktemp("servers"), monkeypatch)
        launcher.start()
    pids = [server.pid for server in launcher.servers]
    try:
        yield launcher
    finally:
        launcher.stop()
    assert wait_gone(pids) == []


def perturbed_weights(tiny, seed: int) -> dict[str, torch.Tensor]:
    """The tiny model's weights plus noise of one standard deviation per matrix."""
    generator = torch.Generator().manual_seed(seed)
    return {name: p.detach() + torch.randn(p.shape, generator=generator) * p.std()
            if p.dim() > 1 else p.detach()
            for name, p in load_hf_model(str(tiny / "model")).named_parameters()}


def group_requests(tokenizer, num_groups: int, group_size: int, max_new_tokens: int = 12):
    """(group, ids, params): a group shares its prompt; every sample has its own seed."""
    return [(g, prompt_ids(tokenizer, f"{g * 7}+{g * 3}="), sampled(100 * g + i, max_new_tokens))
            for g in range(num_groups) for i in range(group_size)]


async def direct(url: str, requests_) -> list:
    client = HTTPEngine(url)
    try:
        return await asyncio.gather(*(client.generate(ids, params) for _, ids, params in requests_))
    finally:
        await client.close()


def quiet_router(urls, **options) -> EngineRouter:
    return EngineRouter(urls, RouterOptions(health_check_interval_s=None, **options))


def test_the_router_balances_and_keeps_each_group_on_one_engine(servers, tokenizer):
    requests_ = group_requests(tokenizer, num_groups=8, group_size=4)

    async def main():
        router = quiet_router(servers.urls)
        try:
            routed = await asyncio.gather(*(router.generate(ids, p) for _, ids, p in requests_))
        finally:
            await router.close()
        return routed, await direct(servers.urls[1], requests_)

    routed, on_one_engine = run(main)
    engine_of_group: dict[int, set] = {}
    for (group, _, _), output in zip(requests_, routed, strict=True):
        engine_of_group.setdefault(group, set()).add(output.meta["engine_url"])
    assert all(len(urls) == 1 for urls in engine_of_group.values())
    assert {url for urls in engine_of_group.values() for url in urls} == set(servers.urls)
    # The engine does not matter: the request's seed makes the tokens.
    assert [o.output_ids for o in routed] == [o.output_ids for o in on_one_engine]


@pytest.mark.parametrize("weight_sync", ["auto", "broadcast"])
def test_weights_reach_every_engine_equally(servers, tokenizer, tiny, weight_sync):
    requests_ = group_requests(tokenizer, num_groups=3, group_size=2)
    weights = perturbed_weights(tiny, seed=1 if weight_sync == "auto" else 2)
    name = "model.layers.1.mlp.up_proj.weight"

    async def main():
        before = await direct(servers.urls[0], requests_)
        router = quiet_router(servers.urls, weight_sync=weight_sync, bucket_bytes=64 << 10)
        try:
            await router.update_weights(weights.items(), version=5)
        finally:
            await router.close()
        after = [await direct(url, requests_) for url in servers.urls]
        rows = [requests.post(url + "/get_weights_by_name", timeout=10,
                              json={"name": name, "truncate_size": 2}).json()
                for url in servers.urls]
        await restore(servers.urls, tiny)
        return before, after, rows

    before, (after0, after1), rows = run(main)
    assert [o.output_ids for o in after0] == [o.output_ids for o in after1]
    assert [o.output_ids for o in after0] != [o.output_ids for o in before]
    assert {o.weight_version for o in after0 + after1} == {5}
    for served in rows:
        torch.testing.assert_close(torch.tensor(served), weights[name][:2], rtol=0, atol=0)


async def restore(urls, tiny) -> None:
    """The boot checkpoint and version 0 on every server, for the tests that follow."""
    for url in urls:
        client = HTTPEngine(url)
        await client.update_weights_from_disk(tiny / "model", version=0)
        await client.close()


def test_abort_reaches_every_engine_and_the_requests_waiting_in_the_router(servers, tokenizer):
    long = [(g, prompt_ids(tokenizer, f"{g}+{g}="), sampled(5000 + g, 900, ignore_eos=True))
            for g in range(8)]
    starts = {f"start {params.sampling_seed}" for _, _, params in long}

    def started() -> int:
        return sum(line in starts for url in servers.urls
                   for line in engine_calls(servers.calls, url))

    async def main():
        router = quiet_router(servers.urls, max_concurrency=2)
        try:
            running_ = [asyncio.ensure_future(router.generate(ids, p)) for _, ids, p in long]
            # Abort once the engines run 2 requests each (not merely once the router
            # sent them: an abort that overtakes a request on the wire would miss it).
            await wait_until(lambda: started() == 4)
            await router.abort_all()
            aborted = await asyncio.wait_for(asyncio.gather(*running_), 300)
            after = await router.generate(long[0][1], sampled(1, 4, ignore_eos=True))
        finally:
            await router.close()
        return aborted, after

    aborted, after = run(main)
    assert {o.finish_reason for o in aborted} == {"abort"}
    assert sum(len(o.output_ids) == 0 for o in aborted) >= 4  # never sent: 2 per engine ran
    assert all(len(o.output_ids) < 900 for o in aborted)
    assert (after.finish_reason, len(after.output_ids)) == ("length", 4)


def test_memory_cache_and_health_calls_reach_every_engine(servers, tokenizer):
    """Counted where they land: each engine records every release, resume and flush."""
    ids = prompt_ids(tokenizer, "1+2=")
    methods = ("release_memory", "resume_memory", "flush_cache")

    def counts() -> list[dict[str, int]]:
        return [{m: engine_calls(servers.calls, url).count(m) for m in methods}
                for url in servers.urls]
    before_counts = counts()

    async def main():
        router = quiet_router(servers.urls)
        try:
            before = await router.generate(ids, sampled(3))
            await router.release_memory()
            await router.resume_memory()
            await router.flush_cache()
            return before, await router.generate(ids, sampled(3)), await router.health()
        finally:
            await router.close()

    before, after, healthy = run(main)
    assert healthy and after.output_ids == before.output_ids
    for old, new in zip(before_counts, counts(), strict=True):
        assert {m: new[m] - old[m] for m in methods} == dict.fromkeys(methods, 1)


def test_an_engine_that_stops_answering_is_dropped_and_its_requests_finish_elsewhere(
        servers, tokenizer, caplog):
    """External servers are not restarted: the hung one leaves, the other serves all."""
    requests_ = group_requests(tokenizer, num_groups=6, group_size=2, max_new_tokens=24)
    hung = servers.servers[1]

    async def main():
        # The hung engine fails its check whatever the timeout; a long one keeps a slow
        # (loaded) but live engine from failing it too.
        router = EngineRouter(servers.urls, RouterOptions(health_check_interval_s=0.3,
                                                          health_timeout_s=30.0))
        try:
            running_ = [asyncio.ensure_future(router.generate(ids, p)) for _, ids, p in requests_]
            while not router.engines[1].in_flight:
                await asyncio.sleep(0.005)
            os.kill(hung.pid, signal.SIGSTOP)
            outputs = await asyncio.wait_for(asyncio.gather(*running_), 300)
            return outputs, [slot.state for slot in router.engines]
        finally:
            os.kill(hung.pid, signal.SIGCONT)
            await router.close()

    with caplog.at_level(logging.WARNING, "furlong.engine.router"):
        outputs, states = run(main)
    assert states == [EngineState.SERVING, EngineState.DROPPED]
    assert "/health_generate failed" in caplog.text and "re-sending" in caplog.text
    assert all(o.finish_reason in ("stop", "length") for o in outputs)
    assert [o.output_ids for o in outputs] == [o.output_ids for o in run(direct, servers.urls[0],
                                                                          requests_)]


def test_external_servers_are_used_as_they_are_and_left_running(servers, tokenizer):
    addresses = tuple(url.removeprefix("http://") for url in servers.urls)
    engine = create_engine("unused", None, CPU, torch.float32,
                           EngineOptions(external_engine_addrs=addresses))
    requests_ = group_requests(tokenizer, num_groups=4, group_size=2)

    async def main():
        try:
            return await asyncio.gather(*(engine.generate(ids, p) for _, ids, p in requests_))
        finally:
            await engine.close()

    outputs = run(main)
    assert {o.meta["engine_url"] for o in outputs} == set(servers.urls)
    assert all(requests.get(url + "/health", timeout=10).status_code == 200
               for url in servers.urls)
    with pytest.raises(ValueError, match="--rollout-external-engine-addrs: http://127.0.0.1:1/"):
        create_engine("unused", None, CPU, torch.float32,
                      EngineOptions(external_engine_addrs=("127.0.0.1:1",)))


# ---- a launched engine dies mid-rollout ----------------------------------------------------

def served_weights(url: str, name: str) -> torch.Tensor:
    """The first two rows of parameter `name` as the engine at `url` holds it."""
    return torch.tensor(requests.post(url + "/get_weights_by_name", timeout=60,
                                      json={"name": name, "truncate_size": 2}).json())


CHECKED_WEIGHT = "model.layers.1.mlp.up_proj.weight"


def test_a_killed_engine_is_restarted_and_nothing_is_lost_or_counted_twice(tiny, tokenizer,
                                                                           tmp_path, caplog,
                                                                           monkeypatch):
    """Engine 1 is killed mid-rollout: its requests finish on engine 0, each generated
    there once (counted by the engines); the restarted engine serves again once it has
    the next weights, and holds those (not its boot checkpoint's)."""
    calls = counting_servers(tmp_path, monkeypatch)
    # The kill is seen by the requests on the wire; no periodic /health_generate may also
    # take out the surviving engine when a loaded machine makes it slow to answer (the
    # server itself fails that check after 20 s busy with the rollout's requests).
    router_options = factory._router_options
    monkeypatch.setattr(factory, "_router_options", lambda *args: dataclasses.replace(
        router_options(*args), health_check_interval_s=None))
    options = EngineOptions(backend="sglang", server_module=COUNTING_SERVER_MODULE, seed=7,
                            sglang=parse_config(SERVER_FLAGS[:4]).sglang,
                            device_groups=[[0], [1]])
    router = create_engine(str(tiny / "model"), tokenizer, CPU, torch.float32, options)
    launcher = router.launcher
    first_pids = [server.pid for server in launcher.servers]
    first_urls = list(launcher.urls)
    requests_ = group_requests(tokenizer, num_groups=12, group_size=4, max_new_tokens=24)
    pushed = [perturbed_weights(tiny, seed) for seed in (3, 4)]  # versions 1 and 2

    async def main():
        try:
            await router.update_weights(pushed[0].items(), version=1)
            running_ = [asyncio.ensure_future(router.generate(ids, p)) for _, ids, p in requests_]
            while not router.engines[1].in_flight:
                await asyncio.sleep(0.005)
            # At once: a request of engine 1 is on the wire, so its death is seen (a
            # pause here let a fast machine finish them all first, and none failed).
            os.killpg(first_pids[1], signal.SIGKILL)
            outputs = await asyncio.wait_for(asyncio.gather(*running_), 300)
            done = {url: done_seeds(engine_calls(calls, url)) for url in first_urls}
            outstanding = [slot.outstanding for slot in router.engines]
            reference = await direct(router.engines[0].url, requests_)
            while router.engines[1].state is EngineState.RECOVERING:
                await asyncio.sleep(0.05)
            waiting = router.engines[1].state
            await router.update_weights(pushed[1].items(), version=2)
            restarted = served_weights(router.engines[1].url, CHECKED_WEIGHT)
            after = await asyncio.gather(*(router.generate(ids, p) for _, ids, p in requests_[:8]))
            return outputs, done, outstanding, reference, waiting, restarted, after
        finally:
            await router.close()

    with caplog.at_level(logging.WARNING, "furlong.engine.router"):
        outputs, done, outstanding, reference, waiting, restarted, after = run(main)
    assert [o.output_ids for o in outputs] == [o.output_ids for o in reference]
    assert "re-sending" in caplog.text and "engine 1 restarted" in caplog.text
    # Counted by the engines: engine 0 generated each request at most once (its own and
    # those re-sent from engine 1), and every request was generated by one of the two;
    # the one an output names generated it. The router's load counts are back to 0.
    survivor, killed = (done[url] for url in first_urls)
    assert all(count == 1 for count in survivor.values()), survivor
    seeds = [params.sampling_seed for _, _, params in requests_]
    assert set(seeds) <= set(survivor) | set(killed)
    for seed, output in zip(seeds, outputs, strict=True):
        assert seed in done[output.meta["engine_url"]]
    assert outstanding == [0, 0]
    assert waiting is EngineState.AWAITING_WEIGHTS  # booted from the checkpoint
    torch.testing.assert_close(restarted, pushed[1][CHECKED_WEIGHT][:2], rtol=0, atol=0)
    assert len({o.meta["engine_url"] for o in after}) == 2  # the restarted one serves again
    assert {o.weight_version for o in after} == {2}
    assert wait_gone(first_pids + [server.pid for server in launcher.servers if server]) == []
    assert launcher.urls == []


def done_seeds(lines: list[str]) -> dict[int, int]:
    """sampling_seed -> how many times the engine generated it to the end (not aborted).

    Seedless generations are the router's /health_generate checks (how many depends on
    how long the test runs), not requests of the test, and are left out."""
    counts: dict[int, int] = {}
    for line in lines:
        words = line.split()
        if words[0] == "done" and words[2] != "abort" and words[1] != "None":
            counts[int(words[1])] = counts.get(int(words[1]), 0) + 1
    return counts


def test_a_lone_engine_that_dies_gets_the_weights_again_and_serves(tiny, tokenizer,
                                                                   monkeypatch):
    """One engine, killed mid-rollout: restarted from the checkpoint it cannot serve
    until it has the weights, so the router asks its weight source for them; every
    request then returns what it would have (same seeds, same weights: pushed ones
    that differ from the checkpoint, read back from the restarted engine)."""
    # The kill is seen by the requests on the wire; no periodic /health_generate may also
    # take out the restarted engine when a loaded machine makes it slow to answer (the
    # server itself fails that check after 20 s busy with the rollout's requests).
    router_options = factory._router_options
    monkeypatch.setattr(factory, "_router_options", lambda *args: dataclasses.replace(
        router_options(*args), health_check_interval_s=None))
    options = EngineOptions(backend="sglang", server_module=BUILTIN_SERVER, seed=7,
                            sglang=parse_config(SERVER_FLAGS[:4]).sglang,
                            device_groups=[[0]])
    router = create_engine(str(tiny / "model"), tokenizer, CPU, torch.float32, options)
    first_pid = router.launcher.servers[0].pid
    requests_ = group_requests(tokenizer, num_groups=4, group_size=4, max_new_tokens=24)
    weights = perturbed_weights(tiny, seed=5)
    pushes = []

    async def weight_source():
        pushes.append(router.weight_version)
        await router.update_weights(weights.items(), version=1)

    router.weight_source = weight_source

    async def main():
        try:
            await router.update_weights(weights.items(), version=1)
            reference = await asyncio.gather(*(router.generate(ids, p) for _, ids, p in requests_))
            running = [asyncio.ensure_future(router.generate(ids, p)) for _, ids, p in requests_]
            while not router.engines[0].in_flight:
                await asyncio.sleep(0.005)
            os.killpg(first_pid, signal.SIGKILL)
            outputs = await asyncio.wait_for(asyncio.gather(*running), 300)
            return reference, outputs, served_weights(router.engines[0].url, CHECKED_WEIGHT)
        finally:
            await router.close()

    reference, outputs, restarted = run(main)
    assert pushes == [1]
    assert [o.output_ids for o in outputs] == [o.output_ids for o in reference]
    assert {o.weight_version for o in outputs} == {1}
    assert router.engines[0].restarts == 1
    torch.testing.assert_close(restarted, weights[CHECKED_WEIGHT][:2], rtol=0, atol=0)


# ---- flags and the factory -------------------------------------------------------------------

def test_which_engine_runs(monkeypatch):
    """auto: SGLang where importable on a GPU; else the fast engine on a GPU for the
    families it supports, the HF engine otherwise; an explicit choice is kept."""
    from transformers import GPT2Config, LlamaConfig, Qwen3Config

    from furlong.engine import factory
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    qwen3, llama, gpt2 = Qwen3Config(), LlamaConfig(), GPT2Config()
    assert factory.in_process_backend("auto", cuda, qwen3) == "fast"
    assert factory.in_process_backend("auto", cuda, llama) == "fast"
    assert factory.in_process_backend("auto", cuda, gpt2) == "hf"
    assert factory.in_process_backend("auto", cpu, qwen3) == "hf"
    assert factory.in_process_backend("hf", cuda, qwen3) == "hf"
    assert factory.in_process_backend("fast", cpu, qwen3) == "fast"
    sliding = Qwen3Config(use_sliding_window=True, sliding_window=128)
    assert factory.in_process_backend("auto", cuda, sliding) == "hf"
    options = EngineOptions()
    monkeypatch.setattr(factory.importlib.util, "find_spec", lambda name: None)
    assert factory.resolve_backend(options, cuda) == "auto"
    monkeypatch.setattr(factory.importlib.util, "find_spec", lambda name: object())
    assert factory.resolve_backend(options, cuda) == "sglang"
    assert factory.resolve_backend(options, cpu) == "auto"
    assert factory.resolve_backend(EngineOptions(backend="fast"), cuda) == "fast"


def config_error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    return str(info.value)


def test_external_flags_are_checked(grpo_argv):
    message = config_error(grpo_argv + ["--rollout-external"])
    assert "--rollout-external needs --rollout-external-engine-addrs" in message
    assert "--rollout-external" in config_error(
        grpo_argv + ["--rollout-external-engine-addrs", "h:1"])
    assert "expected HOST:PORT" in config_error(
        grpo_argv + ["--rollout-external", "--rollout-external-engine-addrs", "h:1", "h"])
    assert "expected HOST:PORT" in config_error(
        grpo_argv + ["--rollout-external", "--rollout-external-engine-addrs", "h:99999"])
    assert "--rollout-backend hf" in config_error(
        grpo_argv + ["--rollout-external", "--rollout-external-engine-addrs", "h:1",
                     "--rollout-backend", "hf"])
    config, _ = load_config(grpo_argv + ["--rollout-external", "--rollout-external-engine-addrs",
                                         "10.0.0.5:30000", "[::1]:30001"])
    options = engine_options(config, shares_device=False, device_groups=[[0], [1]])
    assert options.external_engine_addrs == ("10.0.0.5:30000", "[::1]:30001")
    assert options.device_groups == [[0], [1]]


def test_sglang_backend_errors_name_the_fix(grpo_argv, monkeypatch):
    config, _ = load_config(grpo_argv + ["--rollout-backend", "sglang"])
    options = engine_options(config, shares_device=True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ValueError, match="needs the sglang package"):
        create_engine("m", None, CPU, torch.float32, options)

