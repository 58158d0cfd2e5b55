"""The fast engine: paged KV cache, continuous batching, CUDA-graph decode windows."""
from furlong.engine.fast.engine import FastEngine
from furlong.engine.fast.model import supports

__all__ = ["FastEngine", "supports"]
