"""`qstream report`: one trade-off report across the compressed variants of a model.

Inputs are result files of `qstream eval ppl --json`, `qstream eval lm-eval --json` and
`qstream bench --json`, matched by shard directory. For each model (and each perplexity setting:
data, context, stride) the report writes a markdown table (size on disk, bits per weight of the
decoder layers and of everything, how the head is stored, perplexity and its change against the
uncompressed variant, accuracy, speed), marks the quality targets, and plots perplexity and s/token
against size (PNG with matplotlib; a plain SVG without it).

Quality targets (``TARGET_RULES``):
  int8  perplexity at most +0.5% above the uncompressed variant's;
  nf4   perplexity increase at most that of bitsandbytes' own NF4 at block size 64 (the
        ``bnb-nf4-reference`` row of `qstream eval ppl --bnb-nf4-reference`, whose increase is
        measured against its own unrounded dense twin).
A variant that misses is marked MISS.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from ..errors import EvalError
from ..store.files import atomic_write_bytes
from .results import variant_name

REFERENCE = "bnb-nf4-reference"
INT8_MAX_REL = 0.005
TARGET_RULES = {
    "int8": "int8: perplexity at most +0.5% above the uncompressed variant",
    "nf4": "nf4: perplexity increase over the uncompressed variant at most that of bitsandbytes' own NF4 "
           "(blocks of 64, every linear layer but lm_head; `qstream eval ppl --bnb-nf4-reference`)",
}


@dataclass
class Row:
    key: str  # normalized shard directory (+ variant for the reference)
    variant: str
    shards: str
    model: str
    shard_bytes: int | None = None
    bits_layers: float | None = None
    bits_all: float | None = None  # every stored byte over every parameter (embeddings and head included)
    head: str | None = None  # how the head is stored (results.head_storage)
    ppl: dict = field(default_factory=dict)  # setting -> ppl result dict
    acc: dict = field(default_factory=dict)  # task -> (metric, value)
    speed: dict | None = None  # bench result
    sources: list = field(default_factory=list)

    @property
    def is_reference(self) -> bool:
        return self.variant == REFERENCE


def _norm(path: str) -> str:
    return os.path.normpath(str(path))


def classify(d: dict) -> str:
    if d.get("kind") in ("ppl", "lm-eval"):
        return d["kind"]
    if "decode_s_per_token" in d and "shards" in d:
        return "bench"
    raise ValueError("not a result of `qstream eval ppl`, `qstream eval lm-eval` or `qstream bench` (--json)")


def load_results(paths: list[str | Path]) -> list[tuple[Path, dict]]:
    if not paths:
        raise EvalError("give one or more result JSON files (from `qstream eval ppl|lm-eval --json` or `qstream bench --json`)")
    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise EvalError(f"result file not found: {p}")
        try:
            d = json.loads(p.read_text())
            if not isinstance(d, dict):
                raise ValueError("expected a JSON object")
            classify(d)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            raise EvalError(f"{p}: {e}; pass result files written by qstream with --json") from None
        out.append((p, d))
    return out


def _setting(d: dict) -> tuple:
    r = d["ppl"]
    return (d.get("data", {}).get("source", "?"), r["context"], r["stride"], r["windows"])


def _acc(metrics: dict) -> tuple[str, float] | None:
    for name in ("acc,none", "acc_norm,none", "exact_match,none"):
        if isinstance(metrics.get(name), (int, float)):
            return name.split(",")[0], float(metrics[name])
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and "stderr" not in k and k != "sample_len":
            return k.split(",")[0], float(v)
    return None


def collect(results: list[tuple[Path, dict]]) -> dict[str, dict[str, Row]]:
    """model -> row key -> Row."""
    models: dict[str, dict[str, Row]] = {}
    pending_bench = []
    for path, d in results:
        kind = classify(d)
        if kind == "bench":
            pending_bench.append((path, d))
            continue
        variant = d.get("variant") or variant_name(d.get("recipe", {}))
        key = _norm(d["shards"]) + (f"#{variant}" if variant == REFERENCE else "")
        row = models.setdefault(d.get("model", "?"), {}).setdefault(
            key, Row(key, variant, d["shards"], d.get("model", "?")))
        if variant != REFERENCE:
            row.shard_bytes = d.get("shard_bytes") or row.shard_bytes
            row.bits_layers = d.get("bits_per_weight_layers") or row.bits_layers
            row.bits_all = d.get("bits_per_weight") or row.bits_all
            row.head = d.get("head") or row.head
        row.sources.append(path.name)
        if kind == "ppl":
            row.ppl[_setting(d)] = {**d["ppl"], "data": d.get("data", {}), "machine": d.get("machine"),
                                    "versions": d.get("versions")}
        else:
            for task, metrics in d.get("lm_eval", {}).get("results", {}).items():
                a = _acc(metrics)
                if a:
                    row.acc[task] = a
    for path, d in pending_bench:
        recipe = d.get("recipe", {})
        model = recipe.get("model", "?")
        key = _norm(d["shards"])
        row = models.setdefault(model, {}).setdefault(key, Row(key, variant_name(recipe), d["shards"], model))
        row.shard_bytes = row.shard_bytes or d.get("shard_bytes")
        row.speed = d
        row.sources.append(path.name)
    return models


def uncompressed(rows: list[Row], setting) -> Row | None:
    """The variant with the most bits per weight among those with a perplexity for ``setting``."""
    cands = [r for r in rows if not r.is_reference and setting in r.ppl]
    if not cands:
        return None
    return max(cands, key=lambda r: (r.bits_layers or 0, r.variant in ("fp32", "bf16", "fp16")))


def target(row: Row, base: Row | None, ref: Row | None, setting) -> str:
    """'ok', 'MISS' or '' (no target for this variant), with the margin."""
    if row.is_reference or base is None or row is base or setting not in row.ppl:
        return ""
    p, b = row.ppl[setting]["perplexity"], base.ppl[setting]["perplexity"]
    if row.variant == "int8":
        rel = p / b - 1
        return f"{'ok' if rel <= INT8_MAX_REL else 'MISS'} ({100 * rel:+.2f}% vs limit +0.50%)"
    if row.variant == "nf4":
        if ref is None or setting not in ref.ppl:
            return "n/a (no bnb-nf4-reference result for this setting)"
        r = ref.ppl[setting]
        ref_delta = r.get("delta", r["perplexity"] - r.get("baseline_perplexity", b))
        delta = p - b
        return f"{'ok' if delta <= ref_delta else 'MISS'} ({delta:+.4f} vs reference {ref_delta:+.4f})"
    return ""


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _f(x, fmt) -> str:
    return "-" if x is None else fmt.format(x)


def reference(rows: list[Row], setting) -> Row | None:
    return next((r for r in rows if r.is_reference and setting in r.ppl), None)


def table(rows: list[Row], setting) -> tuple[list[str], list[list[str]], Row | None]:
    base = uncompressed(rows, setting)
    ref = reference(rows, setting)
    tasks = sorted({t for r in rows for t in r.acc})
    head = ["variant", "size on disk", "bits/weight (layers)", "perplexity",
            f"Δ vs {base.variant}" if base else "Δ", "bytes", f"size vs {base.variant}" if base else "size vs base",
            "bits/weight (all)", "head", *[f"{t} {rows_metric(rows, t)}" for t in tasks],
            "s/token", "tokens/s", "quality target"]
    body = []
    order = sorted(rows, key=lambda r: (r.is_reference, -(r.bits_layers or 0), r.variant))
    for r in order:
        if r.is_reference and setting not in r.ppl:
            continue
        pr = r.ppl.get(setting)
        p = pr["perplexity"] if pr else None
        if r.is_reference and pr:
            d = pr.get("delta")
            bp = pr.get("baseline_perplexity")
            delta = f"{d:+.4f} ({100 * d / bp:+.2f}%) vs its twin" if d is not None and bp else "-"
        elif p is not None and base is not None:
            b = base.ppl[setting]["perplexity"]
            delta = "—" if r is base else f"{p - b:+.4f} ({100 * (p / b - 1):+.2f}%)"
        else:
            delta = "-"
        sp = r.speed or {}
        body.append([
            r.variant, "- (simulated)" if r.is_reference else _mib(r.shard_bytes),
            f"{4 + 32 / (pr or {}).get('blocksize', 64):.2f} (simulated)" if r.is_reference else _f(r.bits_layers, "{:.2f}"), _f(p, "{:.4f}"), delta,
            "-" if r.is_reference else _f(r.shard_bytes, "{:,}"), _ratio(r, base),
            "-" if r.is_reference else _f(r.bits_all, "{:.2f}"), "-" if r.is_reference else (r.head or "-"),
            *[_f(r.acc[t][1], "{:.3f}") if t in r.acc else "-" for t in tasks],
            _f(sp.get("decode_s_per_token"), "{:.4f}"), _f(sp.get("decode_tokens_per_s"), "{:.2f}"),
            target(r, base, ref, setting),
        ])
    return head, body, base


def _ratio(r: Row, base: Row | None) -> str:
    if r.is_reference or base is None or not r.shard_bytes or not base.shard_bytes:
        return "-"
    return f"{r.shard_bytes / base.shard_bytes:.3f}"


def rows_metric(rows: list[Row], task: str) -> str:
    return next((r.acc[task][0] for r in rows if task in r.acc), "acc")


def speed_table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    head = ["variant", "size on disk", "s/token", "tokens/s", "prefill tokens/s", "load s", "device", "plan"]
    body = []
    for r in sorted(rows, key=lambda r: -(r.shard_bytes or 0)):
        s = r.speed
        if not s:
            continue
        body.append([r.variant, _mib(r.shard_bytes), f"{s['decode_s_per_token']:.4f}", f"{s['decode_tokens_per_s']:.2f}",
                     _f(s.get("prefill_tokens_per_s"), "{:.1f}"), _f(s.get("load_s"), "{:.1f}"), str(s.get("device", "-")),
                     ", ".join(f"{k} {v}" for k, v in (s.get("plan") or {}).items())])
    return head, body


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _plt():
    """matplotlib.pyplot, or None when matplotlib is not installed (the plots are then plain SVG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_ppl(rows: list[Row], setting, out: Path, title: str) -> Path | None:
    """Perplexity against size on disk; ``out`` is the PNG path (an SVG next to it without matplotlib).
    Returns the file written, or None when no variant has both numbers."""
    pts = [(r.shard_bytes / 2**20, r.ppl[setting]["perplexity"], r.variant) for r in rows
           if not r.is_reference and setting in r.ppl and r.shard_bytes]
    if not pts:
        return None
    ref = next((r for r in rows if r.is_reference and setting in r.ppl), None)
    plt = _plt()
    if plt is None:
        hline = (ref.ppl[setting]["perplexity"], "bnb NF4 reference (dense twin)") if ref is not None else None
        return svg_scatter(pts, out.with_suffix(".svg"), title=title, xlabel="size on disk (MiB)",
                           ylabel="perplexity (lower is better)", hline=hline)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], zorder=3)
    for x, y, name in pts:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
    if ref is not None:
        ax.axhline(ref.ppl[setting]["perplexity"], ls="--", lw=1, color="gray", label="bnb NF4 reference (dense twin)")
        ax.legend(fontsize=8)
    ax.margins(0.15)
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_speed(rows: list[Row], out: Path, title: str) -> Path | None:
    pts = [(r.shard_bytes / 2**20, r.speed["decode_s_per_token"], r.variant) for r in rows if r.speed and r.shard_bytes]
    if not pts:
        return None
    plt = _plt()
    if plt is None:
        return svg_scatter(pts, out.with_suffix(".svg"), title=title, xlabel="size on disk (MiB)",
                           ylabel="decode s/token (lower is better)", y_from_zero=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:orange", zorder=3)
    for x, y, name in pts:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
    ax.margins(0.15)
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("decode s/token (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# the SVG plot's canvas and margins, in pixels (matplotlib's 6.4 x 4.2 inch figure at 100 dpi)
_SVG_W, _SVG_H, _SVG_L, _SVG_R, _SVG_T, _SVG_B = 640, 420, 70, 20, 36, 50


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering lo..hi (1, 2 or 5 times a power of ten apart)."""
    span = hi - lo if hi > lo else abs(hi) or 1.0
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def svg_scatter(pts: list[tuple[float, float, str]], out: Path, *, title: str, xlabel: str, ylabel: str,
                hline: tuple[float, str] | None = None, y_from_zero: bool = False) -> Path:
    """A labelled scatter plot as a standalone SVG, for machines without matplotlib."""
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts] + ([hline[0]] if hline else [])
    x0, x1 = min(xs), max(xs)
    y0, y1 = (0.0 if y_from_zero else min(ys)), max(ys)
    # 15% margins around the points, as the PNG's ax.margins(0.15)
    pad_x, pad_y = 0.15 * ((x1 - x0) or abs(x1) or 1), 0.15 * ((y1 - y0) or abs(y1) or 1)
    x0, x1, y1 = x0 - pad_x, x1 + pad_x, y1 + pad_y
    y0 = y0 if y_from_zero else y0 - pad_y
    w, h = _SVG_W - _SVG_L - _SVG_R, _SVG_H - _SVG_T - _SVG_B

    def px(x: float) -> float:
        return _SVG_L + (x - x0) / (x1 - x0) * w

    def py(y: float) -> float:
        return _SVG_T + (y1 - y) / (y1 - y0) * h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_SVG_W}" height="{_SVG_H}" font-family="sans-serif" font-size="11">',
             f'<rect width="{_SVG_W}" height="{_SVG_H}" fill="white"/>',
             f'<text x="{_SVG_W / 2}" y="20" text-anchor="middle" font-size="13">{escape(title)}</text>',
             f'<rect x="{_SVG_L}" y="{_SVG_T}" width="{w}" height="{h}" fill="none" stroke="black"/>']
    for t in _ticks(x0, x1):
        if x0 <= t <= x1:
            parts.append(f'<line x1="{px(t):.1f}" y1="{_SVG_T}" x2="{px(t):.1f}" y2="{_SVG_T + h}" stroke="#ddd"/>'
                         f'<text x="{px(t):.1f}" y="{_SVG_T + h + 16}" text-anchor="middle">{t:g}</text>')
    for t in _ticks(y0, y1):
        if y0 <= t <= y1:
            parts.append(f'<line x1="{_SVG_L}" y1="{py(t):.1f}" x2="{_SVG_L + w}" y2="{py(t):.1f}" stroke="#ddd"/>'
                         f'<text x="{_SVG_L - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    if hline:
        parts.append(f'<line x1="{_SVG_L}" y1="{py(hline[0]):.1f}" x2="{_SVG_L + w}" y2="{py(hline[0]):.1f}" '
                     f'stroke="gray" stroke-dasharray="5,4"/><text x="{_SVG_L + w - 4}" y="{py(hline[0]) - 4:.1f}" '
                     f'text-anchor="end" fill="gray">{escape(hline[1])}</text>')
    for x, y, name in pts:
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="#1f77b4"><title>{escape(name)}: '
                     f'{x:.1f} MiB, {y:.4g}</title></circle><text x="{px(x) + 6:.1f}" y="{py(y) - 5:.1f}">{escape(name)}</text>')
    parts += [f'<text x="{_SVG_L + w / 2}" y="{_SVG_H - 12}" text-anchor="middle">{escape(xlabel)}</text>',
              f'<text x="16" y="{_SVG_T + h / 2}" text-anchor="middle" transform="rotate(-90 16 {_SVG_T + h / 2})">'
              f'{escape(ylabel)}</text>', "</svg>"]
    atomic_write_bytes(out, "\n".join(parts).encode())
    return out


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s).strip("-").lower() or "model"


# one function on purpose: a linear document, one section after another
def write_report(paths: list[str | Path], out: str | Path, *, title: str | None = None, notes: str | None = None) -> Path:
    """Write OUT/README.md and the plots; returns the README path."""
    results = load_results(paths)
    models = collect(results)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} is a file; give a directory")
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title or 'qstream report: ' + ', '.join(models)}", ""]
    machines = {json.dumps(d.get("machine"), sort_keys=True): d.get("machine") for _, d in results if d.get("machine")}
    vers = {json.dumps(d.get("versions"), sort_keys=True): d.get("versions") for _, d in results if d.get("versions")}
    lines.append("Made by `qstream report` from " + ", ".join(f"`{p.name}`" for p, _ in results) + ".")
    lines.append("")
    for m in machines.values():
        lines.append("Machine: " + ", ".join(f"{k} {v}" for k, v in m.items()) + ".")
    for v in vers.values():
        lines.append("Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".")
    lines.append("")
    multi = len(models) > 1
    for model, by_key in models.items():
        rows = list(by_key.values())
        settings = sorted({s for r in rows for s in r.ppl})
        if multi:
            lines += [f"## {model}", ""]
        for i, setting in enumerate(settings):
            source, context, stride, windows = setting
            head, body, base = table(rows, setting)
            any_pr = next(r.ppl[setting] for r in rows if setting in r.ppl)
            lines.append(f"{'#' if multi else ''}## Perplexity on {source} (context {context}, stride {stride}, "
                         f"{windows} windows, {any_pr['tokens_scored']} tokens scored)")
            lines += ["", markdown_table(head, body), ""]
            marks = [m for m in (target(r, base, reference(rows, setting), setting) for r in rows) if m.startswith(("ok", "MISS"))]
            rules = [TARGET_RULES[v] for v in ("int8", "nf4") if any(r.variant == v for r in rows)]
            if rules:
                lines.append("Quality targets (the `quality target` column; a variant that misses is marked **MISS**):")
                lines += [f"- {rule}" for rule in rules]
                n_miss = sum(t.startswith("MISS") for t in marks)
                lines.append(f"\n{n_miss} of {len(marks)} targeted variants miss." if marks else "")
                lines.append("")
            if base is not None:
                lines.append(f"Δ is against `{base.variant}` ({base.shards}), the variant with the most bits per weight. "
                             "The reference row is measured on transformers' dense twin of the uncompressed shards and its "
                             "Δ against that same twin unrounded.")
                lines.append("")
            suffix = "" if len(settings) == 1 else f"-{i + 1}"
            png = f"ppl_vs_size-{_slug(model)}{suffix}.png"
            plot = plot_ppl(rows, setting, out / png, f"{model}: perplexity vs size ({Path(str(source)).name}, ctx {context})")
            if plot is not None:
                lines += [f"![perplexity vs size]({plot.name})", ""]
        if not settings:
            lines += ["No perplexity results.", ""]
        head, body = speed_table(rows)
        if body:
            lines += [f"{'#' if multi else ''}## Speed (`qstream bench`)", "", markdown_table(head, body), ""]
            png = f"speed_vs_size-{_slug(model)}.png"
            plot = plot_speed(rows, out / png, f"{model}: decode s/token vs size")
            if plot is not None:
                lines += [f"![s/token vs size]({plot.name})", ""]
        accs = [(r, t, a) for r in rows for t, a in r.acc.items()]
        if accs and not settings:
            lines += [markdown_table(["variant", "task", "metric", "value"],
                                     [[r.variant, t, a[0], f"{a[1]:.3f}"] for r, t, a in accs]), ""]
    if notes:
        lines += [notes.rstrip(), ""]
    readme = out / "README.md"
    atomic_write_bytes(readme, "\n".join(lines).encode())
    return readme
