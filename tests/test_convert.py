"""`nanoseek convert`: native <-> HF, exact in fp32, MTP + routing bias + tokenizer kept, atomic output.

Run: python -m pytest -q tests/test_convert.py
"""

import json

import pytest
import torch
from conftest import micro_config, randomize_bias

from nanoseek import NanoseekError
from nanoseek.checkpoint import load_model, save_model
from nanoseek.cli import main
from nanoseek.convert import convert
from nanoseek.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def micro():
    return micro_config(num_nextn_predict_layers=2, max_position_embeddings=256, attn_impl="absorb", init_std=0.006)


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


def test_convert_replaces_the_destination_atomically_and_reports_errors(run_dir, tmp_path, capsys):
    run, _ = run_dir
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    convert(run, dst, to="native", dtype="bf16")
    assert not (dst / "stale.txt").exists() and (dst / "model.safetensors").is_file()
    m2, _ = load_model(dst, dtype=torch.float32)
    assert m2.layers["0"].self_attn.q_a_proj.weight.dtype == torch.float32  # stored bf16, loaded as asked
    with pytest.raises(NanoseekError, match="is the source"):
        convert(dst, dst, to="hf")
    with pytest.raises(NanoseekError, match="--fp8"):
        convert(run, tmp_path / "x", to="native", fp8=True)
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "y"), "--to", "hf"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
