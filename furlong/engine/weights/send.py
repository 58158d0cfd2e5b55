"""Sending weights to engine servers: one bucket loop behind every transport SGLang offers.

A push is `sender.send(named_tensors, servers, version)`, with the sender `make_sender(mode)`
builds. `named_tensors` is any iterable of (HF parameter name, tensor) pairs: a model's full
weights, a LoRA adapter, some experts. It is cut into buckets of at most `bucket_bytes`
(`send_in_buckets`, the one loop); the last bucket sets `version` and flushes the servers'
caches. The modes (SEND_MODES), one vocabulary for the router, HTTPEngine and Ray ranks:

- "value", "ipc", "auto": `TensorSender`, /update_weights_from_tensor, each bucket
  serialized once and posted to every server at the same time: by value ("value": a
  torch.save archive that only furlong's servers read), as CUDA IPC handles ("ipc":
  SGLang's own format, for servers on the sender's GPU), or by the bucket's device
  ("auto": IPC for CUDA tensors, by value for CPU ones). The request's
  `serialized_named_tensors` holds one payload per tensor-parallel rank of the engine.
  Given a `TPGather` (the colocated fan-out: the trainer ranks on one engine's GPUs), each
  rank serializes its own bucket, the payloads are gathered in TP order to the engine's
  first rank, which posts the one request, and every rank waits for its outcome (its
  memory must live until the engine loaded it). Without one, a by-value payload serves
  every TP rank; an IPC payload names memory on one GPU, so it serves engines of one.
- "broadcast": `BroadcastSender`, rank 0 of a process group with the servers
  (/init_weights_update_group) broadcasts each bucket (/update_weights_from_distributed);
  right for SGLang and furlong servers on any host. The group is formed on the first push
  and formed anew, under a new name, when the servers change (one died or restarted).

Loading from disk is not a sender (it carries a path, not tensors): `send_from_disk` asks
servers to load an HF directory (/update_weights_from_disk).

Callers: the router and HTTPEngine (in-process driver, on a worker thread) and the Ray
trainer ranks (directly). Everything here blocks (HTTP through `requests`, collectives).
Every request carries the servers' API key, if any. The package lives under engine/
because these are the engine servers' own endpoints (wire.py is their format, receive.py
their handling); it imports nothing from the trainer or the cluster.
"""
from __future__ import annotations

import logging
import socket
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, TypeVar

import requests
import torch

from furlong.engine.api_key import auth_headers
from furlong.engine.http_error import EngineHTTPError
from furlong.engine.weights.group import WeightUpdateGroup
from furlong.engine.weights.wire import (Bucket, NamedTensors, disk_update_body,
                                         distributed_update_body, iter_buckets, join_group_body,
                                         serialize_named_tensors, serialize_named_tensors_ipc,
                                         tensor_update_body)

T = TypeVar("T")
TRANSPORTS = ("value", "ipc", "auto")          # TensorSender's
SEND_MODES = (*TRANSPORTS, "broadcast")         # make_sender's
DEFAULT_BUCKET_BYTES = 512 << 20  # --update-weight-buffer-size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Servers:
    """The engine servers one push goes to. Equal values name the same server processes:
    a broadcast group is kept while the servers stay equal."""
    urls: tuple[str, ...]
    api_key: str | None = None        # their --api-key
    ranks_per_server: int = 1         # an SGLang server of tensor-parallel size N has N
    restarts: tuple[int, ...] = ()    # per server: one restarted at the same URL is new

    def __post_init__(self):
        object.__setattr__(self, "urls", tuple(url.rstrip("/") for url in self.urls))

    @property
    def world_size(self) -> int:
        """The size of a broadcast group with these servers: rank 0 and their ranks."""
        return 1 + len(self.urls) * self.ranks_per_server


class TPGather(Protocol):
    """The trainer ranks on the devices of one engine, in its tensor-parallel order: rank
    i of the group feeds the engine's TP rank i. Collective: every member calls each method
    for each bucket. The first member is the source, which posts the engine's requests."""

    @property
    def is_source(self) -> bool:
        """Whether this rank posts the engine's requests."""

    def gather(self, payload: str) -> list[str] | None:
        """Every member's payload, in TP order, at the source; None at the others."""

    def share(self, error: str | None) -> str | None:
        """The bucket's outcome, at every member: the source's `error`, or a failure of
        another engine the same push feeds (None: every engine loaded the bucket)."""


class WeightSender(Protocol):
    def send(self, named_tensors: NamedTensors, servers: Servers, version: int) -> int:
        """Push the pairs in buckets; the last one sets `version`. Returns the bucket count."""

    def close(self) -> None:
        """Let go of what the sender holds between pushes (a process group)."""


def make_sender(mode: str, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                timeout_s: float | None = 600.0, backend: str = "gloo",
                rendezvous: Callable[[], tuple[str, int]] | None = None,
                tp_gather: TPGather | None = None) -> WeightSender:
    """The sender of `mode` (one of SEND_MODES). "broadcast" needs the group's `backend`
    (gloo: CPU tensors, nccl: CUDA tensors) and `rendezvous()`, where the servers reach
    rank 0 (see BroadcastSender); the tensor modes ignore both and take a `tp_gather`
    (the colocated fan-out; see TensorSender)."""
    if mode in TRANSPORTS:
        return TensorSender(mode, bucket_bytes, timeout_s, tp_gather)
    if mode == "broadcast":
        assert rendezvous is not None, "a broadcast sender needs a rendezvous"
        return BroadcastSender(backend, rendezvous, bucket_bytes, timeout_s)
    raise ValueError(f"weight sync mode {mode!r}: use one of {', '.join(SEND_MODES)}")


def send_in_buckets(named_tensors: NamedTensors, bucket_bytes: int, version: int,
                    send_bucket: Callable[[Bucket, int | None], None]) -> int:
    """`send_bucket(bucket, None)` for each bucket in order, `send_bucket(last, version)`
    for the last; returns the number of buckets."""
    num_buckets = 0
    for bucket, is_last in iter_buckets(named_tensors, bucket_bytes):
        send_bucket(bucket, version if is_last else None)
        num_buckets += 1
    return num_buckets


def post(url: str, body: dict, api_key: str | None, timeout_s: float | None) -> dict:
    """One JSON POST to an engine server. ConnectionError when it cannot be reached,
    EngineHTTPError for an error status or a `{"success": false}` answer."""
    try:
        response = requests.post(url, json=body, timeout=timeout_s,
                                 headers=auth_headers(api_key))
    except requests.RequestException as error:
        raise ConnectionError(f"cannot reach the engine server at {url}: {error}") from error
    if response.status_code >= 400:
        raise EngineHTTPError(f"POST {url} answered HTTP {response.status_code}: "
                              f"{response.text[:1000]}", response.status_code)
    result = response.json()
    if isinstance(result, dict) and result.get("success") is False:
        raise EngineHTTPError(f"POST {url} failed: {result.get('message')}",
                              response.status_code)
    return result


def post_all(pool: ThreadPoolExecutor, servers: Servers, path: str, bodies: list[dict],
             timeout_s: float | None) -> list[Future]:
    """POST `bodies[i]` to server i, all at once on `pool`."""
    return [pool.submit(post, url + path, body, servers.api_key, timeout_s)
            for url, body in zip(servers.urls, bodies, strict=True)]


def first_failure(futures: list[Future]) -> None:
    """Wait for every future; raise the first failure as soon as it happens (the servers'
    futures first: a server's error says most)."""
    wait(futures, return_when=FIRST_EXCEPTION)
    for future in futures:
        if future.done() and future.exception() is not None:
            raise future.exception()


def send_from_disk(model_path: str | Path, servers: Servers, version: int,
                   timeout_s: float | None = 600.0) -> None:
    """Every server loads the HF directory `model_path` (which it must be able to read)."""
    for url in servers.urls:
        post(f"{url}/update_weights_from_disk", disk_update_body(model_path, version),
             servers.api_key, timeout_s)


class TensorSender:
    """/update_weights_from_tensor: each bucket serialized once, posted to every server;
    with a `tp_gather`, one payload per TP rank from the trainer rank on its device."""

    def __init__(self, transport: str = "value", bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 timeout_s: float | None = 600.0, tp_gather: TPGather | None = None):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport {transport!r}: use one of {', '.join(TRANSPORTS)}")
        self.transport, self.bucket_bytes, self.timeout_s = transport, bucket_bytes, timeout_s
        self.tp_gather = tp_gather

    def send(self, named_tensors: NamedTensors, servers: Servers, version: int) -> int:
        """Every member of a `tp_gather` sends (the others' `servers` may be empty); the
        source's `servers` is its engine, or none when that engine is out of rotation."""
        with ThreadPoolExecutor(max(1, len(servers.urls)),
                                thread_name_prefix="weight-push") as pool:
            return send_in_buckets(named_tensors, self.bucket_bytes, version,
                                   lambda bucket, v: self._send_bucket(pool, bucket, servers, v))

    def _send_bucket(self, pool: ThreadPoolExecutor, bucket: Bucket, servers: Servers,
                     version: int | None) -> None:
        ipc = self.transport == "ipc" or (self.transport == "auto" and bool(bucket)
                                          and bucket[0][1].is_cuda)
        # IPC: handles to `bucket`'s memory, which stays alive until every server loaded it.
        payload = (serialize_named_tensors_ipc if ipc else serialize_named_tensors)(bucket)
        if self.tp_gather is None:
            if ipc and servers.ranks_per_server > 1:
                raise ValueError("an IPC payload names memory on one GPU: an engine of "
                                 f"{servers.ranks_per_server} GPUs takes one payload per TP "
                                 "rank, from the trainer rank on that GPU (give a tp_gather)")
            body = tensor_update_body([payload] * servers.ranks_per_server, version)
            first_failure(post_all(pool, servers, "/update_weights_from_tensor",
                                   [body] * len(servers.urls), self.timeout_s))
        else:
            self._fan_out(payload, servers, version)
        if ipc:  # no kernel of ours may still touch the bucket when its memory is reused
            torch.cuda.synchronize()

    def _fan_out(self, payload: str, servers: Servers, version: int | None) -> None:
        """This rank's part of one bucket of the colocated fan-out: the payloads meet at
        the source, which posts them as one request; every member then learns its outcome
        (and so keeps its bucket alive until the engine has loaded it), and stops with the
        push when any engine's load failed."""
        gather = self.tp_gather
        payloads = gather.gather(payload)
        failure = None
        if gather.is_source and servers.urls:
            try:  # any failure is shared: the other feeders wait for the outcome
                if len(servers.urls) != 1 or len(payloads) != servers.ranks_per_server:
                    raise ValueError(f"a TP group feeds one engine of {len(payloads)} ranks, "
                                     f"got {servers}")
                post(servers.urls[0] + "/update_weights_from_tensor",
                     tensor_update_body(payloads, version), servers.api_key, self.timeout_s)
            except Exception as error:
                failure = error
        shared = gather.share(None if failure is None else str(failure))
        if failure is not None:
            raise failure
        if shared is not None:
            raise RuntimeError(f"a bucket of this push was not loaded: {shared}")

    def close(self) -> None:
        pass  # nothing is kept between pushes


class BroadcastSender:
    """Rank 0 of a weight-update group with the servers; broadcasts buckets.

    `backend`: gloo (CPU tensors) or nccl (CUDA tensors). `rendezvous()`: where the
    servers reach rank 0, an address of this machine and a port free on it, asked anew for
    each group. Each group has a new name, so a server that missed the old one's destroy
    still joins the next. After a failure in a push the group is unusable: `close` it.
    """

    def __init__(self, backend: str, rendezvous: Callable[[], tuple[str, int]],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout_s: float = 600.0):
        self.backend, self.rendezvous = backend, rendezvous
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.group: JoinedGroup | None = None
        self.num_groups = 0

    def send(self, named_tensors: NamedTensors, servers: Servers, version: int) -> int:
        return send_in_buckets(named_tensors, self.bucket_bytes, version,
                               self._group_with(servers).send_bucket)

    def _group_with(self, servers: Servers) -> JoinedGroup:
        if self.group is None or self.group.servers != servers:
            self.close()
            self.num_groups += 1
            group = JoinedGroup(servers, f"furlong_weights_{self.num_groups}", self.timeout_s)
            group.join(*self.rendezvous(), self.backend)
            self.group = group
        return self.group

    def close(self) -> None:
        """Leave the group. A member that died cannot leave: logged, not raised."""
        group, self.group = self.group, None
        if group is None:
            return
        try:
            group.close()
        except Exception as error:
            log.warning("leaving weight-update group %s failed (%s); a new group replaces it",
                        group.group_name, error)


class JoinedGroup:
    """Rank 0's end of one group with `servers`.

    Server i takes ranks `1 + i * ranks_per_server` on (an SGLang server of tensor-parallel
    size N takes N ranks; a furlong server takes one). Neither end of a collective returns
    before the other has joined, so the HTTP calls that make the servers join and rank 0's
    part run at the same time, on worker threads.
    """

    def __init__(self, servers: Servers, group_name: str, timeout_s: float):
        if not servers.urls:
            raise ValueError("a weight-update group needs at least one engine server URL")
        self.servers, self.group_name, self.timeout_s = servers, group_name, timeout_s
        self.group: WeightUpdateGroup | None = None
        # One thread per server call plus one for rank 0's part of the collective.
        self._pool = ThreadPoolExecutor(len(servers.urls) + 1,
                                        thread_name_prefix="weight-broadcast")

    def join(self, master_address: str, master_port: int, backend: str) -> None:
        """Rank 0 here, every server through /init_weights_update_group."""
        per_server = self.servers.ranks_per_server
        bodies = [join_group_body(master_address, master_port, 1 + i * per_server,
                                  self.servers.world_size, self.group_name, backend)
                  for i in range(len(self.servers.urls))]
        try:
            self.group = self._together("/init_weights_update_group", bodies,
                                        lambda: WeightUpdateGroup(
                                            master_address, master_port, 0,
                                            self.servers.world_size, self.group_name,
                                            backend, self.timeout_s))
        except BaseException:
            self.close()  # its worker threads
            raise

    def send_bucket(self, bucket: Bucket, version: int | None) -> None:
        """The servers allocate the bucket's tensors, then rank 0 broadcasts into them;
        the bucket that carries `version` also flushes the cache."""
        bucket = [(name, self._on_group_device(tensor)) for name, tensor in bucket]
        body = distributed_update_body(bucket, self.group_name, version,
                                       flush_cache=version is not None)
        self._together("/update_weights_from_distributed", [body] * len(self.servers.urls),
                       lambda: self.group.broadcast([tensor for _, tensor in bucket]))

    def _on_group_device(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if tensor.device.type != self.group.device_type:
            tensor = tensor.to(self.group.device_type)
        return tensor.contiguous()

    def close(self) -> None:
        """Leave the group on every server and here, at the same time (an NCCL member's
        shutdown waits for the others)."""
        if self.group is not None:
            group, self.group = self.group, None
            self._together("/destroy_weights_update_group",
                           [{"group_name": self.group_name}] * len(self.servers.urls),
                           group.destroy)
        self._pool.shutdown(wait=False, cancel_futures=True)  # a failed collective may hang on

    def _together(self, path: str, bodies: list[dict], rank0_part: Callable[[], T]) -> T:
        """POST `bodies` to the servers while rank 0 does its part, all at once."""
        calls = post_all(self._pool, self.servers, path, bodies, self.timeout_s)
        local = self._pool.submit(rank0_part)
        first_failure([*calls, local])
        return local.result()


def address_towards(host: str) -> str:
    """This machine's address on the route to `host` (a UDP connect sends nothing): where
    servers on that host reach rank 0 of a broadcast group."""
    family, _, _, _, address = socket.getaddrinfo(host.strip("[]"), 9,
                                                  type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        return sock.getsockname()[0]
