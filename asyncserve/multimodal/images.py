"""An image from a request, decoded with Pillow under limits: a broken, huge or hostile image is an
`InvalidImageError` naming the part it came in, never a stall, a memory blow-up or a 500.

Limits: the encoded bytes (a data URL, a file or a download), the pixel count read from the header before
anything is decoded (a decompression bomb fails there), and a fully decoded result (a truncated file fails
here, not later inside the processor)."""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
from urllib.parse import unquote, urlparse

from asyncserve.errors import InvalidParameterError

MAX_IMAGE_BYTES = 20 * 1024 * 1024   # an encoded image (about 27 MB of base64)
MAX_IMAGE_PIXELS = 40_000_000        # decoded: about 160 MB of RGBA; Qwen's processor resizes to ~12.8 MP anyway


class InvalidImageError(InvalidParameterError):
    """An image part cannot be used: the message says which part and why (HTTP 400)."""


class FetchedImage(str):
    """An http(s) image URL already downloaded (multimodal/fetch.py), carrying its bytes. A str, so that the
    part passes every check a URL does; JSON never makes one, so a client cannot forge it."""

    data: bytes

    def __new__(cls, url: str, data: bytes) -> FetchedImage:
        fetched = super().__new__(cls, url)
        fetched.data = data
        return fetched


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        raise InvalidImageError("Images need Pillow: pip install pillow.") from None
    return Image


def checked_image(image, where: str):
    """A PIL image (given by a caller as is) as RGB, fully decoded; refused if empty or too large."""
    Image = _pil()
    if not isinstance(image, Image.Image):
        raise InvalidImageError(f"{where} must be a PIL.Image.Image, got {type(image).__name__}.", where)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{where} is empty ({width}x{height} pixels).", where)
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidImageError(f"{where} has {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} are accepted. "
                                "Send a smaller image.", where)
    try:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"{where} cannot be decoded: {exc}.", where) from None


def decode_image_bytes(data: bytes, where: str):
    """Encoded image bytes (PNG, JPEG, WebP, GIF ...) -> an RGB PIL image."""
    Image = _pil()
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidImageError(f"{where} is {len(data)} bytes; at most {MAX_IMAGE_BYTES} are accepted.", where)
    if not data:
        raise InvalidImageError(f"{where} is empty.", where)
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"{where} is not an image Pillow can read: {exc}.", where) from None
    return checked_image(image, where)


def load_image_url(url: str, where: str, allowed_local_media_path: str | None):
    """An image part's URL: `data:image/...;base64,...`, `file://` under --allowed-local-media-path, or an
    http(s) URL downloaded beforehand (a FetchedImage: the server and `LLM.chat` fetch before decoding)."""
    if isinstance(url, FetchedImage):
        return decode_image_bytes(url.data, where)
    if not isinstance(url, str) or not url:
        raise InvalidImageError(f"{where} must be a non-empty URL string.", where)
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or ";base64" not in header:
            raise InvalidImageError(f"{where} must be a base64 data URL (data:image/png;base64,...).", where)
        if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise InvalidImageError(f"{where} is larger than {MAX_IMAGE_BYTES} bytes.", where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidImageError(f"{where} is not valid base64.", where) from None
        return decode_image_bytes(data, where)
    scheme = urlparse(url).scheme
    if scheme == "file":
        return decode_image_bytes(_read_local(url, where, allowed_local_media_path), where)
    if scheme in ("http", "https"):
        raise InvalidImageError(f"{where}: http(s) image URLs are not fetched on this path; send the image inline "
                                "as a base64 data URL (data:image/png;base64,...).", where)
    raise InvalidImageError(f"{where} has an unsupported URL scheme {scheme!r}: send a base64 data URL or an "
                            "http(s) URL.", where)


def _read_local(url: str, where: str, allowed: str | None) -> bytes:
    if allowed is None:
        raise InvalidImageError(f"{where}: file:// URLs are off; start the server with --allowed-local-media-path "
                                "FOLDER to read images from FOLDER.", where)
    path = os.path.realpath(unquote(urlparse(url).path))
    if os.path.commonpath([path, allowed]) != allowed:
        raise InvalidImageError(f"{where}: {path} is outside --allowed-local-media-path.", where)
    try:
        if os.path.getsize(path) > MAX_IMAGE_BYTES:
            raise InvalidImageError(f"{where} is larger than {MAX_IMAGE_BYTES} bytes.", where)
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise InvalidImageError(f"{where} cannot be read: {exc.strerror}.", where) from None


def content_hash(image) -> int:
    """A 63-bit hash of the decoded RGB pixels and size (so PNG and JPEG of equal pixels share cache)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{image.width}x{image.height}".encode())
    digest.update(image.tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1
