"""Bytes one decode step moves, counted on the meta device: static YaRN against Dynamic-YaRN.

    python bench/decode_traffic.py                    # Llama 2 7B, bf16, 131072 cached positions
    python bench/decode_traffic.py --dim 64 --n-layers 2 --n-heads 4 --vocab-size 96 --context 4096

Nothing is computed and nothing is allocated: the model and its KV cache live on the meta
device, and a dispatch mode sees every op of one decode step (one new token after `context`
cached positions). Every op that is not a view counts the bytes of its tensor inputs and
outputs, as a kernel that reads its inputs and writes its outputs once would move them. A
chain of elementwise ops therefore pays for every intermediate, and a fused op (rope_op)
pays once. This is a model of the traffic on a GPU, not a measurement: it counts neither
cache hits nor kernels that read an input twice.

The floor for any decode step is reading every weight once and every cached key and value
once; static YaRN is near it. Dynamic-YaRN must rotate every cached key at the current s
(Sec. 3.3): read the pre-RoPE keys, write the rotated ones, and attention reads them back,
so its floor without a rotation fused into attention is the weights + 2x the KV cache.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from yarn_minimal.model import KVCache, ModelArgs, Transformer  # noqa: E402
from yarn_minimal.rope import RopeConfig  # noqa: E402

GiB = 2 ** 30


class TrafficCounter(TorchDispatchMode):
    """Sums the bytes of the tensor inputs and outputs of every non-view op."""

    def __init__(self):
        super().__init__()
        self.bytes, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            self.ops += 1
        return out


def meta_model(args: ModelArgs, dtype: torch.dtype) -> Transformer:
    with torch.device("meta"):
        return Transformer(args).to(dtype).eval()


def llama2_7b(rope: RopeConfig) -> ModelArgs:
    return ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, rope=rope)


def weight_bytes(model: Transformer) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes(args: ModelArgs, positions: int, dtype: torch.dtype) -> int:
    """Keys and values of every layer: 2 x layers x positions x kv heads x |D| x element size."""
    return 2 * args.n_layers * positions * args.n_kv_heads * args.head_dim * dtype.itemsize


@torch.inference_mode()
def decode_traffic(args: ModelArgs, context: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Bytes and ops of one decode step after `context` cached positions."""
    model = meta_model(args, dtype)
    cache = KVCache(args, 1, context + 1, device="meta", dtype=dtype)
    cache.make_room(context + 1)  # room for the cached positions and the new token
    cache.length = context  # contents do not matter on the meta device
    cache.s0_table(args.rope, args.head_dim, "meta")  # made once per generation, not per step
    token = torch.zeros((1, 1), dtype=torch.long, device="meta")
    with TrafficCounter() as counter:
        model(token, cache=cache, last_only=True)
    return dict(bytes=counter.bytes, ops=counter.ops, scale=cache.scale,
                weights=weight_bytes(model), kv=kv_bytes(args, context + 1, dtype))


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The model-shape flags of both meta-device benches (defaults: Llama 2 7B)."""
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--n-layers", type=int, default=32)
    p.add_argument("--n-heads", type=int, default=32)
    p.add_argument("--n-kv-heads", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=32000)


def shape_args(a: argparse.Namespace, rope: RopeConfig) -> ModelArgs:
    return ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                     vocab_size=a.vocab_size, rope=rope)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(p)
    p.add_argument("--context", type=int, default=131072 - 1, help="cached positions (default 131071)")
    p.add_argument("--original-length", type=int, default=4096, help="L (default 4096)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    L = a.original_length
    s = (a.context + 1) / L
    ropes = {f"static YaRN s={s:g}": RopeConfig(method="yarn", scale=max(s, 1.0), original_length=L),
             "Dynamic-YaRN": RopeConfig(method="yarn", dynamic=True, original_length=L)}
    rows = {}
    for name, rope in ropes.items():
        args = shape_args(a, rope)
        rows[name] = decode_traffic(args, a.context, dtype)
    static, dynamic = rows.values()
    if a.json:
        print(json.dumps(dict(rows, ratio=dynamic["bytes"] / static["bytes"])))
        return
    print(f"# one decode step after {a.context} cached positions; dim {a.dim}, {a.n_layers} layers, "
          f"{a.n_heads} heads, {a.dtype}; weights {static['weights'] / GiB:.2f} GiB, "
          f"K + V {static['kv'] / GiB:.2f} GiB")
    print(f"{'':<24} {'GiB moved':>10} {'ops':>6} {'/ (weights + K + V)':>20}")
    for name, r in rows.items():
        print(f"{name:<24} {r['bytes'] / GiB:>10.2f} {r['ops']:>6} {r['bytes'] / (r['weights'] + r['kv']):>20.2f}")
    print(f"Dynamic-YaRN / static: {dynamic['bytes'] / static['bytes']:.2f}x")


if __name__ == "__main__":
    main()
