"""Tied embeddings (issue 23): a checkpoint that stores one tensor for the embedding and the
output (HF tie_word_embeddings, a GGUF without output.weight) loads as one Parameter, and every
export keeps it one tensor. Llama 2 stays untied. Oracles: transformers on the same files,
gguf's own reader, Meta's loader (load_state_dict into an untied model)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import yarn_minimal
from conftest import smollm2_gguf
from yarn_minimal import sizing
from yarn_minimal.data import write_segments
from yarn_minimal.model import ModelArgs, Transformer
from yarn_minimal.tokenizer import SentencePieceTokenizer

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4


def is_tied(model) -> bool:
    return model.output.weight is model.tok_embeddings.weight \
        and model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()


def hf_folder(tmp_path, tokenizer_path, tied: bool):
    """A tiny LlamaForCausalLM with random weights, saved by transformers itself."""
    vocab = SentencePieceTokenizer(tokenizer_path).vocab_size
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64,
                      tie_word_embeddings=tied, initializer_range=0.1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    folder = tmp_path / ("hf-tied" if tied else "hf")
    model.save_pretrained(folder)
    shutil.copy(tokenizer_path, folder / "tokenizer.model")
    return folder


def transformers_logits(folder, tokens):
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits, hf.num_parameters()


def tokens_for(vocab_size):
    return torch.randint(3, vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def test_tied_hf_loads_one_tensor_with_transformers_logits(tmp_path, tokenizer_path):
    folder = hf_folder(tmp_path, tokenizer_path, tied=True)
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # what save_pretrained writes for a tied model
    model, tok = yarn_minimal.load(folder)
    assert model.args.tie_word_embeddings and is_tied(model)
    tokens = tokens_for(tok.vocab_size)
    want, n_params = transformers_logits(folder, tokens)
    assert (logits(model, tokens) - want).abs().max().item() <= TOL
    assert sum(p.numel() for p in model.parameters()) == n_params  # the tied tensor once, as transformers counts


@pytest.mark.parametrize("fmt", ["hf", "gguf", "meta"])
def test_round_trips_keep_the_tie(fmt, tmp_path, tokenizer_path):
    model, tok = yarn_minimal.load(hf_folder(tmp_path, tokenizer_path, tied=True))
    tokens = tokens_for(tok.vocab_size)
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    yarn_minimal.save(model, tok, out, format=fmt)
    if fmt == "hf":
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
        with safe_open(out / "model.safetensors", "pt") as f:
            assert "lm_head.weight" not in f.keys()
        want, _ = transformers_logits(out, tokens)  # transformers ties it back
        assert (logits(model, tokens) - want).abs().max().item() <= TOL
    elif fmt == "gguf":
        from gguf import GGUFReader
        assert "output.weight" not in {t.name for t in GGUFReader(str(out)).tensors}
    else:
        # params.json stays Meta's; the .pth holds one storage under both keys, and Meta's loader
        # (load_state_dict into an untied model) reads it as two equal weights
        assert "tie_word_embeddings" not in json.loads((out / "params.json").read_text())
        state = torch.load(out / "consolidated.00.pth", weights_only=True)
        assert state["output.weight"].untyped_storage().data_ptr() == \
            state["tok_embeddings.weight"].untyped_storage().data_ptr()
        untied = Transformer(ModelArgs(**{**vars(model.args), "tie_word_embeddings": False}))
        untied.load_state_dict(state, strict=True)
        assert not is_tied(untied) and torch.equal(logits(untied, tokens), logits(model, tokens))
    again, _ = yarn_minimal.load(out)
    assert again.args.tie_word_embeddings and is_tied(again)
    assert torch.equal(logits(again, tokens), logits(model, tokens))


@pytest.mark.parametrize("fmt", ["hf", "gguf", "meta"])
def test_untied_llama_stays_untied(fmt, tmp_path, tokenizer_path):
    folder = hf_folder(tmp_path, tokenizer_path, tied=False)
    model, tok = yarn_minimal.load(folder)
    assert not model.args.tie_word_embeddings and not is_tied(model)
    with torch.no_grad():  # equal values must not make a tie: only the checkpoint's own word does
        model.output.weight.copy_(model.tok_embeddings.weight)
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    yarn_minimal.save(model, tok, out, format=fmt)
    if fmt == "hf":
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    elif fmt == "gguf":
        from gguf import GGUFReader
        assert "output.weight" in {t.name for t in GGUFReader(str(out)).tensors}
    again, _ = yarn_minimal.load(out)
    assert not again.args.tie_word_embeddings and not is_tied(again)


def test_smollm2_gguf_holds_one_copy():
    path = smollm2_gguf()
    pytest.importorskip("gguf")
    model, _ = yarn_minimal.load(path, dtype=torch.float32)
    assert model.args.tie_word_embeddings and is_tied(model)
    n = sum(p.numel() for p in model.parameters())
    assert n == 134_515_008  # SmolLM2-135M's published parameter count: 540 MB in float32, not 651 MB
    assert sizing.count_params(model.args)["total"] == n


def test_count_params_counts_a_tied_tensor_once():
    shape = dict(dim=64, n_layers=2, n_heads=4, vocab_size=384, multiple_of=32)
    untied, tied = (sizing.count_params(ModelArgs(**shape, tie_word_embeddings=t)) for t in (False, True))
    assert tied["output"] == 0 and tied["embedding"] == untied["embedding"] == 384 * 64
    assert tied["total"] == untied["total"] - 384 * 64
    # the tied tensor is still the output matmul: the same FLOPs per token
    assert sizing.flops_per_token(ModelArgs(**shape, tie_word_embeddings=True), 32) == \
        sizing.flops_per_token(ModelArgs(**shape), 32)


def test_train_py_keeps_a_tied_model_tied(tmp_path, tokenizer_path):
    """Two steps of train.py on a tied checkpoint, in one process and in two (torchrun, gloo,
    FSDP2: the shared tensor lives in the root unit once): the output is still the embedding,
    that tensor was trained (the loss reads model.output.weight), and both runs end with the
    same weights."""
    model, tok = yarn_minimal.load(hf_folder(tmp_path, tokenizer_path, tied=True))
    yarn_minimal.save(model, tok, tmp_path / "ckpt")
    segs = np.random.default_rng(0).integers(3, tok.vocab_size, size=(4, 33))
    write_segments(tmp_path / "data", segs, dict(vocab_size=tok.vocab_size, bos_id=1, eos_id=2))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    finals = {}
    for launcher in ([], ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]):
        out = tmp_path / f"run{len(launcher)}"
        cmd = [sys.executable, *launcher, str(ROOT / "train.py"), "--ckpt", str(tmp_path / "ckpt"), "--data",
               str(tmp_path / "data"), "--out", str(out), "--global-batch-size", "4", "--original-length", "16",
               "--lr", "1e-2", "--warmup-steps", "1", "--steps", "2"]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr[-3000:]
        finals[len(launcher)], _ = yarn_minimal.load(out / "final")
    one, two = finals.values()
    for trained in (one, two):
        assert is_tied(trained)
        assert not torch.equal(trained.tok_embeddings.weight, model.tok_embeddings.weight)
    # AdamW turns a gradient's float32 summation order into up to ~1e-5 of a weight (an element
    # whose gradient is near 0 moves by +-lr); a tie lost on one side would move the shared
    # tensor by about lr = 1e-2
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
