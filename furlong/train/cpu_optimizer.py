"""--optimizer-cpu-offload on one GPU: AdamW steps float32 masters held in host memory.

Megatron's CPU optimizer with the whole state offloaded (--optimizer-offload-fraction
1.0): the masters and both Adam moments live in host memory, so the device holds only
the bfloat16 model, its gradients and activations. `HostStep.step` takes over after
the backward (train/master_weights.py computes the gradient norm on the device first):

    each gradient, as accumulated (bfloat16 after one micro-batch, float32 after
    several), is copied device -> host and scaled by the clipping factor in float32;
    torch's fused CPU AdamW updates the masters and moments;
    each master, rounded to the model's dtype on the host (half the bytes to send),
    is copied host -> device into its parameter.

With --overlap-cpu-optimizer-d2h-h2d the parameters go in buckets of about
`bucket_numel` elements, in model order, through pinned host memory and two copy
streams: bucket k+1's gradients travel to the host while the CPU steps bucket k, and
bucket k's weights travel back while it steps bucket k+1. An event orders each bucket's
step after its gradients arrive; the compute stream waits for the last weights before
the next forward. Without the flag all parameters are one bucket with blocking copies;
without CUDA (tensors already on the host) the buckets are stepped with plain copies.
The update is AdamW's either way, as stepping the masters on the device.

Several ranks get the same from FSDP2's CPUOffloadPolicy (train/parallel.py).
"""
from __future__ import annotations

import torch

BUCKET_NUMEL = 1 << 25  # 32M elements: two buckets of float32 gradients pin 256 MiB


def buckets(sizes: list[int], bucket_numel: int) -> list[range]:
    """Consecutive index ranges of `sizes` whose sum stays within `bucket_numel` (a larger
    tensor makes a bucket of its own); every index once, in order."""
    result, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and total + size > bucket_numel:
            result.append(range(start, index))
            start, total = index, 0
        total += size
    if sizes:
        result.append(range(start, len(sizes)))
    return result


class HostStep:
    """The optimizer step of float32 masters in host memory for a model on a device."""

    def __init__(self, overlap: bool, bucket_numel: int = BUCKET_NUMEL):
        self.overlap = overlap
        self.bucket_numel = bucket_numel
        self._streams: _StreamCopies | None = None  # made at the first step on CUDA

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer, masters: list[torch.Tensor],
             grads: list[torch.Tensor], params: list[torch.Tensor],
             scale: torch.Tensor) -> None:
        """One step of `optimizer` (built on the host `masters`) with gradients
        `grads * scale` (`scale` a 0-d float32 tensor), then each master rounded into the
        matching model tensor of `params`. Lists in the same order."""
        scale = scale.cpu()
        copies = self._copies(params[0])
        sizes = [param.numel() for param in params]
        parts = buckets(sizes, self.bucket_numel if self.overlap else sum(sizes))
        incoming = copies.to_host([grads[i] for i in parts[0]])
        for index, part in enumerate(parts):
            host_grads, arrived = incoming
            if index + 1 < len(parts):  # the next bucket travels while this one steps
                incoming = copies.to_host([grads[i] for i in parts[index + 1]])
            copies.wait(arrived)
            bucket_masters = [masters[i] for i in part]
            _step_bucket(optimizer, bucket_masters, host_grads, scale)
            copies.to_device([params[i] for i in part], bucket_masters)
        copies.finish()

    def _copies(self, param: torch.Tensor) -> _BlockingCopies | _StreamCopies:
        if not (self.overlap and param.is_cuda):
            return _BlockingCopies()
        if self._streams is None:
            self._streams = _StreamCopies()
        self._streams.start()
        return self._streams


def _step_bucket(optimizer: torch.optim.Optimizer, masters: list[torch.Tensor],
                 host_grads: list[torch.Tensor], scale: torch.Tensor) -> None:
    """AdamW on `masters` alone: the optimizer skips parameters without a gradient, and
    its state is per parameter, so stepping bucket by bucket is one step."""
    scaled = [grad.float() for grad in host_grads]
    torch._foreach_mul_(scaled, scale)
    for master, grad in zip(masters, scaled, strict=True):
        master.grad = grad
    optimizer.step()
    for master in masters:
        master.grad = None


class _BlockingCopies:
    """Copies that are done when they return (no overlap, or tensors on the host)."""

    def to_host(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], None]:
        return [tensor.cpu() for tensor in tensors], None

    def wait(self, arrived: None) -> None:
        pass

    def to_device(self, params: list[torch.Tensor], masters: list[torch.Tensor]) -> None:
        for param, master in zip(params, masters, strict=True):
            param.copy_(master.to(param.dtype))

    def finish(self) -> None:
        pass


class _StreamCopies:
    """Non-blocking copies through pinned host memory on a device -> host and a host ->
    device stream; the host allocator keeps each pinned block until its copy is done."""

    def __init__(self):
        self.d2h, self.h2d = torch.cuda.Stream(), torch.cuda.Stream()

    def start(self) -> None:
        compute = torch.cuda.current_stream()
        self.d2h.wait_stream(compute)  # the backward wrote the gradients
        self.h2d.wait_stream(compute)  # and read the parameters

    def to_host(self, tensors: list[torch.Tensor]
                ) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        """Pinned host copies of `tensors`; the event marks their arrival."""
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        with torch.cuda.stream(self.d2h):
            for target, source in zip(host, tensors, strict=True):
                target.copy_(source, non_blocking=True)
            return host, self.d2h.record_event()

    def wait(self, arrived: torch.cuda.Event) -> None:
        arrived.synchronize()

    def to_device(self, params: list[torch.Tensor], masters: list[torch.Tensor]) -> None:
        """Round `masters` to the parameters' dtype on the host (half the bytes to send),
        then copy them into `params`."""
        pinned = [torch.empty(m.shape, dtype=p.dtype, pin_memory=True).copy_(m)
                  for p, m in zip(params, masters, strict=True)]
        with torch.cuda.stream(self.h2d):
            for param, source in zip(params, pinned, strict=True):
                param.copy_(source, non_blocking=True)

    def finish(self) -> None:
        torch.cuda.current_stream().wait_stream(self.h2d)  # the next forward reads them
