"""Reading a shard directory back: the per-file table of `qstream inspect` and the
checksum pass of `qstream verify`."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import ShardError
from .check import header_problems, manifest_problems, model_shapes, shape_problems
from .files import safe_member, sha256_file
from .manifest import Manifest, read_manifest
from .tensors import read_header


def human(n: float) -> str:
    """Bytes in binary units: 1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def params_of(entry) -> int:
    return sum(math.prod(t["shape"]) for t in entry.tensors.values())


def inspect_table(m: Manifest) -> str:
    rows = [("file", "schemes", "params", "bytes", "bits/weight")]
    total_params = total_bytes = 0
    drafts = [f for f in m.files if f.kind == "draft"]
    for f in m.files:
        if f.kind == "draft":
            continue  # one summary line below: the copy is not part of the model's size
        params = params_of(f)
        schemes = Counter(t["scheme"] for t in f.tensors.values())
        desc = ", ".join(f"{k} x{v}" for k, v in sorted(schemes.items()))
        rows.append((f.name, desc, f"{params:,}", human(f.size), f"{8 * f.size / max(params, 1):.2f}"))
        total_params += params
        total_bytes += f.size
    dense = m.dense_bytes or 2 * total_params
    rows.append(("total", "", f"{total_params:,}", human(total_bytes), f"{8 * total_bytes / max(total_params, 1):.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(-1, "  ".join("-" * w for w in widths))
    head = f"{m.root}: {m.source} ({m.architecture}), {m.num_layers} layers, compute dtype {m.compute_dtype}"
    foot = f"compression vs 16-bit: {human(dense)} -> {human(total_bytes)} ({dense / max(total_bytes, 1):.2f}x)"
    if drafts:
        lines.append(draft_line(drafts, m))
    return "\n".join([head, *lines, foot])


def draft_line(drafts: list, m: Manifest) -> str:
    """The draft copies in one line: scheme, files, bytes, what they cost next to the layers they copy."""
    size = sum(f.size for f in drafts)
    layers = sum(f.size for f in m.files if f.kind == "layer")
    params = sum(params_of(f) for f in drafts)
    schemes = Counter(t["scheme"] for f in drafts for t in f.tensors.values())
    desc = ", ".join(f"{k} x{v}" for k, v in sorted(schemes.items()))
    return (f"draft (speculative, draft_NNN.safetensors): {len(drafts)} files, {desc}, {human(size)} "
            f"({8 * size / max(params, 1):.2f} bits/weight, {size / max(layers, 1):.0%} of the layers' {human(layers)})")


@dataclass(frozen=True)
class VerifyReport:
    ok: list[str]
    missing: list[str]
    corrupt: list[str]
    invalid: list[str] = field(default_factory=list)  # the manifest or a header is inconsistent (one line each)

    @property
    def passed(self) -> bool:
        return not self.missing and not self.corrupt and not self.invalid


def require_verified(root: str | Path) -> None:
    """Full verification before a run (``--verify``): a ShardError naming the first problem."""
    rep = verify(root, progress=False)
    if not rep.passed:
        bad = [f"missing {n}" for n in rep.missing] + [f"corrupt {n}" for n in rep.corrupt] + rep.invalid
        raise ShardError(f"{root}: verify failed: {bad[0]}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; "
                         "re-run `qstream shard` on the recipe")


def verify(root: str | Path, *, progress: bool = True, shapes: bool = True) -> VerifyReport:
    """Every file's size and sha256, every header against the manifest, the manifest's completeness
    and the fields the runtime relies on; ``shapes`` also builds the config's model on the meta
    device and checks every stored shape against it."""
    m = read_manifest(root)
    ok, missing, corrupt = [], [], []
    invalid = manifest_problems(m)
    for f in tqdm(m.files, desc="verify", unit="file", disable=not progress):
        p = safe_member(m.root, f.name)
        if not p.is_file():
            missing.append(f.name)
            continue
        if p.stat().st_size != f.size or sha256_file(p) != f.sha256:
            corrupt.append(f.name)
            continue
        try:
            problems = header_problems(f, read_header(p, expected_size=f.size))
        except ShardError as e:
            problems = [str(e)]
        invalid += problems
        if not problems:
            ok.append(f.name)
    sums = m.tokenizer_checksums
    for t in m.tokenizer_files:
        p = safe_member(m.root, t)
        if not p.is_file():
            missing.append(t)
        elif t in sums and (p.stat().st_size != sums[t]["size"] or sha256_file(p) != sums[t]["sha256"]):
            corrupt.append(t)
        else:
            ok.append(t)
    if shapes:
        try:
            invalid += shape_problems(m, model_shapes(m))
        except ShardError as e:
            invalid.append(str(e))
    return VerifyReport(ok, missing, corrupt, invalid)
