"""Llama 2, written to read like Meta's reference model, with the YaRN paper's RoPE methods.

Parameter names are Meta's checkpoint keys (tok_embeddings, layers.N.attention.wq, ...), and
RoPE uses Meta's interleaved convention: dimensions (2d, 2d+1) of a head form the complex
number of frequency pair d (Eq. 3-4). Raw Llama 2 weights therefore load without renaming.

The only place the extension methods enter is `Transformer._rope`, which asks rope.py for
float32 cos/sin tables at the scale s in effect (Sec. 3.3) and turns them into the complex
rotation e^{i m theta} that `apply_rope` multiplies by. Everything below it (attention,
the KV cache, flash-attn) is method-agnostic, which is the point of the "length scaling"
trick of Sec. 3.4.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint

from .rope import RopeConfig, check_head_dim, effective_scale, rope_tables

try:  # optional: installed on CUDA machines only (see README)
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None


@dataclass
class ModelArgs:
    """The fields of Llama 2's params.json, plus the RoPE extension in effect."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: n_heads (no grouped-query attention)
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope: RopeConfig = field(default_factory=RopeConfig)  # rope.base is params.json's rope_theta
    # Mistral's sliding-window attention span. This model attends to every earlier token, so a
    # checkpoint with a window runs only sequences that fit in it (see Transformer.hidden_states)
    sliding_window: Optional[int] = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelArgs.{name}: must be > 0, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"ModelArgs: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs: n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        check_head_dim(self.head_dim)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's SwiGLU width: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to
        multiple_of (11008 / 13824 / 28672 for 7B / 13B / 70B)."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_params(cls, params: dict, rope: Optional[RopeConfig] = None) -> "ModelArgs":
        """Build from a params.json dict. A rope_theta there (Code Llama) sets the base."""
        known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                 "ffn_dim_multiplier", "norm_eps", "sliding_window"}
        kwargs = {k: v for k, v in params.items() if k in known}
        if rope is None:
            rope = RopeConfig(base=float(params.get("rope_theta", 10000.0)))
        return cls(**kwargs, rope=rope)

    def to_params(self) -> dict:
        """The params.json Meta's loader expects (plus rope_theta when it is not 10000)."""
        params = dict(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                      vocab_size=self.vocab_size, multiple_of=self.multiple_of,
                      ffn_dim_multiplier=self.ffn_dim_multiplier, norm_eps=self.norm_eps)
        if self.rope.base != 10000.0:
            params["rope_theta"] = self.rope.base
        if self.sliding_window is not None:
            params["sliding_window"] = self.sliding_window  # the key Mistral's own params.json uses
        return params


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / sqrt(mean(x^2) + eps) in float32 as Meta does (bf16 sums of squares lose
        # precision), rounded back to x's dtype before the weight, in Meta's order
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rotation(rope: RopeConfig, head_dim: int, positions: torch.Tensor, scale: float, device=None) -> torch.Tensor:
    """e^{i m h(theta_d)} for the given positions m at scale s, as complex64 (T, 1, |D|/2) ready
    to broadcast over heads: cos + i sin from rope.rope_tables, which already carry YaRN's
    sqrt(1/t) (Sec. 3.4)."""
    cos, sin = rope_tables(rope, head_dim, positions, scale, device=device)
    return torch.complex(cos, sin)[:, None, :]


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Eq. 5: f(x_m, m) = e^{i m theta} x_m, where each interleaved pair (x_2d, x_2d+1) of a
    head is one complex number (Eq. 3-4). x is (B, T, H, |D|), rot comes from `rotation`."""
    # one complex multiplication in float32; on CPU ~10x faster than the same arithmetic on
    # strided real/imaginary views, with the same result
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rot).flatten(-2).type_as(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(|D|)) v (Eq. 2) where the Tq queries are the LAST Tq of the
    Tk keys' positions. Shapes (B, T, H, |D|); k and v may have fewer (grouped) heads.
    Never builds a Tq x Tk score or mask tensor on the fast paths."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        # flash-attn aligns the causal mask bottom-right when Tq != Tk, and handles GQA
        return flash_attn_func(q, k, v, causal=True)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if Tq == 1:  # one new token attends to everything cached
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    elif Tq == Tk:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:  # a prefill chunk after a cached prefix: causal mask aligned to the bottom right
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Tq, Tk), enable_gqa=gqa)
    return out.transpose(1, 2)


ROTATE_BLOCK = 8192  # positions re-rotated at a time when s changes


class KVCache:
    """Keys and values of every layer for a batch of sequences, up to max_len positions.

    Sec. 3.3: under Dynamic Scaling, s changes with the sequence length and so does the
    rotation of every cached key, so the correct cache keeps keys BEFORE RoPE (`k`). Two phases:

    - while s stays at its floor s0 (lengths up to L s0), rotations never change: each key is
      rotated once, when it arrives, into `k_rot` (L s0 positions per layer);
    - past L s0, s = l'/L changes with every token: each forward pass rotates all cached keys
      of a layer with the current s into `scratch`, one buffer shared by the layers.

    So the cache costs the pre-RoPE keys and values plus small extras (Llama 2 7B at 128k:
    64 GiB + 1 GiB for k_rot + 1 GiB scratch), not a second full key buffer.

    With a static method s never changes, so only rotated keys are kept (`k_rot`, full length).
    mode="rotated" does that even under Dynamic Scaling, as Hugging Face, vLLM and the
    authors' code do, so that old keys keep a stale s: it exists to measure that bug.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device=None,
                 dtype=torch.float32, mode: str = "pre-rope"):
        if mode not in ("pre-rope", "rotated"):
            raise ValueError(f"KVCache.mode: {mode!r}; allowed: pre-rope, rotated")
        rope = args.rope
        zeros = lambda n: torch.zeros((batch_size, n, args.n_kv_heads, args.head_dim), device=device, dtype=dtype)
        self.mode, self.max_len = mode, max_len
        self.v = [zeros(max_len) for _ in range(args.n_layers)]
        if mode == "pre-rope" and rope.dynamic:
            floor_len = min(max_len, math.floor(rope.original_length * rope.scale))  # where s = s0
            self.k = [zeros(max_len) for _ in range(args.n_layers)]
            self.k_rot = [zeros(floor_len) for _ in range(args.n_layers)]
            self.scratch = zeros(max_len)
        else:
            self.k = self.scratch = None
            self.k_rot = [zeros(max_len) for _ in range(args.n_layers)]
        self.length = 0      # positions filled
        self.scale = None    # s of the last forward pass
        self._floor_rope, self._floor_rot = None, None

    def reset(self) -> None:
        self.length, self.scale = 0, None

    def floor_rotation(self, rope: RopeConfig, head_dim: int, device) -> torch.Tensor:
        """`rotation` of positions 0..max_len-1 at s = s0, the scale every static method uses
        (and Dynamic Scaling up to L s0): computed on first use, then sliced by each forward
        pass instead of recomputing cos/sin per token."""
        if self._floor_rope is not rope:  # the model's RoPE setting (frozen) may be replaced between uses
            self._floor_rot = rotation(rope, head_dim, torch.arange(self.max_len), rope.scale, device)
            self._floor_rope = rope
        return self._floor_rot


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, rope: "RopeState", cache: Optional[KVCache] = None, layer: int = 0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q = apply_rope(q, rope.rot_new)
        if cache is None:
            k = apply_rope(k, rope.rot_new)
        else:
            start, end = rope.start, rope.start + T
            cache.v[layer][:B, start:end] = v
            if cache.k is not None:
                cache.k[layer][:B, start:end] = k  # Sec. 3.3: cache keys before RoPE
            if rope.rotate_all:  # s is not at its floor: every cached key gets the current rotation
                keys = cache.scratch[:B, :end]
                for a in range(0, end, ROTATE_BLOCK):  # in blocks, to bound float32 temporaries
                    b = min(a + ROTATE_BLOCK, end)
                    keys[:, a:b] = apply_rope(cache.k[layer][:B, a:b], rope.rot[a:b])
            else:  # s never changes for these keys: rotate each once, on arrival
                cache.k_rot[layer][:B, start:end] = apply_rope(k, rope.rot_new)
                keys = cache.k_rot[layer][:B, :end]
            k, v = keys, cache.v[layer][:B, :end]
        out = attention(q, k, v)
        return self.wo(out.reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, cache=None, layer=0):
        h = x + self.attention(self.attention_norm(x), rope, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


@dataclass
class RopeState:
    """The rotations one forward pass needs, and where its tokens sit."""

    scale: float              # s in effect for this forward pass (Sec. 3.3)
    start: int                # position of the first new token
    rot: torch.Tensor         # `rotation` of positions 0..end-1 when rotate_all, else of the new ones
    rotate_all: bool          # rotate every cached key from the pre-RoPE cache (s above its floor)

    @property
    def rot_new(self):
        return self.rot[self.start:] if self.rotate_all else self.rot


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)  # not tied to the embedding
        self.activation_checkpointing = False

    @property
    def rope(self) -> RopeConfig:
        return self.args.rope

    def set_rope(self, rope: RopeConfig) -> None:
        """Switch the extension method; weights are untouched (methods need no new parameters)."""
        self.args = replace(self.args, rope=rope)

    # The checkpoint's end-of-sequence ids (load() sets them from the tokenizer files, as
    # transformers keeps them in generation_config); generation stops at any of them by default.
    eos_ids: tuple[int, ...] = ()

    def check_length(self, length: int) -> None:
        """Refuse sequences longer than a Mistral checkpoint's sliding window: past it the
        checkpoint expects banded attention, and silent full attention would be a different model."""
        window = self.args.sliding_window
        if window is not None and length > window:
            raise ValueError(f"sequence of {length} tokens, longer than the checkpoint's sliding_window {window}; "
                             "this model has no sliding-window attention, so it runs at most that many tokens")

    def init_weights(self, std: float = 0.02, seed: Optional[int] = None) -> None:
        """GPT-2 style initialization for training from scratch: N(0, std), with residual
        output projections scaled by 1/sqrt(2 n_layers)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                out_proj = name.endswith(("wo.weight", "w2.weight"))
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.args.n_layers) if out_proj else std, generator=gen)

    def _rope(self, T: int, cache: Optional[KVCache], scale_length: Optional[int], device) -> RopeState:
        start = cache.length if cache is not None else 0
        end = start + T
        # Sec. 3.3: s follows the length of the sequence this forward pass sees
        s = effective_scale(self.rope, scale_length if scale_length is not None else end)
        # a pre-RoPE cache past L s0: s differs from its floor and changes with every token
        rotate_all = cache is not None and cache.k is not None and s > self.rope.scale
        if cache is not None and s == self.rope.scale:  # s at its floor: one table for the whole cache
            rot = cache.floor_rotation(self.rope, self.args.head_dim, device)[start:end]
        else:
            first = 0 if rotate_all else start
            rot = rotation(self.rope, self.args.head_dim, torch.arange(first, end), s, device)
        return RopeState(scale=s, start=start, rot=rot, rotate_all=rotate_all)

    def hidden_states(self, tokens: torch.Tensor, cache: Optional[KVCache] = None,
                      scale_length: Optional[int] = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, dim) of the T new tokens.

        With a cache, the tokens continue the cached sequence and the cache is extended.
        scale_length overrides the length that sets the dynamic scale (chunked prefill uses
        the whole prompt's length so that every chunk sees the same s as one big forward)."""
        B, T = tokens.shape
        if cache is not None and cache.length + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {cache.length} used, {T} more requested")
        self.check_length((cache.length if cache is not None else 0) + T)
        rope = self._rope(T, cache, scale_length, tokens.device)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and self.training and cache is None:
                h = checkpoint(layer, h, rope, use_reentrant=False)
            else:
                h = layer(h, rope, cache, i)
        if cache is not None:
            cache.length += T
            cache.scale = rope.scale
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, last_only: bool = False,
                scale_length: Optional[int] = None) -> torch.Tensor:
        """Logits (B, T, vocab) for positions 0..T-1, or (B, 1, vocab) with last_only.
        With targets (B, T) it returns the mean next-token loss instead, computed in chunks so
        that no (T, vocab) float32 tensor exists at once (targets == -100 are ignored)."""
        h = self.hidden_states(tokens, cache, scale_length)
        if targets is not None:
            return chunked_cross_entropy(self.output, h, targets)
        if last_only:
            h = h[:, -1:]
        return self.output(h)


def _chunk_nll(output: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = output(h).float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=-100)


def chunked_cross_entropy(output: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int = 2048) -> torch.Tensor:
    """Mean cross-entropy of output(h) against targets, chunk by chunk over the sequence.
    Each chunk's float32 logits are recomputed in backward (checkpoint) rather than kept."""
    total = h.new_zeros((), dtype=torch.float32)
    for h_chunk, t_chunk in zip(h.split(chunk_size, dim=1), targets.split(chunk_size, dim=1)):
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_nll, output, h_chunk, t_chunk, use_reentrant=False)
        else:
            total = total + _chunk_nll(output, h_chunk, t_chunk)
    return total / (targets != -100).sum().clamp(min=1)
