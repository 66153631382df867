"""The artifact store: immutable blobs addressed by their sha256.

Uploads are streamed into a staging file with a size limit (never held in memory), validated
there, then committed: renamed atomically into ``<root>/<aa>/<sha256>``. A blob is never
overwritten; committing one that exists already only leases it (below). :class:`ArtifactStore` is
the interface a shared volume or an S3-compatible store implements; :class:`LocalArtifactStore`
is the local-directory one (also right for a shared volume mounted on every node).

Removal without a lock across processes (docs/architecture.md#the-artifact-store). A blob is
removed when no committed row references it (service/core/repo/blobs.py), but a writer that stored
the same bytes may not have committed its row yet. So a writer that finds its blob stored sets the
blob's mtime ``LEASE_S`` into the future, and a remover first renames the blob aside (atomic), then
decides from what it holds: it puts the blob back if it is leased (mtime in the future) or its
caller's ``keep`` (references in the database, the collector's grace) says so, else deletes it.
``remove`` takes a group of blobs: it sets every one aside, then asks ``keep`` once for all of them
(one check of the references), then removes or puts back each; if anything fails, it puts every
one back. A lease taken before the rename is seen on the blob set aside; one tried after it finds
no file and writes the blob anew from the writer's staged copy, and the remover then leaves that
one alone. A blob written anew is not leased (else deleting what was just uploaded would have to
wait): pruning only takes blobs whose rows it saw deleted, which a writer of the same bytes finds
and leases, and the collector only blobs untouched for its grace.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

CHUNK = 1 << 20
# How long a writer that found its bytes stored may take to commit the row that references them.
LEASE_S = 24 * 3600.0
SHA256 = re.compile(r"[0-9a-f]{64}")


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
        """Store the staged file under its sha256; True if it was new (False: it existed, and is
        now leased to the caller: removers leave it alone until its row can have committed)."""

    def lease(self, sha256: str) -> bool:
        """Lease a stored blob for a row about to reference it without committing its bytes (as
        ``commit`` of the same bytes does); False if it is not stored (or set aside by a remover)."""

    def exists(self, sha256: str) -> bool: ...

    def size(self, sha256: str) -> int: ...

    def open(self, sha256: str) -> BinaryIO: ...

    def local_path(self, sha256: str) -> Path:
        """A local file with the blob's bytes (the worker reads tensors from it)."""

    def delete(self, sha256: str) -> None:
        """Remove a blob (only for one that no row references, e.g. after a failed commit) unless
        another writer leased it meanwhile."""

    def remove(self, digests: Sequence[str], keep: Callable[[dict[str, float]], set[str]]) -> list[str]:
        """Remove the blobs of ``digests`` unless leased or kept: set every one aside, out of reach
        of new leases (one not stored is skipped, one found leased is put back at once), then, with
        all of them set aside, call ``keep`` once with {sha256: mtime} of the others (not at all if
        none): those in the set it returns are put back, the rest removed. If anything fails,
        ``keep`` included, every one is put back. Returns the removed digests, in the order given."""

    def blobs(self) -> Iterator[tuple[str, float]]:
        """Every blob's sha256 and mtime (when it was written, or until when it is leased)."""

    def tidy(self, before: float) -> int:
        """Undo what stopped processes left before ``before``: put back the blobs a remover had set
        aside, remove staging files; returns the staging files removed."""

    def put_bytes(self, data: bytes) -> str: ...

    def put_file(self, path: str | Path) -> str: ...


class LocalArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.trash = self.root / "trash"  # blobs a remover set aside: <sha256>.<when>.<random>
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.trash.mkdir(exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not SHA256.fullmatch(sha256):
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
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staged.path, 0o444)
        try:
            while not self.lease(staged.sha256):  # not stored, or set aside by a remover: write it
                try:
                    os.link(staged.path, dest)  # fails rather than overwrite
                except FileExistsError:  # put back, or written by another writer, meanwhile
                    continue
                _fsync_dir(dest.parent)
                return True
            return False
        finally:
            staged.discard()

    def lease(self, sha256: str) -> bool:
        until = time.time() + LEASE_S
        try:
            os.utime(self.path(sha256), (until, until))  # works on a 0o444 file: we own it
        except FileNotFoundError:
            return False
        return True

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
        self.remove([sha256], lambda held: set())

    def remove(self, digests: Sequence[str], keep: Callable[[dict[str, float]], set[str]]) -> list[str]:
        aside: dict[str, Path] = {}  # set aside, not decided yet: put back unless removed
        asked: dict[str, float] = {}  # of those, the ones not leased: their mtime
        removed = []
        try:
            for sha256 in dict.fromkeys(digests):
                dest = self.path(sha256)
                path = self.trash / f"{sha256}.{int(time.time())}.{secrets.token_hex(4)}"
                try:
                    os.rename(dest, path)  # from now on a writer finds no blob to lease and writes its own
                except FileNotFoundError:
                    continue
                aside[sha256] = path
                mtime = path.stat().st_mtime
                if mtime > time.time():  # leased: put back at once, not asked
                    self._put_back({sha256: aside.pop(sha256)})
                else:
                    asked[sha256] = mtime
            kept = keep(dict(asked)) if asked else set()  # every one of the group is set aside now
            for sha256 in asked:
                if sha256 not in kept:
                    aside[sha256].unlink()
                    del aside[sha256]
                    removed.append(sha256)
        finally:
            self._put_back(aside)
        return removed

    def _put_back(self, aside: dict[str, Path]) -> None:
        """Link each blob set aside back in place (one written anew meanwhile stays: the path is
        taken), then drop it from trash/; every one is tried, the first failure raised after."""
        failed: OSError | None = None
        for sha256, path in aside.items():
            try:
                with contextlib.suppress(FileExistsError):  # written anew meanwhile: that one stays
                    os.link(path, self.path(sha256))
                path.unlink()
            except OSError as e:  # left in trash/: tidy() puts it back
                failed = failed or e
        if failed is not None:
            raise failed

    def blobs(self) -> Iterator[tuple[str, float]]:
        with os.scandir(self.root) as shards:
            dirs = [d.path for d in shards if len(d.name) == 2 and d.is_dir()]  # not tmp/, trash/
        for shard in dirs:
            with os.scandir(shard) as entries:
                for entry in entries:
                    if not SHA256.fullmatch(entry.name):  # e.g. an NFS client's .nfs… file
                        continue
                    try:
                        mtime = entry.stat().st_mtime
                    except FileNotFoundError:  # removed meanwhile
                        continue
                    yield entry.name, mtime

    def tidy(self, before: float) -> int:
        # A remover holds a blob aside for a moment; one left for longer stopped before it decided.
        for aside in self.trash.iterdir():
            sha256, when, _ = aside.name.split(".")
            if int(when) < before:
                with contextlib.suppress(FileExistsError, FileNotFoundError):  # or another tidy did
                    os.link(aside, self.path(sha256))
                with contextlib.suppress(FileNotFoundError):
                    aside.unlink()
        removed = 0
        for staging in self.tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):  # committed or discarded meanwhile
                if staging.stat().st_mtime < before:
                    staging.unlink()
                    removed += 1
        return removed

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
