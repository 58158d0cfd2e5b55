"""Sessions: multi-turn chat with exact tokens, for training agents (Miles' session routes).

- `POST /sessions` -> `{"session_id": ID}`.
- `POST /sessions/{ID}/v1/chat/completions`: OpenAI's chat completion (openai_routes.py;
  one choice). When the messages extend the session's conversation (the recorded
  messages unchanged, then new ones, after a response that ended its turn), the prompt
  is the recorded token ids followed by the template tokens of the appended messages
  only (chat_template.continuation_ids); the earlier turns are never re-tokenised.
  Otherwise (the first request, a rewritten history) the request starts a new
  trajectory. The response's sampled tokens and log-probs are recorded.
- `POST /sessions/{ID}/samples` (body `{"max_seq_len": N}` optional) -> the training
  samples, one per trajectory (trajectory.py).
- `DELETE /sessions/{ID}` frees the session (204).

With `record_routes` (a server started with --enable-return-routed-experts, a run with
--use-rollout-routing-replay) every turn asks the engine for its MoE routes, and each
sample carries its trajectory's (the last turn's cover every token but the last).

An unknown session id gets a 404. A turn whose prompt leaves no room in the context
generates nothing: the response has finish reason "length" and the trajectory it would
extend ends truncated. The engine calls of a session carry its id as the router's
session key (router/routing.py), so an EngineRouter keeps the session on one engine,
whose prefix cache holds its conversation.
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from furlong.engine.base import GenerateOutput
from furlong.engine.router.routing import session_affinity
from furlong.engine.server import chat_template
from furlong.engine.server.openai_request import ChatRequest, chat_request
from furlong.engine.server.openai_routes import OpenAIRoutes
from furlong.engine.server.request_fields import bad_request, field as body_field, json_body
from furlong.engine.server.trajectory import Trajectory

logger = logging.getLogger(__name__)

RETOKENIZE_MISMATCH_METRIC = "session/retokenize_mismatch_tokens"


@dataclass
class Session:
    trajectories: list[Trajectory] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one turn at a time


class SessionRoutes:
    """The session routes over the /v1 machinery of `openai`; `record_routes`: see the
    module docstring."""

    def __init__(self, openai: OpenAIRoutes, record_routes: bool = False):
        self.openai = openai
        self.record_routes = record_routes
        self.tokenizer = openai.tokenizer
        self.sessions: dict[str, Session] = {}

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/sessions", self.create),
                web.delete("/sessions/{session_id}", self.delete),
                web.post("/sessions/{session_id}/v1/chat/completions", self.chat_completions),
                web.post("/sessions/{session_id}/samples", self.samples)]

    async def create(self, request: web.Request) -> web.Response:
        session_id = uuid.uuid4().hex
        self.sessions[session_id] = Session()
        return web.json_response({"session_id": session_id})

    async def delete(self, request: web.Request) -> web.Response:
        self._session(request)
        del self.sessions[request.match_info["session_id"]]
        return web.Response(status=204)

    def _session(self, request: web.Request) -> Session:
        session_id = request.match_info["session_id"]
        session = self.sessions.get(session_id)
        if session is None:
            raise web.HTTPNotFound(text=json.dumps({
                "error": f"session not found: session_id={session_id} (POST /sessions opens "
                         "a session; DELETE /sessions/{id} closed it)"}),
                content_type="application/json")
        return session

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        session = self._session(request)
        chat = chat_request(await json_body(request))
        if chat.output.n != 1:
            bad_request("n: a session records one response per request; leave n out")
        async with session.lock:
            trajectory, new_messages, context_ids = self._plan(session, chat)
            prompt = (trajectory.tokens if trajectory else []) + context_ids
            params = self.openai.sampling(chat.params, chat.max_tokens, len(prompt))
            if params is None:  # no room left: the trajectory ends here
                if trajectory is not None:
                    trajectory.cut_by_limit()
                output = GenerateOutput([], [], "length", prompt_tokens=len(prompt))
                [choice] = self.openai.chat_choices([output], chat)
            else:
                with session_affinity(request.match_info["session_id"]):
                    [output] = await self.openai.generate(
                        prompt, params, 1, return_routed_experts=self.record_routes)
                [choice] = self.openai.chat_choices([output], chat)
                if trajectory is None:
                    trajectory = Trajectory(prompt_length=len(prompt))
                    session.trajectories.append(trajectory)
                end_token = chat_template.closing_token(self.tokenizer, output.output_ids,
                                                        output.finish_reason)
                trajectory.record(new_messages, context_ids, output, choice.message, end_token,
                                  len(choice.tool_call_errors), chat.tools,
                                  chat.template_kwargs)
        return await self.openai.send_chat(request, prompt, [choice], chat)

    def _plan(self, session: Session, chat: ChatRequest
              ) -> tuple[Trajectory | None, list[dict], list[int]]:
        """(the trajectory the request extends or None for a new one, the messages it
        adds, their token ids: the appended messages' template tokens, or a new
        trajectory's whole prompt)."""
        current = session.trajectories[-1] if session.trajectories else None
        if current is not None and current.extends(chat.messages):
            appended = chat.messages[len(current.messages):]
            try:
                ids = chat_template.continuation_ids(
                    self.tokenizer, current.messages, appended, current.end_token, chat.tools,
                    chat.template_kwargs)
            except ValueError as error:
                bad_request(str(error))
            if ids is not None:
                return current, appended, ids
            logger.warning("the chat template does not render the end-of-turn token the model "
                           "sampled after its response: the session starts a new trajectory")
        return None, chat.messages, self.openai.chat_prompt_ids(chat.messages, chat)


    async def samples(self, request: web.Request) -> web.Response:
        """{"samples": [one per trajectory], "metrics": {RETOKENIZE_MISMATCH_METRIC: total}}."""
        session = self._session(request)
        max_seq_len = body_field(await json_body(request), "max_seq_len", int, None)
        if max_seq_len is not None and max_seq_len < 1:
            bad_request(f"max_seq_len must be >= 1, got {max_seq_len}")
        async with session.lock:  # after a turn in flight
            samples = [t.sample(self.tokenizer, self._retokenize_mismatch(t), max_seq_len)
                       for t in session.trajectories]
        mismatch = sum(s["metadata"]["retokenize_mismatch_tokens"] for s in samples)
        return web.json_response({"samples": samples,
                                  "metrics": {RETOKENIZE_MISMATCH_METRIC: mismatch}})

    def _retokenize_mismatch(self, trajectory: Trajectory) -> int:
        """Tokens that differ between the trajectory (closed as the template closes a
        turn) and its messages rendered and tokenised afresh: template drift."""
        t, tokenizer = trajectory, self.tokenizer
        rendered = chat_template.encode_text(tokenizer, chat_template.render(
            tokenizer, t.messages, t.tools, False, t.template_kwargs))
        closing = [] if t.end_token is None else chat_template.continuation_ids(
            tokenizer, t.messages, [], t.end_token, t.tools, t.template_kwargs,
            add_generation_prompt=False) or []
        return chat_template.differing_tokens(t.tokens + closing, rendered)
