"""Hugging Face Llama and Mistral folders in and out.

    config.json     LlamaConfig / MistralConfig, incl. rope_scaling (transformers v4) or
                    rope_parameters (v5); every key read: docs/checkpoints.md
    model.safetensors, or model-0000X-of-0000N.safetensors + model.safetensors.index.json
                    (pytorch_model*.bin only where there is no safetensors file)
    tokenizer.model (sentencepiece) or tokenizer.json (Hugging Face `tokenizers`), with BOS/EOS
                    from tokenizer_config.json / generation_config.json (tokenizer.open_tokenizer)

Reading: config.json -> ModelArgs and RopeConfig (rope_from_hf), then the tensors, renamed to
Meta's keys and with wq / wk permuted back to Meta's interleaved rotation.
Export: the same mapping the other way (like gpt-fast's convert_hf_checkpoint.py, reversed):
hf_rope_scaling and hf_config write config.json, save_hf model.safetensors.
"""
from __future__ import annotations

import contextlib
import math
import re
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..files import CheckpointError, atomic_write, read_json, write_json
from ..model import ModelArgs, Transformer
from ..rope import (RopeConfig, attention_factor, is_number, ntk_aware_base, ntk_aware_frequencies, pi_frequencies,
                    rope_frequencies, yarn_attention_factor)
from ..tokenizer import Tokenizer
from .common import (RopeExplanation, assign_weights, check_finite, check_key, check_keys, check_shape,
                     check_sliding_window, check_tokenizer, empty_model, explain_rope, first_line, json_text, model_args, read_key,
                     read_tokenizer, torch_load)
from .meta import meta_ffn_params


# ---------------------------------------------------------------------------------------
# The mapping between Meta's names and rotation and Hugging Face's
# ---------------------------------------------------------------------------------------

def hf_key(meta_key: str) -> str:
    """Meta's key name -> HF LlamaForCausalLM's."""
    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if meta_key in top:
        return top[meta_key]
    _, layer, rest = meta_key.split(".", 2)
    rest = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
            "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
            "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
            "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
            "ffn_norm.weight": "post_attention_layernorm.weight"}[rest]
    return f"model.layers.{layer}.{rest}"


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates interleaved pairs (2i, 2i+1) of each head; HF rotates halves (i, i + D/2).
    Reorder the rows of wq / wk so that HF's rotation gives the same q.k (HF's converter)."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_to_hf: HF's split-half rows back to Meta's interleaved pairs."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _heads_of(meta_key: str, args: ModelArgs) -> Optional[int]:
    """n_heads for wq, n_kv_heads for wk: the rows HF permutes. None for every other key."""
    if meta_key.endswith("attention.wq.weight"):
        return args.n_heads
    if meta_key.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


# ---------------------------------------------------------------------------------------
# config.json -> ModelArgs and RopeConfig
# ---------------------------------------------------------------------------------------

# The released Yarn-Mistral checkpoints (NousResearch/Yarn-Mistral-7b-64k, -128k) run the authors'
# remote code, which their config.json names in auto_map. That code hard-codes constants that
# differ from Llama's 32 / 1 / 0.1 and that the config does not carry: jquesnelle/yarn,
# scaled_rope/modeling_mistral_yarn.py, `MistralYaRNScaledRotaryEmbedding.__init__` defaults
# beta_fast=128, beta_slow=2 (its `_init_rope` passes neither) and `_yarn_get_mscale`:
# sqrt(1/t) = 0.07 ln(s) + 1.
YARN_MISTRAL_CODE = "modeling_mistral_yarn"
YARN_MISTRAL_CONSTANTS = {"beta": 128.0, "alpha": 2.0, "attention_coefficient": 0.07}

# max_position_embeddings when config.json omits it: LlamaConfig's and MistralConfig's defaults
DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32}


def _remote_code(cfg: dict, source: Path) -> Optional[str]:
    """The auto_map entry that points at the authors' Yarn-Mistral code, if any."""
    for ref in read_key(cfg, "auto_map", "a JSON object", source, {}).values():
        if YARN_MISTRAL_CODE in str(ref):
            return str(ref)
    return None


def rope_from_hf(cfg: dict, source: Path) -> tuple[RopeConfig, dict[str, str], list[str]]:
    """RopeConfig from a config.json's rope_scaling (transformers v4) or rope_parameters (v5),
    with where each value came from (RopeConfig field -> config key, or "default") and the
    ambiguities worth a reader's attention (defaults used, a factor that disagrees with
    max_position_embeddings / original_max_position_embeddings, constants that live in remote
    code; a LoudNote when two keys of the file contradict each other). The loader and
    `python -m yarn_minimal rope --config` (through explain_hf) both read configs with it.
    It reads the RoPE keys of any architecture; load() refuses non-Llama weights elsewhere.

    default -> plain RoPE, L = max_position_embeddings.
    linear  -> PI (Eq. 10), s = factor.
    dynamic -> Dynamic NTK-aware (Sec. 3.1 + 3.3) with L = max_position_embeddings. HF computes
               b' = b (a l/L - (a - 1))^(D/(D-2)) with its factor a; for a = 1 that is the
               paper's s = max(1, l/L). For a != 1 there is no RopeConfig equivalent, so we stop
               and ask for an explicit rope= rather than silently change the model
               (explain_hf explains it at a given length).
    yarn    -> YaRN (Eq. 17 to Eq. 22) with the public code's ramp: alpha = beta_slow, beta = beta_fast,
               L = original_max_position_embeddings, s = factor (required, as transformers requires it),
               sqrt(1/t) = attention_factor, or HF's 0.1 mscale ln(s) + 1 over
               0.1 mscale_all_dim ln(s) + 1 when both are set, or else Eq. 22; truncate: false keeps
               the correction dims fractional.
               The released Yarn-Llama-2 configs add "finetuned": true; it only matters to the
               authors' dynamic variant, so a static "yarn" accepts and ignores it.
               Yarn-Mistral (auto_map -> modeling_mistral_yarn): the remote code's 128 / 2 / 0.07
               (YARN_MISTRAL_CONSTANTS) wherever the config itself says nothing.
    llama3  -> Llama 3.1's NTK-by-parts: Eq. 17 to Eq. 20 with the paper's ramp (Eq. 18, linear in
               r = L/lambda), alpha = low_freq_factor, beta = high_freq_factor,
               L = original_max_position_embeddings, s = factor, no temperature. transformers
               keeps theta where lambda < L/high_freq_factor (r > beta: gamma = 1), uses
               theta/factor where lambda > L/low_freq_factor (r < alpha: gamma = 0) and blends
               with smooth = (L/lambda - low)/(high - low) = gamma(r) in between. The window is
               max_position_embeddings (Llama 3.1: 131072, not s L = 65536), as transformers,
               vLLM and llama.cpp's converter take it: RopeConfig.extended_length.

    For llama3, yarn and longrope, L is read as transformers reads it: a top-level
    original_max_position_embeddings (Phi-3 keeps it there) wins over the one in rope_scaling.
    """
    r = _ConfigReading(cfg, source)
    key, kind = r.key, r.kind
    model_type = read_key(cfg, "model_type", "a string", source, "llama")
    base = float(r.read("base", [f"{key}.rope_theta", "rope_theta"], 10000.0, "LlamaConfig's default"))
    max_pos = r.max_positions(model_type)
    r.provenance["original_length"] = r.provenance["max_position_embeddings"]  # L, unless the method states another
    r.provenance["method"] = f"{key}.{'rope_type' if 'rope_type' in r.scaling else 'type'}" if r.scaling else "default"

    try:
        if kind in ("default", "none", None):
            rope = RopeConfig(base=base, original_length=max_pos)
        elif kind == "linear":
            rope = RopeConfig(method="pi", scale=float(r.need("factor")), original_length=max_pos, base=base)
        elif kind == "dynamic":
            factor = float(r.read("scale", [f"{key}.factor"], 1.0, "the paper's Dynamic NTK"))
            if factor != 1.0:
                raise CheckpointError(
                    f"{source}: {key} dynamic with factor {factor:g}: transformers then uses "
                    f"b' = b (factor l/L - (factor - 1))^(D/(D-2)), which differs from the paper's Dynamic NTK "
                    f"(s = max(1, l/L), i.e. factor 1) and has no RopeConfig equivalent. Pass rope= to load(), "
                    f"e.g. RopeConfig(method='ntk', dynamic=True, original_length={max_pos}), to choose explicitly")
            r.provenance["dynamic"] = r.provenance["method"]
            rope = RopeConfig(method="ntk", dynamic=True, original_length=max_pos, base=base)
        elif kind == "llama3":
            scale, original = float(r.need("factor")), r.original_length(max_pos)
            # the checkpoint's stated context, where it is not s L (Llama 3.1: 131072 vs 8 x 8192)
            extended = max_pos if max_pos != int(round(original * scale)) else None
            if extended is not None:
                r.provenance["extended_length"] = r.provenance["max_position_embeddings"]
            rope = RopeConfig(method="ntk-by-parts", ramp="paper", scale=scale, original_length=original, base=base,
                              alpha=float(r.need("low_freq_factor")), beta=float(r.need("high_freq_factor")),
                              extended_length=extended)
            r.provenance["ramp"] = r.provenance["method"]
            r.check_factor(rope, max_pos)
        elif kind == "yarn":
            rope = _yarn_from_hf(r, max_pos, base, model_type)
        elif kind in ("longrope", "su"):
            raise CheckpointError(f"{source}: {key} type {kind!r} is not supported: LongRoPE (Phi-3) uses one searched "
                                  "factor per frequency pair, switched from short_factor to long_factor past "
                                  "original_max_position_embeddings; it is no method of the paper and this model cannot "
                                  "run it (`python -m yarn_minimal rope --config` explains it)")
        else:
            raise CheckpointError(f"{source}: {key} type {kind!r} is not supported; supported: default, linear, "
                                  "dynamic, yarn, llama3 (and longrope, explained by `rope --config` only)")
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        # RopeConfig names its field ("RopeConfig.scale: ..."): name the config key it came from
        field = re.match(r"RopeConfig\.(\w+): ", str(e))
        where = r.provenance.get(field[1], "default") if field else "default"
        if field and where != "default":
            raise CheckpointError(f"{source}: {_shown(where)}: {str(e)[field.end():]}") from None
        raise CheckpointError(f"{source}: {key}: {e}") from None
    return rope, r.provenance, r.notes


class LoudNote(str):
    """A note that load() also gives as a UserWarning: two keys of the file contradict each other."""


def _shown(key: str) -> str:
    """"rope_scaling.factor" as errors write it: "rope_scaling: factor"."""
    return key.replace(".", ": ", 1)


class _ConfigReading:
    """A config.json being read for its RoPE: each value with the key it came from, and notes
    on what is ambiguous."""

    FIELD_OF = {"factor": "scale", "original_max_position_embeddings": "original_length",
                "low_freq_factor": "alpha", "high_freq_factor": "beta"}  # config key -> RopeConfig field

    def __init__(self, cfg: dict, source: Path):
        self.cfg, self.source = cfg, source
        self.key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
        self.scaling = read_key(cfg, self.key, "a JSON object", source, {})
        type_key = "rope_type" if "rope_type" in self.scaling else "type"
        self.kind = read_key(self.scaling, type_key, "a string", f"{source}: {self.key}", "default")
        self.provenance: dict[str, str] = {}
        self.notes: list[str] = []

    def read(self, field: str, names: list[str], default, why: str, fallback: str = "default",
             expected: str = "a positive number"):
        """The first of the config keys `names` that is set ("a.b" looks inside a), checked to be
        `expected` (common.EXPECTED); else default, recorded as `fallback` (and noted when it is
        a plain default)."""
        for name in names:
            value = self.cfg
            for part in name.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value is not None:
                self.provenance[field] = name
                return check_key(value, _shown(name), expected, self.source)
        self.provenance[field] = fallback
        if fallback == "default":
            self.notes.append(f"{' / '.join(names)} not set: using {default:g} ({why})")
        return default

    def need(self, name: str, expected: str = "a positive number"):
        """A rope_scaling key the method cannot do without, checked to be `expected`."""
        if self.scaling.get(name) is None:
            why = (f"; transformers refuses it too, and s cannot be inferred: max_position_embeddings / "
                   f"original_max_position_embeddings is a guess" if (self.kind, name) == ("yarn", "factor") else "")
            raise CheckpointError(f"{self.source}: {self.key} of type {self.kind!r} has no {name!r}{why}")
        self.provenance[self.FIELD_OF.get(name, name)] = f"{self.key}.{name}"
        return check_key(self.scaling[name], f"{self.key}: {name}", expected, self.source)

    def get(self, name: str, expected: str, default=None):
        """An optional rope_scaling key, checked to be `expected`."""
        return read_key(self.scaling, name, expected, f"{self.source}: {self.key}", default)

    def max_positions(self, model_type: str) -> int:
        return int(self.read("max_position_embeddings", ["max_position_embeddings"],
                             DEFAULT_MAX_POSITIONS.get(model_type, 2048),
                             f"{model_type} config default" if model_type in DEFAULT_MAX_POSITIONS
                             else f"LlamaConfig's default; {model_type}'s own is not known here",
                             expected="a positive integer"))

    def original_length(self, max_pos: int) -> int:
        """L for llama3 / yarn / longrope as transformers reads it (PreTrainedConfig.standardize_rope_params):
        a top-level original_max_position_embeddings wins over the one in rope_scaling; neither:
        max_position_embeddings. Two different values are a LoudNote naming both; L larger than
        max_position_embeddings is an error."""
        inner_key = f"{self.key}.original_max_position_embeddings"
        top = read_key(self.cfg, "original_max_position_embeddings", "a positive integer", self.source, None)
        inner = read_key(self.scaling, "original_max_position_embeddings", "a positive integer",
                         f"{self.source}: {self.key}", None)
        if top is not None and inner is not None and top != inner:
            self.notes.append(LoudNote(
                f"original_max_position_embeddings is {top} at the top level of config.json and {inner} in "
                f"{self.key}: L = {top} (the top-level value, as transformers reads it)"))
        original = int(self.read("original_length", ["original_max_position_embeddings", inner_key], max_pos,
                                 "max_position_embeddings, as transformers", expected="a positive integer"))
        if original > max_pos:
            raise CheckpointError(f"{self.source}: {_shown(self.provenance['original_length'])} is {original}, larger "
                                  f"than max_position_embeddings {max_pos}; expected at most max_position_embeddings "
                                  "(L is the pre-training context, max_position_embeddings the model's)")
        return original

    def check_factor(self, rope: RopeConfig, max_pos: int) -> None:
        """Two keys state the extension ratio; say so when they disagree (transformers issue 38224)."""
        if max_pos == int(round(rope.original_length * rope.scale)):
            return
        ratio = (f"{self.key}.factor {rope.scale:g} disagrees with max_position_embeddings / "
                 f"original_max_position_embeddings = {max_pos} / {rope.original_length} = "
                 f"{max_pos / rope.original_length:g}; s = factor is used (as transformers does)")
        if rope.extended_length is not None:
            self.notes.append(f"{ratio} for the frequencies, and the window is max_position_embeddings {max_pos} "
                              f"(as transformers, vLLM and llama.cpp's converter take it), not L x s = "
                              f"{int(round(rope.original_length * rope.scale))}")
        else:
            self.notes.append(f"{ratio}, so the intended window L x s is {rope.window}, not {max_pos}")


def _yarn_from_hf(r: _ConfigReading, max_pos: int, base: float, model_type: str) -> RopeConfig:
    key = r.key
    original = r.original_length(max_pos)
    scale = float(r.need("factor"))
    r.provenance["ramp"] = r.provenance["method"]  # "yarn" means the public code's ramp
    remote = _remote_code(r.cfg, r.source) if model_type == "mistral" else None
    fallback = f"remote code ({remote})" if remote else "default"
    if remote:
        constants, why = YARN_MISTRAL_CONSTANTS, "the Yarn-Mistral remote code"
        r.notes.append(f"auto_map -> {remote}: beta_fast 128, beta_slow 2 and sqrt(1/t) = 0.07 ln(s) + 1 live in "
                       "that remote code (jquesnelle/yarn scaled_rope/modeling_mistral_yarn.py), not in this config")
    else:
        paper = RopeConfig()  # the paper's 32 / 1 / 0.1, which are transformers' too
        constants = {"beta": paper.beta, "alpha": paper.alpha, "attention_coefficient": paper.attention_coefficient}
        why = "transformers' and the paper's default"
        if model_type == "mistral":
            r.notes.append("model_type mistral with yarn and no auto_map to the authors' modeling_mistral_yarn.py: "
                           "transformers' constants (32 / 1 / 0.1) are used; NousResearch's Yarn-Mistral checkpoints "
                           "were trained with 128 / 2 / 0.07")
    alpha = float(r.read("alpha", [f"{key}.beta_slow"], constants["alpha"], why, fallback))
    beta = float(r.read("beta", [f"{key}.beta_fast"], constants["beta"], why, fallback))
    factor = r.get("attention_factor", "a positive number")
    mscale, mscale_all_dim = r.get("mscale", "a positive number"), r.get("mscale_all_dim", "a positive number")
    if factor is not None:
        r.provenance["attention_factor"] = f"{key}.attention_factor"
    elif mscale and mscale_all_dim:  # DeepSeek-style: the ratio of two Eq. 22 forms
        factor = yarn_attention_factor(scale, 0.1 * mscale) / yarn_attention_factor(scale, 0.1 * mscale_all_dim)
        r.provenance["attention_factor"] = f"{key}.mscale / {key}.mscale_all_dim"
    else:
        r.provenance["attention_coefficient"] = fallback
        if mscale or mscale_all_dim:
            r.notes.append(f"{key}.{'mscale' if mscale else 'mscale_all_dim'} alone changes no frequency and no cos/sin "
                           "factor: transformers uses the ratio only when both mscale and mscale_all_dim are set")
    truncate = r.get("truncate", "true or false", True)
    if not truncate:
        r.provenance["truncate"] = f"{key}.truncate"
    rope = RopeConfig(method="yarn", scale=scale, original_length=original, base=base, alpha=alpha, beta=beta,
                      attention_factor=None if factor is None else float(factor),
                      attention_coefficient=constants["attention_coefficient"], truncate=truncate)
    if r.provenance["original_length"] != "default":
        r.check_factor(rope, max_pos)
    return rope


def args_from_hf(cfg: dict, rope: Optional[RopeConfig], source: Path) -> tuple[ModelArgs, dict, list[str]]:
    """(ModelArgs, RoPE provenance, notes) from a config.json; see rope_from_hf. Every key read is
    checked for its type and range here, and named with the file when it is wrong."""
    model_type = read_key(cfg, "model_type", "a string", source, "llama")
    if model_type not in DEFAULT_MAX_POSITIONS:
        raise CheckpointError(f"{source}: model_type {model_type!r}; only Llama-architecture "
                              f"checkpoints (model_type {' or '.join(map(repr, DEFAULT_MAX_POSITIONS))}) are supported")
    dim, n_layers, n_heads, vocab_size, hidden = (read_key(cfg, name, "a positive integer", source) for name in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"))
    n_kv_heads = read_key(cfg, "num_key_value_heads", "a positive integer", source, n_heads)
    if dim % n_heads or n_heads % n_kv_heads:
        raise CheckpointError(f"{source}: hidden_size {dim}, num_attention_heads {n_heads} and num_key_value_heads "
                              f"{n_kv_heads}: each must be a multiple of the next")
    for name, allowed in (("hidden_act", ("silu",)), ("attention_bias", (False,)), ("mlp_bias", (False,)),
                          ("partial_rotary_factor", (1, 1.0)), ("head_dim", (dim // n_heads,))):
        if cfg.get(name) is not None and cfg[name] not in allowed:
            raise CheckpointError(f"{source}: {name} is {json_text(cfg[name])}; Llama 2 (and this model) needs "
                                  f"{json_text(allowed[0])}" + (" (hidden_size / num_attention_heads)" if name == "head_dim" else ""))
    multiple_of, multiplier = meta_ffn_params(dim, hidden, source)
    params = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                  multiple_of=multiple_of, ffn_dim_multiplier=multiplier,
                  norm_eps=read_key(cfg, "rms_norm_eps", "a positive number", source, 1e-6),  # LlamaConfig's default
                  # Mistral 7B v0.1: 4096; null: full attention
                  sliding_window=read_key(cfg, "sliding_window", "a positive integer", source, None))
    tied = read_key(cfg, "tie_word_embeddings", "true or false", source, False)  # LlamaConfig's default
    own, provenance, notes = rope_from_hf(cfg, source)
    window = params["sliding_window"]
    if window is not None and own.window is not None and own.window > window:
        notes.append(f"sliding_window {window} is shorter than the intended window {own.window}: this model has "
                     f"full attention only, so sequences longer than {window} tokens are refused")
    if rope is not None:
        provenance, notes = {field: "rope= (given to load)" for field in provenance}, []
    return model_args(params, rope if rope is not None else own, source, tied), provenance, notes


def read_hf_config(path: Path) -> tuple[ModelArgs, dict, list[str]]:
    """checkpoint.read_config for a config.json: ModelArgs, where each RoPE value came from, notes."""
    cfg = read_json(path)
    args, provenance, notes = args_from_hf(cfg, None, path)
    provenance["head_dim"] = "head_dim" if "head_dim" in cfg else "hidden_size / num_attention_heads"
    return args, provenance, notes


# ---------------------------------------------------------------------------------------
# config.json of any architecture -> what its RoPE computes (`rope --config`)
# ---------------------------------------------------------------------------------------

DEEPSEEK = ("deepseek_v2", "deepseek_v3")  # attention that multiplies its softmax scale by mscale^2


def explain_hf(cfg: dict, source: Path, seq_len: Optional[int] = None) -> RopeExplanation:
    """What the RoPE of any config.json computes at length seq_len (None: as transformers builds it
    at init), whatever the architecture: the weights need not be Llama's, since nothing is run.
    llama, mistral, qwen2, gpt_oss, deepseek_v2/v3 and others with default / linear / yarn /
    llama3 read through rope_from_hf, the loader's own reading; the rotary dim is
    qk_rope_head_dim (DeepSeek), or head_dim, or hidden_size / num_attention_heads, times
    partial_rotary_factor, as transformers takes it. HF's dynamic and Phi-3's longrope, which
    have no RopeConfig, are explained with the paper's formulas where they use them."""
    model_type = read_key(cfg, "model_type", "a string", source, "llama")
    head_dim, head_from = _rotary_dim(cfg, source)
    r = _ConfigReading(cfg, source)
    if r.kind in ("longrope", "su"):
        ex = _explain_longrope(r, model_type, head_dim, head_from, seq_len)
    elif r.kind == "dynamic":
        ex = _explain_dynamic(r, model_type, head_dim, head_from, seq_len)
    else:
        rope, provenance, notes = rope_from_hf(cfg, source)
        ex = explain_rope(rope, head_dim, {**provenance, "head_dim": head_from}, notes, seq_len)
        mscale_all_dim = r.get("mscale_all_dim", "a positive number")
        if model_type in DEEPSEEK and rope.method == "yarn" and mscale_all_dim:
            _deepseek_softmax(ex, rope, r.get("mscale", "a positive number"), mscale_all_dim, r.key)
    window = read_key(cfg, "sliding_window", "a positive integer", source, None)
    if window is not None:
        ex.rows.append(("sliding_window", f"{window} (longer sequences are refused)", "sliding_window"))
    if model_type not in DEFAULT_MAX_POSITIONS:
        ex.notes.append(f"model_type {model_type}: this explains its RoPE only; load() runs Llama-architecture "
                        "weights (llama, mistral)")
    return ex


def _rotary_dim(cfg: dict, source: Path) -> tuple[int, str]:
    """|D| as transformers' RoPE init takes it, and the keys it came from."""
    if cfg.get("qk_rope_head_dim") is not None:  # DeepSeek's MLA: only these dims of q and k rotate
        dim, where = read_key(cfg, "qk_rope_head_dim", "a positive integer", source), "qk_rope_head_dim"
    elif cfg.get("head_dim") is not None:  # gpt-oss, Llama 3.2: not hidden_size / num_attention_heads
        dim, where = read_key(cfg, "head_dim", "a positive integer", source), "head_dim"
    else:
        hidden = read_key(cfg, "hidden_size", "a positive integer", source)
        dim, where = hidden // read_key(cfg, "num_attention_heads", "a positive integer", source), \
            "hidden_size / num_attention_heads"
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    for name, holder in (("partial_rotary_factor", cfg), ("partial_rotary_factor", scaling)):
        if isinstance(holder, dict) and holder.get(name) is not None:
            part = check_key(holder[name], name, "a positive number", source)
            if part > 1:
                raise CheckpointError(f"{source}: {name} is {json_text(part)}; expected a number in (0, 1]")
            dim, where = int(dim * part), f"{where} x {name}"
            break
    if dim % 2:
        raise CheckpointError(f"{source}: {where} gives a rotary dimension of {dim}; expected an even number "
                              "(RoPE rotates pairs of dimensions)")
    return dim, where


def _deepseek_softmax(ex: RopeExplanation, rope: RopeConfig, mscale, mscale_all_dim, key: str) -> None:
    """DeepSeek-V2/V3's attention (transformers' yarn_apply_mscale) multiplies its softmax scale by
    mscale^2, mscale = 0.1 mscale_all_dim ln(s) + 1, on top of the cos/sin factor."""
    m = yarn_attention_factor(rope.scale, 0.1 * mscale_all_dim)
    ex.softmax_factor = m * m
    total = (ex.attention_factor * m) ** 2
    ex.rows.append(("softmax scale", f"x {ex.softmax_factor:.4f} ((0.1 x {mscale_all_dim:g} ln(s) + 1)^2)",
                    f"{key}.mscale_all_dim (DeepSeek's attention)"))
    ex.notes.append(f"DeepSeek's attention also multiplies its softmax scale by (0.1 mscale_all_dim ln(s) + 1)^2 = "
                    f"{ex.softmax_factor:.4f}; with the cos/sin factor {ex.attention_factor:.4f} on q and k, q.k is scaled "
                    f"by {total:.4f}" + (f" = (0.1 x {mscale:g} ln(s) + 1)^2: Eq. 22's 1/t with c = 0.1 mscale"
                                         if mscale else ""))


def _explain_dynamic(r: _ConfigReading, model_type: str, head_dim: int, head_from: str,
                     seq_len: Optional[int]) -> RopeExplanation:
    """transformers' "dynamic": NTK-aware (Eq. 14 to Eq. 16) at s = a l/L - (a - 1), with a = factor,
    L = max_position_embeddings and l = max(seq_len, L) (_compute_dynamic_ntk_parameters). Sec. 3.3
    says s = max(1, l/L): the same for a = 1 only."""
    base = float(r.read("base", [f"{r.key}.rope_theta", "rope_theta"], 10000.0, "LlamaConfig's default"))
    max_pos = r.max_positions(model_type)
    a = float(r.need("factor"))
    length = max(seq_len or max_pos, max_pos)
    s = a * length / max_pos - (a - 1)
    rope = RopeConfig(method="ntk", dynamic=True, original_length=max_pos, base=base)
    inv_freq = ntk_aware_frequencies(head_dim, base, s)
    paper = max(1.0, length / max_pos)
    rows = [("method", "transformers' dynamic: NTK-aware (Eq. 14-16) at a length-dependent s", f"{r.key}.type"),
            ("a (factor)", f"{a:g}", f"{r.key}.factor"),
            ("s at this length", f"{s:g} = a l/L - (a - 1), l = {length}", "transformers' formula"),
            ("L (original_length)", f"{max_pos}", r.provenance["max_position_embeddings"]),
            ("b (base)", f"{base:g}; b' = b s^(|D|/(|D|-2)) = {ntk_aware_base(base, s, head_dim):.6g}", r.provenance["base"]),
            ("|D| (head_dim)", f"{head_dim}", head_from),
            ("sqrt(1/t)", "1 (no temperature)", "method"),
            ("intended window", "none: s follows the length", "derived")]
    notes = r.notes + [f"transformers' dynamic uses s = a l/L - (a - 1) (a = factor = {a:g}); the paper's Dynamic "
                       f"Scaling (Sec. 3.3) uses s = max(1, l/L): at l = {length} that is {s:g} against {paper:g}"
                       + (" (the same: a = 1)" if a == 1 else "") + "; load() runs it only for a = 1"]
    if seq_len is None:
        notes.append(f"no --seq-len: l = max_position_embeddings = {max_pos}, as transformers builds it at init "
                     "(plain RoPE); give --seq-len N to see it at N tokens")
    return RopeExplanation(f"HF dynamic NTK (a={a:g}, L={max_pos}) at l={length}", head_dim, s, inv_freq, 1.0, rows,
                           notes, rope=RopeConfig(method="ntk", scale=s, original_length=max_pos, base=base))


def _explain_longrope(r: _ConfigReading, model_type: str, head_dim: int, head_from: str,
                      seq_len: Optional[int]) -> RopeExplanation:
    """Phi-3's LongRoPE as transformers computes it (_compute_longrope_parameters): per-pair PI,
    h(theta_d) = theta_d / s_d (Eq. 10 with one searched s_d per pair), short_factor up to L and
    long_factor past it; cos and sin times sqrt(1 + ln(s) / ln(L)) with s = factor or
    max_position_embeddings / L. Not a method of the paper (no ramp, no Eq. 22)."""
    base = float(r.read("base", [f"{r.key}.rope_theta", "rope_theta"], 10000.0, "LlamaConfig's default"))
    max_pos = r.max_positions(model_type)
    original = r.original_length(max_pos)
    factors = {}
    for name in ("short_factor", "long_factor"):
        values = r.scaling.get(name)
        if not (isinstance(values, list) and len(values) == head_dim // 2 and all(is_number(v) and v > 0 for v in values)):
            raise CheckpointError(f"{r.source}: {r.key}: {name} is {json_text(values)}; expected a list of {head_dim // 2} "
                                  f"positive numbers (one per frequency pair of |D| = {head_dim}, from {head_from})")
        factors[name] = torch.tensor(values, dtype=torch.float64)
    s = r.get("factor", "a positive number") or max_pos / original
    factor = r.get("attention_factor", "a positive number")
    if factor is None:  # LongRoPE's (Phi-3's) own temperature, not Eq. 22
        factor = 1.0 if s <= 1 else math.sqrt(1 + math.log(s) / math.log(original))
    use = "long_factor" if seq_len and seq_len > original else "short_factor"
    inv_freq = pi_frequencies(rope_frequencies(head_dim, base), factors[use])
    rows = [("method", "longrope: per-pair PI, theta_d / s_d", f"{r.key}.type"),
            ("s_d", f"{use} ({factors[use].min():.4g} .. {factors[use].max():.4g})",
             f"{r.key}.{use} ({'--seq-len > L' if use == 'long_factor' else 'no --seq-len, or --seq-len <= L'})"),
            ("s (scale)", f"{s:g}", f"{r.key}.factor" if r.get("factor", "a positive number") else
             "max_position_embeddings / original_max_position_embeddings"),
            ("L (original_length)", f"{original}", r.provenance["original_length"]),
            ("b (base)", f"{base:g}", r.provenance["base"]),
            ("|D| (head_dim)", f"{head_dim}", head_from),
            ("sqrt(1/t)", f"{factor:.4f}" + ("" if r.get("attention_factor", "a positive number")
                                              else " (sqrt(1 + ln(s) / ln(L)), LongRoPE's, not Eq. 22)"),
             f"{r.key}.attention_factor" if r.get("attention_factor", "a positive number") else "derived"),
            ("intended window", f"{max_pos}", "max_position_embeddings")]
    notes = r.notes + ["LongRoPE is no method of the paper: one searched factor per pair, no ramp; transformers "
                       f"switches the whole table from short_factor to long_factor once the sequence passes L = "
                       f"{original} (give --seq-len to choose); load() cannot run it"]
    return RopeExplanation(f"LongRoPE (s={s:g}, L={original}, {use})", head_dim, float(s), inv_freq, float(factor),
                           rows, notes, window=max_pos)



# ---------------------------------------------------------------------------------------
# Reading the tensors
# ---------------------------------------------------------------------------------------

def hf_weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {index.name} but missing")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{folder}: no weight files (model.safetensors, model-*-of-*.safetensors "
                              "or pytorch_model*.bin) beside config.json")
    return files


def _open_hf_files(files: list[Path], stack: contextlib.ExitStack) -> dict[str, tuple[Path, Callable, tuple]]:
    """HF key -> (file, read(), shape), reading no tensor data yet."""
    tensors = {}
    for path in files:
        if path.suffix == ".safetensors":
            try:
                f = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                for k in f.keys():
                    tensors[k] = (path, lambda f=f, k=k: f.get_tensor(k), tuple(f.get_slice(k).get_shape()))
            except Exception as e:  # truncated or corrupt header / data
                raise CheckpointError(f"{path}: cannot be read as safetensors ({type(e).__name__}: {first_line(e)})") from None
        else:
            state = torch_load(path)
            for k, v in state.items():
                tensors[k] = (path, lambda v=v: v, tuple(v.shape))
    return tensors


def load_hf(folder: Path, rope: Optional[RopeConfig], device: torch.device | str,
            dtype: torch.dtype, progress: bool = False) -> tuple[Transformer, Tokenizer]:
    config_path = folder / "config.json"
    cfg = read_json(config_path)
    args, _, notes = args_from_hf(cfg, rope, config_path)
    for note in notes:
        if isinstance(note, LoudNote):
            warnings.warn(f"{config_path}: {note}", stacklevel=3)
    tokenizer = read_tokenizer(folder)
    check_tokenizer(tokenizer, args, config_path)
    check_sliding_window(args, rope, config_path)
    files = hf_weight_files(folder)
    model = empty_model(args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with contextlib.ExitStack() as stack:
        tensors = _open_hf_files(files, stack)
        for k in [k for k in tensors if k.endswith("rotary_emb.inv_freq")]:
            del tensors[k]  # older transformers saved this buffer; we compute our own
        if args.tie_word_embeddings and "model.embed_tokens.weight" in tensors:
            # transformers ties lm_head to the embedding and ignores a stored lm_head.weight
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        source = str(files[0].parent / (files[0].name if len(files) == 1 else "{" + ",".join(f.name for f in files) + "}"))
        check_keys(set(tensors), {hf_key(k) for k in expected}, source)
        for key, shape in expected.items():
            path, _, found = tensors[hf_key(key)]
            check_shape(hf_key(key), found, shape, str(path), f" from {config_path.name}")
        state = {}
        for key in tqdm(expected, desc=f"reading {len(files)} file(s)", unit="tensor", disable=not progress):
            path, read, _ = tensors.pop(hf_key(key))
            if key == "output.weight" and args.tie_word_embeddings:
                state[key] = state["tok_embeddings.weight"]  # the same tensor, read once
                continue
            try:
                t = read()
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read tensor {hf_key(key)} ({type(e).__name__}: {first_line(e)})") from None
            check_finite(hf_key(key), t, path)
            heads = _heads_of(key, args)
            state[key] = (permute_from_hf(t, heads) if heads else t).to(device=device, dtype=dtype)
    assign_weights(model, state)
    return model, tokenizer


# ---------------------------------------------------------------------------------------
# Export: config.json and model.safetensors for transformers, vLLM and llama.cpp
# ---------------------------------------------------------------------------------------

def hf_rope_scaling(rope: RopeConfig, head_dim: int) -> tuple[float, Optional[dict], int]:
    """(rope_theta, rope_scaling, max_position_embeddings) for config.json.

    rope_scaling carries both "rope_type" (transformers >= 4.45, vLLM) and "type" (older
    transformers, llama.cpp's converter). Static NTK-aware is written exactly as a base change,
    rope_theta = b' (Eq. 16). Methods with no counterpart that transformers, vLLM and llama.cpp
    all read the same way are refused rather than written approximately."""
    L, s = rope.original_length, rope.scale
    entry = lambda kind, **kw: {"rope_type": kind, "type": kind, **kw}
    if rope.method == "none" or (s == 1 and not rope.dynamic and rope.method != "ntk" and rope.attention_factor is None):
        return rope.base, None, L
    if rope.method == "pi" and not rope.dynamic:
        return rope.base, entry("linear", factor=s), L  # HF's convention: max_position_embeddings = L
    if rope.method == "ntk" and not rope.dynamic:
        # Eq. 14 to Eq. 16: static NTK-aware is plain RoPE with base b' (what Code Llama's rope_theta is)
        return ntk_aware_base(rope.base, s, head_dim), None, int(round(L * s))
    if rope.method == "ntk" and rope.dynamic and s == 1:
        return rope.base, entry("dynamic", factor=1.0), L  # HF's dynamic uses L = max_position_embeddings
    if rope.method == "yarn" and not rope.dynamic and rope.ramp == "code":
        scaling = entry("yarn", factor=s, original_max_position_embeddings=L, beta_fast=rope.beta, beta_slow=rope.alpha)
        if not rope.truncate:
            scaling["truncate"] = False
        if rope.attention_factor is not None or rope.attention_coefficient != 0.1:
            # transformers' key (replaces Eq. 22); a coefficient other than 0.1 has no key of its own
            scaling["attention_factor"] = attention_factor(rope, s)
        return rope.base, scaling, rope.window
    if rope.method == "ntk-by-parts" and not rope.dynamic and rope.ramp == "paper":
        # Llama 3.1's "llama3" is exactly this (see rope_from_hf)
        return rope.base, entry("llama3", factor=s, original_max_position_embeddings=L, low_freq_factor=rope.alpha,
                                high_freq_factor=rope.beta), rope.window  # Llama 3.1: 131072, the stated window
    raise CheckpointError(
        f"format='hf': {rope.describe()} (ramp={rope.ramp}) has no Hugging Face rope_scaling equivalent "
        "(transformers knows static PI 'linear', Dynamic NTK 'dynamic' with s0 = 1, static YaRN 'yarn' with the "
        "code's ramp, and static NTK-by-parts with the paper's ramp as 'llama3'). Save with format='meta' (this project's layout keeps any RopeConfig in rope.json)")


def hf_config(model: Transformer, dtype: torch.dtype, tokenizer: Optional[Tokenizer] = None) -> dict:
    """config.json for transformers' LlamaForCausalLM (also read by vLLM and llama.cpp's converter);
    MistralForCausalLM for a model with a sliding window, so that the window is not dropped.
    BOS/EOS ids are the tokenizer's (Llama 2's 1 and 2 without one); eos_token_id lists every
    id that ends generation when there are several."""
    args = model.args
    rope_theta, rope_scaling, max_pos = hf_rope_scaling(args.rope, args.head_dim)
    bos, eos = (1, [2]) if tokenizer is None else (tokenizer.bos_id, list(tokenizer.eos_ids))
    mistral = args.sliding_window is not None
    return {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        **({"sliding_window": args.sliding_window} if mistral else {}),
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps, "hidden_act": "silu", "max_position_embeddings": max_pos,
        "rope_theta": rope_theta, "rope_scaling": rope_scaling,
        "tie_word_embeddings": args.tie_word_embeddings, "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
        "bos_token_id": bos, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "initializer_range": 0.02, "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def save_hf(model: Transformer, state: dict[str, torch.Tensor], folder: Path, tokenizer: Optional[Tokenizer]) -> None:
    """model.safetensors with HF's names and wq / wk rows permuted to HF's split-half rotation,
    and config.json. Refuses RoPE settings HF cannot express before anything is written."""
    config = hf_config(model, next(iter(state.values())).dtype, tokenizer)
    hf_state = {}
    for key, t in state.items():
        if key == "output.weight" and model.args.tie_word_embeddings:
            continue  # as save_pretrained writes a tied model: no lm_head.weight
        heads = _heads_of(key, model.args)
        hf_state[hf_key(key)] = (permute_to_hf(t, heads) if heads else t).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(hf_state, str(tmp), metadata={"format": "pt"}))
    write_json(folder / "config.json", config)
