"""Training step speed: this project against Hugging Face transformers on the same weights, and
the peak memory of the chunked loss at a long sequence.

    python bench/bench_train_step.py                    # the demo model, 4 x 1024 tokens, float32, CPU
    python bench/bench_train_step.py --memory-only      # only the long-sequence loss memory (meta device)

One step is: forward with the loss, backward, AdamW step, zero_grad. Both sides start from the
demo model's weights (transformers' copy goes through the project's HF export, save(format="hf")
then from_pretrained) and see the same batch; the losses of the first round must be equal. Rounds
are interleaved (each side once per round), the first is a warm-up; the table gives the best round
and the median of the per-round ratios. This is a benchmark, not a test: only the losses are checked.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import yarn_minimal  # noqa: E402
from bench_generate import machine, rounds, transformers_model  # noqa: E402
from yarn_minimal import training  # noqa: E402
from yarn_minimal.loss import cross_entropy  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "demo" / "yarn-demo"


def batch(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0):
    """inputs (B, T) and next-token targets (B, T); the last position has no target (-100), which
    is what transformers does with labels = inputs."""
    tokens = torch.randint(3, vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    targets = torch.cat([tokens[:, 1:], torch.full((batch_size, 1), -100)], dim=1)
    return tokens, targets


def timed_step(loss_fn, model, optimizer) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process, loss) of one training step. On a machine
    shared with other jobs the CPU time is the steadier figure: it leaves out the time spent
    waiting for a core (with one thread, it is the step's own compute)."""
    wall, cpu = time.perf_counter(), time.process_time()
    loss = loss_fn()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu, loss.item()


def step_speed(args) -> None:
    model, _ = yarn_minimal.load(DEMO)
    hf = transformers_model(model, torch.device("cpu"), torch.float32)
    model.train(), hf.train()
    tokens, targets = batch(model.args.vocab_size, args.batch_size, args.seq_len)
    ours_opt, hf_opt = training.make_optimizer(model), training.make_optimizer(hf)
    import transformers

    n_params = sum(p.numel() for p in model.parameters())
    print(f"# machine: {machine()}")
    print(f"# model: {DEMO.name}, dim {model.args.dim}, {model.args.n_layers} layers, vocab {model.args.vocab_size} "
          f"({n_params / 1e6:.1f}M parameters), float32 on cpu; batch {args.batch_size} x {args.seq_len} tokens; "
          f"step = loss + backward + AdamW (lr {training.LR}) + zero_grad")
    names = ("yarn-minimal", f"transformers {transformers.__version__} (sdpa)")
    results = rounds({
        names[0]: lambda: timed_step(lambda: model(tokens, targets=targets), model, ours_opt),
        names[1]: lambda: timed_step(lambda: hf(input_ids=tokens, labels=tokens).loss, hf, hf_opt),
    }, args.repeats)
    ours, theirs = results[names[0]], results[names[1]]
    print(f"\n{'best of ' + str(args.repeats) + ' rounds':<40} {'wall s':>8} {'tokens/s':>9} {'CPU s':>8}")
    for name in names:
        wall, cpu = min(r[0] for r in results[name]), min(r[1] for r in results[name])
        print(f"{name:<40} {wall:>8.3f} {args.batch_size * args.seq_len / wall:>9.0f} {cpu:>8.3f}")
    print("\nspeed yarn-minimal / transformers (their time / ours):")
    for i, clock in ((0, "wall"), (1, "CPU")):
        best = min(r[i] for r in theirs) / min(r[i] for r in ours)
        paired = statistics.median(b[i] / a[i] for a, b in zip(ours, theirs))
        print(f"  {clock + ' time':<9} {best:.2f}x best round, {paired:.2f}x paired median")
    # both sides take the same steps from the same weights, so every round's losses must agree
    worst = max(abs(a[2] - b[2]) / abs(b[2]) for a, b in zip(ours, theirs))
    print("losses per round: " + ", ".join(f"{a[2]:.6f} / {b[2]:.6f}" for a, b in zip(ours, theirs)))
    print(f"largest relative loss difference: {worst:.1e}")
    if worst > 1e-4:
        raise SystemExit(f"error: the two sides' losses differ by {worst:.1e} (relative): not the same computation")


# ---------------------------------------------------------------------------------------------
# Peak memory of the loss at a long sequence, counted on the meta device

class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created inside this mode that are alive at once: the peak, and the
    largest single float32 tensor. Only ops that allocate count (not views, not in-place ops);
    a storage is freed when its last tensor goes (torch keeps one Python object per storage, so
    a finalizer on it runs exactly then)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest_float32 = 0
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.is_mutable:
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self.seen:
                    self.seen.add(storage._cdata)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, storage._cdata, storage.nbytes())
                if t.dtype == torch.float32:
                    self.largest_float32 = max(self.largest_float32, t.numel() * 4)
        self.peak = max(self.peak, self.live)
        return out

    def _free(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes


def full_cross_entropy(output, h, targets):
    """The T x vocab float32 logits at once: what transformers does."""
    return F.cross_entropy(output(h).float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def loss_memory(loss_fn, tokens: int, dim: int, vocab_size: int, dtype) -> LiveBytes:
    """Forward and backward of loss_fn over 1 x tokens on the meta device (nothing is computed)."""
    output = torch.nn.Linear(dim, vocab_size, bias=False, device="meta", dtype=dtype)
    h = torch.empty(1, tokens, dim, device="meta", dtype=dtype, requires_grad=True)
    targets = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    with LiveBytes() as mem:
        loss_fn(output, h, targets).backward()
    return mem


def memory(args) -> None:
    dim, vocab = args.memory_dim, args.memory_vocab
    print(f"\n# peak bytes alive at once among the loss's own tensors (logits, softmax, the gradients of h "
          f"and of the output weight), forward + backward of 1 x tokens, dim {dim}, vocab {vocab}, counted on "
          f"the meta device. dL/dh (tokens x dim) is part of every loss's peak; the rest must not grow with tokens.")
    print(f"{'tokens':>8} {'dtype':>9} {'chunked: peak':>14} {'of it dL/dh':>12} {'the rest':>9} {'full logits: peak':>18}")
    for tokens in args.memory_tokens:
        for dtype in (torch.float32, torch.bfloat16):
            ours = loss_memory(cross_entropy, tokens, dim, vocab, dtype).peak
            full = loss_memory(full_cross_entropy, tokens, dim, vocab, dtype).peak
            grad_h = tokens * dim * dtype.itemsize
            mib = lambda n: f"{n / 2**20:.0f} MiB"
            print(f"{tokens:>8} {str(dtype)[6:]:>9} {mib(ours):>14} {mib(grad_h):>12} {mib(ours - grad_h):>9} {mib(full):>18}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds, each side once per round (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--memory-only", action="store_true", help="skip the speed comparison")
    p.add_argument("--memory-tokens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--memory-dim", type=int, default=4096)
    p.add_argument("--memory-vocab", type=int, default=32000)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.memory_only:
        step_speed(args)
    memory(args)


if __name__ == "__main__":
    main()
