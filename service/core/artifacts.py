"""The artifact store: immutable blobs addressed by their sha256.

Uploads are streamed into a staging file with a size limit (never held in memory), validated
there, then committed: renamed atomically into ``<root>/<aa>/<sha256>``. A blob is never
overwritten; committing one that exists already is a no-op. :class:`ArtifactStore` is the
interface a shared volume or an S3-compatible store implements; :class:`LocalArtifactStore`
is the local-directory one (also right for a shared volume mounted on every node).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

CHUNK = 1 << 20


class TooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"larger than the limit of {limit} bytes")
        self.limit = limit


@dataclass
class Staged:
    """A file streamed to local disk: its path, sha256 and size. Discard or commit it."""

    path: Path
    sha256: str
    size: int

    def open(self) -> BinaryIO:
        return open(self.path, "rb")

    def head(self, n: int) -> bytes:
        with open(self.path, "rb") as f:
            return f.read(n)

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class ArtifactStore(Protocol):
    def stage(self, source: BinaryIO, max_bytes: int) -> Staged: ...

    def commit(self, staged: Staged) -> bool:
        """Store the staged file under its sha256; True if it was new (False: it existed)."""

    def exists(self, sha256: str) -> bool: ...

    def size(self, sha256: str) -> int: ...

    def open(self, sha256: str) -> BinaryIO: ...

    def local_path(self, sha256: str) -> Path:
        """A local file with the blob's bytes (the worker reads tensors from it)."""

    def delete(self, sha256: str) -> None:
        """Remove a blob (only for one that no row references, e.g. after a failed commit)."""

    def put_bytes(self, data: bytes) -> str: ...

    def put_file(self, path: str | Path) -> str: ...


class LocalArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def stage(self, source: BinaryIO, max_bytes: int) -> Staged:
        digest, size = hashlib.sha256(), 0
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(max_bytes)
                    digest.update(chunk)
                    out.write(chunk)
        except BaseException:
            os.unlink(name)
            raise
        return Staged(Path(name), digest.hexdigest(), size)

    def commit(self, staged: Staged) -> bool:
        dest = self.path(staged.sha256)
        if dest.exists():
            staged.discard()
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staged.path, 0o444)
        # os.link fails if dest appeared meanwhile (another writer): never overwrite.
        try:
            os.link(staged.path, dest)
            new = True
        except FileExistsError:
            new = False
        staged.discard()
        if new:
            _fsync_dir(dest.parent)
        return new

    def put_bytes(self, data: bytes) -> str:
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="put-")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        staged = Staged(Path(name), hashlib.sha256(data).hexdigest(), len(data))
        self.commit(staged)
        return staged.sha256

    def put_file(self, path: str | Path) -> str:
        """Copy a local file in (the worker's checkpoints); returns its sha256."""
        with open(path, "rb") as f:
            staged = self.stage(f, max_bytes=1 << 62)
        self.commit(staged)
        return staged.sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def open(self, sha256: str) -> BinaryIO:
        return open(self.path(sha256), "rb")

    def local_path(self, sha256: str) -> Path:
        return self.path(sha256)

    def delete(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(sha256).unlink()

    def iter_range(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``start..end`` inclusive, in chunks."""
        with self.open(sha256) as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
