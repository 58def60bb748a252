"""The simulator's images: content parts checked as OpenAI's endpoint checks them, and each image
counted as a fixed number of prompt tokens per 512 x 512 tile.

The count is OpenAI's published rule for its GPT-4o-class models: `detail: low` costs 85 tokens;
otherwise (high, auto or unset) the image is scaled down to fit in 2048 x 2048, then down so that
its shorter side is at most 768, and costs 85 plus 170 per 512 x 512 tile it spans. A 1024 x 1024
image: 768 x 768, 4 tiles, 765 tokens. An image's size is read from its PNG, JPEG, GIF or WebP
header, without decoding it. An http(s) URL is not fetched: it counts as a 512 x 512 image.

A part the real endpoint refuses is a 400 with its message, param and code: a type other than
text or image_url, an image_url without a url, a url neither http(s) nor a base64 data URL of an
image, bytes that are no PNG, JPEG, GIF or WebP, an image in a message whose role is not user.
"""

from __future__ import annotations

import binascii
import math
import struct
from typing import Any

BASE_TOKENS = 85
TILE_TOKENS = 170
TILE = 512
FIT = 2048  # high detail: scaled to fit in FIT x FIT ...
SHORT = 768  # ... then so that its shorter side is at most SHORT
URL_SIDE = 512  # an http(s) URL, not fetched, counts as a URL_SIDE x URL_SIDE image
PART_TYPES = ("text", "image_url")
DETAILS = ("low", "high", "auto")
_DATA_URL_EXAMPLE = "data:image/png;base64,aW1nIGJ5dGVzIGhlcmU="
_FORMATS = "['png', 'jpeg', 'gif', 'webp']"
# JPEG start-of-frame markers, which carry the size: C0-CF but C4 (DHT), C8 (JPG) and CC (DAC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class BadPart(ValueError):
    """A content part the endpoint refuses (400), with the param and code it names."""

    def __init__(self, message: str, param: str | None, code: str) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def image_tokens(width: int, height: int, detail: str | None) -> int:
    """The prompt tokens of one image of this size, by the tile rule."""
    if detail == "low":
        return BASE_TOKENS
    width, height = _scaled(width, height, FIT / max(width, height))
    width, height = _scaled(width, height, SHORT / min(width, height))
    return BASE_TOKENS + TILE_TOKENS * math.ceil(width / TILE) * math.ceil(height / TILE)


def _scaled(width: int, height: int, scale: float) -> tuple[int, int]:
    """Scaled down by `scale`, never up; a side of one pixel stays one."""
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, GIF, WebP or JPEG header; None for anything else."""
    size: tuple[int, int] | None
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR" and len(data) >= 24:
        size = struct.unpack(">II", data[16:24])
    elif data.startswith((b"GIF87a", b"GIF89a")) and len(data) >= 10:
        size = struct.unpack("<HH", data[6:10])
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        size = _webp(data)
    elif data.startswith(b"\xff\xd8"):
        size = _jpeg(data)
    else:
        return None
    return size if size is not None and size[0] > 0 and size[1] > 0 else None


def _webp(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def _jpeg(data: bytes) -> tuple[int, int] | None:
    """The size in the first start-of-frame segment, walking the segments before it."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length
            at += 2
            continue
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        if marker in _SOF:
            if at + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[at + 5 : at + 9])
            return width, height
        if marker == 0xD9 or length < 2:
            return None
        at += 2 + length
    return None


def content_image_tokens(content: list[Any], where: str, role: str) -> int:
    """The prompt tokens of a message's image parts; BadPart for a part the endpoint refuses.
    `where` is the message's param (`messages[0]`)."""
    tokens = 0
    for j, part in enumerate(content):
        param = f"{where}.content[{j}]"
        kind = part.get("type")
        if not isinstance(kind, str):
            raise BadPart(
                f"Missing required parameter: '{param}.type'.", f"{param}.type", "missing_required_parameter"
            )
        if kind not in PART_TYPES:
            supported = " and ".join(f"'{t}'" for t in PART_TYPES)
            raise BadPart(
                f"Invalid value: '{kind}'. Supported values are: {supported}.",
                f"{param}.type",
                "invalid_value",
            )
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise BadPart(
                    f"Missing required parameter: '{param}.text'.",
                    f"{param}.text",
                    "missing_required_parameter",
                )
            continue
        if role != "user":
            raise BadPart(
                f"Invalid '{where}'. Image URLs are only allowed for messages with role 'user', but this "
                f"message with role '{role}' contains an image URL.",
                where,
                "invalid_value",
            )
        tokens += _part_tokens(part.get("image_url"), f"{param}.image_url")
    return tokens


def _part_tokens(image: Any, param: str) -> int:
    if not isinstance(image, dict):
        raise BadPart(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    url, detail = image.get("url"), image.get("detail")
    if url is None:
        raise BadPart(
            f"Missing required parameter: '{param}.url'.", f"{param}.url", "missing_required_parameter"
        )
    if not isinstance(url, str):
        kind = "an object" if isinstance(url, dict) else f"a {type(url).__name__}"
        raise BadPart(
            f"Invalid type for '{param}.url': expected a string, but got {kind} instead.",
            f"{param}.url",
            "invalid_type",
        )
    if detail is not None and detail not in DETAILS:
        raise BadPart(
            f"Invalid value: '{detail}'. Supported values are: 'low', 'high', and 'auto'.",
            f"{param}.detail",
            "invalid_value",
        )
    if url.startswith(("http://", "https://")):
        return image_tokens(URL_SIDE, URL_SIDE, detail)
    size = dimensions(_data_url_bytes(url, f"{param}.url"))
    if size is None:
        raise BadPart(
            f"You uploaded an unsupported image. Please make sure your image has of one the following "
            f"formats: {_FORMATS}.",
            None,
            "invalid_image_format",
        )
    return image_tokens(*size, detail)


def _data_url_bytes(url: str, param: str) -> bytes:
    """The bytes of a base64 data URL with an image MIME type; BadPart says what is wrong."""

    def bad(got: str) -> BadPart:
        return BadPart(
            f"Invalid image URL: '{param}'. Expected a base64-encoded data URL with an image MIME type "
            f"(e.g. '{_DATA_URL_EXAMPLE}'), but got {got}.",
            param,
            "invalid_value",
        )

    if not url.startswith("data:"):
        raise bad("a value without the 'data:' prefix")
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise bad("a value that is not base64-encoded")
    if not header[5:].startswith("image/"):
        raise bad("an unsupported MIME type")
    if not payload:
        raise bad("empty base64-encoded bytes")
    try:
        return binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):  # ValueError: a character outside ASCII
        raise bad("an invalid base64-encoded value") from None
