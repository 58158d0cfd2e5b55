"""Sending a LoRA adapter to engine servers: the whole adapter, one load per server.

`send_adapter(lora_name, config, named_tensors, servers, version, transport)` does, on
every server at the same time: POST /unload_lora_adapter {lora_name} (a 400, nothing
loaded under that name yet, is fine: the load that follows says what is wrong), the load,
then /update_weight_version when there is a `version`. The base weights are never sent.
The transports (ADAPTER_TRANSPORTS):

- "ipc": /load_lora_adapter_from_tensors with CUDA IPC handles of a dict name -> tensor,
  SGLang's format (what its LoRA loader iterates), for servers on the sender's GPU;
  furlong's servers started there read it too.
- "value": the same endpoint with furlong's by-value payload (a torch.save archive, sent
  once whatever the engine's TP size): furlong's servers only, on any host.
- "disk": the adapter written in PEFT's format (model/lora_files.py) to a new directory
  under `adapter_dir`, then /load_lora_adapter {lora_name, lora_path}: any server, SGLang's
  included, that can read that directory; servers on other hosts need it on a disk they
  share with the sender. Only the latest push's directory is kept.

The adapter keeps its name from push to push: it is unloaded and loaded again under the
same name, as Miles does, rather than loaded under a new name per version. Every holder of
the name (AdapterEngine, the router front, hooks that kept `args.engine`) then samples the
newest adapter with nothing to switch, and no old versions pile up on the servers. A
reported SGLang issue (a reload of the same name serving the old weights) concerns
releases that keyed their adapter memory by name; current SGLang gives each load a new
`lora_id` and keys its GPU slots by it, so the reload cannot hit the old slot. No request
names the adapter between the unload and the load: pushes happen while nothing generates.

Blocking (HTTP through `requests`): callers run it on a worker thread.
"""
from __future__ import annotations

import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import torch

from furlong.engine.http_error import EngineHTTPError
from furlong.engine.weights.send import Servers, first_failure, post
from furlong.engine.weights.wire import (lora_path_body, lora_tensors_body,
                                         serialize_named_tensors, serialize_tensor_dict_ipc,
                                         weight_version_body)
from furlong.model.lora_files import write_adapter

ADAPTER_TRANSPORTS = ("ipc", "value", "disk")
UNLOADED_STATUS = 400  # SGLang's and furlong's answer to unloading a name not loaded


def send_adapter(lora_name: str, config: dict,
                 named_tensors: Iterable[tuple[str, torch.Tensor]], servers: Servers,
                 version: int | None, transport: str, adapter_dir: str | Path | None = None,
                 timeout_s: float | None = 600.0) -> None:
    """Load the adapter `lora_name` (`config`: its adapter_config.json keys, PEFT's tensor
    names) on every server of `servers` by `transport`; "disk" writes it under
    `adapter_dir`. Then `version` is the servers' weight version."""
    if transport not in ADAPTER_TRANSPORTS:
        raise ValueError(f"adapter transport {transport!r}: use one of "
                         f"{', '.join(ADAPTER_TRANSPORTS)}")
    named = [(name, tensor.detach()) for name, tensor in named_tensors]  # alive until loaded
    if transport == "disk":
        if adapter_dir is None:
            raise ValueError("loading an adapter from disk needs a directory the servers "
                             "can read (adapter_dir)")
        path = _written(Path(adapter_dir), lora_name, config, named)
        path_hint = (f"the adapter was written to {path}: servers on other hosts need it on "
                     "a disk they share with this process")
        _load_everywhere(servers, lora_name, "/load_lora_adapter",
                         lora_path_body(lora_name, path), version, timeout_s, path_hint)
        _keep_only(path)
        return
    if transport == "ipc":
        torch.cuda.synchronize()  # the server reads the memory from another process
        payload = serialize_tensor_dict_ipc(named)
    else:
        payload = serialize_named_tensors(named)
    body = lora_tensors_body(lora_name, config, payload,
                             servers.ranks_per_server if transport == "ipc" else None)
    _load_everywhere(servers, lora_name, "/load_lora_adapter_from_tensors", body, version,
                     timeout_s, None)


def _written(adapter_dir: Path, lora_name: str, config: dict,
             named: list[tuple[str, torch.Tensor]]) -> Path:
    """A new directory `adapter_dir/<lora_name>.<random>` holding the adapter in PEFT's
    format (complete before any server is told of it)."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{lora_name}.", dir=adapter_dir))
    write_adapter(path, config, named)
    return path


def _keep_only(path: Path) -> None:
    """Remove the earlier pushes' directories of this adapter (the servers hold what they
    loaded in memory)."""
    name = path.name.rsplit(".", 1)[0]
    for other in path.parent.glob(f"{name}.*"):
        if other != path and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)


def _load_everywhere(servers: Servers, lora_name: str, path: str, body: dict,
                     version: int | None, timeout_s: float | None, hint: str | None) -> None:
    with ThreadPoolExecutor(max(1, len(servers.urls)),
                            thread_name_prefix="adapter-push") as pool:
        first_failure([pool.submit(_load_one, url, servers.api_key, lora_name, path, body,
                                   version, timeout_s, hint) for url in servers.urls])


def _load_one(url: str, api_key: str | None, lora_name: str, path: str, body: dict,
              version: int | None, timeout_s: float | None, hint: str | None) -> None:
    """Unload, load, set the version: one server's part of a push."""
    try:
        post(url + "/unload_lora_adapter", {"lora_name": lora_name}, api_key, timeout_s)
    except EngineHTTPError as error:
        if error.status != UNLOADED_STATUS:
            raise
    try:
        post(url + path, body, api_key, timeout_s)
    except EngineHTTPError as error:
        if hint is None:
            raise
        raise EngineHTTPError(f"{error}; {hint}", error.status) from error
    if version is not None:
        post(url + "/update_weight_version", weight_version_body(version), api_key,
             timeout_s)
