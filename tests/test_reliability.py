"""Issue 10: never delete what is not ours, never run on corrupt data, one line for every bad input.

One test per case of the attack. Tiny models only (tests/conftest.py); a shard directory is
made once per module and copied for each test that damages it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny, shard_to, write_recipe
import qstream
from qstream.cli import main
from qstream.errors import QstreamError, ShardError
from qstream.recipe import parse_recipe
from qstream.shard import shard
from qstream.store import read_header, read_manifest, verify

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fixtures and helpers

def add_tokenizer(d: Path) -> Path:
    """A tiny word-level fast tokenizer (w0 .. w249 plus specials), saved beside a tiny model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(250)} | {"<unk>": 250, "<s>": 251, "</s>": 252}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("base")
    src = add_tokenizer(make_tiny(tmp / "m", "llama"))
    return {"src": src, "nf4": shard_to(tmp, src, "nf4")}


@pytest.fixture
def shards(base, tmp_path) -> Path:
    """A private copy of the tiny nf4 shards to damage."""
    return Path(shutil.copytree(base["nf4"], tmp_path / "s"))


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([*map(str, args), "-q"])  # -q after the subcommand: the top-level one is lost (see the report)
    o = capsys.readouterr()
    return rc, o.out, o.err


def one_line_error(capsys, *args, code: int = 2) -> str:
    rc, _, err = cli(capsys, *args)
    lines = [line for line in err.strip().splitlines() if not line.startswith("qstream: note:")]
    assert rc == code and len(lines) == 1 and lines[0].startswith("qstream: error:"), (rc, err)
    return lines[0]


def edit_manifest(d: Path, fn) -> None:
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def flip(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x01
    path.write_bytes(bytes(b))


def tensor_offset(path: Path, key: str) -> int:
    """File offset of the middle of one stored tensor."""
    h = read_header(path)
    s = h.tensors[key]
    return h.data_offset + (s.start + s.end) // 2


def recipe_for(src, out, **kw):
    return parse_recipe({"model": str(src), "output": str(out), "scheme": "nf4", **kw})


def disk_tier_load(monkeypatch, d: Path):
    """Load with every layer read from disk on each pass (a budget of two layer slots, no host cache)."""
    import qstream.runtime.build as build

    real = build.plan_tiers

    def two_slots(layer_bytes, *, fixed_bytes, budget, host_budget, max_slots=4, **kw):
        return real(layer_bytes, fixed_bytes=fixed_bytes, budget=fixed_bytes + 2 * max(layer_bytes) + 1, host_budget=0,
                    max_slots=max_slots, **kw)

    monkeypatch.setattr(build, "plan_tiers", two_slots)
    model = qstream.load(d, device="cpu", gpu_memory="1GiB", host_memory=0, max_seq=32, progress=False)
    assert len(model.plan.disk) == model.plan.streamed.__len__() == 4
    return model


# ---------------------------------------------------------------- 1. data loss

def test_force_refuses_files_that_are_not_qstreams(base, tmp_path, capsys):
    out = tmp_path / "out"
    shard(recipe_for(base["src"], out, scheme="int8"), progress=False)
    (out / ".bashrc").write_text("mine")
    (out / ".config").mkdir()
    (out / "model.safetensors").write_bytes(b"user weights")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    recipe = write_recipe(tmp_path / "r.yaml", model=str(base["src"]), output=str(out), scheme="nf4")
    err = one_line_error(capsys, "shard", recipe, "--force")
    assert "--force removes only qstream's own files" in err and any(n in err for n in (".bashrc", ".config", "model.safetensors"))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing removed, nothing written
    for n in (".bashrc", ".config", "model.safetensors"):
        shutil.rmtree(out / n) if (out / n).is_dir() else (out / n).unlink()
    assert cli(capsys, "shard", recipe, "--force")[0] == 0  # only qstream's files left: --force replaces them
    assert {t["scheme"] for f in read_manifest(out).files for t in f.tensors.values()} == {"nf4", "bf16"}


def test_force_leaves_foreign_files_of_an_empty_run_alone_and_message_does_not_recommend_it(base, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"user weights")
    recipe = write_recipe(tmp_path / "r.yaml", model=str(base["src"]), output=str(out))
    for extra in ((), ("--force",)):
        err = one_line_error(capsys, "shard", recipe, *extra)
        assert "holds no qstream shards" in err and "model.safetensors" in err and "--force" not in err
    assert (out / "model.safetensors").read_bytes() == b"user weights"


@pytest.mark.parametrize("where", ["equal", "inside", "containing"])
def test_output_overlapping_the_source_is_refused(tmp_path, capsys, where):
    src = make_tiny(tmp_path / "parent" / "m", "llama")
    out = {"equal": src, "inside": src / "shards", "containing": tmp_path / "parent"}[where]
    before = sorted((p.name, p.stat().st_size) for p in src.iterdir())
    recipe = write_recipe(tmp_path / "r.yaml", model=str(src), output=str(out))
    err = one_line_error(capsys, "shard", recipe, "--force")
    assert "overlaps the source model" in err
    assert sorted((p.name, p.stat().st_size) for p in src.iterdir()) == before


# ---------------------------------------------------------------- 2. integrity at run time

@pytest.mark.parametrize("part", ["embed", "head", "norm", "absmax", "codes"])
def test_a_flipped_byte_is_a_shard_error_at_load(shards, part):
    fname, key = {
        "embed": ("embed.safetensors", "model.embed_tokens.weight"),
        "head": ("head.safetensors", "lm_head.weight"),
        "norm": ("layer_001.safetensors", "model.layers.1.input_layernorm.weight"),
        "absmax": ("layer_002.safetensors", "model.layers.2.mlp.up_proj.weight.absmax"),
        "codes": ("layer_003.safetensors", "model.layers.3.self_attn.o_proj.weight"),
    }[part]
    flip(shards / fname, tensor_offset(shards / fname, key))
    with pytest.raises(ShardError, match=f"{fname} does not match its checksum"):
        qstream.load(shards, device="cpu", progress=False)


def test_disk_tier_file_replaced_mid_generation_is_caught(shards, monkeypatch):
    model = disk_tier_load(monkeypatch, shards)
    try:
        ids = torch.tensor([[1, 2, 3]])
        first = model(ids)
        assert torch.equal(model(ids), first)  # re-reads pass their check
        p = shards / "layer_002.safetensors"
        p.write_bytes(os.urandom(p.stat().st_size))  # replaced by random bytes of the same size
        with pytest.raises(ShardError, match="layer_002.safetensors changed since it was first read"):
            model(ids)
    finally:
        model.close()


def test_old_manifest_without_fast_hash_falls_back_to_sha256(shards):
    edit_manifest(shards, lambda m: [f.pop("xxh3_64") for f in m["files"]])
    qstream.load(shards, device="cpu", progress=False).close()  # format 1 without the new field still loads
    p = shards / "layer_000.safetensors"
    flip(p, tensor_offset(p, "model.layers.0.mlp.down_proj.weight"))
    with pytest.raises(ShardError, match=r"layer_000.safetensors does not match its checksum \(sha256"):
        qstream.load(shards, device="cpu", progress=False)


@pytest.mark.parametrize("command", [["generate", "--prompt", "w1 w2"], ["eval", "ppl", "--text-file", "TEXT", "--context", "32"],
                                     ["bench", "--new-tokens", "2", "--prompt-tokens", "2"]])
def test_verify_flag_on_every_command_that_loads(shards, tmp_path, capsys, command):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 200}" for i in range(300)))
    command = [str(text) if c == "TEXT" else c for c in command]
    n = 1 if command[0] != "eval" else 2
    # a byte flipped where the size stays right: --verify names it before loading
    flip(shards / "layer_001.safetensors", tensor_offset(shards / "layer_001.safetensors", "model.layers.1.mlp.up_proj.weight"))
    err = one_line_error(capsys, *command[:n], shards, *command[n:], "--device", "cpu", "--verify")
    assert "verify failed: corrupt layer_001.safetensors" in err


def test_lm_eval_accepts_verify():
    from qstream.cli import build_parser

    a = build_parser().parse_args(["eval", "lm-eval", "d", "--tasks", "x", "--verify"])
    assert a.verify is True


# ---------------------------------------------------------------- 3. tokenizer checksums

@pytest.mark.parametrize("damage", ["swapped-ids", "empty-json"])
def test_tokenizer_files_are_checksummed(shards, capsys, damage):
    p = shards / "tokenizer.json"
    if damage == "swapped-ids":
        t = json.loads(p.read_text())
        v = t["model"]["vocab"]
        v["w1"], v["w2"] = v["w2"], v["w1"]
        p.write_text(json.dumps(t))
    else:
        p.write_text("{}")
    rc, out, _ = cli(capsys, "verify", shards)
    assert rc == 1 and "CORRUPT  tokenizer.json" in out
    with pytest.raises(ShardError, match="tokenizer file .*tokenizer.json does not match its checksum"):
        qstream.load(shards, device="cpu", progress=False)
    assert "tokenizer.json does not match its checksum" in one_line_error(capsys, "generate", shards, "--prompt", "w1")


# ---------------------------------------------------------------- 4. lock; manifest.json is never a tokenizer file

def test_second_shard_run_on_the_same_output_fails_naming_the_holder(base, tmp_path, capsys):
    from qstream.shard import _OutputLock

    out = tmp_path / "out"
    out.mkdir()
    holder = _OutputLock(out)
    holder.acquire()  # another run holds the output (flock conflicts between open files, even in one process)
    try:
        recipe = write_recipe(tmp_path / "r.yaml", model=str(base["src"]), output=str(out))
        err = one_line_error(capsys, "shard", recipe)
        assert f"being written by another `qstream shard` (PID {os.getpid()})" in err
        assert sorted(p.name for p in out.iterdir()) == [".qstream.lock"]
    finally:
        holder.release()
    assert cli(capsys, "shard", recipe)[0] == 0 and not (out / ".qstream.lock").exists()


def test_tokenizer_listing_never_includes_qstreams_own_files(base, tmp_path, monkeypatch):
    import qstream.shard as sh

    real = sh.open_source

    def noisy(model):
        s = real(model)
        save = s.save_tokenizer

        def save_and_litter(d: Path) -> list[str]:
            (d / "manifest.json").write_text("{}")  # what a diff of the directory listed on reruns
            (d / "layer_000.safetensors").write_bytes(b"x")
            return save(d) + ["manifest.json"]

        s.save_tokenizer = save_and_litter
        return s

    monkeypatch.setattr(sh, "open_source", noisy)
    out = tmp_path / "out"
    for _ in range(2):
        shard(recipe_for(base["src"], out), progress=False)
        m = read_manifest(out)
        assert m.tokenizer_files == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
        assert verify(out, progress=False).passed


# ---------------------------------------------------------------- 5. the manifest is checked against the files

def test_scheme_changed_in_the_manifest_fails_verify_and_load(shards, capsys):
    def nf4_to_fp4(m):
        m["files"][1]["tensors"]["model.layers.0.mlp.up_proj.weight"]["scheme"] = "fp4"

    edit_manifest(shards, nf4_to_fp4)
    rc, out, _ = cli(capsys, "verify", shards)
    assert rc == 1 and "INVALID  layer_000.safetensors: manifest.json disagrees with the file's own header" in out
    with pytest.raises(ShardError, match="disagrees with the file's own header about model.layers.0.mlp.up_proj.weight"):
        qstream.load(shards, device="cpu", progress=False)


@pytest.mark.parametrize("damage", ["no-files", "layer-gone"])
def test_verify_checks_completeness(shards, capsys, damage):
    if damage == "no-files":
        edit_manifest(shards, lambda m: m.update(files=[]))
        want = "lists no shard files"
    else:
        edit_manifest(shards, lambda m: m.update(files=[f for f in m["files"] if f["name"] != "layer_002.safetensors"]))
        (shards / "layer_002.safetensors").unlink()
        want = "no file for layer 2"
    rc, out, err = cli(capsys, "verify", shards)
    assert rc == 1 and f"INVALID  {want}" in out and "FAILED" in err and "OK" not in out


# ---------------------------------------------------------------- 6. reruns keep the tokenizer listed

def test_rerun_and_resume_keep_tokenizer_files_listed(base, tmp_path, capsys):
    out = tmp_path / "out"
    shard(recipe_for(base["src"], out), progress=False)
    assert shard(recipe_for(base["src"], out), progress=False).files_written == 0
    assert "tokenizer.json" in read_manifest(out).tokenizer_files
    (out / "tokenizer.json").unlink()
    rc, o, _ = cli(capsys, "verify", out)
    assert rc == 1 and "MISSING  tokenizer.json" in o


# ---------------------------------------------------------------- 7. a kill right after the first rename

def test_kill_between_first_rename_and_journal_write_resumes(base, tmp_path, monkeypatch):
    import qstream.shard as sh

    out = tmp_path / "out"
    real = sh.atomic_write_bytes

    def rename_then_die(path, data):
        real(path, data)
        raise KeyboardInterrupt  # killed after the rename, before the journal records the file

    monkeypatch.setattr(sh, "atomic_write_bytes", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        shard(recipe_for(base["src"], out), progress=False)
    monkeypatch.setattr(sh, "atomic_write_bytes", real)
    assert (out / "embed.safetensors").exists() and (out / ".journal.json").exists()
    r = shard(recipe_for(base["src"], out), progress=False)  # resumes, no refusal
    assert r.files_written == 6
    assert verify(out, progress=False).passed


# ---------------------------------------------------------------- 8. disk full, read-only output

def test_disk_full_while_writing_shards_is_one_line(base, tmp_path, capsys, monkeypatch):
    import qstream.shard as sh

    real, calls = sh.atomic_write_bytes, {"n": 0}

    def full(path, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(sh, "atomic_write_bytes", full)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", model=str(base["src"]), output=str(out))
    err = one_line_error(capsys, "shard", recipe)
    assert "No space left on device" in err and "rerun to resume" in err
    assert not (out / "manifest.json").exists() and not list(out.glob(".*tmp*"))
    monkeypatch.setattr(sh, "atomic_write_bytes", real)
    assert shard(recipe_for(base["src"], out), progress=False).files_resumed == 2


def test_disk_full_while_saving_the_tokenizer_leaves_no_half_file(base, tmp_path, capsys, monkeypatch):
    import qstream.shard as sh

    real = sh.open_source

    def failing(model):
        s = real(model)
        save = s.save_tokenizer

        def half(d: Path) -> list[str]:
            save(d)
            (d / "tokenizer.json").write_text('{"trunc')  # what an in-place write leaves on ENOSPC
            raise OSError(28, "No space left on device", str(d / "tokenizer.json"))

        s.save_tokenizer = half
        return s

    monkeypatch.setattr(sh, "open_source", failing)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", model=str(base["src"]), output=str(out))
    assert "No space left on device" in one_line_error(capsys, "shard", recipe)
    assert not (out / "tokenizer.json").exists() and not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if "tmp" in p.name]


def test_unwritable_output_fails_before_the_source_is_read(base, tmp_path, capsys, monkeypatch):
    import qstream.shard as sh

    def erofs(self):
        raise OSError(30, "Read-only file system", str(self.path))

    def never(model):
        raise AssertionError("the source was opened before the output was known to be writable")

    monkeypatch.setattr(sh._OutputLock, "acquire", erofs)
    monkeypatch.setattr(sh, "open_source", never)
    recipe = write_recipe(tmp_path / "r.yaml", model=str(base["src"]), output=str(tmp_path / "out"))
    assert "cannot write to output directory" in one_line_error(capsys, "shard", recipe)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 9. undecodable input, devices, a GGUF as recipe

def test_non_utf8_recipe(tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_bytes(b"model: \xff\xfe\noutput: x\n")
    assert "not UTF-8 text (byte 0xff" in one_line_error(capsys, "shard", r)


def test_non_utf8_batch_file(shards, tmp_path, capsys):
    b = tmp_path / "prompts.txt"
    b.write_bytes(b"w1 w2\nw3 \xc3\x28\n")
    assert "not UTF-8 text (byte 0xc3 on line 2)" in one_line_error(capsys, "generate", shards, "--batch-file", b)


def test_non_utf8_prompt(shards, tmp_path):
    # argv bytes that are not UTF-8 reach Python as surrogate escapes
    p = subprocess.run([sys.executable.encode(), b"-m", b"qstream.cli", b"-q", b"generate", str(shards).encode(), b"--prompt",
                        b"w1 \xff"], capture_output=True, cwd=ROOT)
    err = p.stderr.decode(errors="replace").strip()
    assert p.returncode == 2 and "Traceback" not in err and err.splitlines()[-1].startswith("qstream: error: --prompt is not valid UTF-8")


@pytest.mark.parametrize("device", ["tpu", "gpu"])
def test_unknown_device(shards, capsys, device):
    assert f"device {device!r}" in one_line_error(capsys, "generate", shards, "--prompt", "w1", "--device", device)


def test_gguf_passed_as_a_recipe(tmp_path, capsys):
    g = tmp_path / "model.gguf"
    g.write_bytes(b"GGUF\x03\x00\x00\x00" + os.urandom(64))
    assert "is a GGUF model file, not a recipe" in one_line_error(capsys, "shard", g)


# ---------------------------------------------------------------- 10. manifest fields the runtime would crash on

@pytest.mark.parametrize("case", ["shape", "compute-dtype", "stored-name", "config-value", "config-value-old-manifest",
                                  "config-shape-old-manifest"])
def test_manifest_fields_the_runtime_relies_on(shards, capsys, case):
    def edit(m):
        layer = m["files"][1]["tensors"]
        if case == "shape":
            layer["model.layers.0.mlp.up_proj.weight"]["shape"] = [64, 64]
        elif case == "compute-dtype":
            m["compute_dtype"] = "int4"
        elif case == "stored-name":
            layer["model.layers.0.mlp.up_proj.weight"]["stored"]["data"] = "nope"
        elif case == "config-shape-old-manifest":
            m["model"]["config"]["intermediate_size"] = 96  # builds a model, but not the one the files hold
            m.pop("config_sha256")
        else:
            m["model"]["config"]["num_attention_heads"] = 3  # 64 is not divisible by 3
            if case == "config-value-old-manifest":
                m.pop("config_sha256")

    edit_manifest(shards, edit)
    want = {"shape": "disagrees with the file's own header", "compute-dtype": "compute_dtype 'int4'",
            "stored-name": "disagrees with the file's own header", "config-value": "does not match its checksum",
            "config-value-old-manifest": "does not build a model", "config-shape-old-manifest": "the model config needs"}[case]
    rc, out, _ = cli(capsys, "verify", shards)
    assert rc == 1 and want in out, out
    assert want in one_line_error(capsys, "generate", shards, "--prompt", "w1", "--device", "cpu")


def test_missing_sha256_key_is_one_line_in_verify_and_inspect(shards, capsys):
    edit_manifest(shards, lambda m: m["files"][2].pop("sha256"))
    for cmd in ("verify", "inspect"):
        assert "files[2] (layer_001.safetensors) has no 'sha256'" in one_line_error(capsys, cmd, shards)


def test_swapped_layer_files(shards, capsys):
    a, b = shards / "layer_001.safetensors", shards / "layer_002.safetensors"
    tmp = shards / "x"
    a.rename(tmp), b.rename(a), tmp.rename(b)
    rc, out, _ = cli(capsys, "verify", shards)
    assert rc == 1 and "CORRUPT  layer_001.safetensors" in out and "CORRUPT  layer_002.safetensors" in out
    assert "layer_001.safetensors" in one_line_error(capsys, "generate", shards, "--prompt", "w1", "--device", "cpu")


@pytest.mark.parametrize("damage", ["missing", "unparsable"])
@pytest.mark.parametrize("command", ["generate", "ppl"])
def test_missing_or_unparsable_tokenizer(shards, tmp_path, capsys, damage, command):
    p = shards / "tokenizer.json"
    if damage == "missing":
        p.unlink()
    else:
        p.write_text("{not json")
    # an old manifest without tokenizer checksums: the tokenizer itself must still fail in one line
    edit_manifest(shards, lambda m: m.pop("tokenizer_checksums"))
    text = tmp_path / "t.txt"
    text.write_text("w1 w2 w3 " * 50)
    args = ["generate", shards, "--prompt", "w1"] if command == "generate" else ["eval", "ppl", shards, "--text-file", text,
                                                                                  "--context", "32"]
    err = one_line_error(capsys, *args, "--device", "cpu")
    assert ("missing tokenizer file" in err) if damage == "missing" else ("cannot load the tokenizer" in err)


# ---------------------------------------------------------------- 11. bad sources, bench --json DIR

def test_source_index_pointing_at_a_bin_file(tmp_path, capsys):
    src = make_tiny(tmp_path / "m", "llama")
    st = src / "model.safetensors"
    from safetensors import safe_open

    with safe_open(st, framework="pt") as f:
        keys = list(f.keys())
    (src / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "pytorch_model.bin" for k in keys}}))
    st.unlink()
    recipe = write_recipe(tmp_path / "r.yaml", model=str(src), output=str(tmp_path / "o"))
    err = one_line_error(capsys, "shard", recipe)
    assert "not valid safetensors" in err and not (tmp_path / "o").exists()


def test_pickle_renamed_safetensors(tmp_path, capsys):
    src = make_tiny(tmp_path / "m", "llama")
    torch.save({"w": torch.zeros(2)}, src / "model.safetensors")  # a pickle (zip) under a safetensors name
    recipe = write_recipe(tmp_path / "r.yaml", model=str(src), output=str(tmp_path / "o"))
    assert "never pickles" in one_line_error(capsys, "shard", recipe)


def test_bench_json_directory(shards, tmp_path, capsys):
    d = tmp_path / "results"
    d.mkdir()
    assert "is a directory" in one_line_error(capsys, "bench", shards, "--json", d, "--device", "cpu")
    assert list(d.iterdir()) == [] and not [p for p in tmp_path.iterdir() if "tmp" in p.name]


# ---------------------------------------------------------------- minor

def test_stale_temp_files_of_dead_runs_are_cleaned(base, tmp_path):
    out = tmp_path / "out"
    shard(recipe_for(base["src"], out), progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = out / f".layer_001.safetensors.tmp-{pid}"
    stale.write_bytes(b"half")
    (out / f".tokenizer.tmp-{pid}").mkdir()
    live = out / f".layer_002.safetensors.tmp-{os.getppid()}"  # a live PID: left alone
    live.write_bytes(b"?")
    shard(recipe_for(base["src"], out), progress=False)
    assert not stale.exists() and not (out / f".tokenizer.tmp-{pid}").exists() and live.exists()


def test_load_error_does_not_send_the_user_to_a_verify_that_fails_the_same_way(shards, capsys):
    (shards / "manifest.json").write_text("{broken")
    err = one_line_error(capsys, "generate", shards, "--prompt", "w1")
    assert "corrupt manifest" in err and "verify" not in err
    assert "corrupt manifest" in one_line_error(capsys, "verify", shards)  # verify fails the same way: exit 2, one line


def test_prompt_longer_than_the_model_is_an_error(shards, capsys):
    prompt = " ".join(f"w{i % 200}" for i in range(300))  # the tiny model has 256 positions
    err = one_line_error(capsys, "generate", shards, "--prompt", prompt, "--no-chat", "--device", "cpu")
    assert "(300 tokens) plus --max-new-tokens 64 exceeds the model's context of 256 tokens" in err


def test_host_memory_without_gpu_memory_on_cpu_is_reported(shards, capsys):
    rc, _, err = cli(capsys, "generate", shards, "--prompt", "w1", "--device", "cpu", "--host-memory", "0",
                     "--max-new-tokens", "2", "--no-chat")
    assert rc == 0 and "--host-memory 0 has no effect on CPU without --gpu-memory" in err


def test_duplicate_yaml_keys(tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_text("model: a\noutput: x\nscheme: nf4\nscheme: int8\n")
    assert "field 'scheme' is given twice (line 4)" in one_line_error(capsys, "shard", r)


@pytest.mark.parametrize("where", ["recipe", "flag"])
def test_empty_output_is_refused(base, tmp_path, capsys, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    if where == "recipe":
        r = tmp_path / "r.yaml"
        r.write_text(f"model: {base['src']}\noutput: ''\n")
        err = one_line_error(capsys, "shard", r)
    else:
        r = write_recipe(tmp_path / "r.yaml", model=str(base["src"]), output=str(tmp_path / "o"))
        err = one_line_error(capsys, "shard", r, "--output", "")
    assert "output" in err and "empty" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]
