"""Eq. 2, softmax(q k^T / sqrt(|D|)) v, as the model runs it. model.py calls `attention(q, blocks)`
and needs nothing else from here.

The reference is SDPA over one block of keys and, for blocks with their log-sum-exp,
`attention_with_lse_tiles` (scores written out, a tile of queries at a time). The other forms
compute the same thing faster or in less memory: flash-attn on CUDA (bf16/fp16, optional, from
2.1 on for its bottom-right causal mask), ATen's CPU flash kernel (which also returns the
log-sum-exp), and the C kernel of fast/decode_kernel.py for a float32 decoding step on the CPU.
Keys may come in several blocks (the pre-RoPE cache rotates its keys a block at a time,
model.CachedKeys): each block is attended on its own and the softmaxes are merged through their
log-sum-exp, as flash-decoding does. tests/test_model.py checks every form against attention
written out in float64.
"""
from __future__ import annotations

import itertools
import math
import re
import warnings
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from .fast import decode_kernel

KeysValues = tuple[torch.Tensor, torch.Tensor]  # one block of keys and values, each (B, T, Hkv, |D|)


def attention(q: torch.Tensor, blocks: Iterable[KeysValues]) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(|D|)) v (Eq. 2), where the Tq queries are the LAST Tq
    positions of the keys. Shapes (B, T, H, |D|); k and v may have fewer (grouped) heads.

    The keys and values come as (k, v) blocks, usually one. The first block holds the queries'
    own positions and ends with them (causal, aligned bottom-right); any further block lies
    entirely before them. Each block is attended on its own and the blocks' softmaxes are
    merged through their log-sum-exp (as flash-decoding does), so that only one block needs to
    exist at a time: the pre-RoPE cache rotates its keys a block at a time (model.CachedKeys).
    Never builds a Tq x Tk score or mask tensor at long context."""
    # a float32 decoding step on the CPU over a cache: the C kernel reads the cache's keys, values
    # and rotation table directly (the rule, and why, are in fast/decode_kernel.py)
    if decode_kernel.applies(q, blocks):
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


# ---------------------------------------------------------------------------------------
# flash-attn (optional; CUDA machines only, docs/install.md)

FLASH_ATTN_MIN = (2, 1)  # before 2.1, flash-attn aligns the causal mask top-left when Tq != Tk


def flash_attn_version_ok(version: str) -> bool:
    """Whether this flash-attn aligns the causal mask bottom-right when there are fewer queries
    than keys (a prefill chunk after a cached prefix), as `attention` needs: from 2.1 on."""
    found = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    return found >= FLASH_ATTN_MIN


def load_flash_attn() -> Optional[Callable[..., torch.Tensor]]:
    """flash_attn_func if flash-attn >= 2.1 is installed (optional: CUDA machines only, see
    docs/install.md), else None, with a one-line warning for an older version."""
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


def flash_attn_applies(q: torch.Tensor) -> bool:
    return flash_attn_func is not None and q.device.type in FLASH_DEVICES and q.dtype in (torch.float16, torch.bfloat16)
