"""http(s) image URLs downloaded under bounds (vLLM's names): at most VLLM_IMAGE_FETCH_TIMEOUT seconds per image
(5) for everything (connecting, redirects, the body), at most MAX_IMAGE_BYTES (the limit of every encoded
image; a larger Content-Length is refused unread, a longer body is cut off where it passes it), a 200
answer only, http and https only, redirects followed only while VLLM_MEDIA_URL_ALLOW_REDIRECTS is on (at most
MAX_REDIRECTS of them), each hop's host checked against `--allowed-media-domains` when it is set.

Downloads are asyncio (aiohttp's client): the server runs them on its loop, all of a request's at once,
before the body goes to the worker thread that decodes images; `LLM.chat` runs them in a loop of its own.
A downloaded part's URL becomes a `FetchedImage` (the URL, carrying the bytes), which `load_image_url`
decodes as any other image."""
from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import aiohttp
from yarl import URL

from asyncserve.errors import ConfigError, InvalidParameterError
from asyncserve.multimodal.images import MAX_IMAGE_BYTES, FetchedImage, InvalidImageError

DEFAULT_FETCH_TIMEOUT_S = 5.0   # vLLM's VLLM_IMAGE_FETCH_TIMEOUT default
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class FetchLimits:
    timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    max_bytes: int = MAX_IMAGE_BYTES
    allow_redirects: bool = True
    max_redirects: int = MAX_REDIRECTS
    allowed_domains: tuple[str, ...] | None = None  # None: any host

    @classmethod
    def from_env(cls, allowed_domains: list[str] | None = None, environ=os.environ) -> FetchLimits:
        """vLLM's environment variables VLLM_IMAGE_FETCH_TIMEOUT (seconds) and VLLM_MEDIA_URL_ALLOW_REDIRECTS
        (0 or 1), and its --allowed-media-domains."""
        raw_timeout = environ.get("VLLM_IMAGE_FETCH_TIMEOUT", "")
        try:
            timeout = float(raw_timeout) if raw_timeout else DEFAULT_FETCH_TIMEOUT_S
        except ValueError:
            timeout = -1.0
        if not timeout > 0:
            raise ConfigError(f"VLLM_IMAGE_FETCH_TIMEOUT must be a number of seconds > 0, got {raw_timeout!r}.")
        redirects = environ.get("VLLM_MEDIA_URL_ALLOW_REDIRECTS", "1").strip().lower()
        if redirects not in ("0", "1", "true", "false"):
            raise ConfigError(f"VLLM_MEDIA_URL_ALLOW_REDIRECTS must be 0 or 1, got {redirects!r}.")
        domains = tuple(domain.lower() for domain in allowed_domains) if allowed_domains else None
        return cls(timeout_s=timeout, allow_redirects=redirects in ("1", "true"), allowed_domains=domains)


class UrlPart(NamedTuple):
    message: int   # messages[message].content[part]
    part: int
    url: str

    @property
    def where(self) -> str:
        return f"messages[{self.message}].content[{self.part}]"


def _image_url(part) -> object:
    url = part.get("image_url")
    return url.get("url") if isinstance(url, dict) else url


def image_parts(messages) -> list[tuple[int, int, dict]]:
    """(i, j, part) of every image part of chat messages as a client sent them (shapes unchecked)."""
    found = []
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else ()):
            if isinstance(part, dict) and part.get("type") in ("image_url", "image_pil"):
                found.append((i, j, part))
    return found


def http_url_parts(messages) -> list[UrlPart]:
    """The image parts whose URL is http(s), to download (anything else is left to the decoding path)."""
    found = []
    for i, j, part in image_parts(messages):
        url = _image_url(part) if part.get("type") == "image_url" else None
        if isinstance(url, str) and not isinstance(url, FetchedImage) and \
                url[:8].lower().startswith(("http://", "https://")):
            found.append(UrlPart(i, j, url))
    return found


def check_image_count(messages, limit: int) -> None:
    """More image parts than --limit-mm-per-prompt are refused before anything is downloaded."""
    count = len(image_parts(messages))
    if count > limit:
        raise InvalidParameterError(f"The prompt carries {count} images; this server takes at most {limit} "
                                    "(--limit-mm-per-prompt).", "messages")


def with_fetched(messages: list, parts: list[UrlPart], contents: list[bytes]) -> list:
    """`messages` with those parts' URLs replaced by the downloaded images (the caller's lists untouched)."""
    messages = list(messages)
    for part, data in zip(parts, contents):
        message = messages[part.message] = dict(messages[part.message])
        content = message["content"] = list(message["content"])
        old = content[part.part]
        image_url = old["image_url"] if isinstance(old["image_url"], dict) else {}
        content[part.part] = {**old, "image_url": {**image_url, "url": FetchedImage(part.url, data)}}
    return messages


def new_session() -> aiohttp.ClientSession:
    """One session for every download: no cookies kept between requests (one user's never go to another),
    no proxy settings read from the environment, our own total timeout per image."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
                                 timeout=aiohttp.ClientTimeout(total=None),
                                 headers={"User-Agent": "asyncserve", "Accept": "image/*"})


def _checked_url(url: str | URL, where: str, limits: FetchLimits) -> URL:
    try:
        parsed = url if isinstance(url, URL) else URL(url)
    except (ValueError, TypeError):
        raise InvalidImageError(f"{where}: {url!s} is not a valid URL.", where) from None
    if parsed.scheme not in ("http", "https"):
        raise InvalidImageError(f"{where}: {url!s} is not an http(s) URL.", where)
    host = (parsed.host or "").lower()
    if not host:
        raise InvalidImageError(f"{where}: {url!s} names no host.", where)
    if limits.allowed_domains is not None and host not in limits.allowed_domains:
        raise InvalidImageError(f"{where}: the host {host!r} of {url!s} is not one of --allowed-media-domains "
                                f"({', '.join(limits.allowed_domains)}).", where)
    return parsed


async def fetch_image(session: aiohttp.ClientSession, url: str, where: str, limits: FetchLimits) -> bytes:
    """The image's bytes; InvalidImageError naming the part for anything but a 200 image within the bounds."""
    try:
        async with asyncio.timeout(limits.timeout_s):
            return await _download(session, url, where, limits)
    except InvalidImageError:
        raise
    except TimeoutError:
        raise InvalidImageError(f"{where}: {url} did not arrive within {limits.timeout_s:g} s "
                                "(VLLM_IMAGE_FETCH_TIMEOUT).", where) from None
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise InvalidImageError(f"{where}: fetching {url} failed: {exc or type(exc).__name__}.", where) from None


async def _download(session: aiohttp.ClientSession, url: str, where: str, limits: FetchLimits) -> bytes:
    target = _checked_url(url, where, limits)
    for _ in range(limits.max_redirects + 1):
        async with session.get(target, allow_redirects=False) as response:
            if response.status in _REDIRECTS:
                if not limits.allow_redirects:
                    raise InvalidImageError(f"{where}: {target} redirects (HTTP {response.status}), and redirects "
                                            "are off (VLLM_MEDIA_URL_ALLOW_REDIRECTS=0).", where)
                location = response.headers.get("Location")
                if not location:
                    raise InvalidImageError(f"{where}: {target} redirects without a Location.", where)
                target = _checked_url(response.url.join(URL(location)), where, limits)
                continue
            if response.status != 200:
                raise InvalidImageError(f"{where}: {target} answered HTTP {response.status} {response.reason or ''}"
                                        .rstrip() + "; an image URL must answer 200.", where)
            declared = response.content_length
            if declared is not None and declared > limits.max_bytes:
                raise InvalidImageError(f"{where}: {target} is {declared} bytes (its Content-Length); an image "
                                        f"may be at most {limits.max_bytes}.", where)
            too_large = f"{where}: {target} is larger than {limits.max_bytes} bytes, the most an image may be."
            body = bytearray()
            async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
                body += chunk
                if len(body) > limits.max_bytes:
                    raise InvalidImageError(too_large, where)  # leaving the block drops the connection
            return bytes(body)
    raise InvalidImageError(f"{where}: {url} redirects more than {limits.max_redirects} times.", where)


async def fetch_all(session: aiohttp.ClientSession, parts: list[UrlPart], limits: FetchLimits) -> list[bytes]:
    """Every part's bytes, downloaded at once; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(fetch_image(session, part.url, part.where, limits)) for part in parts]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def fetch_messages_sync(messages: list, limits: FetchLimits, max_images: int) -> list:
    """`LLM.chat`: the messages with their http(s) image URLs downloaded (same bounds as the server), in a
    loop of a short-lived thread, so that a caller inside a running loop (a notebook) works too."""
    parts = http_url_parts(messages)
    if not parts:
        return messages
    check_image_count(messages, max_images)

    async def download() -> list[bytes]:
        async with new_session() as session:
            return await fetch_all(session, parts, limits)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncserve-fetch") as pool:
        contents = pool.submit(asyncio.run, download()).result()
    return with_fetched(messages, parts, contents)
