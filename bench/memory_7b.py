"""Peak memory of `generate` for Llama 2 7B at 128k tokens, tracked on the meta device.

    python bench/memory_7b.py                                  # 7B shapes, bf16, 131072 tokens
    python bench/memory_7b.py --dim 64 --n-layers 2 --n-heads 4 --vocab-size 96 --prompt-len 4000

Nothing is computed: the model lives on the meta device and a dispatch mode keeps every
storage alive in a table, adding its bytes when an op creates it and removing them when
Python frees it, so the peak is the largest sum of live tensors, as torch's CUDA allocator
would count them (without its rounding and fragmentation). flash-attn is replaced by a
stand-in that checks its calling contract and allocates what flash-attn allocates (the
output and the log-sum-exp), so the shapes of the CUDA path are the ones measured.

The floor is the weights plus the K and V buffers (7B: 12.55 + 64 GiB = 76.55 GiB); what
is above it is the work of one forward pass (activations, the rotation table, and under
Dynamic Scaling one block of rotated keys).
"""
from __future__ import annotations

import argparse
import json
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yarn_minimal.generation as generation  # noqa: E402
import yarn_minimal.attention as attention_module  # noqa: E402
from decode_traffic import GiB, add_shape_args, kv_bytes, meta_model, shape_args, weight_bytes  # noqa: E402
from yarn_minimal.model import ModelArgs  # noqa: E402
from yarn_minimal.rope import RopeConfig  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """The bytes of all live storages that ops created (plus those handed to `track`), and
    their peak."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = 0, 0
        self._seen = weakref.WeakSet()

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        self._seen.add(storage)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, storage.nbytes())

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def flash_attn_stand_in(q, k, v, causal=False, return_attn_probs=False):
    """flash_attn_func's contract: (B, T, H, |D|) inputs of one half-precision dtype, H a
    multiple of the key heads; returns the output and, if asked, the log-sum-exp (B, H, Tq)."""
    B, Tq, H, D = q.shape
    assert k.shape == v.shape and k.shape[0] == B and k.shape[3] == D and H % k.shape[2] == 0
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16)
    out = torch.empty_like(q)
    if return_attn_probs:
        return out, torch.empty((B, H, Tq), dtype=torch.float32, device=q.device), None
    return out


@torch.inference_mode()
def peak_memory(args: ModelArgs, prompt_len: int, new_tokens: int, prefill_chunk: int = 4096,
                dtype: torch.dtype = torch.bfloat16) -> dict:
    """Peak live bytes through generate(prompt_len tokens, new_tokens) on the meta device."""
    saved = attention_module.flash_attn_func, attention_module.FLASH_DEVICES, generation.sample
    attention_module.flash_attn_func, attention_module.FLASH_DEVICES = flash_attn_stand_in, {"meta"}
    generation.sample = lambda logits, *a, **kw: 0  # a meta tensor has no values to sample from
    try:
        with LiveBytes() as live:
            model = meta_model(args, dtype)
            for p in model.parameters():
                live.track(p)
            generation.generate(model, [1] * prompt_len, new_tokens, prefill_chunk=prefill_chunk)
    finally:
        attention_module.flash_attn_func, attention_module.FLASH_DEVICES, generation.sample = saved
    floor = weight_bytes(model) + kv_bytes(args, prompt_len + new_tokens, dtype)
    return dict(peak=live.peak, floor=floor, weights=weight_bytes(model))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(p)
    p.add_argument("--prompt-len", type=int, default=131072 - 16, help="default 131056")
    p.add_argument("--new-tokens", type=int, default=16, help="default 16 (prompt + new = 131072)")
    p.add_argument("--prefill-chunk", type=int, default=4096)
    p.add_argument("--original-length", type=int, default=4096, help="L (default 4096)")
    p.add_argument("--scale", type=float, default=32.0, help="s of static YaRN (default 32)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = p.parse_args(argv)
    L = a.original_length
    ropes = {f"static YaRN s={a.scale:g}": RopeConfig(method="yarn", scale=a.scale, original_length=L),
             "Dynamic-YaRN": RopeConfig(method="yarn", dynamic=True, original_length=L)}
    rows = {}
    for name, rope in ropes.items():
        args = shape_args(a, rope)
        rows[name] = peak_memory(args, a.prompt_len, a.new_tokens, a.prefill_chunk)
    if a.json:
        print(json.dumps(rows))
        return
    total = a.prompt_len + a.new_tokens
    print(f"# generate: {a.prompt_len} prompt + {a.new_tokens} new = {total} tokens, prefill chunks of "
          f"{a.prefill_chunk}; dim {a.dim}, {a.n_layers} layers, bf16, flash-attn stand-in")
    print(f"{'':<22} {'peak GiB':>9} {'floor GiB':>10} {'above floor':>12}")
    for name, r in rows.items():
        print(f"{name:<22} {r['peak'] / GiB:>9.2f} {r['floor'] / GiB:>10.2f} {(r['peak'] - r['floor']) / GiB:>12.2f}")


if __name__ == "__main__":
    main()
