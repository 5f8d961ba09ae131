"""`GET /`: the chat page, one static HTML file shipped in the package (no build step, nothing from a CDN)."""
from __future__ import annotations

import functools
from importlib import resources

from aiohttp import web

# The page runs only its own inline script and style, talks only to this server, and is never shown inside
# another site's frame (where that site could overlay it and steer the user's clicks and typed key).
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",  # frame-ancestors' predecessor, for browsers that predate it
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@functools.cache
def chat_page_html() -> bytes:
    return resources.files("asyncserve.server").joinpath("static/chat.html").read_bytes()


async def chat_page(request: web.Request) -> web.Response:
    """Public, like a login page: the page itself holds no secret; its API calls carry the key."""
    return web.Response(body=chat_page_html(), content_type="text/html", charset="utf-8", headers=_HEADERS)
