"""Generation speed: this project against Hugging Face transformers' generate, on the same
random weights, and the cost of Dynamic Scaling against static YaRN at a long context.

    python bench/bench_generate.py                       # small model on CPU (the README's table)
    python bench/bench_generate.py --device cuda --dtype bfloat16 --dim 4096 --n-layers 32 --compile

Both sides: batch 1, greedy, the same prompt length and dtype. Prefill tokens/s is prompt
length / time to the first new token. For transformers, decode time is generate(N new tokens)
minus generate(1 new token); for this project it is the time of the N - 1 decoding forward
passes (GenerationStats). This is a benchmark, not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from yarn_minimal import checkpoint, cli, training  # noqa: E402
from yarn_minimal.generation import GenerationStats, decode_step, generate, prefill  # noqa: E402
from yarn_minimal.model import KVCache, ModelArgs, Transformer  # noqa: E402
from yarn_minimal.rope import RopeConfig  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        desc += f", {torch.cuda.get_device_name()}"
    return desc


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_bandwidth(device, n_bytes: int) -> float:
    """Bytes/s of reading a buffer once (a sum over it), the best of 5: what a read-only
    stream of memory traffic reaches on this device with these threads."""
    buffer = torch.ones(n_bytes // 4, device=device)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        buffer.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best


def decode_bytes_per_token(model, context: int) -> int:
    """Memory one decode step must read at least: every weight except the embedding table (one
    row of it), and the cached keys and values of `context` positions in every layer."""
    a = model.args
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                  if not name.startswith("tok_embeddings"))
    element = model.output.weight.element_size()
    kv = 2 * a.n_layers * context * a.n_kv_heads * a.head_dim * element
    return weights + a.dim * element + kv


def ours(model, prompt, new_tokens, **opts) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one generate() call."""
    stats = GenerationStats()
    generate(model, prompt, new_tokens, stats=stats, **opts)
    return stats.prefill_tokens_per_s, stats.decode_tokens_per_s


def hf_generate_seconds(hf, prompt_ids, new_tokens, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    out = hf.generate(prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    sync(device)
    assert out.shape[1] == prompt_ids.shape[1] + new_tokens
    return time.perf_counter() - t0


def transformers_model(model, device, dtype):
    """LlamaForCausalLM holding the model's weights, through the project's own HF export
    (save(format="hf"), then from_pretrained)."""
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        checkpoint.save(model, None, folder, format="hf")
        # sdpa: transformers' fastest built-in attention on CPU
        hf = LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=dtype)
    return hf.to(device).eval()


def theirs(hf, prompt, new_tokens, device) -> tuple[float, float]:
    """The same two figures for transformers: prefill from generate(1 new token), decode from
    generate(N) minus generate(1)."""
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        first = hf_generate_seconds(hf, ids, 1, device)
        total = hf_generate_seconds(hf, ids, new_tokens, device)
    return len(prompt) / first, (new_tokens - 1) / max(total - first, 1e-9)


def rounds(runs: dict[str, Callable[[], tuple[float, float]]], repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Each run once per round, round-robin, so that a noisy machine slows every side of a
    round alike; the first round is a warm-up (allocator, compile) and is dropped.
    Returns each run's (prefill, decode) tokens/s, round by round."""
    results = {name: [] for name in runs}
    for i in range(repeats + 1):
        for name, run in runs.items():
            speed = run()
            if i > 0:
                results[name].append(speed)
    return results


def best(speeds: list[tuple[float, float]]) -> tuple[float, float]:
    return max(p for p, _ in speeds), max(d for _, d in speeds)


def ratios(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> str:
    """a / b from the best runs, and the median and range of the per-round ratios (paired runs)."""
    (pa, da), (pb, db) = best(a), best(b)
    paired = lambda i: sorted(x[i] / y[i] for x, y in zip(a, b))
    spread = lambda r: f"paired median {statistics.median(r):.2f}x, range {r[0]:.2f}-{r[-1]:.2f}x"
    return (f"prefill {pa / pb:.2f}x ({spread(paired(0))}), "
            f"decode {da / db:.2f}x ({spread(paired(1))})")


@torch.inference_mode()
def interleaved_steps(model, prompt: list[int], ropes: dict[str, RopeConfig], steps: int) -> dict[str, list[float]]:
    """Seconds of each decode step under each RoPE setting, one step of each in turn, after one
    prefill per setting: the finest interleaving, for a machine whose load changes within a
    generate() call. Each step is generate's decode step (one token, the KV cache, last logits)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tokens = torch.tensor([prompt], device=device)
    caches = {}
    for name, rope in ropes.items():
        model.set_rope(rope)
        caches[name] = KVCache(model.args, 1, len(prompt) + steps, device=device, dtype=dtype)
        prefill(model, prompt, caches[name], 4096)
    times = {name: [] for name in ropes}
    for i in range(steps):
        for name, rope in ropes.items():
            model.set_rope(rope)
            sync(device)
            t0 = time.perf_counter()
            decode_step(model, tokens[:, i:i + 1], caches[name])
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def step_ratio(dynamic: list[float], static: list[float]) -> str:
    """Dynamic / static decode speed from step times: best steps, median steps, and the median
    and quartiles of the per-pair ratios."""
    pairs = sorted(s / d for s, d in zip(static, dynamic))
    q = lambda f: pairs[int(f * (len(pairs) - 1))]
    return (f"best {min(static) / min(dynamic):.2f}x, median {statistics.median(static) / statistics.median(dynamic):.2f}x, "
            f"per-pair median {statistics.median(pairs):.2f}x (quartiles {q(0.25):.2f}-{q(0.75):.2f}x)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--long-len", type=int, default=4096,
                   help="prompt length for the dynamic-vs-static comparison (L = half of it)")
    p.add_argument("--long-new-tokens", type=int, default=32)
    p.add_argument("--long-original-length", type=int, default=None,
                   help="L for the dynamic-vs-static comparison (default: half of --long-len); static YaRN "
                        "gets the s that covers the whole sequence, at least 4")
    p.add_argument("--step-pairs", type=int, default=0,
                   help="also time N decode steps of static YaRN and Dynamic-YaRN alternately, step by step, "
                        "after the --long-len prompt (robust to a machine whose load changes within a run)")
    p.add_argument("--long-only", action="store_true",
                   help="only the dynamic-vs-static comparison (no short-prompt runs, no transformers)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed rounds; every round runs each side once (best is kept); default 3 (0: none, with --step-pairs)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="also torch.compile our decode step")
    p.add_argument("--skip-hf", action="store_true", help="leave transformers out")
    cli.add_device_args(p)
    args = p.parse_args(argv)
    device, dtype = cli.resolve_device_dtype(args.device, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)

    L = args.long_original_length or args.long_len // 2
    margs = ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, vocab_size=args.vocab_size,
                      rope=RopeConfig(original_length=max(args.prompt_len + args.new_tokens, L)))
    with torch.device(device):
        model = Transformer(margs)
    training.init_weights(model, seed=0)
    model = model.to(dtype).eval()
    prompt = torch.randint(3, args.vocab_size, (args.long_len,), generator=torch.Generator().manual_seed(0)).tolist()
    short = prompt[:args.prompt_len]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# machine: {machine()}")
    print(f"# model: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, vocab {args.vocab_size} "
          f"({n_params / 1e6:.1f}M parameters), {str(dtype).removeprefix('torch.')} on {device}; batch 1, greedy")

    t = f"prompt {args.prompt_len}, {args.new_tokens} new"
    runs = {f"yarn-minimal ({t})": lambda: ours(model, short, args.new_tokens)}
    if args.compile:
        runs[f"yarn-minimal --compile ({t})"] = lambda: ours(model, short, args.new_tokens, compile=True)
    if not args.skip_hf and not args.long_only:
        import transformers
        hf = transformers_model(model, device, dtype)
        runs[f"transformers {transformers.__version__} generate ({t})"] = \
            lambda: theirs(hf, short, args.new_tokens, device)
    results = rounds(runs, args.repeats) if not args.long_only else {}

    # Dynamic Scaling above L: s = l'/L changes with every token, so every step re-rotates all
    # cached keys of every layer (Sec. 3.3). Static YaRN (s covering the sequence, at least 4)
    # rotates only the new key.
    static_s = max(4.0, math.ceil((args.long_len + args.long_new_tokens) / L))
    t = f"prompt {args.long_len}, L {L}, {args.long_new_tokens} new"
    static = RopeConfig(method="yarn", scale=static_s, original_length=L)
    dynamic = RopeConfig(method="yarn", scale=1.0, original_length=L, dynamic=True)

    def long_run(rope, cache):
        model.set_rope(rope)
        return ours(model, prompt, args.long_new_tokens, cache=cache)

    long_names = [f"static YaRN s={static_s:g} ({t})", f"Dynamic-YaRN, pre-RoPE cache ({t})",
                  f"Dynamic-YaRN, rotated cache (stale) ({t})"]
    if args.repeats:
        results.update(rounds({
            long_names[0]: lambda: long_run(static, "pre-rope"),
            long_names[1]: lambda: long_run(dynamic, "pre-rope"),
            long_names[2]: lambda: long_run(dynamic, "rotated"),
        }, args.repeats))

    if args.step_pairs:
        ropes = {"static": static, "dynamic": dynamic}
        times = interleaved_steps(model, prompt, ropes, args.step_pairs)
        for name in ropes:
            print(f"# {name}: decode step best {min(times[name]) * 1e3:.2f} ms, "
                  f"median {statistics.median(times[name]) * 1e3:.2f} ms over {args.step_pairs} steps")
        print(f"step-interleaved Dynamic-YaRN / static YaRN decode at {args.long_len} tokens: "
              f"{step_ratio(times['dynamic'], times['static'])}")
        if not args.repeats:
            return
    print(f"\n{'best of ' + str(args.repeats) + ' rounds':<62} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, speeds in results.items():
        pre, dec = best(speeds)
        print(f"{name:<62} {pre:>14.1f} {dec:>13.1f}")
    names = list(runs) if not args.long_only else []
    # The decode bound: one step cannot be faster than reading its weights and KV cache once.
    # Only meaningful where they do not fit in the caches (large models, GPUs).
    per_token = decode_bytes_per_token(model, args.prompt_len + args.new_tokens // 2)
    bandwidth = memory_bandwidth(device, 1 << (30 if device.type == "cuda" else 28))
    bound = bandwidth / per_token
    print(f"\nmemory-bandwidth bound on decode: {bound:.1f} tok/s ({per_token / 1e6:.1f} MB read per token at "
          f"{bandwidth / 1e9:.1f} GB/s, measured by reading a buffer)")
    for name in names:
        print(f"  {name.split(' (')[0]}: {best(results[name])[1] / bound:.0%} of the bound")
    print()
    if not args.skip_hf and not args.long_only:
        print(f"ratio yarn-minimal / transformers: {ratios(results[names[0]], results[names[-1]])}")
        if args.compile:
            print(f"ratio yarn-minimal --compile / transformers: {ratios(results[names[1]], results[names[-1]])}")
    print(f"ratio Dynamic-YaRN (pre-RoPE) / static YaRN at {args.long_len} tokens: "
          f"{ratios(results[long_names[1]], results[long_names[0]])}")


if __name__ == "__main__":
    main()
