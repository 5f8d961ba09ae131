"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) over the chat path: the
request converted once into an OpenAI chat request, the reply converted back into content blocks."""
from asyncserve.server.anthropic.errors import error_response, is_messages_request
from asyncserve.server.anthropic.handler import count_tokens, create_message

__all__ = ["count_tokens", "create_message", "error_response", "is_messages_request"]
