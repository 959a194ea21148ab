"""Files of OpenAI's `/v1/files` (batch inputs and outputs, fine-tuning data) in a directory: each
file's content `{id}.jsonl` with its metadata `{id}.json` beside it.

On disk rather than in Redis: a file and its metadata live exactly as long as each
other (until deleted), whatever Redis's TTLs or restarts do, and several gateways
see the same files when the directory is on shared storage (LLMQ_FILES_DIR on
NFS, EFS or CephFS). Writes go to a temporary name first and are renamed into
place, so a reader on any gateway sees a whole file or none.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from aiohttp import BodyPartReader

FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")
_READ_CHUNK = 1 << 16


class FileTooLarge(Exception):
    pass


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def new_id() -> str:
        return f"file-{uuid.uuid4().hex}"

    def content_path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.jsonl"

    def _meta_path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.json"

    async def save_upload(self, part: BodyPartReader, filename: str, purpose: str, tenant: str | None,
                          max_bytes: int) -> dict:
        """Stream an upload's part to disk, never holding more than a chunk; FileTooLarge
        (and nothing kept) past `max_bytes`."""
        file_id = self.new_id()
        partial = self.root / f".{file_id}.part"
        size = 0
        out = await asyncio.to_thread(open, partial, "wb")
        try:
            while chunk := await part.read_chunk(_READ_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise FileTooLarge
                await asyncio.to_thread(out.write, chunk)
            await asyncio.to_thread(out.close)
            return await asyncio.to_thread(self._publish, partial, file_id, filename, purpose, tenant, size)
        finally:
            out.close()
            partial.unlink(missing_ok=True)

    def _publish(self, partial: Path, file_id: str, filename: str, purpose: str, tenant: str | None,
                 size: int) -> dict:
        """Rename the content into place, then write the metadata: a file exists once its metadata does."""
        meta = {"id": file_id, "bytes": size, "created_at": int(time.time()), "filename": filename,
                "purpose": purpose, "tenant": tenant}
        os.replace(partial, self.content_path(file_id))
        staging = self.root / f".{file_id}.meta"
        staging.write_text(json.dumps(meta))
        os.replace(staging, self._meta_path(file_id))
        return meta

    async def set_purpose(self, meta: dict, purpose: str) -> dict:
        """The metadata with another purpose, replaced whole (a reader sees the old or the new)."""
        changed = {**meta, "purpose": purpose}

        def write() -> None:
            staging = self.root / f".{meta['id']}.meta"
            staging.write_text(json.dumps(changed))
            os.replace(staging, self._meta_path(meta["id"]))

        await asyncio.to_thread(write)
        return changed

    async def adopt(self, written: Path, filename: str, tenant: str | None) -> dict | None:
        """A file the gateway wrote itself (a batch's output) made a file of `tenant`'s;
        None, and nothing kept, if it is empty (OpenAI leaves such a file out)."""
        size = (await asyncio.to_thread(written.stat)).st_size
        if size == 0:
            written.unlink(missing_ok=True)
            return None
        return await asyncio.to_thread(self._publish, written, self.new_id(), filename, "batch_output", tenant, size)

    async def meta(self, file_id: str) -> dict | None:
        if not FILE_ID.match(file_id):
            return None
        try:
            return json.loads(await asyncio.to_thread(self._meta_path(file_id).read_text))
        except FileNotFoundError:
            return None

    async def delete(self, file_id: str) -> None:
        """The metadata first: once it is gone the file is gone for every reader."""
        await asyncio.to_thread(self._meta_path(file_id).unlink, missing_ok=True)
        await asyncio.to_thread(self.content_path(file_id).unlink, missing_ok=True)

    async def all_meta(self) -> list[dict]:
        return await asyncio.to_thread(lambda: list(self._read_all(self.root.glob("file-*.json"))))

    @staticmethod
    def _read_all(paths: Iterable[Path]) -> Iterable[dict]:
        for path in paths:
            try:
                yield json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                continue  # deleted meanwhile, or being written by another gateway


def file_object(meta: dict) -> dict:
    """A file's metadata as OpenAI's File object."""
    return {"id": meta["id"], "object": "file", "bytes": meta["bytes"], "created_at": meta["created_at"],
            "filename": meta["filename"], "purpose": meta["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}
