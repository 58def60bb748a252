"""The simulator's images (#23 item 6): each image counted as prompt tokens by the tile rule, its
size read from the header of each format Pillow writes, and malformed parts refused with the
400 a real endpoint gives."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from batchrun.simulator import serve_in_thread
from batchrun.simulator.vision import dimensions, image_tokens

TEXT_TOKENS = 3 + 4  # "Describe it.": "Describe", "it" and "."; and 4 per message


def image(format: str, size: tuple[int, int], **save: Any) -> bytes:
    out = io.BytesIO()
    mode = "RGBA" if save.pop("alpha", False) else "RGB"
    Image.new(mode, size, (200, 30, 30)).save(out, format=format, **save)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def body(*parts: Any, role: str = "user") -> dict[str, Any]:
    content = [{"type": "text", "text": "Describe it."}, *parts]
    return {"model": "grok-4.3", "messages": [{"role": role, "content": content}]}


def picture(url: str, detail: str | None = None) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **({"detail": detail} if detail else {})}}


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with serve_in_thread() as sim, httpx.Client(base_url=sim.base_url, timeout=10) as http:
        yield http


def usage(client: httpx.Client, request: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/chat/completions", json=request)
    assert response.status_code == 200, response.text
    return dict(response.json()["usage"])


@pytest.mark.parametrize(
    ("size", "detail", "tokens"),
    [
        ((1024, 1024), "high", 765),  # OpenAI's worked examples: 768 x 768, 4 tiles
        ((2048, 4096), None, 1105),  # 1024 x 2048, then 768 x 1536: 6 tiles
        ((4096, 8192), "auto", 1105),
        ((4096, 8192), "low", 85),
        ((100, 100), None, 255),  # never scaled up: one tile
        ((512, 512), None, 255),
        ((513, 512), None, 425),
        ((2000, 100), None, 765),  # the shorter side is already under 768
    ],
)
def test_the_tile_rule(size: tuple[int, int], detail: str | None, tokens: int) -> None:
    assert image_tokens(*size, detail) == tokens


def test_images_add_their_tokens_to_the_prompt(client: httpx.Client) -> None:
    small, large = image("PNG", (64, 48)), image("JPEG", (1024, 1024))
    text_only = usage(client, body())["prompt_tokens"]

    both = usage(client, body(picture(data_url(small)), picture(data_url(large, "image/jpeg"))))
    low = usage(client, body(picture(data_url(large, "image/jpeg"), "low")))
    by_url = usage(client, body(picture("https://images.example/a.jpg")))

    assert text_only == TEXT_TOKENS
    assert both["prompt_tokens"] == text_only + 255 + 765
    assert both["total_tokens"] == both["prompt_tokens"] + both["completion_tokens"]
    assert low["prompt_tokens"] == text_only + 85
    assert by_url["prompt_tokens"] == text_only + 255  # not fetched: counted as 512 x 512


FORMATS = [
    ("PNG", {}),
    ("PNG", {"alpha": True}),
    ("GIF", {}),
    ("JPEG", {}),
    ("JPEG", {"progressive": True, "exif": b"Exif\0\0" + bytes(64)}),
    ("WEBP", {}),  # lossy: VP8
    ("WEBP", {"lossless": True}),  # VP8L
    ("WEBP", {"alpha": True, "exif": b"Exif\0\0" + bytes(16)}),  # VP8X
]


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(FORMATS), st.integers(1, 2000), st.integers(1, 2000))
def test_the_size_is_read_from_every_header_pillow_writes(
    format: tuple[str, dict[str, Any]], width: int, height: int
) -> None:
    name, options = format
    data = image(name, (width, height), **dict(options))

    assert dimensions(data) == Image.open(io.BytesIO(data)).size == (width, height)


MAGIC = [b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", b"\xff\xd8\xff", b"GIF89a", b"RIFF\0\0\0\0WEBPVP8", b""]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(MAGIC), st.binary(max_size=80))
def test_any_bytes_give_a_size_or_none_and_never_raise(magic: bytes, rest: bytes) -> None:
    size = dimensions(magic + rest)

    assert size is None or (size[0] > 0 and size[1] > 0)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(MAGIC), st.binary(max_size=80), st.sampled_from([None, "low", "high"]))
def test_any_image_bytes_are_counted_or_refused_as_unsupported(
    client: httpx.Client, magic: bytes, rest: bytes, detail: str | None
) -> None:
    data = magic + rest
    response = client.post("/chat/completions", json=body(picture(data_url(data), detail)))

    size = dimensions(data)
    if size is None:
        assert response.status_code == 400
        empty = "invalid_value"  # no bytes at all: "got empty base64-encoded bytes"
        assert response.json()["error"]["code"] == ("invalid_image_format" if data else empty)
    else:
        assert response.status_code == 200
        assert response.json()["usage"]["prompt_tokens"] == TEXT_TOKENS + image_tokens(*size, detail)


URL = "messages[0].content[1].image_url.url"
NOT_A_DATA_URL = (
    f"Invalid image URL: '{URL}'. Expected a base64-encoded data URL with an image MIME type "
    "(e.g. 'data:image/png;base64,aW1nIGJ5dGVzIGhlcmU='), but got "
)


@pytest.mark.parametrize(
    ("part", "message", "param", "code"),
    [
        (
            {"type": "image", "image": "x"},
            "Invalid value: 'image'. Supported values are: 'text' and 'image_url'.",
            "messages[0].content[1].type",
            "invalid_value",
        ),
        (
            {"image_url": {"url": "https://a.example/b.png"}},
            "Missing required parameter: 'messages[0].content[1].type'.",
            "messages[0].content[1].type",
            "missing_required_parameter",
        ),
        (
            {"type": "text"},
            "Missing required parameter: 'messages[0].content[1].text'.",
            "messages[0].content[1].text",
            "missing_required_parameter",
        ),
        (
            {"type": "image_url"},
            "Missing required parameter: 'messages[0].content[1].image_url'.",
            "messages[0].content[1].image_url",
            "missing_required_parameter",
        ),
        (
            {"type": "image_url", "image_url": {"detail": "low"}},
            f"Missing required parameter: '{URL}'.",
            URL,
            "missing_required_parameter",
        ),
        (
            {"type": "image_url", "image_url": {"url": {"href": "x"}}},
            f"Invalid type for '{URL}': expected a string, but got an object instead.",
            URL,
            "invalid_type",
        ),
        (
            picture("photos/a.png"),
            NOT_A_DATA_URL + "a value without the 'data:' prefix.",
            URL,
            "invalid_value",
        ),
        (
            picture("data:image/png,abc"),
            NOT_A_DATA_URL + "a value that is not base64-encoded.",
            URL,
            "invalid_value",
        ),
        (
            picture("data:text/plain;base64,aGk="),
            NOT_A_DATA_URL + "an unsupported MIME type.",
            URL,
            "invalid_value",
        ),
        (
            picture("data:image/png;base64,"),
            NOT_A_DATA_URL + "empty base64-encoded bytes.",
            URL,
            "invalid_value",
        ),
        (
            picture("data:image/png;base64,iVBOR w0K!"),
            NOT_A_DATA_URL + "an invalid base64-encoded value.",
            URL,
            "invalid_value",
        ),
        (
            picture(data_url(b"just some text, no image")),
            "You uploaded an unsupported image. Please make sure your image has of one the following "
            "formats: ['png', 'jpeg', 'gif', 'webp'].",
            None,
            "invalid_image_format",
        ),
        (
            picture(data_url(image("PNG", (4, 4))), "medium"),
            "Invalid value: 'medium'. Supported values are: 'low', 'high', and 'auto'.",
            "messages[0].content[1].image_url.detail",
            "invalid_value",
        ),
    ],
)
def test_malformed_parts_get_the_400_a_real_endpoint_gives(
    client: httpx.Client, part: dict[str, Any], message: str, param: str | None, code: str
) -> None:
    response = client.post("/chat/completions", json=body(part))

    assert response.status_code == 400
    assert response.json() == {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }


def test_an_image_outside_a_user_message_is_refused(client: httpx.Client) -> None:
    response = client.post(
        "/chat/completions", json=body(picture(data_url(image("PNG", (4, 4)))), role="system")
    )

    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        "Invalid 'messages[0]'. Image URLs are only allowed for messages with role 'user', but this "
        "message with role 'system' contains an image URL."
    )
    assert response.json()["error"]["param"] == "messages[0]"
