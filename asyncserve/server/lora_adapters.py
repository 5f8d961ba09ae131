"""LoRA adapters served by name, as vLLM serves them: `--lora-modules name=path` (or its JSON form) at
start-up, a request's `model` naming one, `/v1/models` listing them with the base model as `parent`, and, when
runtime updating is allowed (vLLM's `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), `POST /v1/load_lora_adapter` and
`/v1/unload_lora_adapter`.
"""
from __future__ import annotations

import itertools
import os

import orjson
from aiohttp import web

from asyncserve.errors import ConfigError, LoRAAdapterError
from asyncserve.lora_request import LoRARequest
from asyncserve.server.errors import ApiError, bad_request
from asyncserve.server.protocol import Fields
from asyncserve.server.serving import read_and_prepare
from asyncserve.server.state import SERVER_STATE

RUNTIME_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
RESOLVER_DIR_ENV = "VLLM_LORA_RESOLVER_CACHE_DIR"  # vLLM's filesystem resolver's folder: --lora-dir's default


def parse_lora_modules(values: list[str] | None) -> list[dict]:
    """vLLM's `--lora-modules` values: `name=path`, or JSON `{"name": ..., "path": ..., "base_model_name": ...}`."""
    modules = []
    for value in values or []:
        if value.lstrip().startswith("{"):
            try:
                spec = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise ConfigError(f"--lora-modules {value!r} is not valid JSON: {exc}.") from None
            if not isinstance(spec, dict) or not {"name", "path"} <= spec.keys():
                raise ConfigError(f"--lora-modules {value!r}: the JSON form needs \"name\" and \"path\".")
        else:
            name, sep, path = value.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--lora-modules {value!r}: give name=path, or the JSON form.")
            spec = {"name": name, "path": path}
        modules.append(spec)
    return modules


def resolver_dir(flag_value: str | None, environ=os.environ) -> str | None:
    return flag_value or environ.get(RESOLVER_DIR_ENV) or None


def runtime_updating_allowed(environ=os.environ) -> bool:
    return environ.get(RUNTIME_UPDATING_ENV, "").strip().lower() in ("1", "true")


class LoRAAdapters:
    """The server's adapters by name; each gets an id (>= 1) that the engine's slots and prefix cache key on."""

    def __init__(self, modules: list[dict] | None = None, allow_runtime_updating: bool = False,
                 lora_dir: str | None = None):
        self.by_name: dict[str, LoRARequest] = {}
        self.allow_runtime_updating = allow_runtime_updating
        self.lora_dir = lora_dir  # a name that is an adapter's folder here is served on first use
        self._ids = itertools.count(1)
        for spec in modules or []:
            self.add(spec["name"], spec["path"], spec.get("base_model_name"))

    def add(self, name: str, path: str, base_model_name: str | None = None) -> LoRARequest:
        request = LoRARequest(name, next(self._ids), path, base_model_name)
        self.by_name[name] = request
        return request

    def get(self, name: str | None) -> LoRARequest | None:
        return self.by_name.get(name) if name is not None else None

    def resolve(self, name: str) -> LoRARequest | None:
        """A served adapter's name, or a folder of --lora-dir holding an adapter (then served from now on);
        a name with a path separator or a leading dot is never looked up."""
        known = self.by_name.get(name)
        if known is not None or self.lora_dir is None or not name or name.startswith(".") or "/" in name \
                or os.sep in name:
            return known
        path = os.path.join(self.lora_dir, name)
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            return None
        return self.add(name, path)


async def load_lora_adapter(request: web.Request) -> web.Response:
    state = request.app[SERVER_STATE]
    adapters = _adapters_allowing_updates(state)
    data = await read_and_prepare(request, state, lambda _state, body: body)
    fields = Fields(data)
    name, path = fields.string("lora_name"), fields.string("lora_path")
    if not name or not path:
        raise bad_request("Give lora_name and lora_path.", "lora_name" if not name else "lora_path")
    if name in adapters.by_name or name in state.model_names:
        raise bad_request(f"The model name '{name}' is already in use.", "lora_name")
    lora = LoRARequest(name, next(adapters._ids), path)
    try:
        await state.engine.prepare_lora(lora)  # read and checked before the name is served
    except LoRAAdapterError as exc:
        raise bad_request(str(exc), "lora_path") from None
    adapters.by_name[name] = lora
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    state = request.app[SERVER_STATE]
    adapters = _adapters_allowing_updates(state)
    data = await read_and_prepare(request, state, lambda _state, body: body)
    name = Fields(data).string("lora_name")
    lora = adapters.by_name.pop(name, None) if name else None
    if lora is None:
        raise ApiError(404, f"The LoRA adapter '{name}' is not loaded.", param="lora_name", code="model_not_found")
    manager = state.engine.llm_engine.lora
    if manager is not None:
        manager.forget(lora.lora_int_id)
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


def _adapters_allowing_updates(state) -> LoRAAdapters:
    if state.lora is None:
        raise ApiError(400, "This server serves no LoRA adapters: start it with --enable-lora.",
                       code="lora_not_enabled")
    if not state.lora.allow_runtime_updating:
        raise ApiError(403, f"Loading adapters at runtime is off: set {RUNTIME_UPDATING_ENV}=True in the "
                       "server's environment (vLLM's switch).", code="lora_runtime_updating_off")
    return state.lora
