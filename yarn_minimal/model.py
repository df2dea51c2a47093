"""Llama 2, written to read like Meta's reference model, with the YaRN paper's RoPE methods.

Parameter names are Meta's checkpoint keys (tok_embeddings, layers.N.attention.wq, ...), and
RoPE uses Meta's interleaved convention: dimensions (2d, 2d+1) of a head form the complex
number of frequency pair d (Eq. 3 and Eq. 4). Raw Llama 2 weights therefore load without renaming.

The only place the extension methods enter is `Transformer.rotation`, which asks rope.py for
float32 cos/sin tables at the scale s in effect (Sec. 3.3) and turns them into the complex
rotation e^{i m theta} that `rotate_pairs` multiplies by (Eq. 5). Everything after it
(attention.py, loss.py) is method-agnostic, which is the point of the "length scaling" trick of
Sec. 3.4. The KV cache knows one thing about the methods: whether s can change (Sec. 3.3), in
which case it keeps keys before RoPE (`LayerCache.update`, `CachedKeys`).

Faster forms of the same arithmetic live in fast/: this file names the three it uses (the fused
RoPE op on `rotate_pairs`, the two-factor table in `Transformer.rotation`, and `fast.Linear`:
nn.Linear without bias, whose one-token float32 steps on the CPU run in C); the C kernel for the
CPU decoding step's attention is chosen in attention.py, and `CachedKeys` says when it takes over.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fast
from .attention import KeysValues, attention
from .loss import cross_entropy
from .rope import RopeConfig, check_head_dim, effective_scale, is_int, is_number, rope_tables


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
    tie_word_embeddings: bool = False  # output shares the embedding's tensor (SmolLM2); Llama 2 does not tie

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
    i sin from rope.rope_tables, which already carry YaRN's sqrt(1/t) (Eq. 22, Sec. 3.4)."""
    return torch.complex(*rope_tables(rope, head_dim, torch.arange(end), scale, device=device))


@fast.fused_rope  # on CUDA and under torch.compile, this body runs as one fused op (fast/rope_op.py)
def rotate_pairs(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Eq. 5: f(x_m, m) = e^{i m theta} x_m, where each interleaved pair (x_2d, x_2d+1) of a
    head is one complex number (Eq. 3 and Eq. 4). x is (B, T, H, |D|) in the model's dtype, rotation
    the (T, |D|/2) rows of `rotation_table` for x's positions; the result has x's dtype."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation[:, None]).flatten(-2).type_as(x)


@dataclass
class Rotation:
    """RoPE for one forward pass: the scale s in effect (Sec. 3.3) and `rotation_table` at
    that s for positions 0..end-1, where the pass's T new tokens are the last T positions."""

    scale: float
    start: int            # position of the first new token
    table: torch.Tensor   # complex64 (end, |D|/2)

    @property
    def new(self) -> torch.Tensor:  # a property, not a field: FSDP2 rebuilds dataclass arguments (training.py)
        """The rows of the new tokens."""
        return self.table[self.start:]


ROTATE_BLOCK = 8192  # pre-RoPE keys rotated (and attended) at a time


class LayerCache:
    """One layer's keys and values for a batch of sequences.

    `update` stores the new tokens' keys and values and returns every key and value so far,
    keys rotated at the s of this forward pass. Sec. 3.3 lives there: under Dynamic Scaling s
    changes with the sequence length and so does the rotation of every cached key, so the cache
    keeps keys BEFORE RoPE and rotates all of them at every forward pass, a block of
    ROTATE_BLOCK positions at a time, each block just before `attention` reads it. So the cache
    costs its keys and values and one rotated block (Llama 2 7B at 128k: 64 GiB + 64 MiB).

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

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor, rotation: Rotation) -> CachedKeys:
        """Store k, v (B, T, Hkv, |D|, keys not rotated yet) at positions start..start+T-1;
        return the keys and values of positions 0..start+T-1, which `attention` reads."""
        B, T = k.shape[:2]
        end = start + T
        self.values[:B, start:end] = v
        if not self.pre_rope:  # s never changes for these keys: rotate each once, on arrival
            self.keys[:B, start:end] = rotate_pairs(k, rotation.new)
            return CachedKeys(self.keys[:B, :end], self.values[:B, :end], start, table=None)
        self.keys[:B, start:end] = k  # Sec. 3.3: cache keys before RoPE
        return CachedKeys(self.keys[:B, :end], self.values[:B, :end], start, rotation.table)


@dataclass
class CachedKeys:
    """Every key and value so far, as `attention` reads them. Under Dynamic Scaling the keys are
    kept BEFORE RoPE with the table that rotates them at this pass's s (Sec. 3.3), and iterating
    rotates them block by block: first the block holding the new tokens (from `start`), then the
    earlier ones. With a static method they are rotated already (table None): one block.

    A float32 decoding step on the CPU reads keys, values and table directly instead, in one C
    kernel that rotates each key as it reads it (fast/decode_kernel.py; the same numbers within
    float32 rounding). To step through this reference there, set YARN_MINIMAL_CPU_KERNEL=0."""

    keys: torch.Tensor    # (B, end, Hkv, |D|)
    values: torch.Tensor
    start: int
    table: Optional[torch.Tensor]  # rotation_table rows 0..end-1 at this pass's s, or None

    def __iter__(self) -> Iterator[KeysValues]:
        if self.table is None:
            yield self.keys, self.values
            return
        end = self.keys.shape[1]
        last = self.start - self.start % ROTATE_BLOCK
        spans = [(last, end)] + [(a, min(a + ROTATE_BLOCK, last)) for a in range(0, last, ROTATE_BLOCK)]
        for a, b in spans:
            yield rotate_pairs(self.keys[:, a:b], self.table[a:b]), self.values[:, a:b]


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
        if (made_for is not rope and made_for != rope) or len(self._s0_table[1]) < self.capacity:
            # `is` first: the common case, and torch.compile-friendly
            self._s0_table = (rope, rotation_table(rope, head_dim, self.capacity, rope.scale, device))
        return self._s0_table[1]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = fast.Linear(args.dim, args.n_heads * args.head_dim)
        self.wk = fast.Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wv = fast.Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wo = fast.Linear(args.n_heads * args.head_dim, args.dim)

    def forward(self, x: torch.Tensor, rotation: Rotation, cache: Optional[LayerCache] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q = rotate_pairs(q, rotation.new)
        if cache is None:
            blocks = [(rotate_pairs(k, rotation.new), v)]
        else:  # every key so far, rotated at this pass's s (Sec. 3.3 lives in the cache)
            blocks = cache.update(rotation.start, k, v, rotation)
        out = attention(q, blocks)
        return self.wo(out.reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = fast.Linear(args.dim, hidden)
        self.w2 = fast.Linear(hidden, args.dim)
        self.w3 = fast.Linear(args.dim, hidden)

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


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = fast.Linear(args.dim, args.vocab_size)
        if args.tie_word_embeddings:  # one tensor, as the checkpoint stores it
            self.output.weight = self.tok_embeddings.weight
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

    def rotation(self, start: int, T: int, cache: Optional[KVCache] = None,
                 scale_length: Optional[int] = None) -> Rotation:
        """RoPE for a forward pass over T new tokens at positions start..start+T-1."""
        end = start + T
        # Sec. 3.3: s follows the length of the sequence this forward pass sees
        s = effective_scale(self.rope, scale_length if scale_length is not None else end)
        device = self.tok_embeddings.weight.device
        if cache is not None and s == self.rope.scale:  # s at its floor: one table for the whole cache
            return Rotation(s, start, cache.s0_table(self.rope, self.args.head_dim, device)[:end])
        if cache is not None:  # Dynamic Scaling past L s0 with a cache: a new table every step, built fast
            return Rotation(s, start, fast.rotation_table(self.rope, self.args.head_dim, end, s, device))
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
        With targets (B, T) it returns the mean next-token loss instead (loss.py: in chunks, so
        that no (T, vocab) float32 tensor exists at once; targets == -100 are ignored)."""
        h = self.hidden_states(tokens, cache, scale_length)
        if targets is not None:
            return cross_entropy(self.output, h, targets)
        if last_only:
            h = h[:, -1:]
        return self.output(h)
