"""The shard directory's manifest: the only reader and writer of ``manifest.json``.

    DIR/manifest.json            written last, atomically: its presence means "complete"
    DIR/embed.safetensors        token embeddings
    DIR/layer_000.safetensors    one file per decoder layer (full HF tensor names)
    DIR/head.safetensors         final norm and output head (tied models: the one stored copy of the
                                 embedding/head matrix, named by the optional "embedding" field)
    DIR/draft_000.safetensors    optional: a low-bit copy of layer 0, the speculative draft (shard_draft.py)
    DIR/tokenizer files          copied from the source
    DIR/.journal.json            progress of an unfinished run (resume), removed at the end

Each file's safetensors header carries the per-tensor metadata as JSON too, so a
shard is self-describing. Nothing is ever unpickled. Everyone else reads the
manifest through :class:`Manifest`'s typed accessors, never through raw dicts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ShardError
from .check import check_structure
from .files import atomic_write_json, config_digest, safe_member

FORMAT = "qstream-shards"
VERSION = 1
MANIFEST = "manifest.json"
JOURNAL = ".journal.json"


@dataclass(frozen=True)
class FileEntry:
    name: str
    kind: str  # embed | layer | head
    index: int | None  # layer index for kind == "layer"
    size: int
    sha256: str
    tensors: dict[str, dict]  # HF name -> meta (scheme, shape, dtype, block_size, stored)
    xxh3: str | None = None  # fast whole-file hash checked on every read (absent in older manifests)

    def to_dict(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "index": self.index, "size": self.size, "sha256": self.sha256}
        if self.xxh3:
            d["xxh3_64"] = self.xxh3
        d["tensors"] = self.tensors
        return d

    @staticmethod
    def from_dict(d: dict) -> "FileEntry":
        return FileEntry(d["name"], d["kind"], d.get("index"), int(d["size"]), d["sha256"], d["tensors"], d.get("xxh3_64"))


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict  # the parsed JSON; read it through the properties below

    @property
    def config(self) -> dict:
        return self.data["model"]["config"]

    @property
    def source(self) -> str:
        return self.data["model"]["source"]

    @property
    def architecture(self) -> str | None:
        return self.data["model"].get("architecture")

    @property
    def recipe(self) -> dict:
        return self.data.get("recipe", {})

    @property
    def fingerprint(self) -> str | None:
        return self.data.get("fingerprint")

    @property
    def compute_dtype(self) -> str:
        return self.data["compute_dtype"]

    @property
    def num_layers(self) -> int:
        return self.data["num_layers"]

    @property
    def layers_prefix(self) -> str:
        return self.data["layers_prefix"]

    @property
    def dense_bytes(self) -> int | None:
        return self.data.get("dense_bytes")

    @property
    def max_positions(self) -> int | None:
        """The model's longest supported sequence (``max_position_embeddings``), when it says."""
        v = self.config.get("max_position_embeddings")
        return int(v) if v else None

    @property
    def embedding(self) -> dict | None:
        """Tied models sharded with the matrix stored once: {"from": "head", "tensor": the head file's
        tensor, "name": the embedding parameter it also is}. None: the embedding is stored as itself."""
        return self.data.get("embedding")

    @property
    def files(self) -> list[FileEntry]:
        return [FileEntry.from_dict(f) for f in self.data["files"]]

    def file(self, kind: str, index: int | None = None) -> FileEntry:
        for f in self.files:
            if f.kind == kind and f.index == index:
                return f
        raise ShardError(f"{self.root / MANIFEST}: no {kind} file{'' if index is None else f' for layer {index}'}; re-shard")

    def layer_files(self) -> list[FileEntry]:
        """The layer files in order 0 .. num_layers-1; an incomplete set is an error."""
        by_index = {f.index: f for f in self.files if f.kind == "layer"}
        missing = [i for i in range(self.num_layers) if i not in by_index]
        if missing:
            raise ShardError(f"{self.root / MANIFEST} lists no file for layer {missing[0]}; re-shard")
        return [by_index[i] for i in range(self.num_layers)]

    def draft_files(self) -> list[FileEntry] | None:
        """The low-bit draft copies of the decoder layers in layer order (qstream/shard_draft.py),
        or None when the directory has none; an incomplete set is an error."""
        by_index = {f.index: f for f in self.files if f.kind == "draft"}
        if not by_index:
            return None
        missing = [i for i in range(self.num_layers) if i not in by_index]
        if missing:
            raise ShardError(f"{self.root / MANIFEST} lists no draft file for layer {missing[0]}; re-shard")
        return [by_index[i] for i in range(self.num_layers)]

    def path(self, entry: FileEntry) -> Path:
        return safe_member(self.root, entry.name)

    @property
    def tokenizer_files(self) -> list[str]:
        return list(self.data.get("tokenizer_files", []))

    @property
    def tokenizer_checksums(self) -> dict[str, dict]:
        """name -> {"size", "sha256"} of the tokenizer files (absent in older manifests: {})."""
        return dict(self.data.get("tokenizer_checksums", {}))

    @property
    def config_sha256(self) -> str | None:
        return self.data.get("config_sha256")


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
        raise ShardError(f"{mpath}: corrupt manifest ({e}); re-shard the model") from None
    except OSError as e:
        raise ShardError(f"{mpath}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ShardError(f"{mpath}: not a qstream manifest")
    if data.get("version") != VERSION:
        raise ShardError(f"{mpath}: format version {data.get('version')} is not supported (this qstream reads {VERSION}); re-shard it")
    check_structure(root, data)  # every field typed accessors rely on exists with the right type
    return Manifest(root, data)


def read_owner(root: Path) -> tuple[str | None, dict]:
    """Whose shards a directory holds: (fingerprint or None, the journal of an unfinished run).
    An unreadable manifest or journal counts as another owner ("unreadable")."""
    for name in (MANIFEST, JOURNAL):
        p = root / name
        if p.is_file():
            try:
                d = json.loads(p.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                return "unreadable", {}
            return d.get("fingerprint"), (d if name == JOURNAL else {})
    return None, {}


def manifest_files(root: Path) -> dict[str, dict]:
    """The file entries of a complete directory's manifest by name (for a rerun to check and skip)."""
    return {f["name"]: f for f in json.loads((root / MANIFEST).read_text())["files"]}


def write_journal(root: Path, journal: dict) -> None:
    atomic_write_json(root / JOURNAL, journal)


def write_manifest(root: Path, *, version: str, fingerprint: str, source: str, config: dict, recipe: dict,
                   compute_dtype: str, layers_prefix: str, tied_head: bool, source_bytes: int, dense_bytes: int,
                   files: list[FileEntry], tokenizer_files: list[str], tokenizer_checksums: dict[str, dict] | None = None,
                   embedding: dict | None = None) -> dict[str, Any]:
    """Write manifest.json (last, atomically) and remove the journal: the directory is complete."""
    data = {
        "format": FORMAT,
        "version": VERSION,
        "qstream_version": version,
        "fingerprint": fingerprint,
        "model": {"source": source, "architecture": (config.get("architectures") or [None])[0],
                  "model_type": config.get("model_type"), "config": config},
        "recipe": recipe,
        "compute_dtype": compute_dtype,
        "layers_prefix": layers_prefix,
        "num_layers": sum(1 for e in files if e.kind == "layer"),
        "tied_head": tied_head,
        **({"embedding": embedding} if embedding is not None else {}),
        "source_bytes": source_bytes,
        "dense_bytes": dense_bytes,
        "files": [e.to_dict() for e in files],
        "tokenizer_files": tokenizer_files,
        "tokenizer_checksums": tokenizer_checksums or {},
        "config_sha256": config_digest(config),
    }
    for t in tokenizer_files:
        safe_member(root, t)
    atomic_write_json(root / MANIFEST, data)
    (root / JOURNAL).unlink(missing_ok=True)
    return data
