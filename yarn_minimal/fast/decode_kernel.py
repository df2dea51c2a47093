"""The CPU decoding step in C: attention as one kernel (decode_attention.c), the fast twin of
model.CachedKeys + attention.attention, and the linear layers' GEMV (decode_linear.c), the fast
twin of nn.Linear, for float32 decoding steps (one new token) on the CPU.

The rule, here and nowhere else: a float32 CPU decoding step over a KV cache, outside autograd,
tracing and torch.compile, runs in the kernel, for every method. With a static method the cached
keys are rotated already and the kernel is plain attention for one query. Under Dynamic Scaling
(Sec. 3.3) the cache keeps keys before RoPE and must rotate all of them at the new s at every
step; in PyTorch that is three passes over the keys where a static cache makes one, and the
kernel rotates each key as attention reads it instead. Either way the keys are read once, so
static decoding is never slower than Dynamic decoding (docs/generation.md has the figures).

The same rule holds for the linear layers (`Linear`, which model.py builds its layers from): a
float32 CPU step of one token, outside autograd, runs in decode_linear.c, which splits every
weight matrix's rows over the threads (inside a torch.compile'd step, as the custom op
`linear_op`). A decoding step is the time it takes to read the weights once; torch runs such a
small matrix-vector product on one thread.

It is built with the system's C compiler ($CC, else cc) the first time a process asks for it
(`library()`; generation builds it before it starts timing), into a temporary folder: nothing
is cached on disk, so a binary built for one CPU never runs on another. Without a compiler that
builds and loads it, or with YARN_MINIMAL_CPU_KERNEL=0, the PyTorch path runs instead and gives
the same results within float32 rounding (tests/test_decode_kernel.py).
The flags never include -ffast-math: with it gcc links code that sets flush-to-zero for the whole
process, which would change every other result of torch.
"""
from __future__ import annotations

import ctypes
import functools
import os
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("decode_attention.c", "decode_linear.c")]
FAST_FLAGS = ["-O3", "-march=native", "-fopenmp",  # reductions may be reordered (vectorised), as SDPA does
              "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
PORTABLE_FLAGS = ["-O3"]  # a compiler without OpenMP or -march=native (Apple's clang)
MIN_FLOATS_PER_THREAD = 32768  # keys or weights each thread reads, at least: with fewer (128 KB), starting
                               # the threads costs more than they save

def enabled() -> bool:
    """YARN_MINIMAL_CPU_KERNEL: 1 (the default) uses the kernel where it applies, 0 never does."""
    value = os.environ.get("YARN_MINIMAL_CPU_KERNEL", "1")
    if value not in ("0", "1"):
        raise ValueError(f"YARN_MINIMAL_CPU_KERNEL={value!r}: expected 1 (the CPU decode kernel, the default) "
                         "or 0 (the PyTorch path)")
    return value == "1"


@functools.cache
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or None (with one warning) when this machine cannot build or load it."""
    command = shlex.split(os.environ.get("CC") or "cc")  # $CC may carry arguments ("ccache gcc")
    reason = f"no C compiler ({' '.join(command)})"
    if shutil.which(command[0]) is not None:
        with tempfile.TemporaryDirectory(prefix="yarn_minimal_") as folder:
            built = Path(folder) / "decode_kernels.so"
            for flags in (FAST_FLAGS, PORTABLE_FLAGS):
                run = subprocess.run([*command, *flags, "-shared", "-fPIC", *map(str, SOURCES), "-o", str(built), "-lm"],
                                     capture_output=True, text=True)
                if run.returncode != 0:
                    lines = run.stderr.strip().splitlines() or [f"exit status {run.returncode}"]
                    reason = f"{command[0]}: " + next((line for line in lines if "error" in line), lines[-1])
                    continue
                try:  # a temporary folder mounted noexec, a missing symbol: built but not loadable
                    lib = ctypes.CDLL(str(built))  # loaded: the file may go with its folder
                except OSError as e:
                    reason = f"built but not loaded: {e}"
                    continue
                lib.decode_attention.restype = None
                lib.decode_attention.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 6 + \
                    [ctypes.c_void_p] * 2 + [ctypes.c_int64]
                lib.decode_linear.restype = None
                lib.decode_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
                return lib
    warnings.warn(f"the CPU decode kernel could not be built ({reason}); decoding uses the PyTorch path: "
                  f"the same results, more slowly (docs/generation.md)", stacklevel=2)
    return None


def applies(q: torch.Tensor, blocks) -> bool:
    """Whether this step of attention(q, blocks) runs in the kernel: a float32 decoding step (one
    query) on the CPU over a cache laid out as LayerCache keeps it (model.CachedKeys: keys,
    values, and the rotation table when the keys are kept before RoPE), outside autograd, tracing
    and torch.compile (which cannot see into the kernel)."""
    keys, values, table = (getattr(blocks, name, None) for name in ("keys", "values", "table"))
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
        return False  # a plain list of blocks: a forward pass without a cache
    B, Tq, H, D = q.shape
    T, Hkv = keys.shape[1], keys.shape[2]
    tensors = (q, keys, values) if table is None else (q, keys, values, table)
    plain = all(type(t) is torch.Tensor and t.device.type == "cpu" for t in tensors)
    table_ok = table is None or (table.dtype == torch.complex64 and table.shape[0] >= T and table.shape[1] == D // 2)
    return (plain and table_ok and Tq == 1 and q.dtype == keys.dtype == values.dtype == torch.float32
            and keys.shape == values.shape and keys.shape[0] == B and keys.shape[3] == D and D % 2 == 0
            and H % Hkv == 0 and keys.stride() == values.stride() and keys.stride()[1:] == (Hkv * D, D, 1)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and enabled() and library() is not None)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q (R_m k_m)^T / sqrt(|D|)) v over every cached position m (Eq. 2 with Eq. 5), where
    R_m is row m of `table` (complex64 (T, |D|/2), model.rotation_table at this step's s), or
    softmax(q k_m^T / sqrt(|D|)) v when table is None (keys rotated already).
    q (B, 1, H, |D|) is rotated already; keys and values are (B, T, Hkv, |D|).
    Call it where `applies` says so."""
    B, _, H, D = q.shape
    T, Hkv = keys.shape[1], keys.shape[2]
    q = q.contiguous()
    table = None if table is None else torch.view_as_real(table[:T].contiguous())
    n_chunks = max(1, min(torch.get_num_threads(), T * Hkv * D // MIN_FLOATS_PER_THREAD))
    work = dict(dtype=torch.float32, device="cpu")  # not torch's defaults, which a caller may have changed
    out, scores, partial = torch.empty(B, 1, H, D, **work), torch.empty(H, T, **work), torch.empty(n_chunks, H, D + 2, **work)
    library().decode_attention(q.data_ptr(), keys.data_ptr(), values.data_ptr(), None if table is None else table.data_ptr(),
                               out.data_ptr(), B, T, H, Hkv, D, keys.stride(0), scores.data_ptr(), partial.data_ptr(),
                               n_chunks)
    return out


# ---------------------------------------------------------------------------------------------
# The linear layers

def linear_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether F.linear(x, weight) (no bias) runs in the kernel: one float32 row on the CPU (a
    decoding step of one sequence), a contiguous weight, outside autograd and compile."""
    # one row first: it is what a training step or a prefill chunk fails, at the cost of one comparison
    return (x.numel() == weight.shape[-1] and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and x.dtype == weight.dtype == torch.float32 and x.is_cpu and weight.is_cpu
            and weight.dim() == 2 and weight.is_contiguous()
            and type(x) is torch.Tensor and type(weight) in (torch.Tensor, torch.nn.Parameter)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and enabled() and library() is not None)


def decode_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for x of one row: (..., in) -> (..., out). Call it where
    `linear_applies` says so."""
    x = x.contiguous()
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32, device="cpu")
    n_threads = max(1, min(torch.get_num_threads(), weight.numel() // MIN_FLOATS_PER_THREAD))
    library().decode_linear(weight.data_ptr(), x.data_ptr(), out.data_ptr(), weight.shape[0], weight.shape[1], n_threads)
    return out


# Inside a torch.compile'd decoding step (--compile) the GEMV is this op, which Inductor calls
# as it is: the graph around it is compiled, the kernel is not.
linear_op = torch.library.custom_op("yarn_minimal::decode_linear", decode_linear, mutates_args=())
linear_op.register_fake(lambda x, weight: x.new_empty((*x.shape[:-1], weight.shape[0])))


def compiled_linear_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """`linear_applies` for a graph being compiled, where tensors are stand-ins: the same rule on
    what a trace can see, with the switch and the build decided before compiling started."""
    return (x.dtype == weight.dtype == torch.float32 and x.device.type == weight.device.type == "cpu"
            and x.shape[:-1].numel() == 1 and weight.dim() == 2 and not torch.is_grad_enabled()
            and KERNEL_READY)


KERNEL_READY = False  # set by `prepare_for_compile`: the switch is on and the kernel built


def prepare_for_compile() -> None:
    """Decide, before torch.compile traces a decoding step, whether its GEMVs may use the kernel."""
    global KERNEL_READY
    KERNEL_READY = enabled() and library() is not None


class Linear(torch.nn.Linear):
    """nn.Linear without bias whose decoding steps on the CPU run in decode_linear.c, where
    `linear_applies` says so; everything else (training, prefill, CUDA) is nn.Linear itself."""

    def __init__(self, in_features: int, out_features: int, **kwargs):
        super().__init__(in_features, out_features, bias=False, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return linear_op(x, self.weight) if compiled_linear_applies(x, self.weight) else super().forward(x)
        if linear_applies(x, self.weight):
            return decode_linear(x, self.weight)
        return super().forward(x)
