"""The shard directory format.

    DIR/manifest.json            written last, atomically: its presence means "complete"
    DIR/embed.safetensors        token embeddings
    DIR/layer_000.safetensors    one file per decoder layer (full HF tensor names)
    DIR/head.safetensors         final norm and output head
    DIR/tokenizer files          copied from the source
    DIR/.journal.json            progress of an unfinished run (resume), removed at the end

Quantized weights are stored as ``NAME`` (packed codes) plus ``NAME.absmax``;
each file's safetensors header carries the per-tensor metadata as JSON too, so a
shard is self-describing. Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import ShardError

FORMAT = "qstream-shards"
VERSION = 1
MANIFEST = "manifest.json"
JOURNAL = ".journal.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp name, fsync, rename: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def _fsync_dir(d: Path) -> None:
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


def sha256_file(path: Path, *, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def safe_member(root: Path, name: str) -> Path:
    """Resolve a file name from a manifest, refusing anything that leaves ``root``."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise ShardError(f"{root / MANIFEST}: refusing file name {name!r}: shard files must be plain names inside the directory")
    return root / name


@dataclass(frozen=True)
class FileEntry:
    name: str
    kind: str  # embed | layer | head
    index: int | None  # layer index for kind == "layer"
    size: int
    sha256: str
    tensors: dict[str, dict]  # HF name -> meta (scheme, shape, dtype, block_size, stored)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "index": self.index, "size": self.size, "sha256": self.sha256, "tensors": self.tensors}

    @staticmethod
    def from_dict(d: dict) -> "FileEntry":
        return FileEntry(d["name"], d["kind"], d.get("index"), int(d["size"]), d["sha256"], d["tensors"])


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict

    @property
    def config(self) -> dict:
        return self.data["model"]["config"]

    @property
    def compute_dtype(self) -> str:
        return self.data["compute_dtype"]

    @property
    def num_layers(self) -> int:
        return self.data["num_layers"]

    @property
    def files(self) -> list[FileEntry]:
        return [FileEntry.from_dict(f) for f in self.data["files"]]

    def file(self, kind: str, index: int | None = None) -> FileEntry:
        for f in self.files:
            if f.kind == kind and f.index == index:
                return f
        raise ShardError(f"{self.root / MANIFEST}: no {kind} file{'' if index is None else f' for layer {index}'}")

    def path(self, entry: FileEntry) -> Path:
        return safe_member(self.root, entry.name)

    @property
    def tokenizer_files(self) -> list[str]:
        return list(self.data.get("tokenizer_files", []))


def read_manifest(root: str | Path) -> Manifest:
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"shard directory not found: {root}")
    mpath = root / MANIFEST
    if not mpath.is_file():
        hint = " (an unfinished shard run: rerun `qstream shard` to resume)" if (root / JOURNAL).exists() else ""
        raise ShardError(f"{root}: no {MANIFEST}: not a complete qstream shard directory{hint}")
    try:
        data = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{mpath}: corrupt manifest ({e}); run `qstream verify {root}` or re-shard") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ShardError(f"{mpath}: not a qstream manifest")
    if data.get("version") != VERSION:
        raise ShardError(f"{mpath}: format version {data.get('version')} is not supported (this qstream reads {VERSION}); re-shard it")
    m = Manifest(root, data)
    for f in data.get("files", []):
        safe_member(root, f.get("name"))
    for t in m.tokenizer_files:
        safe_member(root, t)
    return m


# --- safetensors headers, for zero-copy loading into preallocated buffers -----

_DT_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}


@dataclass(frozen=True)
class TensorSlot:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    start: int  # byte offset inside the data section
    end: int


@dataclass(frozen=True)
class Header:
    data_offset: int  # where the data section starts in the file
    data_size: int
    tensors: dict[str, TensorSlot]
    metadata: dict[str, str]


def read_header(path: Path, *, expected_size: int | None = None) -> Header:
    """Parse a safetensors header (8-byte little-endian length + JSON) and check it against the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ShardError(f"missing shard file {path}; run `qstream verify {path.parent}`") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"corrupt shard file {path} ({e}); run `qstream verify {path.parent}`") from None
    if expected_size is not None and size != expected_size:
        raise ShardError(f"shard file {path} has {size} bytes, the manifest says {expected_size}; run `qstream verify {path.parent}`")
    meta = header.pop("__metadata__", {}) or {}
    slots = {}
    data_size = size - 8 - n
    try:
        for name, t in header.items():
            start, end = t["data_offsets"]
            numel = 1
            for d in t["shape"]:
                numel *= d
            if not (0 <= start <= end <= data_size) or end - start != numel * _DT_SIZES[t["dtype"]]:
                raise ValueError(f"tensor {name} has bad offsets")
            slots[name] = TensorSlot(name, t["dtype"], tuple(t["shape"]), start, end)
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"corrupt shard file {path} ({e}); run `qstream verify {path.parent}`") from None
    return Header(8 + n, data_size, slots, meta)


def iter_layer_files(m: Manifest) -> Iterator[FileEntry]:
    for f in sorted((f for f in m.files if f.kind == "layer"), key=lambda f: f.index):
        yield f
