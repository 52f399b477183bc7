"""`nanoseek convert`: native <-> HF, exact in fp32, MTP + routing bias + tokenizer kept, atomic output.

Run: python -m pytest -q tests/test_convert.py
"""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import micro_config, randomize_bias

from nanoseek import NanoseekError
from nanoseek.checkpoint import list_checkpoints, load_model, resolve, save_model
from nanoseek.cli import main
from nanoseek.convert import convert
from nanoseek.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def micro(**kw):
    # attn_impl naive and moe_impl loop: fields with no HF key, which a round trip must keep all the same
    base = dict(num_nextn_predict_layers=2, max_position_embeddings=256, attn_impl="naive", moe_impl="loop")
    return micro_config(init_std=0.006, **{**base, **kw})


@pytest.fixture
def run_dir(tmp_path):
    """A training-run layout: tokenizer at the top, weights in checkpoints/step_*/."""
    from nanoseek.tokenizer import train_tokenizer

    torch.manual_seed(0)
    m = Transformer(micro())
    randomize_bias(m, 0.01)
    run = tmp_path / "run"
    save_model(m, run / "checkpoints" / "step_0000010")
    train_tokenizer(["def f(x):\n    return x + 1\n"] * 8, vocab_size=270).save(run / "tokenizer.json")
    return run, m


def test_native_hf_native_round_trip_is_exact(run_dir, tmp_path):
    run, m = run_dir
    hf, back = tmp_path / "hf", tmp_path / "back"
    assert main(["convert", str(run), str(hf), "--to", "hf"]) == 0
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 2 and (hf / "tokenizer.json").is_file()
    convert(hf, back, to="native")
    m2, tok = load_model(back, dtype=torch.float32, attn_impl="absorb")
    a, b = m.state_dict(), m2.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # MTP layers and routing bias too
    assert len(m2.mtp) == 2 and tok is not None and tok.vocab_size == 270
    assert {p.name for p in tmp_path.iterdir()} == {"run", "hf", "back"}  # no temporary directories left
    # the config too: name, attn_impl and moe_impl have no HF key and travel under "nanoseek"
    original = (run / "checkpoints" / "step_0000010" / "config.json").read_text()
    assert (back / "config.json").read_text() == original and json.loads(original)["name"] == "tiny"
    assert cfg["nanoseek"] == {"attn_impl": "naive", "moe_impl": "loop", "name": "tiny"}
    assert cfg["dtype"] == cfg["torch_dtype"] == "float32"  # what is stored (transformers loads in it)


def test_bf16_and_fp8_exports_load_close_to_the_original(run_dir, tmp_path):
    run, m = run_dir
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        ref = m(x)
        for flags, tol in ((["--dtype", "bf16"], 0.02), (["--fp8"], 0.1)):
            out = tmp_path / flags[-1].strip("-")
            assert main(["convert", str(run), str(out), "--to", "hf", *flags]) == 0
            m2, _ = load_model(out, dtype=torch.float32, attn_impl="absorb")
            assert (m2(x) - ref).abs().max() < tol * ref.abs().max()
            bias = m2.layers["1"].mlp.gate.e_score_correction_bias
            assert bias.dtype == torch.float32 and torch.equal(bias, m.layers["1"].mlp.gate.e_score_correction_bias)


def test_fp8_export_of_block_aligned_experts_reloads_and_converts_back(tmp_path):
    """Expert weights whose dims are whole 128x128 blocks are quantised from transposed views without padding:
    the export must still save (contiguous tensors), reload close to the original and convert back."""
    torch.manual_seed(0)
    m = Transformer(micro(hidden_size=128, moe_intermediate_size=128, num_nextn_predict_layers=1)).eval()
    randomize_bias(m, 0.01)
    src = tmp_path / "native"
    save_model(m, src)
    assert main(["convert", str(src), str(tmp_path / "hf8"), "--to", "hf", "--fp8", "--dtype", "bf16"]) == 0
    cfg = json.loads((tmp_path / "hf8" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "fp8" and cfg["dtype"] == "bfloat16"  # as V3's release
    m8, _ = load_model(tmp_path / "hf8", dtype=torch.float32, attn_impl="naive")
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        ref, got = m(x), m8(x)
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
    assert torch.equal(got[0, -8:].argmax(-1), ref[0, -8:].argmax(-1))  # greedy tokens unchanged
    convert(tmp_path / "hf8", tmp_path / "back", to="native")
    back, _ = load_model(tmp_path / "back", dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), m8.state_dict().values(), strict=True))


def test_convert_writes_a_tokenizer_config_that_transformers_reads(run_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    run, _ = run_dir
    convert(run, tmp_path / "hf", to="hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    text = "def f(x):\n    return x + 1\n"
    assert tok(text)["input_ids"] == load_model(run)[1].encode(text) and tok.decode(tok(text)["input_ids"]) == text


def test_output_directories_get_the_umask_mode(run_dir, tmp_path):
    run, _ = run_dir
    old = os.umask(0o027)
    try:
        convert(run, tmp_path / "hf", to="hf")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o750  # not mkdtemp's 0700
    assert stat.S_IMODE((tmp_path / "hf" / "model.safetensors").stat().st_mode) == 0o640  # not safetensors' 0600


def test_convert_never_deletes_what_is_not_a_model(run_dir, tmp_path, monkeypatch):
    run, _ = run_dir
    ckpt = run / "checkpoints" / "step_0000010"
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    for dst in (run, run / "checkpoints", ckpt, tmp_path):  # the source, the checkpoint, or above them
        with pytest.raises(NanoseekError, match=r"is the source( checkpoint)? or a directory above it"):
            convert(ckpt, dst, to="native")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("notes")
    with pytest.raises(NanoseekError, match=r"not a model directory: replacing it would delete notes\.txt"):
        convert(run, precious, to="hf")
    (tmp_path / "a_file").write_text("data")
    with pytest.raises(NanoseekError, match="exists and is not a directory"):
        convert(run, tmp_path / "a_file", to="hf")
    with pytest.raises(NanoseekError, match=r"cannot write .*a_file/sub"):
        convert(run, tmp_path / "a_file" / "sub", to="hf")
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for dst in (".", ".."):
        assert main(["convert", str(run), dst, "--to", "hf"]) == 2
        with pytest.raises(NanoseekError, match="is the current directory or a directory above it"):
            convert(run, dst, to="hf")
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert after == sorted([*before, "precious", "precious/notes.txt", "a_file", "work", "work/deep"])
    assert (precious / "notes.txt").read_text() == "notes" and (tmp_path / "a_file").read_text() == "data"


def test_convert_replaces_the_destination_atomically_and_reports_errors(run_dir, tmp_path, capsys):
    run, _ = run_dir
    dst = tmp_path / "out"
    dst.mkdir()
    convert(run, dst, to="hf")  # an empty directory is filled
    (dst / "model.safetensors").write_text("stale")  # a model directory is replaced
    convert(run, dst, to="native", dtype="bf16")
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    m2, _ = load_model(dst, dtype=torch.float32)
    assert m2.layers["0"].self_attn.q_a_proj.weight.dtype == torch.float32  # stored bf16, loaded as asked
    with pytest.raises(NanoseekError, match="is the source"):
        convert(dst, dst, to="hf")
    with pytest.raises(NanoseekError, match="--fp8"):
        convert(run, tmp_path / "x", to="native", fp8=True)
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "y"), "--to", "hf"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_convert_onto_a_full_disk_is_one_line(run_dir, tmp_path, monkeypatch):
    """safetensors reports a full disk with its own exception type (not OSError): still one line, with the free
    space, and no temporary directory left behind."""
    from safetensors import SafetensorError

    import nanoseek.hf

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(nanoseek.hf, "save_pretrained", full)
    with pytest.raises(NanoseekError, match=r"cannot write .*out: .*No space left on device\) \([\d,]+ MiB free"):
        convert(run_dir[0], tmp_path / "out", to="hf")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no out, no temporary directory


def stored_dtypes(path) -> dict[str, str]:
    """The dtype each tensor is stored in, as safetensors names it (BF16, F32, ...)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as h:
        return {k: h.get_slice(k).get_dtype() for k in h.keys()}  # noqa: SIM118


def test_load_model_in_bf16_keeps_the_routing_bias_fp32(run_dir):
    """Loading in bf16 casts the weights, never the routing bias: bf16 would round the bias (whose updates are
    ±1e-3 steps) and change which experts are picked."""
    run, m = run_dir
    m2, _ = load_model(run, dtype=torch.bfloat16)
    bias, want = m2.layers["1"].mlp.gate.e_score_correction_bias, m.layers["1"].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, want) and want.abs().min() > 0
    assert not torch.equal(bias.bfloat16().float(), want)  # so a bf16 round trip would show
    q = m2.layers["0"].self_attn.q_a_proj.weight
    assert q.dtype == torch.bfloat16 and torch.equal(q, m.layers["0"].self_attn.q_a_proj.weight.bfloat16())


def test_bf16_conversions_store_bf16_weights_and_an_fp32_routing_bias(run_dir, tmp_path):
    """`--dtype bf16` is the storage dtype (half the file), both ways: the linear weights are stored BF16, the
    routing bias F32, and an HF export's config says bfloat16."""
    run, m = run_dir
    bias = m.layers["1"].mlp.gate.e_score_correction_bias
    for to, prefix in (("native", ""), ("hf", "model.")):
        out = tmp_path / to
        assert main(["convert", str(run), str(out), "--to", to, "--dtype", "bf16"]) == 0
        dtypes = stored_dtypes(out / "model.safetensors")
        assert dtypes[f"{prefix}layers.0.self_attn.q_a_proj.weight"] == "BF16"
        assert dtypes[f"{prefix}embed_tokens.weight"] == "BF16"
        assert dtypes[f"{prefix}layers.1.mlp.gate.e_score_correction_bias"] == "F32"
        assert {d for k, d in dtypes.items() if not k.endswith("e_score_correction_bias")} == {"BF16"}
        m2, _ = load_model(out, dtype=torch.float32)
        assert torch.equal(m2.layers["1"].mlp.gate.e_score_correction_bias, bias)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_convert_refuses_a_destination_holding_only_a_config_or_only_weights(run_dir, tmp_path):
    """A directory with a config.json and no weights, or weights and no config.json, is not a model directory:
    replacing it would lose what it holds (perhaps the only copy of a hand-written config, or weights whose
    config lives elsewhere), so it is refused and left as it was."""
    run, _ = run_dir
    for name, content in (("config.json", '{"hand": "written"}'), ("model.safetensors", "weights")):
        dst = tmp_path / f"only_{name}"
        dst.mkdir()
        (dst / name).write_text(content)
        with pytest.raises(
            NanoseekError, match=rf"exists and is not a model directory: replacing it would delete {name};"
        ):
            convert(run, dst, to="hf")
        assert [p.name for p in dst.iterdir()] == [name]
        assert (dst / name).read_text() == content


def test_save_pretrained_over_a_sharded_export_leaves_no_stale_shards(tmp_path):
    """Re-exporting unsharded into a directory that holds a sharded export drops the old shards and index (an
    index left behind would point loaders at the old weights), while other files (a tokenizer) carry over."""
    from nanoseek.hf import save_pretrained

    torch.manual_seed(1)
    old = Transformer(micro())
    torch.manual_seed(2)
    m = Transformer(micro())
    randomize_bias(m, 0.01)
    d = tmp_path / "hf"
    save_pretrained(old, d, max_shard_bytes=200_000, dtype=torch.float32)
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(shards) > 1 and (d / "model.safetensors.index.json").is_file()
    (d / "tokenizer.json").write_text("{}")
    save_pretrained(m, d, dtype=torch.float32)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not (d / "model.safetensors.index.json").exists()
    (d / "tokenizer.json").unlink()  # a placeholder, not a tokenizer load_model could read
    m2, _ = load_model(d, dtype=torch.float32, attn_impl="naive")
    a, b = m.state_dict(), m2.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_copies_the_runs_own_tokenizer_config(run_dir, tmp_path):
    """A tokenizer_config.json beside the run's tokenizer.json (chat template, special tokens) is the user's: the
    export carries it byte for byte rather than writing the minimal one it makes when there is none."""
    run, _ = run_dir
    custom = b'{"eos_token": "<|endoftext|>", "model_max_length": 77, "chat_template": "{{ messages }}"}\n'
    (run / "tokenizer_config.json").write_bytes(custom)
    convert(run, tmp_path / "hf", to="hf")
    assert (tmp_path / "hf" / "tokenizer_config.json").read_bytes() == custom


def test_mis_shaped_native_weight_is_a_one_line_error(run_dir):
    from safetensors.torch import load_file, save_file

    run, _ = run_dir
    f = run / "checkpoints" / "step_0000010" / "model.safetensors"
    save_file({**load_file(str(f)), "norm.weight": torch.ones(63)}, str(f))
    with pytest.raises(NanoseekError) as e:
        load_model(run)
    assert "\n" not in str(e.value) and "mis-shaped: norm.weight (63,) (expected (64,))" in str(e.value)


def test_an_incomplete_checkpoint_directory_is_skipped(run_dir):
    """A step directory without its weights (a save that was cut short, or being written) is not a checkpoint:
    the newest complete one is used."""
    run, _ = run_dir
    done = run / "checkpoints" / "step_0000010"
    partial = run / "checkpoints" / "step_0000020"
    partial.mkdir()
    shutil.copy2(done / "config.json", partial / "config.json")
    assert list_checkpoints(run) == [done]
    assert resolve(run) == ("native", done)


def test_an_mtp_layers_own_embedding_survives_conversion_to_native(run_dir, tmp_path):
    """An HF checkpoint whose MTP layer keeps an embedding of its own (not equal to the main one) converts to a
    native checkpoint that keeps it (see test_mtp_copies_that_differ_are_kept for the HF side)."""
    from safetensors.torch import load_file, save_file

    run, m = run_dir
    hf = tmp_path / "hf"
    convert(run, hf, to="hf")
    key = f"model.layers.{m.cfg.num_hidden_layers}.embed_tokens.weight"
    f = hf / "model.safetensors"
    save_file({**load_file(str(f)), key: m.embed_tokens.weight.detach() + 1.0}, str(f))
    convert(hf, tmp_path / "native", to="native")
    back, _ = load_model(tmp_path / "native")
    assert back.mtp[0].embed_tokens is not None and back.mtp[1].embed_tokens is None
    assert torch.equal(back.mtp[0].embed_tokens.weight, m.embed_tokens.weight + 1.0)


def test_an_interrupted_export_leaves_the_previous_one_and_no_temporary_directory(tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt, not an Exception) during a write still removes the temporary directory and
    leaves the previous export as it was."""
    import nanoseek.hf
    from nanoseek.hf import save_pretrained

    m = Transformer(micro())
    d = tmp_path / "hf"
    save_pretrained(m, d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(nanoseek.hf, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(m, d)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no .hf.tmp-*
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_atomic_write_text_keeps_the_old_content_when_a_write_fails(tmp_path, monkeypatch):
    """A full disk halfway through the write leaves the previous file whole (e.g. train_config.json), and no
    temporary file beside it."""
    from nanoseek.atomic import atomic_write_text

    f = tmp_path / "train_config.json"
    atomic_write_text(f, '{"old": 1}\n')
    write_text = Path.write_text

    def half_then_full_disk(self, text, *a, **k):
        write_text(self, text[: len(text) // 2], *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(f, '{"new": 2, "longer": "content"}\n')
    monkeypatch.undo()
    assert f.read_text() == '{"old": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_config.json"]  # no half-written temporary


def test_free_space_note_says_the_free_space_of_the_nearest_existing_directory(tmp_path, monkeypatch):
    """The note appended to a failed write's error (a full disk rarely says so itself); nothing when the space
    cannot be told."""
    from types import SimpleNamespace

    from nanoseek.atomic import free_space_note

    seen = []

    def usage(p):
        seen.append(Path(p))
        return SimpleNamespace(total=10 * 2**30, used=5 * 2**30, free=5 * 2**30)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    assert free_space_note(tmp_path / "not" / "yet") == " (5,120 MiB free on its disk)"
    assert seen == [tmp_path]  # the directory the output would have gone into, not the missing path

    def unreadable(p):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(shutil, "disk_usage", unreadable)
    assert free_space_note(tmp_path) == ""


def test_convert_onto_a_symlink_loop_is_one_line(run_dir, tmp_path, capsys):
    run, _ = run_dir
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    assert main(["convert", str(run), str(tmp_path / "loop1"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: destination") and "loop1" in err, err
    assert (tmp_path / "loop1").is_symlink() and (tmp_path / "loop2").is_symlink()
