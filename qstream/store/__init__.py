"""The shard store: the only owner of manifest.json and of safetensors I/O.

files     atomic writes, checksums, safe member names
tensors   the safetensors dtype table, header validation, reads into buffers, the stored-name rule
manifest  the typed Manifest (read and write)
check     the one place that trusts or refuses a directory: manifest structure, completeness,
          headers against the manifest, shapes against the config, tokenizer checksums
integrity hashing files while they are read (xxh3_64; sha256 for older manifests)
inspect   `qstream inspect` / `qstream verify`
"""
from .files import atomic_write_bytes, atomic_write_json, safe_member, sha256_file
from .inspect import VerifyReport, human, inspect_table, verify
from .manifest import JOURNAL, MANIFEST, FileEntry, Manifest, read_manifest
from .tensors import Header, read_file, read_header, read_into, views

__all__ = ["atomic_write_bytes", "atomic_write_json", "safe_member", "sha256_file", "VerifyReport", "human",
           "inspect_table", "verify", "JOURNAL", "MANIFEST", "FileEntry", "Manifest", "read_manifest", "Header",
           "read_file", "read_header", "read_into", "views"]
