"""Images in rows (prompt.images): what a cell names, read once to key its row and again to send it.

A cell holds a local path (relative to the input's folder), an http(s) URL, an object-store URL
(s3://, gs://, az://, read with the credentials polars finds for the input), image bytes, or a
list of these. Rendering a row (prompts.py) reads nothing: each image becomes an `ImageRef`. The
key pass (plan.py) reads each image once, streamed, for the sha256 of its bytes, which the row's
request key hashes instead of its path: a changed image is sent again, a renamed one is not. When
the row is sent, `ImageSender` (the core's `resolve`, for every executor) reads it again off the
event loop, checks that it is the image keyed, resizes it (images.max_side) and inlines it as a
data URL; only the rows in flight hold their images. A URL sent as it is (without images.fetch)
is keyed by its text. An image that cannot be sent fails its row (RowInputError), not the job.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import threading
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchrun.errors import RowInputError
from batchrun.storage import Location, Url, cloud_reason

MB = 1_000_000
# With images.max_side, an image may be larger than images.max_mb before it is resized: read up
# to this many times max_mb, past which it fails its row unread.
RESIZE_READ_FACTOR = 10
FETCH_TIMEOUT_S = 60.0
CHUNK = 1 << 20
READERS = 16  # images of a key-pass batch read at once: object stores and URLs are slow to answer
OBJECT_SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs", "az": "az", "azure": "az"}
OBJECT_SCHEMES |= {"abfs": "abfs", "abfss": "abfss"}
NOT_AN_IMAGE = "not a PNG, JPEG, WebP or GIF image"
SHOWN_URL_CHARS = 48  # of a data URL, as `validate` shows a request
EXTRA = "pip install 'batchrun[images]'"
# Where an image's bytes are: a local file, an object-store URL, an http(s) URL to fetch, the
# bytes themselves, or nowhere (a cell that names no image).
Source = Path | Url | str | bytes | None


def sniff(head: bytes) -> str | None:
    """The MIME type the bytes' magic number says, for the four types every vision API takes."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    return None


class ImageProblem(Exception):
    """Why an image cannot be sent, in words that follow its name."""


class ImageRef(dict[str, Any]):
    """An image part's `image_url` until its row is sent. As a dict it is what the request key
    hashes, and what JSON shows: `{"url": "sha256:HEX", "detail", "max_side"}` once keyed (the
    name before), or `{"url": NAME, "error": ...}` for one that cannot be read. Where its bytes are
    (`source`: a Path, a Url, an http(s) URL, or the bytes) is kept apart: never in a key, never
    in the checkpoint."""

    __slots__ = ("error", "name", "sha256", "source")

    def __init__(self, name: str, source: Source, extra: dict[str, Any]):
        super().__init__(url=name, **extra)
        self.name = name
        self.source = source
        self.sha256: str | None = None
        self.error: str | None = None

    def fail(self, error: str) -> None:
        self.error = error
        self.clear()
        self.update(url=self.name, error=error)

    def __reduce__(self) -> Any:  # dict's pickling would drop the slots (Ray ships refs to workers)
        return _ref, (self.name, self.source, dict(self), self.sha256, self.error)


def _ref(
    name: str,
    source: Path | Url | str | bytes | None,
    items: dict[str, Any],
    sha: str | None,
    error: str | None,
) -> ImageRef:
    ref = ImageRef(name, source, {})
    ref.update(items)
    ref.sha256, ref.error = sha, error
    return ref


@dataclass(frozen=True)
class ImageSettings:
    """prompt.images and the images section, with the folder relative paths are read from."""

    columns: tuple[str, ...]
    folder: Location
    detail: str | None = None
    max_side: int | None = None
    fetch: bool = False
    max_mb: float = 20.0

    @property
    def read_cap(self) -> int:
        """The most bytes read of one image."""
        return int(self.max_mb * MB * (RESIZE_READ_FACTOR if self.max_side else 1))

    def parts(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The row's image parts, in column order, each cell's list in its order; nothing is read.
        A null (input.on_null: empty) or a null in a list is no part."""
        parts = []
        for column in self.columns:
            value = row[column]
            for item in value if isinstance(value, list | tuple) else [value]:
                if item is not None:
                    parts.append({"type": "image_url", "image_url": self._image_url(column, item)})
        return parts

    def _image_url(self, column: str, value: Any) -> dict[str, Any]:
        extra: dict[str, Any] = {} if self.detail is None else {"detail": self.detail}
        if isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value)
            return ImageRef(f"column '{column}' ({len(data):,} bytes)", data, extra)
        if not isinstance(value, str):
            ref = ImageRef(f"column '{column}'", None, extra)
            ref.fail(f"holds {type(value).__name__} {str(value)[:40]!r}, not a path, a URL or image bytes")
            return ref
        name = value if len(value) <= 300 else value[:300] + "..."
        scheme = value.split("://", 1)[0].lower() if "://" in value else None
        if scheme in ("http", "https"):
            return ImageRef(name, value, extra) if self.fetch else {"url": value, **extra}
        if scheme is not None:
            if scheme in OBJECT_SCHEMES:
                return ImageRef(name, Url(value), extra)
            ref = ImageRef(name, None, extra)
            ref.fail(f"{scheme}:// is not a scheme batchrun reads images from (http, https, s3, gs, az)")
            return ref
        if not value.strip():
            ref = ImageRef(f"column '{column}'", None, extra)
            ref.fail("holds an empty name")
            return ref
        path = Path(value)
        if path.is_absolute():
            return ImageRef(name, path, extra)
        folder = self.folder
        return ImageRef(name, folder / path if isinstance(folder, Path) else Url(folder.text + value), extra)

    def digest(self, ref: ImageRef) -> None:
        """Key `ref`: read it (streamed) for the sha256 of its bytes and check that it is an image;
        what fails is kept on it, to fail its row when the row is sent."""
        if ref.sha256 is not None or ref.error is not None:
            return
        try:
            head, ref.sha256 = _hashed(ref.source, self.read_cap, self)
            if sniff(head) is None:
                raise ImageProblem(NOT_AN_IMAGE)
        except ImageProblem as exc:
            ref.fail(str(exc))
            return
        ref["url"] = f"sha256:{ref.sha256}"
        if self.max_side:
            ref["max_side"] = self.max_side

    def digest_all(self, bodies: Iterable[dict[str, Any] | None]) -> None:
        """Key every image of `bodies`, several read at once."""
        refs = [ref for body in bodies if body is not None for ref in refs_of(body)]
        if len(refs) <= 1:
            for ref in refs:
                self.digest(ref)
            return
        with ThreadPoolExecutor(min(READERS, len(refs)), thread_name_prefix="batchrun-keys") as pool:
            for _ in pool.map(self.digest, refs):
                pass

    def inline(self, body: dict[str, Any]) -> dict[str, Any]:
        """`body` as it is sent: each image read again, checked against its key, resized and
        inlined as a data URL; RowInputError names the image that cannot be sent."""
        messages = []
        for message in body["messages"]:
            content = message.get("content")
            if isinstance(content, list) and any(isinstance(p.get("image_url"), ImageRef) for p in content):
                message = {**message, "content": [self._sent_part(part) for part in content]}
            messages.append(message)
        return {**body, "messages": messages}

    def _sent_part(self, part: dict[str, Any]) -> dict[str, Any]:
        ref = part.get("image_url")
        if not isinstance(ref, ImageRef):
            return part
        try:
            url = self._data_url(ref)
        except ImageProblem as exc:
            raise RowInputError(f"{ref.name}: {exc}") from None
        return {
            "type": "image_url",
            "image_url": {"url": url, **({"detail": ref["detail"]} if "detail" in ref else {})},
        }

    def _data_url(self, ref: ImageRef) -> str:
        if ref.error is not None:
            raise ImageProblem(ref.error)
        self.digest(ref)  # a ref not keyed by a pass (validate's first rows)
        if ref.error is not None:
            raise ImageProblem(ref.error)
        data = _read(ref.source, self.read_cap, self)
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise ImageProblem("changed since this run read it; run again to send it as it is now")
        mime = sniff(data[:16])
        if mime is None:
            raise ImageProblem(NOT_AN_IMAGE)
        if self.max_side:
            data = _resized(data, self.max_side)
        if len(data) > self.max_mb * MB:
            raise ImageProblem(
                f"{size_text(len(data))} as sent, more than images.max_mb ({self.max_mb:g} MB)"
            )
        return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def refs_of(body: dict[str, Any]) -> list[ImageRef]:
    """The images of a rendered body still to be read."""
    return [
        part["image_url"]
        for message in body["messages"]
        if isinstance(content := message.get("content"), list)
        for part in content
        if isinstance(part.get("image_url"), ImageRef)
    ]


def shown(body: dict[str, Any]) -> dict[str, Any]:
    """A request as `validate` shows it: a data URL cut short, an image not sent by its name."""

    def part(p: dict[str, Any]) -> dict[str, Any]:
        image = p.get("image_url")
        if not isinstance(image, dict):
            return p
        url = image["url"]
        if isinstance(image, ImageRef):
            url = image.name
        elif isinstance(url, str) and url.startswith("data:") and len(url) > SHOWN_URL_CHARS:
            url = f"{url[:SHOWN_URL_CHARS]}... ({len(url):,} characters)"
        return {**p, "image_url": {"url": url, **{k: v for k, v in image.items() if k == "detail"}}}

    messages = [
        {**m, "content": [part(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
        for m in body["messages"]
    ]
    return {**body, "messages": messages}


class ImageSender:
    """The core's `resolve`: a row's body with its images inlined, made in threads of its own so
    that slow reads keep neither the event loop nor the plan's keying waiting."""

    def __init__(self, settings: ImageSettings, width: int):
        self._settings = settings
        self._pool = ThreadPoolExecutor(max(1, min(32, width)), thread_name_prefix="batchrun-images")

    async def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        if not refs_of(body):
            return body
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._settings.inline, body)


def pillow_missing(settings: ImageSettings) -> str | None:
    """Why the job cannot run here: images.max_side without Pillow installed."""
    import importlib.util

    if settings.max_side and importlib.util.find_spec("PIL") is None:
        return f"images.max_side resizes images with Pillow, which is not installed: {EXTRA}"
    return None


# --- reading ---


def _hashed(source: Source, cap: int, settings: ImageSettings) -> tuple[bytes, str]:
    """The first bytes of an image and the sha256 of all of them, read a chunk at a time."""
    if isinstance(source, bytes):
        _check_size(len(source), cap, settings)
        return source[:16], hashlib.sha256(source).hexdigest()
    digest = hashlib.sha256()
    head = b""
    for chunk in _chunks(source, cap, settings):
        if len(head) < 16:
            head += chunk[: 16 - len(head)]
        digest.update(chunk)
    return head, digest.hexdigest()


def _read(source: Source, cap: int, settings: ImageSettings) -> bytes:
    if isinstance(source, bytes):
        return source
    return b"".join(_chunks(source, cap, settings))


def _chunks(source: Path | Url | str | None, cap: int, settings: ImageSettings) -> Iterable[bytes]:
    if isinstance(source, Path):
        return _file_chunks(source, cap, settings)
    if isinstance(source, Url):
        return _object_chunks(source, cap, settings)
    if isinstance(source, str):
        return _fetched_chunks(source, cap, settings)
    raise ImageProblem("nothing to read")


def size_text(size: int) -> str:
    return f"{size / MB:,.1f} MB" if size >= MB / 10 else f"{size:,} bytes"


def _check_size(size: int, cap: int, settings: ImageSettings) -> None:
    if size <= cap:
        return
    if settings.max_side:
        raise ImageProblem(
            f"{size_text(size)}, more than {RESIZE_READ_FACTOR} x images.max_mb ({cap / MB:g} MB) to resize"
        )
    raise ImageProblem(f"{size_text(size)}, more than images.max_mb ({settings.max_mb:g} MB)")


def _file_chunks(path: Path, cap: int, settings: ImageSettings) -> Iterable[bytes]:
    try:
        with path.open("rb") as file:
            _check_size(path.stat().st_size, cap, settings)
            read = 0
            while chunk := file.read(CHUNK):
                read += len(chunk)
                _check_size(read, cap, settings)  # grown since its size was read
                yield chunk
    except FileNotFoundError:
        raise ImageProblem("no such file") from None
    except IsADirectoryError:
        raise ImageProblem("is a folder, not a file") from None
    except OSError as exc:
        raise ImageProblem(f"cannot read it ({exc.strerror or exc})") from None


_stores: dict[str, Any] = {}
_stores_lock = threading.Lock()


def _object_chunks(url: Url, cap: int, settings: ImageSettings) -> Iterable[bytes]:
    try:
        import obstore
        from obstore.store import from_url
    except ImportError:
        raise ImageProblem(f"reading {url.scheme}:// images needs obstore: {EXTRA}") from None
    scheme = OBJECT_SCHEMES[url.scheme]
    rest = url.text.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    root = f"{scheme}://{bucket}"
    try:
        with _stores_lock:
            store = _stores.get(root) or _stores.setdefault(root, from_url(root))
        got = obstore.get(store, key)
        _check_size(int(got.meta["size"]), cap, settings)
        read = 0
        for chunk in got.stream(min_chunk_size=CHUNK):
            read += len(chunk)
            _check_size(read, cap, settings)
            yield bytes(chunk)
    except ImageProblem:
        raise
    except Exception as exc:  # obstore raises its own tree, and OSErrors, for every failure
        raise ImageProblem(f"cannot read it ({cloud_reason(exc)})") from None


_client: Any = None
_client_lock = threading.Lock()


def _http_client() -> Any:
    global _client
    import httpx2

    with _client_lock:
        if _client is None:
            # One client for its TLS setup, no connection kept between images: it is never closed.
            limits = httpx2.Limits(max_keepalive_connections=0)
            _client = httpx2.Client(timeout=FETCH_TIMEOUT_S, follow_redirects=True, limits=limits)
        return _client


def _fetched_chunks(url: str, cap: int, settings: ImageSettings) -> Iterable[bytes]:
    import httpx2

    try:
        with _http_client().stream("GET", url) as response:
            if response.status_code != 200:
                raise ImageProblem(f"HTTP {response.status_code} when fetched")
            if (length := response.headers.get("content-length", "")).isdigit():
                _check_size(int(length), cap, settings)
            read = 0
            for chunk in response.iter_bytes(CHUNK):
                read += len(chunk)
                _check_size(read, cap, settings)
                yield chunk
    except httpx2.HTTPError as exc:
        raise ImageProblem(f"cannot fetch it ({type(exc).__name__}: {exc})") from None


# --- resizing ---

_opening = threading.Lock()  # warnings filters are process-wide: one image is opened at a time


def _resized(data: bytes, max_side: int) -> bytes:
    """The image with its longer side at most `max_side`, in its own format; as it was if it fits."""
    from PIL import Image

    try:
        image = _opened(data)
        if max(image.size) <= max_side:
            return data
        format = image.format or "PNG"
        turned = _turned(image, max_side)
        out = io.BytesIO()
        turned.save(out, format=format, **({"quality": 90} if format in ("JPEG", "WEBP") else {}))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageProblem("has too many pixels to resize") from None
    except Exception as exc:  # a broken file makes Pillow raise most kinds (OSError, struct.error...)
        raise ImageProblem(f"cannot be decoded to resize ({type(exc).__name__}: {exc})") from None
    return out.getvalue()


def _opened(data: bytes) -> Any:
    """The image, opened lazily by Pillow; a decompression bomb raises."""
    from PIL import Image

    with _opening, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def _turned(image: Any, side: int) -> Any:
    """The image turned upright, its longer side at most `side`: saving drops the EXIF
    orientation a camera left, so the pixels are turned as it says first."""
    from PIL import ImageOps

    turned = ImageOps.exif_transpose(image)
    turned.thumbnail((side, side))
    return turned


def thumbnail(ref: ImageRef, settings: ImageSettings, side: int, max_bytes: int) -> str | None:
    """A small data URL of a row's image, for a page: a JPEG of at most `side` pixels (with
    Pillow), or without Pillow the image as it is if it has at most `max_bytes`; None for an
    image that cannot be read, or is too large to show without Pillow."""
    try:
        data = _read(ref.source, settings.read_cap, settings)
    except ImageProblem:
        return None
    if sniff(data[:16]) is None:
        return None
    import importlib.util

    if importlib.util.find_spec("PIL") is None:
        return (
            f"data:{sniff(data[:16])};base64,{base64.b64encode(data).decode()}"
            if len(data) <= max_bytes
            else None
        )
    try:
        small = _turned(_opened(data), side).convert("RGB")
        out = io.BytesIO()
        small.save(out, format="JPEG", quality=70)
    except Exception:  # a broken or outsized image is not shown; the row's own record says why
        return None
    return f"data:image/jpeg;base64,{base64.b64encode(out.getvalue()).decode()}"
