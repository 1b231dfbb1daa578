"""Atomic files, checksums and safe member names: the storage primitives every
writer of a shard directory uses, so a reader sees an old file or a new one,
never half of one."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import ShardError

HASH_CHUNK = 1 << 22  # 4 MiB reads: large enough to stream at disk speed, small enough to never matter for RAM


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp name, fsync, rename: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, interrupt) leaves nothing behind
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def sha256_file(path: Path, *, chunk: int = HASH_CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def safe_member(root: Path, name: str, *, what: str = "manifest.json") -> Path:
    """Resolve a file name from a manifest, refusing anything that leaves ``root``."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise ShardError(f"{root / what}: refusing file name {name!r}: shard files must be plain names inside the directory")
    return root / name


def config_digest(config: dict) -> str:
    """sha256 of the model config in canonical JSON: the config lives inside manifest.json, so it
    is checksummed there (a changed value would build a different model from the same weights)."""
    canonical = json.loads(json.dumps(config))  # as read back from manifest.json (tuples -> lists)
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
