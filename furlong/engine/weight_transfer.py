"""Moving weights from the trainer into engine servers, on SGLang's three paths.

- From disk (`/update_weights_from_disk`): `read_hf_weights` streams the tensors of an HF
  directory's safetensors files by parameter name.
- By value over HTTP (`/update_weights_from_tensor`): `serialize_named_tensors` packs
  (name, tensor) pairs as a base64 `torch.save` archive, `deserialize_named_tensors` opens
  it with `weights_only=True`, so a request can carry tensors, names and lists, never code.
  CUDA IPC payloads (SGLang's format: a pickle of IPC handles) are unpickled with an
  allowlist of the few torch globals such a pickle names, so they cannot run code either.
- By broadcast (`/init_weights_update_group`, `/update_weights_from_distributed`): the
  trainer is rank 0 of a process group of its own with the engine servers.
  `WeightUpdateGroup` is one member's end of it, `WeightBroadcaster` the trainer's driver.

The group is built from public c10d parts (TCPStore, PrefixStore, ProcessGroupGloo/NCCL) and
is never registered with torch.distributed: a trainer that already runs a default group
(FSDP) keeps it, and both ends can live in one process (the tests do). Its store keys are
the ones SGLang's and Miles' `init_custom_process_group` produce, so the other end may be
an SGLang server or a Miles trainer. Every HTTP call carries the servers' `api_key`, if any.
"""
from __future__ import annotations

import base64
import io
import logging
import pickle
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import requests
import torch
import torch.distributed as dist

from furlong.engine.api_key import auth_headers

T = TypeVar("T")
NamedTensors = Iterable[tuple[str, torch.Tensor]]
# gloo moves CPU tensors, nccl CUDA tensors; torch keys a backend's store by that device.
DEVICE_OF_BACKEND = {"gloo": "cpu", "nccl": "cuda"}

log = logging.getLogger(__name__)


def read_hf_weights(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `model_dir/*.safetensors`, one at a time, by its HF name."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors file; give an HF model "
                                "directory saved with safetensors")

    def tensors():
        for file in files:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
    return tensors()


def serialize_named_tensors(named_tensors: NamedTensors) -> str:
    """(name, tensor) pairs as one base64 string: a `torch.save` archive of CPU copies.

    This is the by-value transport, right for any device and any two hosts. A CUDA IPC
    transport (SGLang's MultiprocessingSerializer: handles, not bytes, for a colocated
    server) would be a second format here, told apart by `deserialize_named_tensors`.
    """
    pairs = [(name, _owning_cpu_copy(tensor)) for name, tensor in named_tensors]
    buffer = io.BytesIO()
    torch.save(pairs, buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _owning_cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor on the CPU with a storage of its own: torch.save writes a view's whole
    storage (a flat FSDP buffer, say), not just the view."""
    tensor = tensor.detach().cpu()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def serialize_named_tensors_ipc(named_tensors: NamedTensors) -> str:
    """(name, CUDA tensor) pairs as CUDA IPC handles, in SGLang's format for
    /update_weights_from_tensor: base64 of a multiprocessing (ForkingPickler) pickle, in
    which torch reduces CUDA tensors to IPC handles. A process on the same GPU maps the
    sender's memory instead of receiving bytes; the sender keeps the tensors alive until
    the request returns (after the load)."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers the tensor reductions)
    pairs = [(name, tensor.detach().contiguous()) for name, tensor in named_tensors]
    return base64.b64encode(ForkingPickler.dumps(pairs)).decode("ascii")


def is_ipc_payload(payload: str) -> bool:
    """Pickles start with the protocol opcode; torch.save archives with the zip magic."""
    return base64.b64decode(payload[:8])[:1] == b"\x80"


class _IpcUnpickler(pickle.Unpickler):
    """Unpickles (name, CUDA tensor) pairs only: the one function that maps an IPC handle,
    the classes and dtypes it takes. Any other global (os.system, ...) is refused, so a
    payload cannot run code; it can at most name GPU memory to map."""

    ALLOWED = {("torch.multiprocessing.reductions", "rebuild_cuda_tensor"),
               ("torch", "Tensor"), ("torch", "Size"), ("torch.storage", "TypedStorage"),
               ("torch.storage", "UntypedStorage"), ("torch", "UntypedStorage")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not part of a CUDA IPC "
                                     "tensor payload")


def deserialize_ipc_tensors(payload: str) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a `serialize_named_tensors_ipc` payload, mapped from the sender;
    a ValueError for anything else. Servers accept these only when started next to their
    trainer (the handles name memory on the same GPU)."""
    import torch.multiprocessing  # noqa: F401
    try:
        pairs = _IpcUnpickler(io.BytesIO(base64.b64decode(payload))).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise ValueError(f"serialized_named_tensors: not a CUDA IPC tensor payload "
                         f"({error})") from None
    return _named_tensor_pairs(pairs)


def tensor_update_body(payload: str, version: int | None, tp_size: int = 1) -> dict:
    """The /update_weights_from_tensor request for one bucket: the payload for every
    tensor-parallel rank; a `version` (the last bucket) also sets it and flushes the cache."""
    body = {"serialized_named_tensors": [payload] * tp_size, "flush_cache": version is not None}
    if version is not None:
        body["weight_version"] = str(version)
    return body


def post_tensor_update(url: str, payload: str, version: int | None,
                       timeout_s: float = 600.0, api_key: str | None = None) -> dict:
    """Send one bucket to a server, synchronously (trainer processes)."""
    return _post(f"{url}/update_weights_from_tensor", tensor_update_body(payload, version),
                 timeout_s, api_key)


def deserialize_named_tensors(payload: str) -> list[tuple[str, torch.Tensor]]:
    """The pairs that `serialize_named_tensors` packed; a ValueError for anything else."""
    try:
        data = base64.b64decode(payload, validate=True)
    except (ValueError, TypeError) as error:
        raise ValueError(f"serialized_named_tensors: not base64 ({error})") from None
    if not data.startswith(b"PK"):  # torch.save writes a zip archive
        raise ValueError("serialized_named_tensors: not a torch.save archive; this server reads "
                         "furlong.engine.weight_transfer.serialize_named_tensors payloads (SGLang's "
                         "CUDA IPC payloads are not supported)")
    try:
        pairs = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"serialized_named_tensors: the archive does not load ({error})") from None
    return _named_tensor_pairs(pairs)


def _named_tensor_pairs(pairs) -> list[tuple[str, torch.Tensor]]:
    if not isinstance(pairs, list) or not all(
            isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)
            and isinstance(pair[1], torch.Tensor) for pair in pairs):
        raise ValueError("serialized_named_tensors: the payload must hold a list of "
                         "(name, tensor) pairs")
    return [(name, tensor) for name, tensor in pairs]


def iter_buckets(named_tensors: NamedTensors, bucket_bytes: int
                 ) -> Iterator[tuple[list[tuple[str, torch.Tensor]], bool]]:
    """(bucket, is_last): runs of `named_tensors`, in order, of at most `bucket_bytes` each
    (a larger tensor travels alone). There is always at least one bucket, maybe empty, so
    the last one can carry the new weight version and the cache flush."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive (--update-weight-buffer-size), "
                         f"got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        num_bytes = tensor.numel() * tensor.element_size()
        if bucket and size + num_bytes > bucket_bytes:
            yield bucket, False
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += num_bytes
    yield bucket, True


def dtype_name(dtype: torch.dtype) -> str:
    """SGLang's spelling of a dtype in `dtypes`: 'bfloat16', not 'torch.bfloat16'."""
    return str(dtype).removeprefix("torch.")


class WeightUpdateGroup:
    """One member of a weight-update process group; rank 0 (the trainer) sends.

    Construction blocks until all `world_size` members have joined, so every member must
    be constructed concurrently (another thread, process or host).
    """

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int,
                 group_name: str = "weight_update_group", backend: str = "nccl",
                 timeout_s: float = 600.0):
        if backend not in DEVICE_OF_BACKEND:
            raise ValueError(f"backend {backend!r}: use gloo (CPU tensors) or nccl (CUDA tensors)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.group_name, self.backend = group_name, backend
        self.device_type = DEVICE_OF_BACKEND[backend]
        timeout = timedelta(seconds=timeout_s)
        # As torch's tcp:// rendezvous: rank 0 hosts the store.
        self._store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0,
                                    timeout=timeout, multi_tenant=True)
        # init_custom_process_group prefixes the group name, then torch's group helper
        # prefixes "<group>/" and the backend's device: the same keys meet the same peers.
        store = dist.PrefixStore(f"{self.device_type}/", dist.PrefixStore(
            f"{group_name}/", dist.PrefixStore(group_name, self._store)))
        self._backend = _make_backend(backend, store, rank, world_size, timeout)
        # torch's helper does this too; its members wait for rank 0's sequence number.
        self._backend._set_sequence_number_for_group()

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Broadcast each tensor in place from rank 0, in order (rank 0 sends, others fill)."""
        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = 0, 0
        works = [self._backend.broadcast([tensor], options) for tensor in tensors]
        for work in works:
            work.wait()

    def receive(self, dtypes: list[torch.dtype], shapes: list[list[int]],
                device: torch.device) -> list[torch.Tensor]:
        """The next tensors rank 0 broadcasts, allocated on `device`."""
        tensors = [torch.empty(shape, dtype=dtype, device=device)
                   for dtype, shape in zip(dtypes, shapes, strict=True)]
        self.broadcast(tensors)
        return tensors

    def destroy(self) -> None:
        self._backend.shutdown()


def _make_backend(backend: str, store, rank: int, world_size: int, timeout: timedelta):
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if not dist.is_nccl_available():
        raise ValueError("backend nccl: this torch build has no NCCL; use gloo")
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = False
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world_size, options)


class WeightBroadcaster:
    """The trainer's end (rank 0): brings engine servers into a group, then sends weights
    bucket by bucket.

    Server i takes ranks `1 + i * ranks_per_server` on (an SGLang server of tensor-parallel
    size N takes N ranks; a furlong server takes one). Neither end of a collective returns
    before the other has joined, so the HTTP calls that make the servers join and rank 0's
    part run at the same time, on worker threads. After a failure the group is unusable:
    `close` it and build another. `api_key`: the servers' --api-key.
    """

    def __init__(self, urls: list[str], group_name: str = "weight_update_group",
                 ranks_per_server: int = 1, timeout_s: float = 600.0,
                 api_key: str | None = None):
        if not urls:
            raise ValueError("WeightBroadcaster needs at least one engine server URL")
        self.urls = [url.rstrip("/") for url in urls]
        self.group_name = group_name
        self.ranks_per_server = ranks_per_server
        self.timeout_s = timeout_s
        self.api_key = api_key
        self.group: WeightUpdateGroup | None = None
        # One thread per server call plus one for rank 0's part of the collective.
        self._pool = ThreadPoolExecutor(len(self.urls) + 1, thread_name_prefix="weight-broadcast")

    @property
    def world_size(self) -> int:
        return 1 + len(self.urls) * self.ranks_per_server

    def init_group(self, master_address: str, master_port: int, backend: str = "nccl") -> None:
        """Create the group: rank 0 here, every server through /init_weights_update_group."""
        bodies = [{"master_address": master_address, "master_port": master_port,
                   "rank_offset": 1 + i * self.ranks_per_server, "world_size": self.world_size,
                   "group_name": self.group_name, "backend": backend}
                  for i in range(len(self.urls))]
        try:
            self.group = self._together("/init_weights_update_group", bodies,
                                        lambda: WeightUpdateGroup(
                                            master_address, master_port, 0, self.world_size,
                                            self.group_name, backend, self.timeout_s))
        except BaseException:
            self.close()  # its worker threads
            raise

    def broadcast(self, named_tensors: NamedTensors, bucket_bytes: int = 512 << 20,
                  version: int | None = None, flush_cache: bool = True) -> int:
        """Send `named_tensors` in buckets of at most `bucket_bytes` (tensors are sent in
        their own dtype; engines cast). The last bucket sets `version` and flushes the cache.
        Returns the number of buckets."""
        if self.group is None:
            raise RuntimeError("WeightBroadcaster.broadcast before init_group")
        num_buckets = 0
        for bucket, is_last in iter_buckets(named_tensors, bucket_bytes):
            self._send_bucket(bucket, version if is_last else None, flush_cache and is_last)
            num_buckets += 1
        return num_buckets

    def _send_bucket(self, bucket: list[tuple[str, torch.Tensor]], version: int | None,
                     flush_cache: bool) -> None:
        tensors = [self._on_group_device(tensor) for _, tensor in bucket]
        body = {"names": [name for name, _ in bucket],
                "dtypes": [dtype_name(tensor.dtype) for tensor in tensors],
                "shapes": [list(tensor.shape) for tensor in tensors],
                "group_name": self.group_name, "flush_cache": flush_cache}
        if version is not None:
            body["weight_version"] = str(version)
        self._together("/update_weights_from_distributed", [body] * len(self.urls),
                       lambda: self.group.broadcast(tensors))

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
                           [{"group_name": self.group_name}] * len(self.urls), group.destroy)
        self._pool.shutdown(wait=False, cancel_futures=True)  # a failed collective may hang on

    def _together(self, path: str, bodies: list[dict], rank0_part: Callable[[], T]) -> T:
        """POST `bodies` to the servers while rank 0 does its part, all at once; the first
        failure is raised as soon as it happens (a server's, which says most, first)."""
        calls = self._post_all(path, bodies)
        local = self._pool.submit(rank0_part)
        wait([*calls, local], return_when=FIRST_EXCEPTION)
        for future in (*calls, local):
            if future.done() and future.exception() is not None:
                raise future.exception()
        return local.result()

    def _post_all(self, path: str, bodies: list[dict]) -> list[Future]:
        return [self._pool.submit(_post, url + path, body, self.timeout_s, self.api_key)
                for url, body in zip(self.urls, bodies, strict=True)]


class CurrentGroup:
    """Rank 0's weight-update group with the servers of the last call, kept while they stay
    the same (`key`) and replaced when they change (one died or restarted). Each group has
    a new name, so a server that missed the old one's destroy still joins the next."""

    def __init__(self):
        self.broadcaster: WeightBroadcaster | None = None
        self.key = None
        self.count = 0

    def get(self, key, join: Callable[[str], WeightBroadcaster]) -> WeightBroadcaster:
        """The group for `key`; `join(group_name)` makes a new one when `key` changed."""
        if self.broadcaster is None or key != self.key:
            self.close()
            self.count += 1
            self.broadcaster, self.key = join(f"furlong_weights_{self.count}"), key
        return self.broadcaster

    def close(self) -> None:
        """Leave the group. A member that died cannot leave: logged, not raised."""
        broadcaster, self.broadcaster = self.broadcaster, None
        if broadcaster is None:
            return
        try:
            broadcaster.close()
        except Exception as error:
            log.warning("leaving weight-update group %s failed (%s); a new group replaces it",
                        broadcaster.group_name, error)


def _post(url: str, body: dict, timeout_s: float, api_key: str | None = None) -> dict:
    try:
        response = requests.post(url, json=body, timeout=timeout_s,
                                 headers=auth_headers(api_key))
    except requests.RequestException as error:
        raise ConnectionError(f"cannot reach the engine server at {url}: {error}") from error
    if response.status_code >= 400:
        raise RuntimeError(f"POST {url} answered HTTP {response.status_code}: "
                           f"{response.text[:1000]}")
    return response.json()
