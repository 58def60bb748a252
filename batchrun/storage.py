"""Where a table lives: a local path (a file, a glob of files, a folder of Parquet files) or an
object-store URL that polars reads and writes through its own cloud I/O, with the credentials it
finds in the environment (AWS_*, GOOGLE_*, AZURE_*, HF_TOKEN)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

READ_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "azure", "abfs", "abfss", "hf")
WRITE_SCHEMES = tuple(s for s in READ_SCHEMES if s != "hf")  # polars cannot write to hf://
GLOB_CHARS = ("*", "?", "[")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class Url:
    """An object-store URL, kept as written: Path('s3://b/k') would make it 's3:/b/k'."""

    text: str

    def __str__(self) -> str:
        return self.text

    @property
    def scheme(self) -> str:
        return self.text.split("://", 1)[0].lower()

    @property
    def name(self) -> str:
        return PurePosixPath(self.text.split("://", 1)[1]).name

    @property
    def suffix(self) -> str:
        return "" if self.is_folder else PurePosixPath(self.name).suffix

    @property
    def is_folder(self) -> bool:
        return self.text.endswith("/")

    def local_stem(self, folder: Path) -> Path:
        """Where files about this URL live on local disk (the checkpoint, the report): in
        `folder/.batchrun/`, named NAME-HASH, HASH from the whole URL so that two outputs of one
        name do not share them."""
        digest = hashlib.sha256(self.text.encode()).hexdigest()[:12]
        return folder / ".batchrun" / f"{self.name}-{digest}"

    def beside(self, name: str) -> Url:
        """The URL of `name` in the same folder."""
        return Url(self.text[: self.text.rstrip("/").rfind("/") + 1] + name)


Location = Path | Url


def location(value: object) -> Location:
    """A job's path as given: a URL of a scheme polars reads, else a local path. ValueError for
    a URL polars cannot read (it would take `ftp://h/f` for a local file named so)."""
    if isinstance(value, Path | Url):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a path or a URL")
    scheme = _SCHEME.match(value)
    if scheme is None:
        return Path(value)
    if scheme.group(1).lower() not in READ_SCHEMES:
        raise ValueError(
            f"polars cannot read {scheme.group(1)}:// URLs; use a local path, or an s3://, gs://, az:// "
            "or hf:// URL"
        )
    return Url(value)


def is_glob(path: Path) -> bool:
    return any(c in str(path) for c in GLOB_CHARS)


def cloud_reason(exc: BaseException) -> str:
    """One line for an object-store error: the service's code and message when it sent them
    (polars quotes its whole XML answer), else the first line of polars' text."""
    text = str(exc).strip()
    code = re.search(r"<Code>([^<]*)</Code>", text)
    message = re.search(r"<Message>([^<]*)</Message>", text)
    if code:
        return f"{code.group(1)}: {message.group(1)}" if message else code.group(1)
    return text.splitlines()[0] if text else type(exc).__name__
