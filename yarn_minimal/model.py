"""Llama 2, written to read like Meta's reference model, with the YaRN paper's RoPE methods.

Parameter names are Meta's checkpoint keys (tok_embeddings, layers.N.attention.wq, ...), and
RoPE uses Meta's interleaved convention: dimensions (2d, 2d+1) of a head form the complex
number of frequency pair d (Eq. 3 and Eq. 4). Raw Llama 2 weights therefore load without renaming.

The only place the extension methods enter is `Transformer.rotation`, which asks rope.py for
float32 cos/sin tables at the scale s in effect (Sec. 3.3) and turns them into the complex
rotation e^{i m theta} that `apply_rope` multiplies by. Everything below it (attention,
flash-attn) is method-agnostic, which is the point of the "length scaling" trick of Sec. 3.4.
The KV cache knows one thing about the methods: whether s can change (Sec. 3.3), in which case
it keeps keys before RoPE (`LayerCache.update`).
"""
from __future__ import annotations

import functools
import itertools
import math
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import decode_kernel
from .rope import RopeConfig, attention_factor, check_head_dim, effective_scale, is_int, is_number, rope_tables

FLASH_ATTN_MIN = (2, 1)  # before 2.1, flash-attn aligns the causal mask top-left when Tq != Tk


def flash_attn_version_ok(version: str) -> bool:
    """Whether this flash-attn aligns the causal mask bottom-right when there are fewer queries
    than keys (a prefill chunk after a cached prefix), as `attention` needs: from 2.1 on."""
    found = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    return found >= FLASH_ATTN_MIN


def load_flash_attn() -> Optional[Callable[..., torch.Tensor]]:
    """flash_attn_func if flash-attn >= 2.1 is installed (optional: CUDA machines only, see
    README), else None, with a one-line warning for an older version."""
    try:
        import flash_attn
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    if not flash_attn_version_ok(flash_attn.__version__):
        warnings.warn(f"flash-attn {flash_attn.__version__} aligns the causal mask top-left when a prefill chunk "
                      f"follows cached tokens; yarn-minimal needs flash-attn >= 2.1, and uses SDPA instead")
        return None
    return flash_attn_func


flash_attn_func = load_flash_attn()
FLASH_DEVICES = {"cuda"}  # where flash-attn is used when installed (tests add "cpu" with a stand-in)


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

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        # types first: a string or a float from a hand-edited params.json is named here, not met as a TypeError
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "sliding_window"):
            value = getattr(self, name)
            if not (value is None and name == "sliding_window") and not (is_int(value) and value > 0):
                raise ValueError(f"ModelArgs.{name}: expected a positive integer, got {value!r}")
        for name in ("norm_eps", "ffn_dim_multiplier"):
            value = getattr(self, name)
            if not (value is None and name == "ffn_dim_multiplier") and not (is_number(value) and value > 0):
                raise ValueError(f"ModelArgs.{name}: expected a positive finite number, got {value!r}")
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
        """Build from a params.json dict (a null value is the field's default). A rope_theta there
        (Code Llama) sets the base."""
        known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                 "ffn_dim_multiplier", "norm_eps", "sliding_window"}
        kwargs = {k: v for k, v in params.items() if k in known and v is not None}
        if rope is None:
            rope = RopeConfig(base=float(params.get("rope_theta") or 10000.0))
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


def rotation_table(rope: RopeConfig, head_dim: int, end: int, scale: float,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """e^{i m h(theta_d)} for positions m = 0..end-1 at scale s, as complex64 (end, |D|/2): cos +
    i sin from rope.rope_tables, which already carry YaRN's sqrt(1/t) (Sec. 3.4).

    Built as e^{i m h} = e^{i 64a h} e^{i r h} for m = 64a + r: cos/sin of end/64 + 64 positions
    and one complex product, 5-8x cheaper than cos/sin of every position (Dynamic Scaling needs
    a new table at every step), within 4e-7 of it (float32 rounding of the two factors)."""
    n_coarse = (end + 63) // 64
    positions = torch.cat([torch.arange(0, end, 64), torch.arange(64)])  # one table: h(theta_d) made once
    table = torch.complex(*rope_tables(rope, head_dim, positions, scale, device=device))
    coarse, fine = table[:n_coarse], table[n_coarse:] / attention_factor(rope, scale)  # sqrt(1/t) once, not twice
    return (coarse[:, None] * fine).flatten(0, 1)[:end]


def rotate_pairs(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Eq. 5: f(x_m, m) = e^{i m theta} x_m, where each interleaved pair (x_2d, x_2d+1) of a
    head is one complex number (Eq. 3 and Eq. 4). x is (B, T, H, |D|) in the model's dtype, rotation
    the (T, |D|/2) rows of `rotation_table` for x's positions; the result has x's dtype.
    One complex multiplication in float32: on CPU ~10x faster than the same arithmetic on
    strided real/imaginary views."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation[:, None]).flatten(-2).type_as(x)


# The same product as one op (a torch.library custom op), so that it can be one fused kernel:
# bf16 in and out, float32 only inside. Eagerly, `rotate_pairs` above is its body; on CUDA
# it is the real-valued form below compiled by Inductor (which generates no code for complex
# numbers) on first use, so that importing the package never starts torch.compile; its fake
# implementation lets the meta device and torch.compile see its shapes.
rope_op = torch.library.custom_op("yarn_minimal::rotate_pairs", rotate_pairs, mutates_args=())


@rope_op.register_fake
def _(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _rotate_pairs_real(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    # reads x once and writes the result once; float32 only in registers
    cos, sin = torch.view_as_real(rotation)[:, None].unbind(-1)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2).to(x.dtype)


@functools.cache
def _compiled_rotate_pairs_real() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return torch.compile(_rotate_pairs_real, dynamic=True)


@rope_op.register_kernel("cuda")
def _(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    return _compiled_rotate_pairs_real()(x, rotation)


def _rope_op_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    # a rotation's adjoint is the opposite rotation: multiply by the conjugate
    rotation, = ctx.saved_tensors
    return rope_op(grad, torch.conj_physical(rotation)), None


def _save_rotation(ctx, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[1])


rope_op.register_autograd(_rope_op_backward, setup_context=_save_rotation)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Eq. 5 (`rotate_pairs`), as one op except in eager CPU code, where the op's dispatch would
    cost more (15-35 us a call on this project's CPU) than its fusion saves."""
    if x.is_cpu and not torch.compiler.is_compiling():
        return rotate_pairs(x, rotation)
    return rope_op(x, rotation)


@dataclass
class Rotation:
    """RoPE for one forward pass: the scale s in effect (Sec. 3.3) and `rotation_table` at
    that s for positions 0..end-1, where the pass's T new tokens are the last T positions."""

    scale: float
    start: int            # position of the first new token
    table: torch.Tensor   # complex64 (end, |D|/2)

    @property
    def new(self) -> torch.Tensor:
        """The rows of the new tokens. A property, not a field: FSDP2's mixed precision rebuilds
        every dataclass argument of a block with dataclasses.replace(), which refuses
        init=False fields."""
        return self.table[self.start:]


KeysValues = tuple[torch.Tensor, torch.Tensor]  # one block of keys and values, each (B, T, Hkv, |D|)


def flash_attn_applies(q: torch.Tensor) -> bool:
    return flash_attn_func is not None and q.device.type in FLASH_DEVICES and q.dtype in (torch.float16, torch.bfloat16)


def attention(q: torch.Tensor, blocks: Iterable[KeysValues]) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(|D|)) v (Eq. 2), where the Tq queries are the LAST Tq
    positions of the keys. Shapes (B, T, H, |D|); k and v may have fewer (grouped) heads.

    The keys and values come as (k, v) blocks, usually one. The first block holds the queries'
    own positions and ends with them (causal, aligned bottom-right); any further block lies
    entirely before them. Each block is attended on its own and the blocks' softmaxes are
    merged through their log-sum-exp (as flash-decoding does), so that only one block needs to
    exist at a time: the pre-RoPE cache rotates its keys a block at a time (PreRopeKeys).
    Never builds a Tq x Tk score or mask tensor on the fast paths."""
    if isinstance(blocks, PreRopeKeys) and decode_kernel.applies(q, blocks.keys, blocks.values, blocks.table):
        # a decoding step on the CPU: the same rotation and softmax as below, in one C kernel
        # that rotates each key as it reads it (decode_kernel.py says why)
        return decode_kernel.decode_attention(q, blocks.keys, blocks.values, blocks.table)
    blocks = iter(blocks)
    k, v = next(blocks)
    more = next(blocks, None)
    if more is None:
        return attention_block(q, k, v, causal=True)
    out, lse = attention_block(q, k, v, causal=True, with_lse=True)
    for k, v in itertools.chain([more], blocks):
        out, lse = merge_softmax(out, lse, *attention_block(q, k, v, causal=False, with_lse=True))
    return out.type_as(q)


def merge_softmax(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                  lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two key sets from each set's output and log-sum-exp of its
    scores (B, Tq, H): softmax over both = each set's softmax weighted by exp(lse - lse_both)."""
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a * (lse_a - lse).exp()[..., None] + out_b * (lse_b - lse).exp()[..., None]
    return out, lse


def attention_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    with_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 over one block of keys, aligned bottom-right if causal, otherwise every key is
    visible. With with_lse: (float32 output, log-sum-exp of the scores (B, Tq, H))."""
    if flash_attn_applies(q):  # (B, T, H, |D|) as flash-attn wants; it handles GQA
        if not with_lse:
            return flash_attn_func(q, k, v, causal=causal)
        out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)  # lse (B, H, Tq)
        return out.float(), lse.transpose(1, 2)
    Tq, Tk = q.shape[1], k.shape[1]
    # a prefill chunk after a cached prefix on the CPU, where SDPA would build its Tq x Tk mask
    if with_lse or (q.is_cpu and causal and 1 < Tq < Tk):
        out, lse = attention_with_lse(q, k, v, causal)
        return (out, lse) if with_lse else out.type_as(q)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    if Tq == 1 or not causal:  # nothing to mask (one new token attends to everything cached)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    elif Tq == Tk:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:  # a prefill chunk after a cached prefix (GPU): causal mask aligned to the bottom right
        from torch.nn.attention.bias import causal_lower_right  # imported here: it loads torch._dynamo (seconds)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Tq, Tk), enable_gqa=gqa)
    return out.transpose(1, 2)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 over one block, with the log-sum-exp of its scores (B, Tq, H), for blocks without
    flash-attn (SDPA does not return the log-sum-exp). A causal block whose queries are only its
    last Tq positions is two blocks: the keys before the queries, which every query sees, and the
    queries' own positions, a square causal block; no Tq x Tk mask is ever built."""
    Tq, Tk = q.shape[1], k.shape[1]
    causal = causal and Tq > 1  # one query sees every key
    if causal and Tq != Tk:
        split = Tk - Tq  # the queries' own positions start here
        out, lse = attention_with_lse(q, k[:, split:], v[:, split:], causal=True)
        return merge_softmax(out, lse, *attention_with_lse(q, k[:, :split], v[:, :split], causal=False))
    if q.is_cpu:  # ATen's CPU flash kernel, the one SDPA runs here, also returns the log-sum-exp
        group = q.shape[2] // k.shape[2]
        q, k, v = (t.transpose(1, 2) for t in (q, k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=causal)
        return out.transpose(1, 2).float(), lse.transpose(1, 2).float()
    return attention_with_lse_tiles(q, k, v, causal)


SCORES_PER_TILE = 1 << 24  # float32 scores at a time in attention_with_lse_tiles (64 MiB)


def attention_with_lse_tiles(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_with_lse written out, for devices without flash-attn other than the CPU:
    queries in tiles so that no more than SCORES_PER_TILE scores exist at once."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    q = q.view(B, Tq, Hkv, H // Hkv, D).permute(0, 2, 3, 1, 4)  # (B, Hkv, group, Tq, D)
    k, v = k.permute(0, 2, 1, 3)[:, :, None], v.permute(0, 2, 1, 3)[:, :, None]  # (B, Hkv, 1, Tk, D)
    tile = max(1, SCORES_PER_TILE // (B * H * Tk))
    outs, lses = [], []
    for a in range(0, Tq, tile):
        scores = (q[..., a:a + tile, :] @ k.transpose(-1, -2)).float() / math.sqrt(D)
        if causal:  # query i sees key j <= i + Tk - Tq
            rows = torch.arange(a, min(a + tile, Tq), device=q.device)[:, None]
            scores = scores.masked_fill(torch.arange(Tk, device=q.device) > rows + Tk - Tq, float("-inf"))
        lse = scores.logsumexp(-1)
        outs.append(((scores - lse[..., None]).exp().to(v.dtype) @ v).float())
        lses.append(lse)
    out, lse = torch.cat(outs, -2), torch.cat(lses, -1)  # (B, Hkv, group, Tq, D), (B, Hkv, group, Tq)
    return out.permute(0, 3, 1, 2, 4).reshape(B, Tq, H, D), lse.permute(0, 3, 1, 2).reshape(B, Tq, H)


ROTATE_BLOCK = 8192  # pre-RoPE keys rotated (and attended) at a time


class LayerCache:
    """One layer's keys and values for a batch of sequences.

    `update` stores the new tokens' keys and values and returns every key and value so far,
    keys rotated at the s of this forward pass. Sec. 3.3 lives there: under Dynamic Scaling s
    changes with the sequence length and so does the rotation of every cached key, so the cache
    keeps keys BEFORE RoPE and rotates all of them at every forward pass, a block of
    ROTATE_BLOCK positions at a time, each block just before `attention` reads it. So the cache
    costs its keys and values and one rotated block (Llama 2 7B at 128k: 64 GiB + 64 MiB). A
    float32 decoding step on the CPU rotates them inside attention instead (decode_kernel.py).

    With a static method s never changes, so keys are stored already rotated. pre_rope=False
    does that even under Dynamic Scaling, as Hugging Face, vLLM and the authors' code do, so
    that old keys keep a stale s: `generate(cache="rotated")` uses it to measure that bug.

    The tensors have room for `capacity` positions; KVCache.make_room grows them (`grow`).
    """

    def __init__(self, batch_size: int, n_kv_heads: int, head_dim: int, pre_rope: bool,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.keys = torch.zeros((batch_size, 0, n_kv_heads, head_dim), device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.pre_rope = pre_rope

    def grow(self, capacity: int) -> None:
        """Room for `capacity` positions, keeping the ones stored. One buffer at a time, each old
        one freed as soon as it is copied: growing a whole cache needs one old buffer on top."""
        def grown(t: torch.Tensor) -> torch.Tensor:
            new = t.new_zeros((t.shape[0], capacity, *t.shape[2:]))
            new[:, :t.shape[1]] = t
            return new
        self.keys = grown(self.keys)
        self.values = grown(self.values)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor, rotation: Rotation) -> Iterable[KeysValues]:
        """Store k, v (B, T, Hkv, |D|, keys not rotated yet) at positions start..start+T-1;
        return the (keys, values) blocks of positions 0..start+T-1 for `attention`."""
        B, T = k.shape[:2]
        end = start + T
        self.values[:B, start:end] = v
        if not self.pre_rope:  # s never changes for these keys: rotate each once, on arrival
            self.keys[:B, start:end] = apply_rope(k, rotation.new)
            return [(self.keys[:B, :end], self.values[:B, :end])]
        self.keys[:B, start:end] = k  # Sec. 3.3: cache keys before RoPE
        return PreRopeKeys(self.keys[:B, :end], self.values[:B, :end], start, rotation.table)


@dataclass
class PreRopeKeys:
    """Every key so far BEFORE RoPE, the values, and the table that rotates them at this pass's s
    (Sec. 3.3). Iterating gives what `attention` reads: the keys rotated block by block, first
    the block holding the new tokens (from `start`), then the earlier ones."""

    keys: torch.Tensor    # (B, end, Hkv, |D|)
    values: torch.Tensor
    start: int
    table: torch.Tensor   # rotation_table rows 0..end-1 at this pass's s

    def __iter__(self) -> Iterator[KeysValues]:
        end = self.keys.shape[1]
        last = self.start - self.start % ROTATE_BLOCK
        spans = [(last, end)] + [(a, min(a + ROTATE_BLOCK, last)) for a in range(0, last, ROTATE_BLOCK)]
        for a, b in spans:
            yield apply_rope(self.keys[:, a:b], self.table[a:b]), self.values[:, a:b]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, rotation: Rotation, cache: Optional[LayerCache] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q = apply_rope(q, rotation.new)
        if cache is None:
            blocks = [(apply_rope(k, rotation.new), v)]
        else:  # every key so far, rotated at this pass's s (Sec. 3.3 lives in the cache)
            blocks = cache.update(rotation.start, k, v, rotation)
        out = attention(q, blocks)
        return self.wo(out.reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, rotation: Rotation, cache: Optional[LayerCache] = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rotation, cache)
        return h + self.feed_forward(self.ffn_norm(h))


CACHE_CHUNK = 4096  # positions a KV cache first makes room for; it doubles from there as the sequence grows


class KVCache:
    """The KV cache of a whole model (one LayerCache per layer) and how far they are filled.

    It holds at most max_len positions, but makes room only as the sequence grows (make_room),
    so memory follows the tokens that exist, not the most that were asked for: a request for
    300000 new tokens that stops at EOS after 255 costs what 255 cost."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, mode: str = "pre-rope"):
        if mode not in ("pre-rope", "rotated"):
            raise ValueError(f"cache mode: {mode!r}; allowed: pre-rope, rotated")
        pre_rope = mode == "pre-rope" and args.rope.dynamic  # static methods: rotated keys are exact
        self.layers = [LayerCache(batch_size, args.n_kv_heads, args.head_dim, pre_rope, device, dtype)
                       for _ in range(args.n_layers)]
        self.max_len = max_len
        self.capacity = 0    # positions the layers have room for
        self.length = 0      # positions filled
        self.scale = None    # s of the last forward pass
        self._s0_table = None  # (RopeConfig, rotation_table at its s0 for `capacity` positions)

    def reset(self) -> None:
        self.length, self.scale = 0, None

    def make_room(self, end: int) -> None:
        """Room for positions 0..end-1. The capacity at least doubles each time it grows (from
        CACHE_CHUNK, up to max_len), so a sequence of n tokens copies the cache about
        log2(n / CACHE_CHUNK) times, and holds at most twice the room it uses."""
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.length} used, "
                             f"{end - self.length} more requested")
        if end > self.capacity:
            self.capacity = min(self.max_len, max(end, 2 * self.capacity, CACHE_CHUNK))
            for layer in self.layers:
                layer.grow(self.capacity)

    def s0_table(self, rope: RopeConfig, head_dim: int, device: torch.device | str | None) -> torch.Tensor:
        """rotation_table of the cache's positions at s0 = rope.scale, the s of every static
        method (and of Dynamic Scaling up to L s0): computed once per RoPE setting and capacity,
        then sliced by each forward pass instead of recomputing cos/sin for every new token."""
        made_for = self._s0_table[0] if self._s0_table is not None else None
        if made_for is not rope and made_for != rope or len(self._s0_table[1]) < self.capacity:
            # `is` first: the common case, and torch.compile-friendly
            self._s0_table = (rope, rotation_table(rope, head_dim, self.capacity, rope.scale, device))
        return self._s0_table[1]


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
        # the generator lives where the weights do (normal_ on CUDA refuses a CPU generator);
        # weights on the meta device have no values to draw
        device = next(self.parameters()).device
        gen = None if seed is None or device.type == "meta" else torch.Generator(device).manual_seed(seed)
        for name, p in self.named_parameters():
            self.init_parameter(name, p, std, gen)

    def init_parameter(self, name: str, p: torch.Tensor, std: float = 0.02,
                       generator: Optional[torch.Generator] = None) -> None:
        """init_weights' rule for one parameter (named as in named_parameters)."""
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        else:
            out_proj = name.endswith(("wo.weight", "w2.weight"))
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.args.n_layers) if out_proj else std, generator=generator)

    def rotation(self, start: int, T: int, cache: Optional[KVCache] = None,
                 scale_length: Optional[int] = None) -> Rotation:
        """RoPE for a forward pass over T new tokens at positions start..start+T-1."""
        end = start + T
        # Sec. 3.3: s follows the length of the sequence this forward pass sees
        s = effective_scale(self.rope, scale_length if scale_length is not None else end)
        device = self.tok_embeddings.weight.device
        if cache is not None and s == self.rope.scale:  # s at its floor: one table for the whole cache
            return Rotation(s, start, cache.s0_table(self.rope, self.args.head_dim, device)[:end])
        return Rotation(s, start, rotation_table(self.rope, self.args.head_dim, end, s, device))

    def hidden_states(self, tokens: torch.Tensor, cache: Optional[KVCache] = None,
                      scale_length: Optional[int] = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, dim) of the T new tokens.

        With a cache, the tokens continue the cached sequence and the cache is extended.
        scale_length overrides the length that sets the dynamic scale (chunked prefill uses
        the whole prompt's length so that every chunk sees the same s as one big forward)."""
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        self.check_length(start + T)
        if cache is not None:
            cache.make_room(start + T)
        rotation = self.rotation(start, T, cache, scale_length)
        layer_caches = cache.layers if cache is not None else [None] * len(self.layers)
        h = self.tok_embeddings(tokens)
        for layer, layer_cache in zip(self.layers, layer_caches):
            if self.activation_checkpointing and self.training and cache is None:
                h = checkpoint(layer, h, rotation, use_reentrant=False)
            else:
                h = layer(h, rotation, layer_cache)
        if cache is not None:
            cache.length += T
            cache.scale = rotation.scale
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


IGNORE_INDEX = -100   # targets that take no part in the loss (F.cross_entropy's default)
LOSS_CHUNK = 2048     # tokens per chunk of logits: 2048 x 32000 float32 is 262 MB


def _chunk_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed -log p(target) of one chunk of logits (N, vocab), and log p itself (float32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return -torch.where(targets != IGNORE_INDEX, picked, 0.0).sum(), logp


def _chunk_gradient(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d(-log p(target)) / d logits = softmax(logits) - onehot(target), built in place over logp;
    rows whose target is ignored get no gradient. Masks rather than boolean indexing, so that no
    shape depends on the data (no GPU sync; runs on the meta device)."""
    index = targets.clamp(min=0).unsqueeze(1)
    grad = logp.exp_()
    grad.scatter_add_(1, index, grad.new_full(index.shape, -1.0))
    return grad.masked_fill_((targets == IGNORE_INDEX).unsqueeze(1), 0.0)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the logits h W^T (h: N x dim, W: vocab x dim) against targets (N,),
    chunk by chunk, with its gradients made in the same pass.

    While a chunk's logits exist, forward turns them into their gradient (_chunk_gradient) and
    multiplies it into the chunk's share of dL/dh and dL/dW. Backward only scales those by the
    incoming gradient: nothing is recomputed, and one chunk's float32 logits is the most the loss
    holds at a time. (torch.utils.checkpoint per chunk would run the output projection and the
    softmax twice; keeping every chunk's logits would hold N x vocab floats.)"""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for a in range(0, h.shape[0], chunk_size):
            total += _LinearCrossEntropy.chunk(h[a:a + chunk_size], weight, targets[a:a + chunk_size],
                                               None if grad_h is None else grad_h[a:a + chunk_size], grad_weight)
        ctx.save_for_backward(grad_h, grad_weight)
        return total

    @staticmethod
    def chunk(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grad_h: Optional[torch.Tensor],
              grad_weight: Optional[torch.Tensor]) -> torch.Tensor:
        """One chunk's summed loss; writes its dL/dh into grad_h, adds its dL/dW to grad_weight."""
        nll, logp = _chunk_nll(h @ weight.t(), targets)
        grad = _chunk_gradient(logp, targets).to(weight.dtype)
        if grad_h is not None:
            grad_h.copy_(grad @ weight)
        if grad_weight is not None:
            # not addmm_: in-place ops escape autocast, and this product must run in bf16 like
            # every other matmul of a bf16 step (autocast keeps float32 masters and grad_weight)
            grad_weight += grad.t() @ h
        return nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], None, None]:
        # scaled in place: a copy would add an N x dim tensor at the peak of training (all
        # activations alive). A second backward through the loss is then refused by autograd's
        # check on modified saved tensors.
        grad_h, grad_weight = ctx.saved_tensors
        return (None if grad_h is None else grad_h.mul_(grad_total.to(grad_h.dtype)),
                None if grad_weight is None else grad_weight.mul_(grad_total.to(grad_weight.dtype)), None, None)


def chunked_cross_entropy(output: nn.Linear, h: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int = LOSS_CHUNK) -> torch.Tensor:
    """Mean cross-entropy of output(h) (B, T, vocab) against targets (B, T), targets == -100 ignored.

    The B x T tokens are flattened and cut into chunks of chunk_size tokens, so that one chunk's
    logits (chunk_size x vocab, float32) is the most that exists at a time, whatever B and T.
    With gradients wanted, each chunk's gradients are made while its logits exist
    (_LinearCrossEntropy); nothing is kept for, or recomputed in, backward."""
    h, targets = h.flatten(0, 1), targets.flatten()
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    if torch.is_grad_enabled() and (h.requires_grad or output.weight.requires_grad):
        total = _LinearCrossEntropy.apply(h, output.weight, targets, chunk_size)
    else:
        total = sum(_chunk_nll(output(h_chunk), t_chunk)[0]
                    for h_chunk, t_chunk in zip(h.split(chunk_size), targets.split(chunk_size)))
    return total / count
