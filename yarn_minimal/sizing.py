"""How big a run is, before and while it runs: parameter counts, model FLOPs per token and the
card's peak (for MFU), the per-GPU memory estimate of `train.py --estimate-memory`
(docs/training.md derives every term), the bytes of a KV cache and of a device (generation checks
a request against them), and the peak memory a process has used so far.

Kept apart from training.py so that the training loop's module holds only what the loop runs.
"""
from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Optional

import torch

from .loss import LOSS_CHUNK
from .model import ModelArgs, Transformer

# Llama 2's shapes (params.json), for train.py --model-size (--init random, --estimate-memory)
LLAMA2_SIZES = {
    "7b": dict(dim=4096, n_layers=32, n_heads=32),
    "13b": dict(dim=5120, n_layers=40, n_heads=40),
    "70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3),
}


def count_params(args: ModelArgs) -> dict[str, int]:
    """Parameters of the model model.py builds, by part: the model is made on the meta device
    (no memory) and its numel() summed, so the shapes are said once, in model.py."""
    with torch.device("meta"):
        model = Transformer(args)

    def size(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    # a tied output is the embedding's tensor: counted once, under embedding (parameters() dedups too)
    output = 0 if args.tie_word_embeddings else size(model.output)
    return dict(block=size(model.layers[0]), embedding=size(model.tok_embeddings), output=output,
                norm=size(model.norm), total=size(model))


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward = 3 x forward; activation-checkpoint
    recomputation is not counted, as MFU requires). Matmuls: 6 N (N without the embedding,
    which is a lookup). Causal attention: q k^T and p v cost 2 x 2 |D| H per visible key,
    T/2 keys on average, per layer: 6 x 2 x n_layers x dim x T / 2."""
    n = count_params(args)
    lookup = 0 if args.tie_word_embeddings else n["embedding"]  # a tied embedding is also the output matmul
    return 6 * (n["total"] - lookup) + 6 * args.n_layers * args.dim * seq_len


# Dense bf16 tensor-core peaks (no sparsity), per GPU, from the vendor data sheets.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def peak_flops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """Per-device peak FLOP/s when known (bf16/fp16 on a listed GPU), else None."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def peak_memory(device: torch.device) -> int:
    """Bytes at this process's peak so far: CUDA's max_memory_allocated on a GPU, the peak
    resident set size (RSS) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class StepMeter:
    """What train.py logs of each step's cost: tokens/s, MFU (on a GPU of known peak) and peak memory."""

    def __init__(self, args: ModelArgs, device: torch.device, dtype: torch.dtype, global_batch_size: int,
                 seq_len: int, world_size: int):
        self.device, self.world_size = device, world_size
        self.peak = peak_flops(device, dtype)
        self.flops_token = flops_per_token(args, seq_len - 1)
        self.tokens_step = global_batch_size * (seq_len - 1)  # each sequence trains seq_len - 1 predictions

    def measure(self, seconds: float) -> dict:
        tokens_per_s = self.tokens_step / seconds
        mfu = None if self.peak is None else tokens_per_s * self.flops_token / (self.peak * self.world_size)
        return dict(tokens_per_s=tokens_per_s, mfu=mfu, max_memory_gb=peak_memory(self.device) / 1e9)

    @staticmethod
    def postfix(record: dict) -> dict:
        """The progress bar's fields for one metrics record."""
        shown = dict(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", gnorm=f"{record['grad_norm']:.3f}",
                     tok_s=f"{record['tokens_per_s']:.0f}", mem=f"{record['max_memory_gb']:.1f}GB")
        return shown if record["mfu"] is None else dict(shown, mfu=f"{record['mfu']:.1%}")


def kv_cache_bytes(args: ModelArgs, positions: int, dtype: torch.dtype, batch_size: int = 1) -> int:
    """Bytes of a KVCache (model.py) holding `positions` positions: every layer's keys and values
    (batch x positions x Hkv x |D| each, in the model's dtype) and its rotation table at s0
    (complex64, |D|/2 numbers a position)."""
    keys_values = 2 * args.n_layers * batch_size * args.n_kv_heads * args.head_dim * dtype.itemsize
    return positions * (keys_values + 8 * (args.head_dim // 2))


def format_bytes(n: int) -> str:
    return f"{n / 2**40:.3g} TiB" if n >= 2**40 else f"{n / 2**30:.3g} GiB"


def device_memory(device: torch.device) -> Optional[int]:
    """Total bytes of memory of the device: the GPU's, or for the CPU the machine's RAM (or the
    container's limit when lower); None for other devices (the meta device has no memory)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # cgroup v2: a number, or "max" for no limit
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return ram
    return min(ram, int(limit)) if limit.isdigit() else ram


def estimate_memory(args: ModelArgs, seq_len: int, world_size: int, micro_batch: int = 1,
                    activation_checkpointing: bool = True, compute_bytes: int = 2,
                    loss_chunk: int = LOSS_CHUNK) -> dict:
    """Per-GPU bytes for FSDP2 training (docs/training.md derives every term).

    states       float32 masters + float32 gradients + AdamW m and v: 16 bytes per parameter,
                 sharded over world_size.
    working      unsharded compute-dtype copies of two blocks (the one running and the one
                 prefetched), one block's unsharded float32 gradient for the reduce-scatter,
                 and the root (embedding + output) unsharded with its gradient.
    activations  what autograd keeps per token per layer (model.py with flash-attn/SDPA: no
                 T x T tensor): both RMSNorms keep a float32 copy of their input (4d) and a
                 compute-dtype normalized output and product (2 x b d); RoPE keeps q and k in
                 float32 (4 (dq + dkv)); attention keeps q, k, v and its output (b (2 dq + 2 dkv))
                 and a float32 log-sum-exp per head; SwiGLU keeps w1x, silu(w1x), w3x and their
                 product (4 b h). With checkpointing only each block's input (b d) is kept, plus
                 one block's activations while it is recomputed.
    loss         the final norm's activations, and the logits of one chunk of loss_chunk tokens
                 (of micro_batch x seq_len) at a time: compute dtype, float32, float32 gradient.
    """
    b, d, h, H = compute_bytes, args.dim, args.ffn_hidden_dim, args.n_heads
    dq, dkv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    p = count_params(args)
    tokens = micro_batch * seq_len
    norm = 4 * d + 4 + 2 * b * d
    per_layer = 2 * norm + 4 * (dq + dkv) + b * (2 * dq + 2 * dkv) + 4 * H + 4 * b * h   # bytes per token
    if activation_checkpointing:
        acts = tokens * (args.n_layers * b * d + per_layer)
    else:
        acts = tokens * args.n_layers * per_layer
    root = p["embedding"] + p["output"] + p["norm"]
    out = dict(
        params=4 * p["total"] / world_size,
        grads=4 * p["total"] / world_size,
        adamw=8 * p["total"] / world_size,
        working=2 * b * p["block"] + 4 * p["block"] + (b + 4) * root,
        activations=acts,
        loss=tokens * norm + min(loss_chunk, tokens) * args.vocab_size * (b + 4 + 4),
    )
    out["total"] = sum(out.values())
    out["n_params"] = p["total"]
    out["per_layer_per_token"] = per_layer
    return out


def format_memory_estimate(args: ModelArgs, seq_len: int, world_size: int, micro_batch: int,
                           gpu_memory_gb: float, compute_bytes: int = 2) -> str:
    """The table `train.py --estimate-memory` prints: each term with and without activation
    checkpointing, and whether the total fits."""
    lines = [f"model: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads ({args.n_kv_heads} kv), "
             f"vocab {args.vocab_size}, ffn {args.ffn_hidden_dim}; sequence {seq_len} x micro-batch {micro_batch}; "
             f"{world_size} GPUs (FSDP full shard); per-GPU GB (1 GB = 1e9 bytes):"]
    est = {ac: estimate_memory(args, seq_len, world_size, micro_batch, ac, compute_bytes) for ac in (False, True)}
    lines.append(f"  parameters: {est[True]['n_params'] / 1e9:.2f} B")
    lines.append(f"  {'':34s}{'no checkpointing':>18s}{'checkpointing':>16s}")
    names = {"params": "float32 masters (sharded)", "grads": "float32 gradients (sharded)",
             "adamw": "AdamW m, v (sharded)", "working": "unsharded blocks + root",
             "activations": "activations", "loss": "final norm + loss chunk", "total": "total"}
    for key, label in names.items():
        lines.append(f"  {label:34s}{est[False][key] / 1e9:18.1f}{est[True][key] / 1e9:16.1f}")
    for ac in (False, True):
        fits = est[ac]["total"] <= 0.9 * gpu_memory_gb * 1e9
        lines.append(f"  {'with' if ac else 'without'} activation checkpointing: "
                     f"{'fits' if fits else 'does NOT fit'} in {gpu_memory_gb:g} GB (keeping 10% for the CUDA "
                     f"context, allocator fragmentation and kernel workspaces)")
    return "\n".join(lines)
