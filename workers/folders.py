"""Putting a folder of model files in place atomically, for the tiny model's build and
the trainer's published outputs: written into a temporary folder beside its place,
made readable by whichever user serves it, then renamed in, so a reader (a worker
loading it) sees a whole folder or none."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def folder_bytes(*folders: str | Path) -> int:
    """The bytes of every file under these folders: a model's size on disk."""
    return sum(p.stat().st_size for folder in folders for p in Path(folder).rglob("*") if p.is_file())


def write_in_place(target: Path, write: Callable[[Path], None], label: str = "writing") -> Path:
    """`write(tmp)` fills a temporary folder beside `target`, which then replaces `target`.
    If another process put `target` in place first (the same build raced), theirs is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{label}-", dir=target.parent))
    try:
        write(tmp)
        # mkdtemp (and the safetensors writer) make owner-only files; workers may run as another user.
        tmp.chmod(0o755)
        for file in tmp.iterdir():
            file.chmod(0o644)
        if target.exists():
            # Moved aside rather than deleted first, so `target` is missing only between two renames.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(old / target.name)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                tmp.rename(target)
            except OSError:
                if not target.exists():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
