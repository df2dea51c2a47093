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
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from yarn_minimal import cli  # noqa: E402
from yarn_minimal.generation import GenerationStats, generate  # noqa: E402
from yarn_minimal.model import ModelArgs, Transformer  # noqa: E402
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


def ours(model, prompt, new_tokens, repeats, **opts) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s), best of `repeats` runs after a warm-up."""
    best_prefill = best_decode = 0.0
    for i in range(repeats + 1):
        stats = GenerationStats()
        generate(model, prompt, new_tokens, stats=stats, **opts)
        if i > 0:  # the first run warms up (allocator, compile)
            best_prefill = max(best_prefill, stats.prefill_tokens_per_s)
            best_decode = max(best_decode, stats.decode_tokens_per_s)
    return best_prefill, best_decode


def hf_generate_seconds(hf, prompt_ids, new_tokens, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    out = hf.generate(prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    sync(device)
    assert out.shape[1] == prompt_ids.shape[1] + new_tokens
    return time.perf_counter() - t0


def transformers_speed(model, prompt, new_tokens, repeats, device, dtype) -> tuple[float, float]:
    from hf_oracle import hf_config, hf_state_dict
    from transformers import LlamaForCausalLM

    cfg = hf_config(model.args)
    cfg._attn_implementation = "sdpa"  # transformers' fastest built-in attention on CPU
    hf = LlamaForCausalLM(cfg).eval()
    hf.load_state_dict(hf_state_dict(model.state_dict(), model.args), strict=False)
    hf.to(device=device, dtype=dtype)
    ids = torch.tensor([prompt], device=device)
    best_first = best_total = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 1):
            first = hf_generate_seconds(hf, ids, 1, device)
            total = hf_generate_seconds(hf, ids, new_tokens, device)
            if i > 0:
                best_first, best_total = min(best_first, first), min(best_total, total)
    return len(prompt) / best_first, (new_tokens - 1) / max(best_total - best_first, 1e-9)


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
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (best is kept)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="also torch.compile our decode step")
    p.add_argument("--skip-hf", action="store_true", help="leave transformers out")
    cli.add_device_args(p)
    args = p.parse_args(argv)
    device, dtype = cli.resolve_device_dtype(args.device, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)

    L = args.long_len // 2
    margs = ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, vocab_size=args.vocab_size,
                      rope=RopeConfig(original_length=max(args.prompt_len + args.new_tokens, L)))
    with torch.device(device):
        model = Transformer(margs)
    model.init_weights(seed=0)
    model = model.to(dtype).eval()
    prompt = torch.randint(3, args.vocab_size, (args.long_len,), generator=torch.Generator().manual_seed(0)).tolist()
    short = prompt[:args.prompt_len]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# machine: {machine()}")
    print(f"# model: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, vocab {args.vocab_size} "
          f"({n_params / 1e6:.1f}M parameters), {str(dtype).removeprefix('torch.')} on {device}; batch 1, greedy")
    rows = []  # (what, prefill tok/s, decode tok/s)

    t = f"prompt {args.prompt_len}, {args.new_tokens} new"
    mine = ours(model, short, args.new_tokens, args.repeats)
    rows.append((f"yarn-minimal ({t})", *mine))
    if args.compile:
        rows.append((f"yarn-minimal --compile ({t})", *ours(model, short, args.new_tokens, args.repeats, compile=True)))
    if not args.skip_hf:
        import transformers
        theirs = transformers_speed(model, short, args.new_tokens, args.repeats, device, dtype)
        rows.append((f"transformers {transformers.__version__} generate ({t})", *theirs))

    # Dynamic Scaling above L: s = l'/L changes with every token, so every step re-rotates all
    # cached keys of every layer (Sec. 3.3). Static YaRN at s = 4 rotates only the new key.
    t = f"prompt {args.long_len} = 2L, {args.long_new_tokens} new"
    static = RopeConfig(method="yarn", scale=4.0, original_length=L)
    dynamic = RopeConfig(method="yarn", scale=1.0, original_length=L, dynamic=True)
    long_rows = []
    for name, rope, cache in (("static YaRN s=4", static, "pre-rope"),
                              ("Dynamic-YaRN, pre-RoPE cache", dynamic, "pre-rope"),
                              ("Dynamic-YaRN, rotated cache (stale)", dynamic, "rotated")):
        model.set_rope(rope)
        long_rows.append((f"{name} ({t})", *ours(model, prompt, args.long_new_tokens, args.repeats, cache=cache)))

    print(f"\n{'':<62} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, pre, dec in rows + long_rows:
        print(f"{name:<62} {pre:>14.1f} {dec:>13.1f}")
    if not args.skip_hf:
        print(f"\nratio yarn-minimal / transformers: prefill {mine[0] / theirs[0]:.2f}x, decode {mine[1] / theirs[1]:.2f}x")
    print(f"ratio Dynamic-YaRN (pre-RoPE) / static YaRN at {args.long_len} tokens: "
          f"prefill {long_rows[1][1] / long_rows[0][1]:.2f}x, decode {long_rows[1][2] / long_rows[0][2]:.2f}x")


if __name__ == "__main__":
    main()
