"""Safetensors I/O for shard files: the one dtype table, header parsing and
validation, zero-copy reads into preallocated buffers, and the rule by which a
quantized weight's tensors are stored.

A weight ``W`` quantized into ``packed = {"": codes, "absmax": ...}`` is stored as
``W`` (the main tensor) plus ``W.absmax``; its metadata records
``stored = {"data": "W", "absmax": "W.absmax"}``. :func:`pack_stored` and
:func:`unpack_stored` are the only places that know this rule.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ShardError

# safetensors dtype name -> torch dtype (sizes come from torch)
ST_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
MAIN = "data"
HASH_STEP = 1 << 20  # bytes read then hashed at a time: fits the L2 of current CPUs, few syscalls  # the key of a packed tensor's main part in ``stored``


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
    prefix: bytes = b""  # the raw header bytes (length + JSON): the start of a whole-file hash


def _corrupt(path: Path, why: str) -> ShardError:
    return ShardError(f"corrupt shard file {path} ({why}); run `qstream verify {path.parent}`")


def read_header(path: Path, *, expected_size: int | None = None) -> Header:
    """Parse a safetensors header (8-byte little-endian length + JSON) and check it against the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise _corrupt(path, "file shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, MAX_HEADER):
                raise _corrupt(path, "header length out of range")
            raw_json = f.read(n)
            header = json.loads(raw_json)
    except FileNotFoundError:
        raise ShardError(f"missing shard file {path}; run `qstream verify {path.parent}`") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _corrupt(path, str(e)) from None
    if expected_size is not None and size != expected_size:
        raise ShardError(f"shard file {path} has {size} bytes, the manifest says {expected_size}; run `qstream verify {path.parent}`")
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    slots = {}
    data_size = size - 8 - n
    try:
        for name, t in header.items():
            start, end = t["data_offsets"]
            numel = 1
            for d in t["shape"]:
                numel *= d
            if not (0 <= start <= end <= data_size) or end - start != numel * ST_DTYPES[t["dtype"]].itemsize:
                raise ValueError(f"tensor {name} has bad offsets")
            slots[name] = TensorSlot(name, t["dtype"], tuple(t["shape"]), start, end)
    except (KeyError, TypeError, ValueError) as e:
        raise _corrupt(path, str(e)) from None
    if not isinstance(meta, dict):
        raise _corrupt(path, "__metadata__ is not a JSON object")
    return Header(8 + n, data_size, slots, meta, raw + raw_json)


def views(buf: torch.Tensor, header: Header) -> dict[str, torch.Tensor]:
    """Typed views of a file's tensors inside a flat uint8 buffer holding its data section.
    safetensors orders tensors by alignment, so every view is aligned."""
    return {name: buf[s.start:s.end].view(ST_DTYPES[s.dtype]).view(s.shape) for name, s in header.tensors.items()}


def regroup(header: Header, groups: list[list[str]]) -> Header:
    """A layout of ``header``'s tensors in which each group's tensors lie back to back, in
    the group's order, plus one extra slot per group (named by :func:`group_key`) that spans
    them as one tensor concatenated along dim 0. What it is for: sibling linear layers that
    read the same input (q/k/v, gate/up) run as one fused matrix-vector product over the span,
    with no copy of their weights (runtime/fuse.py). Use :func:`relayout` to move a buffer's
    bytes from ``header``'s layout to this one. Every group's tensors must share a dtype and
    their trailing dimensions."""
    slots, out, pos = header.tensors, {}, 0
    grouped = {k for g in groups for k in g}

    def align(n: int) -> int:
        return -(-n // 16) * 16  # 16 bytes: enough for any dtype in ST_DTYPES

    for g in groups:
        first = slots[g[0]]
        if any(slots[k].dtype != first.dtype or slots[k].shape[1:] != first.shape[1:] for k in g):
            raise ValueError(f"group {g} mixes dtypes or trailing shapes")
        pos = start = align(pos)
        for k in g:
            s = slots[k]
            out[k] = TensorSlot(k, s.dtype, s.shape, pos, pos + s.end - s.start)
            pos += s.end - s.start
        rows = sum(slots[k].shape[0] for k in g)
        out[group_key(g)] = TensorSlot(group_key(g), first.dtype, (rows, *first.shape[1:]), start, pos)
    for k, s in slots.items():
        if k not in grouped:
            pos = align(pos)
            out[k] = TensorSlot(k, s.dtype, s.shape, pos, pos + s.end - s.start)
            pos += s.end - s.start
    return Header(header.data_offset, align(pos), out, header.metadata, header.prefix)


def group_key(group: list[str]) -> str:
    """The name of the slot spanning a group made by :func:`regroup` (not a file key)."""
    return "+".join(group)


def relayout(buf: torch.Tensor, src: Header, dst: Header) -> torch.Tensor:
    """``buf`` (a data section in ``src``'s layout) copied into a new buffer in ``dst``'s layout
    (made by :func:`regroup`; spanning slots need no bytes of their own)."""
    out = torch.empty(dst.data_size, dtype=torch.uint8, pin_memory=buf.is_pinned())
    for k, s in src.tensors.items():
        d = dst.tensors[k]
        out[d.start:d.end].copy_(buf[s.start:s.end])
    return out


def read_into(path: Path, header: Header, buf: torch.Tensor, *, cold: bool = False, hashers: list = ()) -> None:
    """Read the data section of a shard file into ``buf`` (CPU, uint8, pinned or not).
    ``cold`` drops the file from the page cache afterwards, so the next read comes from the disk
    (what a machine whose RAM cannot hold the model sees; used by benchmarks).
    ``hashers`` (hashlib-style) are fed the header bytes and then each chunk right after it is
    read, while it is still in the CPU cache: a whole-file hash for the price of one pass over
    cached bytes (see store/integrity.py)."""
    n = header.data_size
    # without hashers one read call takes it all; with them, chunks small enough to stay in L2/L3
    step = HASH_STEP if hashers else n
    for h in hashers:
        h.update(header.prefix)
    try:
        with open(path, "rb", buffering=0) as f:
            if cold:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            f.seek(header.data_offset)
            mv = memoryview(buf.numpy()).cast("B")[:n]
            got = 0
            while got < n:
                r = f.readinto(mv[got:min(got + step, n)])
                if not r:
                    raise ShardError(f"shard file {path} is truncated; run `qstream verify {path.parent}`")
                for h in hashers:
                    h.update(mv[got:got + r])
                got += r
            if cold:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    except FileNotFoundError:
        raise ShardError(f"missing shard file {path}; run `qstream verify {path.parent}`") from None


def read_file(path: Path, *, expected_size: int | None = None, device: torch.device | str = "cpu",
              check=None, header: Header | None = None) -> dict[str, torch.Tensor]:
    """A whole shard file's tensors on ``device``: typed views of one buffer (one copy to the device).
    ``check`` (a :class:`~qstream.store.integrity.FileCheck`) verifies the bytes as they are read;
    ``header``, when the caller has read (and checked) it already."""
    h = header or read_header(path, expected_size=expected_size)
    buf = torch.empty(h.data_size, dtype=torch.uint8)
    if check is not None:
        check.read_into(h, buf)
    else:
        read_into(path, h, buf)
    return views(buf.to(device), h)


def save_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


def pack_stored(name: str, packed: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A scheme's packed tensors -> (file key -> tensor, the ``stored`` map for the metadata)."""
    tensors, stored = {}, {}
    for suffix, t in packed.items():
        key = name if not suffix else f"{name}.{suffix}"
        tensors[key] = t
        stored[suffix or MAIN] = key
    return tensors, stored


def stored_keys(meta: dict) -> dict[str, str]:
    """The ``stored`` map as scheme suffix -> file key (the main tensor's suffix is "")."""
    return {("" if k == MAIN else k): v for k, v in meta["stored"].items()}


def unpack_stored(meta: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_stored`: the packed dict a scheme's ``dequantize`` takes."""
    return {suffix: tensors[key] for suffix, key in stored_keys(meta).items()}
