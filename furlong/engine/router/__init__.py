"""One `Engine` in front of several engine servers (SGLang's or furlong's).

- `engine_router.py`: `EngineRouter`, the Engine protocol: generation with re-sends,
  fan-out of control calls and weight pushes (through furlong/engine/weights/send.py).
- `routing.py`: which engine takes a request (prompt affinity, else least outstanding).
- `health.py`: health checks, taking failed engines out, restarting or dropping them.
- `slots.py`: `RouterOptions`, `EngineState` and the router's view of each engine.
"""
from furlong.engine.router.engine_router import EngineRouter
from furlong.engine.router.slots import EngineState, RouterOptions

__all__ = ["EngineRouter", "EngineState", "RouterOptions"]
