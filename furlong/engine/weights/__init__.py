"""Weights from the trainer into engine servers, over SGLang's weight-update endpoints.

- `wire.py`: the format both ends share: buckets, tensor payloads (by value; CUDA IPC with
  its unpickling allowlist), the request bodies.
- `group.py`: the weight-update process group (rank 0 the trainer, then the servers).
- `send.py`: every way of sending tensors (by value, CUDA IPC, broadcast) behind one
  `send(named_tensors, servers, version)`, built by `make_sender(mode)`, used by the
  router, HTTPEngine and Ray ranks; and `send_from_disk`, which sends a path instead.
- `lora_send.py`: a LoRA adapter, whole, to every server (unload, load, version): CUDA IPC
  in SGLang's format, furlong's by-value payload, or PEFT files on disk.
- `receive.py`: what a server does with each kind of update.
"""
