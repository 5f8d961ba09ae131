"""The OpenAI-compatible HTTP front door: `openai_app(engine)` is an aiohttp app to run or mount."""
from asyncserve.server.app import openai_app
from asyncserve.server.cors import CorsConfig
from asyncserve.server.state import SERVER_STATE

__all__ = ["openai_app", "SERVER_STATE", "CorsConfig"]
