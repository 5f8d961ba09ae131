"""Chat messages with image parts (OpenAI's `image_url`, vLLM's `image_pil`) -> messages a chat template
renders (each image part as {"type": "image"}) and the images, decoded, in order. The server and
`LLM.chat` share it; each image part is named in errors as `messages[i].content[j]`."""
from __future__ import annotations

from asyncserve.errors import InvalidParameterError
from asyncserve.multimodal.images import checked_image, load_image_url

IMAGE_PART_TYPES = ("image_url", "image_pil")


def has_image_parts(messages: list[dict]) -> bool:
    return any(isinstance(message.get("content"), list) and any(
        isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES for part in message["content"])
        for message in messages)


def first_image_part(messages: list[dict]) -> str | None:
    """'messages[i].content[j]' of the first image part (what a model without vision refuses)."""
    for i, message in enumerate(messages):
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else ()):
            if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES:
                return f"messages[{i}].content[{j}]"
    return None


def split_image_parts(messages: list[dict], allowed_local_media_path: str | None = None
                      ) -> tuple[list[dict], list]:
    """(messages with image parts as {"type": "image"}, the decoded images in order)."""
    rendered, images = [], []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            rendered.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                images.append(load_image_url(url, where, allowed_local_media_path))
                parts.append({"type": "image"})
            elif kind == "image_pil":
                images.append(checked_image(part.get("image_pil"), where))
                parts.append({"type": "image"})
            else:
                raise InvalidParameterError(f"'{where}' must be a text, image_url or image_pil part, got "
                                            f"{kind!r}.", where)
        rendered.append({**message, "content": parts})
    return rendered, images
