"""Helpers shared by routes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from service.api.deps import Context
from service.api.problems import Problem
from service.core.artifacts import Staged, TooLarge


class StoredUpload:
    """A staged upload that becomes a stored artifact on :meth:`commit`. If anything fails after
    the commit (the database transaction, say), the blob is removed again when it was new, so a
    refused request leaves no file behind."""

    def __init__(self, ctx: Context, staged: Staged):
        self.ctx, self.staged, self.new = ctx, staged, False

    def commit(self) -> None:
        self.new = self.ctx.store.commit(self.staged)

    def rollback(self) -> None:
        self.staged.discard()
        if self.new:
            self.ctx.store.delete(self.staged.sha256)
            self.new = False


@contextmanager
def stored_upload(ctx: Context, source: BinaryIO, field: str) -> Iterator[StoredUpload]:
    try:
        staged = ctx.store.stage(source, ctx.settings.max_upload_bytes)
    except TooLarge as exc:
        raise Problem(413, "Content too large", f"{field}: {exc}", kind="too-large", field=field) from None
    upload = StoredUpload(ctx, staged)
    try:
        yield upload
    except BaseException:
        upload.rollback()
        raise
    finally:
        staged.discard()
