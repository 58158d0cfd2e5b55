"""The server's weight endpoints: SGLang's request fields in, the receiver's work out.

Each handler checks its fields (a 400 names the bad one) and hands the update to the
server's `WeightReceiver` (furlong/engine/weights/receive.py), which says what is done
with each kind; an update it refuses is a 400 with its message.
"""
from __future__ import annotations

from aiohttp import web

from furlong.engine.server.request_fields import (bad_request, check_load_format, field,
                                                  json_body, load_options, parse_dtype,
                                                  parse_shape, version_field)
from furlong.engine.weights.group import DEFAULT_GROUP_NAME
from furlong.engine.weights.receive import UpdateRefused, WeightReceiver


class WeightRoutes:
    """The weight endpoints of one server, over its `receiver`."""

    def __init__(self, receiver: WeightReceiver):
        self.receiver = receiver

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/get_weights_by_name", self.get_weights_by_name),
            web.post("/update_weights_from_disk", self.update_weights_from_disk),
            web.post("/update_weights_from_tensor", self.update_weights_from_tensor),
            web.post("/init_weights_update_group", self.init_weights_update_group),
            web.post("/update_weights_from_distributed", self.update_weights_from_distributed),
            web.post("/destroy_weights_update_group", self.destroy_weights_update_group),
            web.post("/update_weight_version", self.update_weight_version),
        ]

    async def get_weights_by_name(self, request: web.Request) -> web.Response:
        """The first `truncate_size` rows of a parameter, as floats (SGLang's debug aid)."""
        body = await json_body(request)
        name = field(body, "name", str)
        truncate_size = field(body, "truncate_size", int, 100)
        try:
            parameter = self.receiver.engine.model.get_parameter(name)
        except AttributeError:
            bad_request(f"name {name!r} is not a parameter of the model")
        return web.json_response(parameter.detach()[:truncate_size].float().cpu().tolist())

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        model_path = field(body, "model_path", str)
        check_load_format(body)
        return await _answer(self.receiver.from_disk(model_path, load_options(body)))

    async def update_weights_from_tensor(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        payloads = field(body, "serialized_named_tensors", list)
        if not payloads or not all(isinstance(payload, str) for payload in payloads):
            bad_request("serialized_named_tensors must be a list of base64 strings, one per "
                        f"tensor-parallel rank (this engine has {self.receiver.tp_size})")
        check_load_format(body)
        return await _answer(self.receiver.from_tensor(payloads, load_options(body)))

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        """Join the trainer's group as rank `rank_offset`; returns once every rank joined."""
        body = await json_body(request)
        address, port = field(body, "master_address", str), field(body, "master_port", int)
        rank, world_size = field(body, "rank_offset", int), field(body, "world_size", int)
        group_name = field(body, "group_name", str, DEFAULT_GROUP_NAME)
        backend = field(body, "backend", str, "nccl")
        return await _answer(self.receiver.join_group(address, port, rank, world_size,
                                                      group_name, backend))

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        """Receive the listed tensors, in order, by broadcast from rank 0; then load them."""
        body = await json_body(request)
        names, dtypes = field(body, "names", list), field(body, "dtypes", list)
        shapes = field(body, "shapes", list)
        if not len(names) == len(dtypes) == len(shapes):
            bad_request(f"names, dtypes and shapes need one entry per tensor; got {len(names)}, "
                        f"{len(dtypes)} and {len(shapes)}")
        if not all(isinstance(name, str) for name in names):
            bad_request("names must be a list of strings")
        dtypes = [parse_dtype(dtype, f"dtypes[{i}]") for i, dtype in enumerate(dtypes)]
        shapes = [parse_shape(shape, f"shapes[{i}]") for i, shape in enumerate(shapes)]
        group_name = field(body, "group_name", str, DEFAULT_GROUP_NAME)
        return await _answer(self.receiver.from_distributed(names, dtypes, shapes, group_name,
                                                            load_options(body)))

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        group_name = field(await json_body(request), "group_name", str, DEFAULT_GROUP_NAME)
        return await _answer(self.receiver.leave_group(group_name))

    async def update_weight_version(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        version = version_field(body, "new_version")
        if version is None:
            bad_request("field 'new_version' is required")
        abort_all_requests = field(body, "abort_all_requests", bool, False)
        return await _answer(self.receiver.set_version(version, abort_all_requests))


async def _answer(update) -> web.Response:
    """SGLang's answer to a weight update: success and a message, or a 400."""
    try:
        message = await update
    except UpdateRefused as error:
        bad_request(str(error))
    return web.json_response({"success": True, "message": message})
