"""The engine server: a furlong `Engine` behind SGLang's HTTP API (docs/sglang.md).

- `cli.py`: the command line (`python -m furlong.engine.serve`), dtype, engine choice.
- `app.py`: `EngineServer`, the aiohttp application: middlewares, health, cache, memory.
- `generation.py`: /generate and /abort_request.
- `weight_routes.py`: the weight endpoints, over furlong/engine/weights/receive.py.
- `request_fields.py`: parsing and checking request fields (a 400 names the bad one).
- `openai_routes.py`, `openai_request.py`, `openai_response.py`: OpenAI's /v1/models,
  /v1/completions and /v1/chat/completions (tools, tool calls, SSE, logprobs, token ids).
- `chat_template.py`: rendering messages, the tokens a continuation appends, drift counts.
- `sessions.py`, `trajectory.py`: agent sessions of exact tokens (/sessions...), each a
  list of linear trajectories that become training samples.
The API key is checked by furlong/engine/api_key.py.
"""
