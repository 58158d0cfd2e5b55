"""What a weight update looks like on the wire: buckets, tensor payloads, request bodies.

Tensor payloads are shared code: the senders (`send.py`) serialize with this module and the
server (`receive.py`) deserializes with it. Request bodies are only written here; the
server's weight routes (engine/server/weight_routes.py, with the field checks of
engine/server/request_fields.py) parse them, and tests/test_serve.py pushes with these
bodies to a furlong server, which is what keeps the two in step.

- Buckets: `iter_buckets` cuts (name, tensor) pairs into runs of at most `bucket_bytes`;
  the last bucket carries the new weight version and the cache flush.
- By value: `serialize_named_tensors` packs pairs as a base64 `torch.save` archive of CPU
  copies; `deserialize_named_tensors` opens it with `weights_only=True`, so a request can
  carry tensors, names and lists, never code. Only furlong's servers read this format.
- CUDA IPC: `serialize_named_tensors_ipc` (pairs) and `serialize_tensor_dict_ipc` (a dict,
  for an adapter) write SGLang's own format (base64 of a
  multiprocessing pickle of IPC handles) with each tensor's device named by its UUID, as
  SGLang's patched torch reductions do: a trainer rank sees its GPU as device 0, the
  engine's TP rank on that GPU sees it under another index. `deserialize_ipc_tensors`
  unpickles it through an allowlist of the few torch globals such a pickle names, so it
  cannot run code either, and maps the UUID back to this process's index.
- Request bodies of SGLang's endpoints (/update_weights_from_tensor, with one payload per
  tensor-parallel rank of the engine; /update_weights_from_distributed,
  /update_weights_from_disk, the group calls; the LoRA loads and /update_weight_version),
  with SGLang's field names and spellings, so real SGLang servers accept them.
"""
from __future__ import annotations

import base64
import io
import pickle
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch.multiprocessing import reductions  # also registers torch's tensor reductions

NamedTensors = Iterable[tuple[str, torch.Tensor]]
Bucket = list[tuple[str, torch.Tensor]]


# ---- buckets ---------------------------------------------------------------------------------

def iter_buckets(named_tensors: NamedTensors, bucket_bytes: int) -> Iterator[tuple[Bucket, bool]]:
    """(bucket, is_last): runs of `named_tensors`, in order, of at most `bucket_bytes` each
    (a larger tensor travels alone). There is always at least one bucket, maybe empty, so
    the last one can carry the new weight version and the cache flush."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive (--update-weight-buffer-size), "
                         f"got {bucket_bytes}")
    bucket: Bucket = []
    size = 0
    for name, tensor in named_tensors:
        num_bytes = tensor.numel() * tensor.element_size()
        if bucket and size + num_bytes > bucket_bytes:
            yield bucket, False
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += num_bytes
    yield bucket, True


# ---- tensor payloads -------------------------------------------------------------------------

def serialize_named_tensors(named_tensors: NamedTensors) -> str:
    """(name, tensor) pairs as one base64 string: a `torch.save` archive of CPU copies.
    The by-value transport, right for any device and any two hosts."""
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
    which torch reduces CUDA tensors to IPC handles, each naming its device by UUID. A
    process on the same GPU maps the sender's memory instead of receiving bytes; the
    sender keeps the tensors alive until the request returns (after the load)."""
    pairs = [(name, tensor.detach().contiguous()) for name, tensor in named_tensors]
    return base64.b64encode(_DeviceUuidPickler.dumps(pairs)).decode("ascii")


def serialize_tensor_dict_ipc(named_tensors: NamedTensors) -> str:
    """The same CUDA IPC format holding a dict name -> tensor: what SGLang's
    /load_lora_adapter_from_tensors unpickles (its LoRA loader iterates the dict's items)."""
    tensors = {name: tensor.detach().contiguous() for name, tensor in named_tensors}
    return base64.b64encode(_DeviceUuidPickler.dumps(tensors)).decode("ascii")


# The device index in the arguments of torch's `rebuild_cuda_tensor` (SGLang's patched
# reductions replace the same argument with the device's UUID).
_DEVICE_ARG = 6


def _device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _local_device(device: int | str) -> int:
    """This process's index of the GPU a payload names: by UUID, or an index as it is."""
    if isinstance(device, int):
        return device
    for index in range(torch.cuda.device_count()):
        if _device_uuid(index) == device:
            return index
    raise ValueError(f"serialized_named_tensors: GPU {device} is not visible to this server "
                     "(CUDA IPC reaches servers on the sender's own GPU)")


def _reduce_by_device_uuid(tensor: torch.Tensor):
    rebuild, args = reductions.reduce_tensor(tensor)
    if rebuild is reductions.rebuild_cuda_tensor and isinstance(args[_DEVICE_ARG], int):
        args = (*args[:_DEVICE_ARG], _device_uuid(args[_DEVICE_ARG]), *args[_DEVICE_ARG + 1:])
    return rebuild, args


class _DeviceUuidPickler(ForkingPickler):
    """ForkingPickler whose CUDA tensors name their device by UUID (nothing global changes:
    the reduction is this pickler's own)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dispatch_table[torch.Tensor] = _reduce_by_device_uuid


def _rebuild_on_local_device(*args):
    """torch's `rebuild_cuda_tensor` with the payload's device mapped to this process's."""
    args = (*args[:_DEVICE_ARG], _local_device(args[_DEVICE_ARG]), *args[_DEVICE_ARG + 1:])
    return reductions.rebuild_cuda_tensor(*args)


def is_ipc_payload(payload: str) -> bool:
    """Pickles start with the protocol opcode; torch.save archives with the zip magic."""
    return base64.b64decode(payload[:8])[:1] == b"\x80"


def deserialize_named_tensors(payload: str) -> list[tuple[str, torch.Tensor]]:
    """The pairs that `serialize_named_tensors` packed; a ValueError for anything else."""
    try:
        data = base64.b64decode(payload, validate=True)
    except (ValueError, TypeError) as error:
        raise ValueError(f"serialized_named_tensors: not base64 ({error})") from None
    if not data.startswith(b"PK"):  # torch.save writes a zip archive
        raise ValueError("serialized_named_tensors: not a torch.save archive; this server reads "
                         "furlong.engine.weights.wire.serialize_named_tensors payloads (SGLang's "
                         "CUDA IPC payloads are not supported)")
    try:
        pairs = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"serialized_named_tensors: the archive does not load ({error})") from None
    return _named_tensor_pairs(pairs)


class _IpcUnpickler(pickle.Unpickler):
    """Unpickles (name, CUDA tensor) pairs only: the one function that maps an IPC handle
    (on this process's index of the named GPU), the classes and dtypes it takes. Any other
    global (os.system, ...) is refused, so a payload cannot run code; it can at most name
    GPU memory to map."""

    ALLOWED = {("torch", "Tensor"), ("torch", "Size"), ("torch.storage", "TypedStorage"),
               ("torch.storage", "UntypedStorage"), ("torch", "UntypedStorage")}

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
            return _rebuild_on_local_device
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
    try:
        pairs = _IpcUnpickler(io.BytesIO(base64.b64decode(payload))).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise ValueError(f"serialized_named_tensors: not a CUDA IPC tensor payload "
                         f"({error})") from None
    return _named_tensor_pairs(pairs)


def _named_tensor_pairs(pairs) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of a payload: a list of pairs, or a dict (SGLang's
    adapter payloads)."""
    if isinstance(pairs, dict):
        pairs = list(pairs.items())
    if not isinstance(pairs, list) or not all(
            isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)
            and isinstance(pair[1], torch.Tensor) for pair in pairs):
        raise ValueError("serialized_named_tensors: the payload must hold a list of "
                         "(name, tensor) pairs or a dict name -> tensor")
    return [(name, tensor) for name, tensor in pairs]


# ---- request bodies (SGLang's field names) ---------------------------------------------------

def dtype_name(dtype: torch.dtype) -> str:
    """SGLang's spelling of a dtype in `dtypes`: 'bfloat16', not 'torch.bfloat16'."""
    return str(dtype).removeprefix("torch.")


def _with_version(body: dict, version: int | None) -> dict:
    """SGLang reports versions as strings; furlong numbers them."""
    if version is not None:
        body["weight_version"] = str(version)
    return body


def tensor_update_body(payloads: list[str], version: int | None) -> dict:
    """/update_weights_from_tensor for one bucket: `payloads[i]` for the engine's
    tensor-parallel rank i (each rank loads its own entry); a `version` (the last bucket)
    also sets it and flushes the cache."""
    return _with_version({"serialized_named_tensors": list(payloads),
                          "flush_cache": version is not None}, version)


def distributed_update_body(bucket: Bucket, group_name: str, version: int | None,
                            flush_cache: bool) -> dict:
    """/update_weights_from_distributed: what the servers allocate before the broadcast
    of one bucket fills it (tensors in their own dtype; engines cast)."""
    return _with_version({"names": [name for name, _ in bucket],
                          "dtypes": [dtype_name(tensor.dtype) for _, tensor in bucket],
                          "shapes": [list(tensor.shape) for _, tensor in bucket],
                          "group_name": group_name, "flush_cache": flush_cache}, version)


def join_group_body(master_address: str, master_port: int, rank_offset: int, world_size: int,
                    group_name: str, backend: str) -> dict:
    """/init_weights_update_group: the server's first rank is `rank_offset`."""
    return {"master_address": master_address, "master_port": master_port,
            "rank_offset": rank_offset, "world_size": world_size, "group_name": group_name,
            "backend": backend}


def disk_update_body(model_path: str | Path, version: int) -> dict:
    """/update_weights_from_disk: an HF directory the server can read."""
    return _with_version({"model_path": str(model_path)}, version)


def lora_tensors_body(lora_name: str, config: dict, payload: str,
                      num_ranks: int | None) -> dict:
    """/load_lora_adapter_from_tensors: the whole adapter. For SGLang (`num_ranks`, the
    engine's tensor-parallel ranks), `payload` once per rank in `serialized_named_tensors`
    (SGLang since its July 2026 change, and Miles' fork) and once more in
    `serialized_tensors` (the field SGLang's releases before that change read); each
    release ignores the other's field, and an IPC payload is handles of a few KB. None: a
    by-value payload, which only furlong's servers read, goes once, in `serialized_tensors`."""
    body = {"lora_name": lora_name, "config_dict": config, "serialized_tensors": payload}
    if num_ranks is not None:
        body["serialized_named_tensors"] = [payload] * num_ranks
    return body


def lora_path_body(lora_name: str, lora_path: str | Path) -> dict:
    """/load_lora_adapter: a PEFT adapter directory the server can read."""
    return {"lora_name": lora_name, "lora_path": str(lora_path)}


def weight_version_body(version: int) -> dict:
    """/update_weight_version, after a load that carries no version of its own."""
    return {"new_version": str(version)}
