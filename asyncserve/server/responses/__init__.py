"""OpenAI's Responses API (`/v1/responses`), served through the chat-completions path."""
from __future__ import annotations

from aiohttp import web

from asyncserve.server.responses.handler import (
    RESPONSE_STORE,
    cancel_response,
    create_response,
    delete_response,
    retrieve_response,
)
from asyncserve.server.responses.store import ResponseStore, capacity_from_env


def add_responses_routes(app: web.Application) -> None:
    """The routes, and the in-memory store they share (`ASYNCSERVE_RESPONSES_STORE_SIZE` responses)."""
    app[RESPONSE_STORE] = ResponseStore(capacity_from_env())
    app.router.add_post("/v1/responses", create_response, name="responses")
    app.router.add_get("/v1/responses/{response_id}", retrieve_response, name="response")
    app.router.add_delete("/v1/responses/{response_id}", delete_response, name="delete_response")
    app.router.add_post("/v1/responses/{response_id}/cancel", cancel_response, name="cancel_response")


__all__ = ["RESPONSE_STORE", "add_responses_routes"]
