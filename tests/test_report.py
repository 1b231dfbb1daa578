"""`qstream report` from synthetic result files: table rows, quality targets, plots, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qstream.cli import main
from qstream.eval.report import write_report

PNG = b"\x89PNG\r\n\x1a\n"
DATA = {"source": "file:eval/data/sample.txt", "chars": 1000, "sha256": "x"}


def _ppl(variant, shards, ppl, *, bits, size, extra=None, model="smollm2-135m"):
    r = {"perplexity": ppl, "nll_per_token": 0.0, "tokens_scored": 8000, "corpus_tokens": 8001, "windows": 16,
         "context": 512, "stride": 512, **(extra or {})}
    return {"kind": "ppl", "variant": variant, "shards": shards, "model": model,
            "recipe": {"model": model, "scheme": variant}, "shard_bytes": size, "bits_per_weight_layers": bits,
            "machine": {"cpu": "x86_64", "cpus": 2}, "versions": {"qstream": "0.1.0"}, "data": DATA, "ppl": r}


def _bench(variant, shards, s_tok, size):
    return {"shards": shards, "recipe": {"model": "smollm2-135m", "scheme": variant}, "device": "cpu",
            "decode_s_per_token": s_tok, "decode_tokens_per_s": 1 / s_tok, "prefill_tokens_per_s": 100.0, "load_s": 1.0,
            "plan": {"resident": 30, "host": 0, "disk": 0, "slots": 0}, "shard_bytes": size}


def _lm(variant, shards, acc):
    return {"kind": "lm-eval", "variant": variant, "shards": shards, "model": "smollm2-135m",
            "recipe": {"model": "smollm2-135m", "scheme": variant}, "lm_eval": {"results": {"qstream_tiny_qa": {"alias": "qstream_tiny_qa", "sample_len": 20, "acc,none": acc,
                                                        "acc_stderr,none": "N/A", "acc_norm,none": 0.1}}}}


def _write(tmp: Path, items: dict) -> list[Path]:
    out = []
    for name, obj in items.items():
        p = tmp / f"{name}.json"
        p.write_text(json.dumps(obj))
        out.append(p)
    return out


def _rows(readme: str) -> dict[str, list[str]]:
    """First table of the README: variant -> cells."""
    rows = {}
    for line in readme.splitlines():
        if line.startswith("| ") and not line.startswith("| variant"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault(cells[0], cells)
    return rows


def _header(readme: str) -> list[str]:
    line = next(l for l in readme.splitlines() if l.startswith("| variant"))
    return [c.strip() for c in line.strip("|").split("|")]


MIB = 2**20


@pytest.fixture
def inputs(tmp_path):
    return _write(tmp_path, {
        "ppl-bf16": _ppl("bf16", "shards/s-bf16", 20.0, bits=16.2, size=310 * MIB),
        "ppl-int8": _ppl("int8", "shards/s-int8", 20.08, bits=8.7, size=170 * MIB),  # +0.40%: ok
        "ppl-nf4": _ppl("nf4", "shards/s-nf4", 21.5, bits=4.7, size=110 * MIB),  # +1.5 vs reference +1.2: MISS
        "ppl-fp4": _ppl("fp4", "shards/s-fp4", 23.0, bits=4.7, size=110 * MIB),
        "ppl-ref": _ppl("bnb-nf4-reference", "shards/s-bf16", 21.25, bits=16.2, size=310 * MIB,
                        extra={"baseline_perplexity": 20.05, "delta": 1.2, "delta_rel": 1.2 / 20.05}),
        "lm-int8": _lm("int8", "shards/s-int8", 0.55),
        "lm-nf4": _lm("nf4", "shards/./s-nf4", 0.45),  # same directory, spelled differently
        "bench-bf16": _bench("bf16", "shards/s-bf16", 0.05, 310 * MIB),
        "bench-nf4": _bench("nf4", "shards/s-nf4/", 0.08, 110 * MIB),
    })


def test_table_rows_targets_and_plots(inputs, tmp_path):
    out = tmp_path / "report"
    readme = write_report(inputs, out, title="SmolLM2 test").read_text()
    head, rows = _header(readme), _rows(readme)
    assert head[:5] == ["variant", "size on disk", "bits/weight (layers)", "perplexity", "Δ vs bf16"]
    assert "qstream_tiny_qa acc" in head and head[-3:] == ["s/token", "tokens/s", "quality target"]
    col = {h: i for i, h in enumerate(head)}
    assert set(rows) == {"bf16", "int8", "nf4", "fp4", "bnb-nf4-reference"}
    # ordered by bits, reference last
    order = [l.split("|")[1].strip() for l in readme.splitlines() if l.startswith("| ") and "variant" not in l]
    assert order[:2] == ["bf16", "int8"] and set(order[2:4]) == {"nf4", "fp4"} and order[4] == "bnb-nf4-reference"
    assert rows["bf16"][col["size on disk"]] == "310.0 MiB" and rows["bf16"][col["perplexity"]] == "20.0000"
    assert rows["bf16"][col["Δ vs bf16"]] == "—" and rows["bf16"][col["quality target"]] == ""
    assert rows["int8"][col["Δ vs bf16"]] == "+0.0800 (+0.40%)"
    assert rows["int8"][col["quality target"]].startswith("ok (+0.40%")
    assert rows["nf4"][col["quality target"]].startswith("MISS (+1.5000 vs reference +1.2000)")
    assert rows["fp4"][col["quality target"]] == ""  # no target for fp4
    assert rows["bnb-nf4-reference"][col["Δ vs bf16"]].startswith("+1.2000 (+5.99%) vs its twin")
    assert rows["int8"][col["qstream_tiny_qa acc"]] == "0.550" and rows["nf4"][col["qstream_tiny_qa acc"]] == "0.450"
    assert rows["bf16"][col["qstream_tiny_qa acc"]] == "-"
    assert rows["nf4"][col["s/token"]] == "0.0800" and rows["nf4"][col["tokens/s"]] == "12.50"
    assert rows["int8"][col["s/token"]] == "-"
    assert "MISS" not in rows["int8"][col["quality target"]] and readme.count("MISS (") == 1
    assert "int8: perplexity at most +0.5% above the uncompressed variant" in readme
    assert "bitsandbytes' own NF4" in readme and "1 of 2 targeted variants miss" in readme
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["ppl_vs_size-smollm2-135m.png", "speed_vs_size-smollm2-135m.png"]
    for p in pngs:
        assert (out / p).read_bytes()[:8] == PNG and f"]({p})" in readme


def test_int8_miss_and_nf4_ok(tmp_path):
    files = _write(tmp_path, {
        "a": _ppl("fp32", "s/fp32", 10.0, bits=32.1, size=600 * MIB),
        "b": _ppl("bf16", "s/bf16", 10.01, bits=16.2, size=300 * MIB),
        "c": _ppl("int8", "s/int8", 10.06, bits=8.7, size=170 * MIB),  # +0.6% over fp32: MISS
        "d": _ppl("nf4", "s/nf4", 10.3, bits=4.7, size=110 * MIB),
        "e": _ppl("bnb-nf4-reference", "s/fp32", 10.31, bits=32.1, size=600 * MIB,
                  extra={"baseline_perplexity": 10.0, "delta": 0.31}),
    })
    readme = write_report(files, tmp_path / "r").read_text()
    head, rows = _header(readme), _rows(readme)
    col = {h: i for i, h in enumerate(head)}
    assert "Δ vs fp32" in head  # the most bits is the uncompressed reference
    assert rows["int8"][col["quality target"]].startswith("MISS (+0.60% vs limit +0.50%)")
    assert rows["nf4"][col["quality target"]].startswith("ok (+0.3000 vs reference +0.3100)")
    assert not list((tmp_path / "r").glob("speed_vs_size*"))  # no bench input, no speed plot
    # without a reference, nf4 cannot be judged, and says so
    readme = write_report(files[:4], tmp_path / "r2").read_text()
    assert "n/a (no bnb-nf4-reference" in _rows(readme)["nf4"][col["quality target"]]


def test_cli_report_and_bad_inputs(inputs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["report", *map(str, inputs), "--out", str(out)]) == 0
    assert (out / "README.md").is_file()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    notjson = tmp_path / "x.json"
    notjson.write_text("{")
    for argv, needle in [
        (["report", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")], "result file not found"),
        (["report", str(bad), "--out", str(tmp_path / "o")], "bad.json: not a result of `qstream eval ppl`"),
        (["report", str(notjson), "--out", str(tmp_path / "o")], "x.json"),
        (["report", str(inputs[0]), "--out", str(inputs[0])], "is a file"),
    ]:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("qstream: error: ") and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_bytes_size_ratio_bits_and_head_columns(tmp_path):
    bf16 = _ppl("bf16", "s/bf16", 20.0, bits=16.0, size=270 * MIB)
    q4 = _ppl("q4", "s/q4", 21.0, bits=4.5, size=90 * MIB)
    bf16.update(bits_per_weight=16.0, head="bf16, tied: stored once")
    q4.update(bits_per_weight=5.3, head="q8 g64, tied: stored once")
    readme = write_report(_write(tmp_path, {"a": bf16, "b": q4}), tmp_path / "r").read_text()
    head, rows = _header(readme), _rows(readme)
    col = {h: i for i, h in enumerate(head)}
    assert rows["q4"][col["bytes"]] == f"{90 * MIB:,}" and rows["q4"][col["size vs bf16"]] == "0.333"
    assert rows["q4"][col["bits/weight (all)"]] == "5.30" and rows["q4"][col["head"]] == "q8 g64, tied: stored once"
    assert rows["bf16"][col["size vs bf16"]] == "1.000"


def test_plots_are_svg_without_matplotlib(inputs, tmp_path, monkeypatch):
    import xml.etree.ElementTree as ET

    import qstream.eval.report as rep

    monkeypatch.setattr(rep, "_plt", lambda: None)  # as on a machine without matplotlib
    readme = write_report(inputs, tmp_path / "r").read_text()
    svgs = sorted(p.name for p in (tmp_path / "r").iterdir() if p.suffix == ".svg")
    assert svgs == ["ppl_vs_size-smollm2-135m.svg", "speed_vs_size-smollm2-135m.svg"]
    assert not list((tmp_path / "r").glob("*.png"))
    root = ET.parse(tmp_path / "r" / svgs[0]).getroot()  # well-formed XML
    texts = {t.text for t in root.iter("{http://www.w3.org/2000/svg}text")}
    assert {"bf16", "int8", "nf4", "fp4"} <= texts and "bnb NF4 reference (dense twin)" in texts
    assert len(list(root.iter("{http://www.w3.org/2000/svg}circle"))) == 4
    assert f"]({svgs[0]})" in readme and f"]({svgs[1]})" in readme
