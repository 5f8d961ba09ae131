"""http(s) image URLs of a chat body, downloaded on the loop between parsing and preparing: parsing finds them
(in the worker thread), the loop downloads them all at once with the app's one ClientSession, then the body,
its URLs now carrying their bytes, goes back to the worker thread to be decoded, rendered and tokenized. A
slow image holds neither the loop nor the single worker thread, so other requests go on meanwhile."""
from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from asyncserve.multimodal.fetch import (FetchLimits, UrlPart, check_image_count, fetch_all, http_url_parts,
                                         new_session, with_fetched)


class ImageFetcher:
    """The app's downloader: its bounds, and the session its cleanup context opens and closes."""

    def __init__(self, limits: FetchLimits) -> None:
        self.limits = limits
        self.session: aiohttp.ClientSession | None = None

    async def download(self, parts: list[UrlPart]) -> list[bytes]:
        if self.session is None:  # a request before start-up or after shutdown
            raise web.HTTPServiceUnavailable(text="The image downloader is not running.")
        return await fetch_all(self.session, parts, self.limits)


IMAGE_FETCHER = web.AppKey("image_fetcher", ImageFetcher)


async def image_fetcher_lifetime(app: web.Application):
    """cleanup_ctx: one ClientSession (its connection pool) for the app's life, closed on shutdown."""
    fetcher = app[IMAGE_FETCHER]
    fetcher.session = new_session()
    yield
    session, fetcher.session = fetcher.session, None
    await session.close()


@dataclass
class PendingImages:
    """A parsed body whose messages hold http(s) image URLs to download before it is prepared."""
    data: dict
    parts: list[UrlPart]


def find_image_urls(state, data) -> PendingImages | None:
    """In the worker thread, right after parsing: the body's http(s) image parts, or None when there is
    nothing to download (no such part, or a model without images, which refuses them by name later). More
    images than --limit-mm-per-prompt are refused here, before anything is downloaded."""
    messages = data.get("messages") if isinstance(data, dict) else None
    parts = http_url_parts(messages)
    if not parts or not state.engine.supports_images:
        return None
    check_image_count(messages, state.engine.config.model.limit_mm_per_prompt.get("image", 0))
    return PendingImages(data, parts)


async def download_images(request: web.Request, pending: PendingImages) -> dict:
    """On the loop: the body with each http(s) image URL replaced by its downloaded bytes."""
    contents = await request.app[IMAGE_FETCHER].download(pending.parts)
    return {**pending.data, "messages": with_fetched(pending.data["messages"], pending.parts, contents)}
