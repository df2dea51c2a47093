"""The conformance table of issue 21: published RoPE configs run through four tools.

    python -m experiments.conformance                  # every config: a few minutes on 2 CPU cores
    python -m experiments.conformance --configs Yarn-Llama-2-7b-64k,gpt-oss-20b
    python -m experiments.conformance --quick          # 3 configs, short models, into results/tmp/

The configs are tests/conformance_configs.py's (name, config.json dict, source). Each goes through

  project       `python -m yarn_minimal rope --config config.json --json` (run in-process through the
                package's own command line) for inv_freq and the cos/sin factor; yarn_minimal.load()
                of a tiny model folder for the logits
  transformers  transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS (the function its model classes
                call; the model's own RotaryEmbedding for plain RoPE) for inv_freq and the factor;
                AutoModelForCausalLM on the tiny folder for the logits
  authors       the paper's formulas written out here (Eq. 10, Eq. 16, Eq. 17-22, Sec. 3.3) with the
                released code's ramp (linear in the pair index d between floor/ceil correction
                dims, not in r) and its constants (Yarn-Mistral: beta 128 / 2, 0.07 ln s + 1);
                for the logits, the transformers model with its rotary inv_freq and factor replaced
                by these numbers
  llama.cpp     (llama-cpp-python) a llama-arch GGUF of the same tiny weights holding the keys
                llama.cpp's own converter writes for the config (see gguf_rope_keys)

Per config: inv_freq's largest relative difference from the authors' formulas, the cos/sin factor,
and, on a tiny random-weight Llama (1 layer, 1 head of the config's rotary dimension, the demo's
4096-token vocabulary) run past the original context, the largest logit difference of each tool from the
authors' model over the last 64 positions, beside that pair's noise floor (the same comparison
with plain RoPE at the config's rope_theta) and the effect (how far the config's RoPE moves the
logits from plain RoPE at all). A difference within 10 x floor + 1e-4 agrees.

The tiny model is a Llama whatever the config's architecture (Qwen2's biases, DeepSeek's MLA, gpt-oss'
sinks are not RoPE): only the config's RoPE keys, its rotary dimension and max_position_embeddings go
into it. Yarn-Mistral keeps model_type mistral, so that each tool reads it as a Mistral checkpoint.

Output (--out, checked before any work: new, empty, or an earlier run of this experiment with
--overwrite): results.json (every number, with the tool versions and the command) and SUMMARY.md
(the table; a rerun keeps its hand-written `## Analysis`). A --quick run never writes into
results/: by default it goes to results/tmp/conformance-quick.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import math
import os
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from experiments.miniature import RESULTS, SCRATCH, machine, out_folder, write_summary
from yarn_minimal.files import Output, OutputError, check_output, holds, write_json

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/conformance_configs.py holds the configs
from tests.conformance_configs import CONFIGS  # noqa: E402

CONFORMANCE = Output("an earlier conformance run", holds("results.json", "SUMMARY.md"), folder=True)
QUICK_CONFIGS = ("Yarn-Llama-2-7b-64k", "gpt-oss-20b", "Linear-PI-factor-4")
TOOLS = ("project", "transformers", "llama.cpp")
TAIL = 64          # logits compared at the last TAIL positions
PAST = 128         # tokens past the original context
TOKENIZER = ROOT / "demo" / "yarn-demo" / "tokenizer.model"  # the demo's sentencepiece model (for the project's export)
VOCAB = 4096       # its size
AGREE = lambda diff, floor: diff <= 10 * floor + 1e-4

# A config that no publisher wrote but users meet (issue 21): the original length only at the top level
EXTRA = [("Yarn-Llama-2-64k-top-level-original",
          {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 32,
           "rope_theta": 10000.0, "max_position_embeddings": 65536, "original_max_position_embeddings": 4096,
           "rope_scaling": {"type": "yarn", "factor": 16.0}},
          "Yarn-Llama-2-7b-64k with original_max_position_embeddings moved to the top level of config.json")]


# ---------------------------------------------------------------------------------------
# Reading a config the way every tool must: rope type, rotary dim, L
# ---------------------------------------------------------------------------------------

def rope_scaling(cfg: dict) -> dict:
    return dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})


def rope_type(cfg: dict) -> str:
    rs = rope_scaling(cfg)
    return rs.get("rope_type", rs.get("type", "default"))


def rotary_dim(cfg: dict) -> int:
    """|D|: DeepSeek rotates qk_rope_head_dim of each head; gpt-oss and Llama 3.2 state head_dim."""
    return int(cfg.get("qk_rope_head_dim") or cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def original_length(cfg: dict) -> int:
    """L as transformers reads it: a top-level original_max_position_embeddings wins over the one
    inside rope_scaling; without either, max_position_embeddings (over the factor for yarn)."""
    rs = rope_scaling(cfg)
    L = cfg.get("original_max_position_embeddings") or rs.get("original_max_position_embeddings")
    if L:
        return int(L)
    if rope_type(cfg) == "yarn":
        return int(cfg["max_position_embeddings"] / rs["factor"])
    return int(cfg.get("max_position_embeddings", 4096))


def is_yarn_mistral(cfg: dict) -> bool:
    """The authors' Yarn-Mistral: their remote code (auto_map) carries constants the config does not."""
    return "modeling_mistral_yarn" in json.dumps(cfg.get("auto_map", {}))


def test_length(cfg: dict, quick: bool) -> int:
    """Tokens in the tiny model's sequence: past the original context L (past max_position_embeddings
    for HF's dynamic type, whose L it is). Plain RoPE has no L: 4096 + PAST. --quick: 1024 + PAST."""
    if quick:
        return 1024 + PAST
    t = rope_type(cfg)
    if t == "default":
        return 4096 + PAST
    if t == "dynamic":
        return int(cfg["max_position_embeddings"]) + PAST
    return original_length(cfg) + PAST


# ---------------------------------------------------------------------------------------
# The authors' formulas, written out from the paper and their released code
# ---------------------------------------------------------------------------------------

def theta(D: int, b: float) -> torch.Tensor:
    """Eq. 5: theta_i = b^(-2i/|D|), i = 0..|D|/2-1."""
    return float(b) ** (-2.0 * torch.arange(D // 2, dtype=torch.float64) / D)


def code_ramp(D: int, b: float, L: int, beta_fast: float, beta_slow: float, truncate: bool) -> torch.Tensor:
    """The released code's ramp (jquesnelle/yarn, find_correction_range + linear_ramp_mask):
    linear in the pair index between the dims where a pair makes beta_fast and beta_slow rotations
    over L, floored / ceiled, clamped to [0, |D|-1]. Returns the interpolation weight (1 - gamma)."""
    dim_at = lambda n: D * math.log(L / (n * 2 * math.pi)) / (2 * math.log(b))
    low, high = dim_at(beta_fast), dim_at(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    if low == high:
        high += 0.001
    return ((torch.arange(D // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)


def paper_ramp(th: torch.Tensor, L: int, alpha: float, beta: float) -> torch.Tensor:
    """Eq. 17-18, linear in r = L / lambda; returns the interpolation weight 1 - gamma(r)."""
    r = L / (2 * math.pi / th)
    return 1 - ((r - alpha) / (beta - alpha)).clamp(0, 1)


def authors(cfg: dict, seq_len: int) -> dict:
    """inv_freq (float64), the cos/sin factor sqrt(1/t), and what they were computed as."""
    D, b, rs, t = rotary_dim(cfg), float(cfg.get("rope_theta", 10000.0)), rope_scaling(cfg), rope_type(cfg)
    th = theta(D, b)
    if t == "default":
        return dict(inv_freq=th, factor=1.0, how="Eq. 5")
    if t == "linear":
        return dict(inv_freq=th / rs["factor"], factor=1.0, how="PI, Eq. 10: theta / s")
    if t == "dynamic":  # Sec. 3.3 with Eq. 16, at the current length; L = max_position_embeddings
        s = max(1.0, seq_len / cfg["max_position_embeddings"])
        return dict(inv_freq=theta(D, b * s ** (D / (D - 2))), factor=1.0,
                    how=f"Dynamic NTK, Sec. 3.3 + Eq. 16: s = max(1, l/L) = {s:g} at l = {seq_len}")
    if t == "llama3":  # Eq. 17-20 with the paper's ramp in r: alpha = low_freq_factor, beta = high_freq_factor
        interp = paper_ramp(th, original_length(cfg), rs["low_freq_factor"], rs["high_freq_factor"])
        return dict(inv_freq=interp * th / rs["factor"] + (1 - interp) * th, factor=1.0,
                    how="NTK-by-parts, Eq. 17-20, ramp in r (alpha, beta = low, high_freq_factor)")
    if t != "yarn":
        return dict(inv_freq=None, factor=None, how=f"no formula in the paper or the authors' code for {t!r}")
    s, L = float(rs["factor"]), original_length(cfg)
    fast, slow, c = rs.get("beta_fast", 32.0), rs.get("beta_slow", 1.0), 0.1
    how = "YaRN, Eq. 17-22 with the code's ramp in d"
    if is_yarn_mistral(cfg):  # scaled_rope/modeling_mistral_yarn.py
        fast, slow, c = 128.0, 2.0, 0.07
        how += "; the authors' Mistral constants beta 128 / 2, 0.07 ln s + 1"
    truncate = rs.get("truncate", True)
    interp = code_ramp(D, b, L, fast, slow, truncate)
    inv = interp * th / s + (1 - interp) * th
    paper = paper_ramp(th, L, slow, fast)
    factor = rs["attention_factor"] if rs.get("attention_factor") is not None else c * math.log(s) + 1  # Eq. 22
    if not truncate:
        how += " (truncate: false, no floor/ceil)"
    return dict(inv_freq=inv, factor=float(factor), how=how,
                paper_ramp_rel=rel_diff(paper * th / s + (1 - paper) * th, inv))


def llama_cpp_rule(cfg: dict, seq_len: int) -> dict:
    """What llama.cpp is documented to run (shared notes, reference-implementations.md) from the keys
    gguf_rope_keys writes, for arch llama: YaRN with beta 32 / 1 whatever the yarn_beta_* keys say,
    the ramp bounds always floored / ceiled, cos/sin x attn_factor (absent: 1) x (0.1 ln s + 1), the
    yarn_attn_factor key ignored; no dynamic type (plain RoPE); llama3 through rope_freqs (the
    authors' llama3 numbers); linear as PI. The run checks llama.cpp against it."""
    t, rs = rope_type(cfg), rope_scaling(cfg)
    if t == "dynamic":
        return authors({**cfg, "rope_scaling": None}, seq_len)
    if t != "yarn":
        return authors(cfg, seq_len)
    D, b, s = rotary_dim(cfg), float(cfg.get("rope_theta", 10000.0)), float(rs["factor"])
    th, interp = theta(D, b), code_ramp(D, b, original_length(cfg), 32.0, 1.0, True)
    return dict(inv_freq=interp * th / s + (1 - interp) * th, factor=0.1 * math.log(s) + 1,
                how="beta 32 / 1, floor / ceil, 0.1 ln s + 1")


def rel_diff(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / b.abs()).max())


# ---------------------------------------------------------------------------------------
# transformers and this project: inv_freq and the cos/sin factor
# ---------------------------------------------------------------------------------------

def hf_config(cfg: dict):
    from transformers import AutoConfig

    c = copy.deepcopy(cfg)  # transformers writes into the rope_scaling dict it is given (its standardisation)
    c.pop("auto_map", None)  # what transformers does without trust_remote_code
    with warnings.catch_warnings(), quiet():
        warnings.simplefilter("ignore")
        return AutoConfig.for_model(c.pop("model_type"), **c)


def transformers_rope(cfg: dict, seq_len: int) -> dict:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    try:
        conf = hf_config(cfg)
        t = conf.rope_parameters.get("rope_type", "default")
        with quiet():
            if t == "default":
                inv, factor = LlamaRotaryEmbedding.compute_default_rope_parameters(conf)
            elif t in ("dynamic", "longrope"):
                inv, factor = ROPE_INIT_FUNCTIONS[t](conf, "cpu", seq_len=seq_len)
            else:
                inv, factor = ROPE_INIT_FUNCTIONS[t](conf, "cpu")
    except Exception as e:  # noqa: BLE001 -- a refusal is a result
        return dict(refused=one_line(e))
    out = dict(inv_freq=inv.double(), factor=float(factor), rope_type=t)
    softmax = softmax_factor(cfg, conf)
    if softmax is not None:
        out["softmax_factor"] = softmax
    return out


def softmax_factor(cfg: dict, conf) -> float | None:
    """DeepSeek's attention multiplies the softmax scale by mscale^2 on top of the cos/sin factor:
    read it from transformers' own attention module (built on the meta device, no weights)."""
    if not cfg["model_type"].startswith("deepseek"):
        return None
    mt = cfg["model_type"]
    module = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    cls = next(getattr(module, n) for n in dir(module) if n.endswith("Attention") and "Flash" not in n
               and n.lower().startswith(mt.replace("_", "")))
    with torch.device("meta"), quiet():
        attn = cls(conf, layer_idx=0)
    head = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    return float(attn.scaling * math.sqrt(head))


def project_rope(config_path: Path, seq_len: int) -> dict:
    """`python -m yarn_minimal rope --config PATH --json [--seq-len N]` through the package's own
    command line (argument parsing included); a refusal is its one error line."""
    from yarn_minimal.__main__ import main

    argv = ["rope", "--config", str(config_path), "--json", "--seq-len", str(seq_len)]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(record=True):
            main(argv)
    except SystemExit:
        return dict(refused=last_line(err.getvalue()) or "exit without a message")
    except Exception as e:  # noqa: BLE001 -- a crash is a result too (the issue found ZeroDivisionError)
        return dict(refused=f"crash: {one_line(e)}")
    try:
        data = json.loads(out.getvalue())
    except ValueError:
        return dict(refused=f"--json printed no JSON: {last_line(out.getvalue())!r}")
    return dict(inv_freq=torch.tensor(data["inv_freq"], dtype=torch.float64), factor=float(data["attention_factor"]),
                **{k: v for k, v in data.items() if k not in ("inv_freq", "attention_factor")})


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


@contextlib.contextmanager
def quiet():
    """transformers' config warnings go to its logger; they are not results."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# ---------------------------------------------------------------------------------------
# The tiny model: one folder per config, the same weights in every tool
# ---------------------------------------------------------------------------------------

def tiny_config(cfg: dict, plain: bool = False) -> dict:
    """A 1-layer, 1-head Llama (Mistral for Yarn-Mistral) with the config's RoPE keys and rotary dim.
    plain=True: the same model with plain RoPE at the config's rope_theta (the noise floor)."""
    D = rotary_dim(cfg)
    out = {"architectures": ["MistralForCausalLM" if cfg["model_type"] == "mistral" else "LlamaForCausalLM"],
           "model_type": "mistral" if cfg["model_type"] == "mistral" else "llama",
           "hidden_size": D, "intermediate_size": 2 * D, "num_hidden_layers": 1, "num_attention_heads": 1,
           "num_key_value_heads": 1, "head_dim": D, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
           "max_position_embeddings": cfg["max_position_embeddings"], "rope_theta": cfg.get("rope_theta", 10000.0)}
    if out["model_type"] == "mistral":
        out["sliding_window"] = cfg.get("sliding_window")
        if "auto_map" in cfg:
            out["auto_map"] = cfg["auto_map"]
    if not plain:
        for key in ("rope_scaling", "rope_parameters", "original_max_position_embeddings"):
            if cfg.get(key) is not None:
                out[key] = copy.deepcopy(cfg[key])
    return out


def tiny_weights(D: int, seed: int = 0) -> dict:
    """Random weights in transformers' Llama layout and names (split-half rotation)."""
    g = torch.Generator().manual_seed(seed + D)
    w = lambda *shape, std=0.5: torch.randn(*shape, generator=g) * std
    return {"model.embed_tokens.weight": w(VOCAB, D, std=1.0), "model.norm.weight": 1 + w(D, std=0.1),
            "lm_head.weight": w(VOCAB, D, std=D ** -0.5 * 4),
            "model.layers.0.input_layernorm.weight": 1 + w(D, std=0.1),
            "model.layers.0.post_attention_layernorm.weight": 1 + w(D, std=0.1),
            # q and k large enough that attention is peaked: a RoPE difference moves the logits visibly
            "model.layers.0.self_attn.q_proj.weight": w(D, D, std=2.0 / D ** 0.5),
            "model.layers.0.self_attn.k_proj.weight": w(D, D, std=2.0 / D ** 0.5),
            "model.layers.0.self_attn.v_proj.weight": w(D, D, std=D ** -0.5),
            "model.layers.0.self_attn.o_proj.weight": w(D, D, std=D ** -0.5),
            "model.layers.0.mlp.gate_proj.weight": w(2 * D, D, std=D ** -0.5),
            "model.layers.0.mlp.up_proj.weight": w(2 * D, D, std=D ** -0.5),
            "model.layers.0.mlp.down_proj.weight": w(D, 2 * D, std=(2 * D) ** -0.5)}


def vocabulary() -> list[str]:
    """The pieces of llama.cpp's vocabulary for the tiny GGUF (only ids are fed, never text)."""
    return ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + [f"t{i}" for i in range(VOCAB - 259)]


def write_folder(folder: Path, config: dict, weights: dict) -> Path:
    """config.json + model.safetensors + the demo's tokenizer.model: a Hugging Face folder every tool loads."""
    import shutil

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    shutil.copy(TOKENIZER, folder / "tokenizer.model")
    return folder


def token_ids(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor([1]), torch.randint(3, VOCAB, (n - 1,), generator=g)])


# ---------------------------------------------------------------------------------------
# Logits in each tool
# ---------------------------------------------------------------------------------------

def hf_logits(folder: Path, ids: torch.Tensor, rotary: tuple | None = None) -> torch.Tensor:
    """transformers' logits at the last TAIL positions; rotary=(inv_freq, factor) replaces its RoPE
    (the authors' model: the same network with the frequencies written out above)."""
    from transformers import AutoModelForCausalLM

    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    if rotary is not None:
        rot = model.model.rotary_emb
        rot.inv_freq = rotary[0].float().clone()
        rot.original_inv_freq = rot.inv_freq.clone()
        rot.attention_scaling = float(rotary[1])
        rot.rope_type = "default"  # no dynamic update on top of the numbers given
    with torch.no_grad():
        return model(ids[None], logits_to_keep=TAIL).logits[0].double()


def project_logits(folder: Path, ids: torch.Tensor, gguf: Path | None = None) -> tuple:
    """(logits at the last TAIL positions, the window it reports, the GGUF it exports or its
    refusal); a refusal to load is one line instead of the logits."""
    import yarn_minimal

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, tok = yarn_minimal.load(folder)
            with torch.no_grad():
                logits = model.output(model.hidden_states(ids[None])[:, -TAIL:])[0].double()
    except Exception as e:  # noqa: BLE001 -- a refusal is a result
        return one_line(e), None, None
    exported = None
    if gguf is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exported = yarn_minimal.save(model, tok, gguf, format="gguf")
        except Exception as e:  # noqa: BLE001
            exported = one_line(e)
    return logits, model.rope.window, exported


def llama_cpp_version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.__version__


def gguf_rope_keys(cfg: dict) -> tuple[dict, torch.Tensor | None, str | None]:
    """The rope metadata llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel) writes for a
    llama-arch model with this config: context_length = max_position_embeddings, freq_base =
    rope_theta; linear: type + factor; yarn: type, factor, original_context_length, and each of
    beta_fast / beta_slow / attention_factor the config holds (as yarn_beta_* / yarn_attn_factor);
    llama3: no scaling keys but the rope_freqs tensor (1 / its per-pair division). Returns (keys,
    rope_freqs or None, why not expressible or None)."""
    t, rs = rope_type(cfg), rope_scaling(cfg)
    keys = {"rope.freq_base": float(cfg.get("rope_theta", 10000.0)), "context_length": int(cfg["max_position_embeddings"])}
    if t == "longrope":
        return keys, None, "longrope is written only for the phi3 architecture"
    if t == "linear":
        keys.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(rs["factor"])})
    elif t == "yarn":
        keys.update({"rope.scaling.type": "yarn", "rope.scaling.factor": float(rs["factor"]),
                     "rope.scaling.original_context_length": original_length(cfg)})
        for name, key in (("beta_fast", "rope.scaling.yarn_beta_fast"), ("beta_slow", "rope.scaling.yarn_beta_slow"),
                          ("attention_factor", "rope.scaling.yarn_attn_factor")):
            if rs.get(name) is not None:
                keys[key] = float(rs[name])
        if rs.get("finetuned") is not None:
            keys["rope.scaling.finetuned"] = bool(rs["finetuned"])
    elif t == "llama3":  # the converter's generate_extra_tensors, Meta's apply_scaling written as factors
        D, b = rotary_dim(cfg), float(cfg["rope_theta"])
        L, s = original_length(cfg), rs["factor"]
        lo, hi = rs["low_freq_factor"], rs["high_freq_factor"]
        factors = []
        for f in theta(D, b).tolist():
            wavelen = 2 * math.pi / f
            if wavelen < L / hi:
                factors.append(1.0)
            elif wavelen > L / lo:
                factors.append(s)
            else:
                smooth = (L / wavelen - lo) / (hi - lo)
                factors.append(1 / ((1 - smooth) / s + smooth))
        return keys, torch.tensor(factors, dtype=torch.float32), None
    return keys, None, None


def write_gguf(path: Path, config: dict, weights: dict, rope_cfg: dict) -> tuple[Path | None, str | None]:
    """The tiny model as llama.cpp's converter would write it (arch llama, F32, Q/K rows back in
    Meta's interleaved order), with the rope keys of gguf_rope_keys(rope_cfg)."""
    import numpy as np
    from gguf import GGUFWriter, TokenType

    keys, freqs, why_not = gguf_rope_keys(rope_cfg)
    if why_not:
        return None, why_not
    D = config["head_dim"]
    unpermute = lambda w, n: w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight", "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
             "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
             "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
             "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
             "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
             "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
             "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
             "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
             "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight"}
    w = GGUFWriter(str(path), "llama")
    w.add_name("conformance tiny llama")
    w.add_context_length(keys.pop("context_length"))
    w.add_embedding_length(D)
    w.add_block_count(1)
    w.add_feed_forward_length(2 * D)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_rope_dimension_count(D)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(VOCAB)
    w.add_file_type(0)
    for key, value in keys.items():
        full = f"llama.{key}"
        if isinstance(value, str):
            w.add_string(full, value)
        elif isinstance(value, bool):
            w.add_bool(full, value)
        elif isinstance(value, int):
            w.add_uint32(full, value)
        else:
            w.add_float32(full, value)
    w.add_tokenizer_model("llama")
    w.add_token_list(vocabulary())
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
                      + [TokenType.NORMAL] * (VOCAB - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if freqs is not None:
        w.add_tensor("rope_freqs.weight", freqs.numpy())
    for hf_name, t in weights.items():
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            t = unpermute(t, 1)
        w.add_tensor(names[hf_name], np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, None


def llama_cpp_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    import llama_cpp
    import numpy as np

    n = len(ids)
    llm = llama_cpp.Llama(str(path), n_ctx=n, n_batch=512, n_ubatch=512, logits_all=True, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    try:
        llm.eval(ids.tolist())
        return torch.from_numpy(np.array(llm.scores[n - TAIL:n], dtype=np.float64))
    finally:
        llm.close()


# ---------------------------------------------------------------------------------------
# One config through every tool
# ---------------------------------------------------------------------------------------

def inv_cell(got: dict, ref: dict) -> dict:
    """A tool's inv_freq and factor beside the authors' (or its refusal)."""
    if "refused" in got:
        return {"refused": got["refused"]}
    cell = {"factor": got["factor"]}
    if ref.get("inv_freq") is not None:
        if len(got["inv_freq"]) != len(ref["inv_freq"]):
            cell["inv_freq_rel"] = None
            cell["note"] = f"{len(got['inv_freq'])} frequencies, the authors' formulas {len(ref['inv_freq'])}"
        else:
            cell["inv_freq_rel"] = rel_diff(got["inv_freq"], ref["inv_freq"])
        cell["factor_diff"] = got["factor"] - ref["factor"]
    for k, v in got.items():  # what else the tool states (the project's JSON: scale, softmax_factor, ...)
        if k not in ("inv_freq", "factor", "refused") and isinstance(v, (int, float, str, bool)):
            cell[k] = v
    if "softmax_factor" in got:  # q.k is scaled by factor^2 x softmax_factor: the sqrt(1/t) in total
        cell["effective_factor"] = got["factor"] * math.sqrt(got["softmax_factor"])
    return cell


def logit_cell(got, got_plain, ref, ref_plain, hf=None, hf_plain=None) -> dict:
    """max |logit difference| from the authors' model (and from transformers'), beside the noise
    floor: the same two tools on the same tiny model with plain RoPE."""
    if isinstance(got, str) or isinstance(got_plain, str):
        return {"refused": got if isinstance(got, str) else f"plain RoPE: {got_plain}"}
    cell = {}
    if ref is not None:
        diff, floor = float((got - ref).abs().max()), float((got_plain - ref_plain).abs().max())
        cell.update(diff=diff, floor=floor, agrees=AGREE(diff, floor))
    if hf is not None:
        diff, floor = float((got - hf).abs().max()), float((got_plain - hf_plain).abs().max())
        cell.update(diff_transformers=diff, floor_transformers=floor, agrees_transformers=AGREE(diff, floor))
    return cell


def run_config(name: str, cfg: dict, source: str, work: Path, quick: bool, use_llama_cpp: bool, tick) -> dict:
    cfg = copy.deepcopy(cfg)
    n = test_length(cfg, quick)
    ids = token_ids(n)
    folder = work / name
    folder.mkdir(parents=True)
    # the published RoPE keys, completed with placeholder shape keys the dicts leave out (not RoPE)
    full = {"num_hidden_layers": 1, "intermediate_size": 4 * cfg["hidden_size"], "vocab_size": VOCAB,
            "rms_norm_eps": 1e-5, **cfg}
    (folder / "config.json").write_text(json.dumps(full, indent=1))
    row = {"name": name, "source": source, "rope_type": rope_type(cfg), "rotary_dim": rotary_dim(cfg),
           "original_length": original_length(cfg), "max_position_embeddings": cfg.get("max_position_embeddings"),
           "tokens": n, "reproduce": f"python -m yarn_minimal rope --config {name}.json --json --seq-len {n}"}
    ref = authors(cfg, n)
    row["authors"] = {"how": ref["how"], "factor": ref["factor"],
                      **({"paper_ramp_rel": ref["paper_ramp_rel"]} if "paper_ramp_rel" in ref else {})}
    tf = transformers_rope(cfg, n)
    row["inv_freq"] = {"project": inv_cell(project_rope(folder / "config.json", n), ref),
                       "transformers": inv_cell(tf, ref)}
    for cell in row["inv_freq"].values():  # messages name the file as the reproduction does, not a temporary path
        if "refused" in cell:
            cell["refused"] = cell["refused"].replace(str(folder / "config.json"), f"{name}.json")
    tick()

    # the tiny model: the same weights with the config's RoPE and with plain RoPE
    weights = tiny_weights(rotary_dim(cfg))
    tiny, plain = tiny_config(cfg), tiny_config(cfg, plain=True)
    f_tiny, f_plain = write_folder(folder / "tiny", tiny, weights), write_folder(folder / "plain", plain, weights)
    th = theta(rotary_dim(cfg), float(cfg.get("rope_theta", 10000.0)))
    ref_l = hf_logits(f_tiny, ids, (ref["inv_freq"], ref["factor"])) if ref["inv_freq"] is not None else None
    ref_p = hf_logits(f_plain, ids, (th, 1.0))
    hf_l, hf_p = hf_logits(f_tiny, ids), hf_logits(f_plain, ids)
    row["effect"] = float((ref_l - ref_p).abs().max()) if ref_l is not None else float((hf_l - hf_p).abs().max())
    logits = {"transformers": logit_cell(hf_l, hf_p, ref_l, ref_p)}
    tick()
    p_l, window, exported = project_logits(f_tiny, ids, folder / "project.gguf" if use_llama_cpp else None)
    p_p, _, exported_plain = project_logits(f_plain, ids, folder / "project-plain.gguf" if use_llama_cpp else None)
    logits["project"] = logit_cell(p_l, p_p, ref_l, ref_p, hf_l, hf_p)
    row["window"] = {"project": window, "transformers": cfg.get("max_position_embeddings")}
    tick()
    if not use_llama_cpp:
        logits["llama.cpp"] = {"refused": "llama-cpp-python is not installed (pip install llama-cpp-python)"}
    else:
        g_tiny, why = write_gguf(folder / "tiny.gguf", tiny, weights, tiny)
        if why:
            logits["llama.cpp"] = {"refused": f"not expressible as a llama-arch GGUF: {why}"}
        else:
            g_plain, _ = write_gguf(folder / "plain.gguf", plain, weights, plain)
            got = llama_cpp_logits(g_tiny, ids)
            logits["llama.cpp"] = logit_cell(got, llama_cpp_logits(g_plain, ids), ref_l, ref_p, hf_l, hf_p)
            logits["llama.cpp"]["gguf_keys"] = {k: v for k, v in gguf_rope_keys(tiny)[0].items()}
            rule = llama_cpp_rule(cfg, n)
            if rule["inv_freq"] is not None:  # is the difference the documented rule? (llama.cpp vs that model)
                rule_l = hf_logits(f_tiny, ids, (rule["inv_freq"], rule["factor"]))
                diff, floor = float((got - rule_l).abs().max()), logits["llama.cpp"]["floor"]
                logits["llama.cpp"]["documented_rule"] = {"how": rule["how"], "diff": diff, "agrees": AGREE(diff, floor)}
        # the project's own GGUF export, run by llama.cpp, against the project's logits
        if isinstance(exported, Path) and isinstance(exported_plain, Path) and not isinstance(p_l, str):
            logits["project GGUF in llama.cpp"] = logit_cell(llama_cpp_logits(exported, ids),
                                                             llama_cpp_logits(exported_plain, ids), p_l, p_p)
            from gguf import GGUFReader
            meta = GGUFReader(str(exported)).fields
            row["window"]["project GGUF"] = int(meta["llama.context_length"].contents())
        elif isinstance(exported, str):
            logits["project GGUF in llama.cpp"] = {"refused": f"save(format='gguf'): {exported}"}
        row["window"]["llama.cpp GGUF"] = int(cfg["max_position_embeddings"])  # the converter's context_length
    tick()
    row["logits"] = logits
    # no temporary paths in the results: a message names the file relative to the config's folder
    return json.loads(json.dumps(row).replace(json.dumps(str(folder))[1:-1] + "/", ""))


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------

def fmt(x, digits=2) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 and abs(x) < 1e4 else f"{x:.1e}"


def inv_text(cell: dict) -> str:
    if "refused" in cell:
        return "refused"
    rel = "-" if cell.get("inv_freq_rel", None) is None else fmt(cell["inv_freq_rel"])
    text = f"{rel} / {cell['factor']:.4f}"
    if cell.get("softmax_factor", 1.0) != 1.0:
        text += f" (x softmax {cell['softmax_factor']:.4f}: {cell['effective_factor']:.4f} in all)"
    return text


def logit_text(cell: dict | None, against="diff") -> str:
    if cell is None:
        return "-"
    if "refused" in cell:
        return "not installed" if "not installed" in cell["refused"] else "refused"
    floor_key, agree_key = {"diff": ("floor", "agrees"),
                            "diff_transformers": ("floor_transformers", "agrees_transformers")}[against]
    if against not in cell:
        return "-"
    return f"{fmt(cell[against])} ({fmt(cell[floor_key])}){'' if cell[agree_key] else ' **differs**'}"


def summary(results: dict) -> str:
    rows = results["configs"]
    lines = ["# Conformance: published RoPE configs in four tools\n",
             f"Command: `{results['command']}`  ",
             f"Machine: {results['machine']}; transformers {results['versions']['transformers']}, llama-cpp-python "
             f"{results['versions']['llama_cpp'] or 'not installed'}; this project at {results['versions']['project']}.  ",
             f"Wall time: {results['wall_s'] / 60:.1f} min.\n",
             "## The RoPE each tool computes from the config\n",
             "Largest relative inv_freq difference from the authors' formulas / the cos/sin factor sqrt(1/t) "
             "(DeepSeek: x its softmax factor, and the sqrt(1/t) that makes in all). Project: `python -m yarn_minimal "
             "rope --config X --json`; transformers: `ROPE_INIT_FUNCTIONS[rope_type](config)`.\n",
             "| config | type | authors' sqrt(1/t) | project | transformers |", "|---|---|---|---|---|"]
    for r in rows:
        factor = "none" if r["authors"]["factor"] is None else f"{r['authors']['factor']:.4f}"
        lines.append(f"| {r['name']} | {r['rope_type']} | {factor} | "
                     f"{inv_text(r['inv_freq']['project'])} | {inv_text(r['inv_freq']['transformers'])} |")
    lines += ["", "## The tiny model past the original context\n",
              f"Largest |logit difference| over the last {TAIL} positions of a 1-layer, 1-head random-weight Llama "
              f"with the config's rotary dim, run {PAST} tokens past the original context, from the authors' model "
              "(transformers' network with the authors' inv_freq and factor), with the pair's noise floor in "
              "parentheses (the same two tools with plain RoPE); **differs**: above 10 x floor + 1e-4. Effect: "
              "the authors' model with the config against plain RoPE. 'llama.cpp vs tf': against transformers' "
              "model. 'project GGUF': the project's own GGUF export run by llama.cpp, against the project's logits.\n",
              "| config | tokens | effect | transformers | project | llama.cpp | llama.cpp vs tf | "
              "llama.cpp vs its documented rule | project GGUF in llama.cpp |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lg = r["logits"]
        lc = lg.get("llama.cpp", {})
        rule = lc.get("documented_rule")
        lines.append(f"| {r['name']} | {r['tokens']} | {fmt(r['effect'])} | {logit_text(lg['transformers'])} | "
                     f"{logit_text(lg['project'])} | {logit_text(lc)} | {logit_text(lc, 'diff_transformers')} | "
                     f"{'-' if rule is None else fmt(rule['diff']) + ('' if rule['agrees'] else ' **differs**')} | "
                     f"{logit_text(lg.get('project GGUF in llama.cpp'))} |")
    lines += ["", "## The window each tool takes the checkpoint to have\n",
              "| config | transformers (max_position_embeddings) | project (warns past) | project's GGUF context_length | "
              "llama.cpp converter's context_length |", "|---|---|---|---|---|"]
    for r in rows:
        w = r.get("window", {})
        lines.append(f"| {r['name']} | {w.get('transformers', '-')} | {w.get('project') or '-'} | "
                     f"{w.get('project GGUF', '-')} | {w.get('llama.cpp GGUF', '-')} |")
    lines += ["", "Refusals, one line each:", ""]
    for r in rows:
        for tool, cell in [*((f"{t}, rope", c) for t, c in r["inv_freq"].items()),
                           *((f"{t}, model", c) for t, c in r["logits"].items())]:
            if "refused" in cell:
                lines.append(f"- {r['name']}, {tool}: {cell['refused']}")
    lines += ["", "The authors' formulas per config:", ""]
    lines += [f"- {r['name']}: {r['authors']['how']}"
              + (f"; Eq. 18's ramp in r would differ by {fmt(r['authors']['paper_ramp_rel'])} (relative inv_freq)"
                 if 'paper_ramp_rel' in r['authors'] else "") for r in rows]
    return "\n".join(lines) + "\n"


def shown_path(path: Path) -> str:
    """A path as the results record it: relative to the repository, or only its name (no absolute paths)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else f"<{path.name}>"


def machine_kind() -> str:
    """'2-core x86-64 VM, torch 2.13.0+cpu': what a figure's cost depends on, nothing more."""
    import platform

    try:
        vm = " VM" if "hypervisor" in Path("/proc/cpuinfo").read_text() else ""
    except OSError:
        vm = ""
    return f"{os.cpu_count()}-core {platform.machine().replace('_', '-')}{vm}, torch {torch.__version__}"


def project_commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "yarn_minimal"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes in yarn_minimal/)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.conformance", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    names = [n for n, _, _ in CONFIGS + EXTRA]
    p.add_argument("--out", default=None, help="results folder, new or empty (default results/conformance; with --quick "
                   "results/tmp/conformance-quick, and never inside results/ but for results/tmp/)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conformance run's results.json and "
                   "SUMMARY.md in --out (its hand-written ## Analysis is kept)")
    p.add_argument("--configs", default=None, help=f"comma-separated names (default all): {', '.join(names)}")
    p.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_CONFIGS)} (or --configs) on short models "
                   f"(1024 + {PAST} tokens), written outside results/")
    a = p.parse_args(argv)
    chosen = a.configs.split(",") if a.configs else list(QUICK_CONFIGS) if a.quick else names
    unknown = [c for c in chosen if c not in names]
    if unknown:
        p.error(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(names)}")
    out = out_folder(a.out, a.quick, RESULTS / "conformance", SCRATCH / "conformance-quick")
    try:
        check_output(out, CONFORMANCE, a.overwrite)
    except OutputError as e:
        raise SystemExit(f"error: --out {e}") from None

    from tqdm import tqdm
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    version = llama_cpp_version()
    if version is None:
        print("llama-cpp-python is not installed: the llama.cpp column is skipped (pip install llama-cpp-python)",
              file=sys.stderr)
    command = "python -m experiments.conformance" + (f" --configs {a.configs}" if a.configs else "") + \
        (" --quick" if a.quick else "") + (f" --out {shown_path(out)}" if a.out else "")
    start = time.time()
    rows = []
    by_name = {n: (n, c, s) for n, c, s in CONFIGS + EXTRA}
    with tempfile.TemporaryDirectory(prefix="conformance-") as tmp, \
            tqdm(total=4 * len(chosen), desc="conformance", unit="step") as bar:
        for name in chosen:
            bar.set_postfix_str(name)
            rows.append(run_config(*by_name[name], Path(tmp), a.quick, version is not None, lambda: bar.update(1)))
    results = {"command": command, "machine": machine_kind(), "wall_s": time.time() - start,
               "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                            "llama_cpp": version, "project": project_commit()},
               "tail": TAIL, "past": PAST, "configs": rows}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    write_summary(out / "SUMMARY.md", summary(results))
    print(f"wrote {out}/results.json and SUMMARY.md ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
