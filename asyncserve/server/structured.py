"""Structured-output request fields -> one StructuredOutputsParams: OpenAI's `response_format`, vLLM's
`structured_outputs` and its older `guided_*` fields; each problem a 400 naming the field it came from."""
from __future__ import annotations

import asyncio

from asyncserve.errors import InvalidParameterError
from asyncserve.sampling_params import StructuredOutputsParams
from asyncserve.server.errors import bad_request

# vLLM's pre-0.11 names -> the StructuredOutputsParams field each one sets.
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
FIELDS = frozenset({"response_format", "structured_outputs", "guided_decoding_backend", *_GUIDED})
_BACKEND_NAMES = ("auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer")


def _response_format(value) -> StructuredOutputsParams | None:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad_request("'response_format' must be an object with a 'type': \"text\", \"json_object\" or "
                          "\"json_schema\".", "response_format")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise bad_request(f"'response_format.type' must be \"text\", \"json_object\" or \"json_schema\", got "
                          f"{kind!r}.", "response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request("'response_format.json_schema' must be an object with 'name' and 'schema'.",
                          "response_format")
    if not isinstance(spec.get("name"), str):
        raise bad_request("'response_format.json_schema.name' must be a string.", "response_format")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise bad_request("'response_format.json_schema.schema' must be a JSON schema object.", "response_format")
    if spec.get("strict") is not None and type(spec["strict"]) is not bool:
        raise bad_request("'response_format.json_schema.strict' must be true or false.", "response_format")
    return StructuredOutputsParams(json=schema)


def structured_field(data: dict) -> str | None:
    """The one request field that asks for structured outputs, or None; a 400 when several do."""
    given = [name for name in ("response_format", "structured_outputs", *_GUIDED) if data.get(name) is not None]
    if "response_format" in given and data["response_format"] == {"type": "text"}:
        given.remove("response_format")
    if len(given) > 1:
        raise bad_request(f"Give one structured-output constraint, not several: got {given}.", given[1])
    return given[0] if given else None


def parse_structured_outputs(data: dict) -> StructuredOutputsParams | None:
    """The request's constraint, from whichever field (`structured_field`) sets it."""
    backend = data.get("guided_decoding_backend")
    if backend is not None and (not isinstance(backend, str) or backend.split(":")[0] not in _BACKEND_NAMES):
        raise bad_request(f"'guided_decoding_backend' must be one of {list(_BACKEND_NAMES)}; this server "
                          "uses its own backend whatever is named.", "guided_decoding_backend")
    source = structured_field(data)
    if source is None:
        return None
    value = data[source]
    try:
        if source == "response_format":
            params = _response_format(value)
        elif source == "structured_outputs":
            if not isinstance(value, dict):
                raise bad_request("'structured_outputs' must be an object with one of json, regex, choice, "
                                  "grammar, json_object.", source)
            params = StructuredOutputsParams.from_dict(value)
        else:
            params = StructuredOutputsParams(**{_GUIDED[source]: value})
    except InvalidParameterError as exc:
        raise bad_request(f"'{source}': {exc}", source) from None
    if params is not None:
        params.key()  # the schema's text, made here: off the loop when the body is big
    return params


async def compile_structured_outputs(engine, params, source: str | None, request=None) -> bool:
    """Compiles the request's grammar off the loop; a bad schema, regex or grammar, or one that does not
    compile in time, is a 400 on `source` (the request field that asked for it; `structured_outputs` when
    the server set it itself). False when the client of `request` left meanwhile: the compile is dropped."""
    if params.structured_outputs is None:
        return True
    source = source or "structured_outputs"
    compiling = asyncio.ensure_future(engine.compile_structured_outputs(params))
    try:
        while not compiling.done():
            await asyncio.wait((compiling,), timeout=_DISCONNECT_POLL_SECONDS)
            if request is not None and (request.transport is None or request.transport.is_closing()):
                return False
        compiling.result()
    except InvalidParameterError as exc:
        raise bad_request(f"'{source}': {exc}", source) from None
    finally:
        compiling.cancel()  # a no-op once done; else the compile is abandoned (see compile_lanes.py)
    return True


_DISCONNECT_POLL_SECONDS = 0.05  # how soon a client that left while its grammar compiles is noticed
