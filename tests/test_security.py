"""Guarded endpoints and loads that cannot run code.

- The engine server with an API key (SGLang's --api-key): 401 without `Authorization:
  Bearer KEY`, the health checks open; HTTPEngine, the router and weight pushes send it;
  the launcher passes it as --api-key and keeps it out of logs; under Ray a server on a
  node address gets a random key (`run_api_key`).
- Checkpoint files, saved rollouts and weight payloads load as plain values: a pickle
  payload is refused before it runs.
- A Megatron torch_dist directory given to --load or --ref-load is refused by validation.
"""
from __future__ import annotations

import asyncio
import base64
import io
import os
import pickle
import random

import pytest
import requests
import torch
from test_serve import (REQUEST_TIMEOUT_S, START_STOP_TIMEOUT_S, ServerThread, greedy,
                        with_client)
from transformers import AutoTokenizer

from furlong import checkpoint
from furlong.config import ConfigError, load_config
from furlong.config.parser import parse_config
from furlong.engine.api_key import is_authorized, redacted, run_api_key
from furlong.engine.client import EngineHTTPError
from furlong.engine.launcher import ServerLauncher, ServerSpec, server_command
from furlong.engine.router import EngineRouter, RouterOptions
from furlong.engine.weights.wire import deserialize_ipc_tensors, deserialize_named_tensors

pytestmark = pytest.mark.timeout(600)
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny / "model")


@pytest.fixture(scope="module")
def guarded(tiny, tokenizer):
    """An engine server on the tiny model that requires KEY."""
    thread = ServerThread(tiny / "model", tokenizer, api_key=KEY)
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    return tokenizer("1+2=")["input_ids"]


def get(url: str, path: str, **headers) -> requests.Response:
    return requests.get(url + path, headers=headers, timeout=REQUEST_TIMEOUT_S)


def post(url: str, path: str, body: dict, **headers) -> requests.Response:
    return requests.post(url + path, json=body, headers=headers, timeout=REQUEST_TIMEOUT_S)


def router(url: str, api_key: str | None, **options) -> EngineRouter:
    return EngineRouter([url], RouterOptions(health_check_interval_s=None, api_key=api_key,
                                             weight_sync_backend="gloo", **options))


def run(engine, action):
    """`await action(engine)` in a fresh event loop, closing the engine after."""
    async def main():
        try:
            return await action(engine)
        finally:
            await engine.close()
    return asyncio.run(main())


# ---- the key on the server ------------------------------------------------------------------

def test_requests_without_the_key_get_401_as_from_sglang(guarded, prompt):
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 2}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Bearer {KEY}x"}, {"X-API-Key": KEY}):
        response = post(guarded.url, "/generate", body, **headers)
        assert (response.status_code, response.json()) == (401, {"error": "Unauthorized"})
    for path in ("/get_model_info", "/flush_cache"):
        assert get(guarded.url, path).status_code == 401
    assert post(guarded.url, "/update_weights_from_disk", {"model_path": "/x"}).status_code == 401
    ok = post(guarded.url, "/generate", body, Authorization=f"Bearer {KEY}")
    assert ok.status_code == 200 and len(ok.json()["output_ids"]) == 2


def test_health_checks_stay_open(guarded):
    assert get(guarded.url, "/health").status_code == 200
    assert get(guarded.url, "/health_generate").status_code == 200


def test_the_check_itself():
    assert is_authorized("/generate", None, None)  # no key: open
    assert is_authorized("/health", None, KEY) and is_authorized("/health_generate", None, KEY)
    assert is_authorized("/generate", f"Bearer {KEY}", KEY)
    assert not is_authorized("/generate", None, KEY)
    assert not is_authorized("/generate", f"bearer {KEY}", KEY)


def test_http_engine_sends_the_key_and_fails_clearly_without_it(guarded, prompt):
    output = with_client(guarded.url, lambda c: c.generate(prompt, greedy(3)), api_key=KEY)
    assert len(output.output_ids) == 3
    with pytest.raises(EngineHTTPError, match="401") as error:
        with_client(guarded.url, lambda c: c.generate(prompt, greedy(3)))
    assert error.value.status == 401
    assert with_client(guarded.url, lambda c: c.health(), api_key=KEY)


def test_the_router_sends_the_key_on_requests_and_weight_pushes(guarded, prompt):
    """Generation, a by-value weight push and a broadcast push (which makes the server
    join a process group over HTTP) all reach the guarded server through the router."""
    weights = {name: p.detach().clone() for name, p in
               guarded.server.engine.model.named_parameters()}

    async def use(engine: EngineRouter, version: int):
        output = await engine.generate(prompt, greedy(3))
        await engine.update_weights(weights.items(), version)
        return output

    for version, sync in enumerate(("auto", "broadcast"), start=2):
        output = run(router(guarded.url, KEY, weight_sync=sync), lambda engine: use(engine,
                                                                                 version))
        assert len(output.output_ids) == 3
        assert guarded.server.weight_version == version
    with pytest.raises(EngineHTTPError, match="401"):
        run(router(guarded.url, None), lambda engine: engine.generate(prompt, greedy(3)))


# ---- which key a run uses ---------------------------------------------------------------------

def test_a_server_on_a_node_address_gets_a_random_key_that_only_its_run_knows():
    first, second = run_api_key(None, "10.1.2.3"), run_api_key(None, "10.1.2.3")
    assert first and second and first != second and len(first) >= 32
    assert run_api_key(None, "0.0.0.0")  # every interface
    assert run_api_key(None, "127.0.0.1") is None and run_api_key(None, "localhost") is None
    assert run_api_key(None, "::1") is None
    assert run_api_key("mine", "10.1.2.3") == "mine" == run_api_key("mine", "127.0.0.1")


def test_sglang_api_key_is_the_users_key():
    assert parse_config(["--sglang-api-key", KEY]).sglang.api_key == KEY
    assert parse_config([]).sglang.api_key is None


def test_the_launcher_passes_the_key_as_api_key():
    sglang = parse_config(["--sglang-dtype", "float32"]).sglang
    argv = server_command(ServerSpec("/m", sglang, 7, api_key=KEY), 30000)
    assert argv[argv.index("--api-key") + 1] == KEY
    assert "--api-key" not in server_command(ServerSpec("/m", sglang, 7), 30000)
    given = parse_config(["--sglang-api-key", KEY]).sglang  # forwarded once, as given
    assert server_command(ServerSpec("/m", given, 7, api_key=KEY), 30000).count("--api-key") == 1
    assert KEY not in " ".join(redacted(argv))


def test_a_launched_server_requires_the_key_and_logs_do_not_show_it(tiny, prompt, tmp_path):
    sglang = parse_config(["--sglang-device", "cpu", "--sglang-dtype", "float32",
                           "--sglang-log-level", "warning"]).sglang
    spec = ServerSpec(str(tiny / "model"), sglang, 7, module="furlong.engine.serve",
                      api_key=KEY, startup_timeout_s=START_STOP_TIMEOUT_S, log_dir=str(tmp_path))
    launcher = ServerLauncher(spec, [None])
    try:
        url = launcher.start()[0]
        assert get(url, "/get_model_info").status_code == 401
        output = run(router(url, KEY), lambda engine: engine.generate(prompt, greedy(2)))
        assert len(output.output_ids) == 2
    finally:
        launcher.stop()
    logs = "".join(path.read_text() for path in tmp_path.glob("*.log"))
    assert "--api-key ***" in logs and KEY not in logs


# ---- loads that cannot run code -------------------------------------------------------------

class WritesAFile:
    """A pickle payload: unpickling it calls os.mkdir (any code could run instead)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_tampered_checkpoint_file_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "rng_rank0.pt"
    torch.save({"python": random.getstate(), "torch": WritesAFile(marker)}, path)
    with pytest.raises(ValueError, match=r"rng_rank0.pt: refused to load.*GLOBAL posix.mkdir"):
        checkpoint.load_state(path)
    assert not marker.exists()


def test_rng_state_resumes_exactly_through_a_safe_load(tmp_path):
    random.seed(5)
    torch.manual_seed(5)
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = ([random.random() for _ in range(3)], torch.rand(3))
    random.seed(0)
    torch.manual_seed(0)
    checkpoint.set_rng_state(checkpoint.load_state(tmp_path / "rng.pt"))
    got = ([random.random() for _ in range(3)], torch.rand(3))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])


def test_optimizer_state_and_rollout_data_load_as_plain_values(tmp_path):
    """What furlong writes to .pt files loads under weights_only: AdamW state with its
    schedule, and saved rollouts (Sample.to_dict rows and metrics)."""
    from furlong.sample import Sample
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": {"step_count": 4}},
               tmp_path / "trainer_rank0.pt")
    state = checkpoint.load_state(tmp_path / "trainer_rank0.pt")
    torch.testing.assert_close(state["optimizer"]["state"][0]["exp_avg"],
                               optimizer.state[model.weight]["exp_avg"])
    sample = Sample(prompt="1+2=", tokens=[1, 2, 3], response="3", response_length=1,
                    label="3", reward={"score": 1.0}, loss_mask=[1], rollout_log_probs=[-0.5],
                    metadata={"source": "x"})
    torch.save({"groups": [[sample.to_dict()]], "metrics": {"reward": 1.0}},
               tmp_path / "rollout.pt")
    loaded = checkpoint.load_state(tmp_path / "rollout.pt")
    assert Sample.from_dict(loaded["groups"][0][0]) == sample


def test_an_ipc_weight_payload_cannot_carry_code(tmp_path):
    """SGLang's CUDA IPC format is a pickle; only the globals of CUDA tensor handles load."""
    marker = tmp_path / "payload_ran"
    payload = base64.b64encode(pickle.dumps([("w", WritesAFile(marker))])).decode()
    with pytest.raises(ValueError, match="posix.mkdir is not part of a CUDA IPC"):
        deserialize_ipc_tensors(payload)
    assert not marker.exists()
    buffer = io.BytesIO()
    torch.save([("w", WritesAFile(marker))], buffer)
    with pytest.raises(ValueError, match="does not load"):
        deserialize_named_tensors(base64.b64encode(buffer.getvalue()).decode())
    assert not marker.exists()


def test_an_ipc_payload_to_a_consenting_server_is_refused_too(tiny, tokenizer, tmp_path):
    marker = tmp_path / "payload_ran"
    thread = ServerThread(tiny / "model", tokenizer, accept_ipc_weights=True)
    try:
        payload = base64.b64encode(pickle.dumps([("w", WritesAFile(marker))])).decode()
        response = post(thread.url, "/update_weights_from_tensor",
                        {"serialized_named_tensors": [payload]})
    finally:
        thread.stop()
    assert response.status_code == 400 and "CUDA IPC" in response.json()["error"]
    assert not marker.exists()


IPC_RECEIVER = """
import sys
from furlong.engine.weights.wire import deserialize_ipc_tensors
for name, tensor in deserialize_ipc_tensors(sys.stdin.read()):
    print(name, tensor.device.type, str(tensor.dtype), tensor.float().sum().item())
"""


@pytest.mark.gpu
def test_cuda_ipc_payloads_from_another_process_still_load():
    """The allowlist admits what torch writes for CUDA tensors (a process cannot open its
    own IPC handles, so the receiver is a child, as a colocated server is)."""
    import subprocess
    import sys

    from conftest import REPO
    from furlong.engine.weights.wire import serialize_named_tensors_ipc
    sent = [("a", torch.ones(4, 3, device="cuda")), ("b", torch.arange(5, device="cuda")),
            ("c", torch.ones(6, device="cuda", dtype=torch.bfloat16)[2:])]
    received = subprocess.run([sys.executable, "-c", IPC_RECEIVER],
                              input=serialize_named_tensors_ipc(sent), capture_output=True,
                              text=True, cwd=REPO, timeout=START_STOP_TIMEOUT_S)
    assert received.returncode == 0, received.stderr
    assert received.stdout.split("\n")[:3] == ["a cuda torch.float32 12.0",
                                               "b cuda torch.int64 10.0",
                                               "c cuda torch.bfloat16 4.0"]


# ---- Megatron checkpoints ---------------------------------------------------------------------

def megatron_save(root, layout: str):
    """A Megatron torch_dist checkpoint: SAVE/iter_N/{.metadata,__0_0.distcp} with the
    tracker beside, or the .metadata and .distcp files directly in `root`."""
    directory = root / "iter_0000010" if layout == "save" else root
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ".metadata").write_bytes(b"\x80")
    (directory / "__0_0.distcp").write_bytes(b"\x00")
    if layout == "save":
        (root / checkpoint.TRACKER).write_text("10\n")
    return root


@pytest.mark.parametrize("layout", ["save", "iteration"])
@pytest.mark.parametrize("flag, instead", [("--load", "--hf-checkpoint"),
                                           ("--ref-load", "--ref-load"),
                                           ("--opd-teacher-load", "--opd-teacher-load")])
def test_a_megatron_checkpoint_is_refused_by_validation(grpo_argv, tmp_path, flag, instead,
                                                        layout):
    path = megatron_save(tmp_path / "megatron", layout)
    with pytest.raises(ConfigError) as error:
        load_config([*grpo_argv, flag, str(path),
                     *(["--use-opd", "--opd-type", "megatron"] if "opd" in flag else [])])
    message = str(error.value)
    assert message.startswith(f"{flag} {path}")
    for words in ("Megatron distributed checkpoint", "HF", "convert_torch_dist_to_hf.py",
                  f"{instead} HF_DIR"):
        assert words in message


def test_furlong_and_hf_directories_pass_validation(grpo_argv, tiny, tmp_path):
    checkpoint.save_checkpoint(tmp_path / "save", 3, lambda d: (d / "model").mkdir())
    config, _ = load_config([*grpo_argv, "--load", str(tmp_path / "save"),
                             "--ref-load", str(tiny / "model")])
    assert config.ckpt.load == str(tmp_path / "save")
