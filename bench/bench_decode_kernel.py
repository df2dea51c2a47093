"""One decoding step's attention on the CPU, per layer: static YaRN against Dynamic-YaRN.

    python bench/bench_decode_kernel.py                          # 8 heads of 32, 1k-32k positions
    python bench/bench_decode_kernel.py --heads 32 --kv-heads 8 --head-dim 128 --positions 4096 16384

Four ways to attend one new token's queries to T cached positions, float32, timed in turn
(round-robin, so that a noisy machine slows all alike):
- static, SDPA:     the keys are cached rotated; SDPA reads them (YARN_MINIMAL_CPU_KERNEL=0);
- static, kernel:   the same keys read by fast/decode_kernel.py's C kernel (what static YaRN runs);
- dynamic, PyTorch: the keys are cached before RoPE; rotate them a block at a time (Eq. 5),
                    then SDPA (Dynamic-YaRN without the kernel: YARN_MINIMAL_CPU_KERNEL=0);
- dynamic, kernel:  the kernel, rotating each key as it reads it (what Dynamic-YaRN runs).
All four are attention.attention, the function a decoding step calls.
`--layers` copies of the cache are attended one after another, so that the caches of a whole
model, not one layer's, compete for the CPU's caches as they do in a real step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from yarn_minimal.attention import attention  # noqa: E402
from yarn_minimal.fast import decode_kernel  # noqa: E402
from yarn_minimal.model import CachedKeys  # noqa: E402


def measure(positions: int, heads: int, kv_heads: int, head_dim: int, layers: int, rounds: int) -> dict:
    """Seconds per layer of each way (best and median over rounds), and their largest difference."""
    caches = [(torch.randn(1, positions, kv_heads, head_dim), torch.randn(1, positions, kv_heads, head_dim))
              for _ in range(layers)]
    q = torch.randn(1, 1, heads, head_dim)
    table = torch.polar(torch.ones(positions, head_dim // 2), torch.rand(positions, head_dim // 2) * 6.28)
    # attention() itself: given a plain iterator of blocks it takes the PyTorch path
    ways = {
        "static, SDPA": lambda k, v: attention(q, iter(CachedKeys(k, v, positions - 1, None))),
        "static, kernel": lambda k, v: attention(q, CachedKeys(k, v, positions - 1, None)),
        "dynamic, PyTorch": lambda k, v: attention(q, iter(CachedKeys(k, v, positions - 1, table))),
        "dynamic, kernel": lambda k, v: attention(q, CachedKeys(k, v, positions - 1, table)),
    }
    k, v = caches[0]
    outs = [way(k, v) for way in ways.values()]  # also the warm-up (and the kernel's build)
    times = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            start = time.perf_counter()
            for k, v in caches:
                way(k, v)
            times[name].append((time.perf_counter() - start) / layers)
    result = {name: (min(t), statistics.median(t)) for name, t in times.items()}
    result["max |kernel - PyTorch|"] = max((outs[1] - outs[0]).abs().max().item(), (outs[3] - outs[2]).abs().max().item())
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--positions", type=int, nargs="+", default=[1024, 4096, 16384, 32768], help="cached positions T")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--head-dim", type=int, default=32, help="|D|")
    p.add_argument("--layers", type=int, default=4, help="caches attended per round, one per layer")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads, also the kernel's")
    args = p.parse_args(argv)
    kv_heads = args.kv_heads or args.heads
    for name, value in (("--positions", min(args.positions)), ("--heads", args.heads), ("--kv-heads", kv_heads),
                        ("--head-dim", args.head_dim), ("--layers", args.layers), ("--rounds", args.rounds),
                        ("--threads", args.threads)):
        if value < 1:
            p.error(f"{name}: must be >= 1, got {value}")
    if args.head_dim % 2 or args.heads % kv_heads:
        p.error(f"--head-dim must be even (RoPE rotates pairs) and --heads a multiple of --kv-heads; "
                f"got {args.head_dim}, {args.heads} and {kv_heads}")
    torch.set_num_threads(args.threads)
    if decode_kernel.library() is None:
        sys.exit("error: the CPU decode kernel could not be built here (see the warning above)")
    print(f"# {args.heads} query heads, {kv_heads} kv heads of {args.head_dim}, float32, "
          f"{args.layers} layers' caches, {args.threads} thread(s); ms per layer, best / median of {args.rounds}")
    names = ("static, SDPA", "static, kernel", "dynamic, PyTorch", "dynamic, kernel")
    print(f"| positions | {' | '.join(names)} | static, kernel / dynamic, kernel | static, SDPA / dynamic, PyTorch |")
    print("|---" * 7 + "|")
    for positions in args.positions:
        r = measure(positions, args.heads, kv_heads, args.head_dim, args.layers, args.rounds)
        cells = " | ".join(f"{r[n][0] * 1e3:.3f} / {r[n][1] * 1e3:.3f}" for n in names)
        print(f"| {positions} | {cells} | {r['static, kernel'][1] / r['dynamic, kernel'][1]:.2f}x | "
              f"{r['static, SDPA'][1] / r['dynamic, PyTorch'][1]:.2f}x |")
        if r["max |kernel - PyTorch|"] > 1e-4:
            sys.exit(f"error: at {positions} positions the kernel and the PyTorch path differ by "
                     f"{r['max |kernel - PyTorch|']:.2e}")


if __name__ == "__main__":
    main()
