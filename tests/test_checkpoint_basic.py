"""The project's own layout: save -> load gives identical tensors and rope settings."""
import json

import torch

import yarn_minimal
from yarn_minimal import RopeConfig
from yarn_minimal.tokenizer import SentencePieceTokenizer


def test_save_load_round_trip(tmp_path, tokenizer_path):
    tok = SentencePieceTokenizer(tokenizer_path)
    rope = RopeConfig(method="yarn", scale=8.0, original_length=16, dynamic=True, ramp="paper")
    from yarn_minimal.model import ModelArgs, Transformer
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, multiple_of=32, rope=rope)
    torch.manual_seed(0)
    model = Transformer(args)
    yarn_minimal.save(model, tok, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "params.json").read_text())["n_kv_heads"] == 2
    loaded, tok2 = yarn_minimal.load(tmp_path / "ckpt")
    assert loaded.rope == rope
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert tok2.encode("the sky is blue") == tok.encode("the sky is blue")
    # an explicit rope overrides the file's
    loaded, _ = yarn_minimal.load(tmp_path / "ckpt", rope=RopeConfig(original_length=16))
    assert loaded.rope.method == "none"
    # the requested dtype
    loaded, _ = yarn_minimal.load(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert loaded.output.weight.dtype == torch.bfloat16


def test_tokenizer_llama_conventions(tokenizer_path):
    tok = SentencePieceTokenizer(tokenizer_path)
    ids = tok.encode("Here we go. There and back again.", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.decode(ids) == "Here we go. There and back again."
    assert tok.decode(tok.encode("ünïcödé ✓", bos=False)) == "ünïcödé ✓"  # byte fallback
