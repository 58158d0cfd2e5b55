"""Run a script with this process's PyTorch allocator capped at GIB GiB of the first GPU
(an 80 GB card's budget on a larger card): `python bench/capped.py GIB SCRIPT ARGS...`.
Allocations beyond the cap raise CUDA out-of-memory errors as on the smaller card."""
import runpy
import sys

import torch

if __name__ == "__main__":
    gib, script = float(sys.argv[1]), sys.argv[2]
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2 ** 30 / total))
    sys.argv = sys.argv[2:]
    runpy.run_path(script, run_name="__main__")
