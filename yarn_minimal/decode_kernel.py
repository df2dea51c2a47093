"""Dynamic Scaling's decoding step on the CPU as one C kernel (kernels/decode_attention.c).

Sec. 3.3 asks the cache to keep keys before RoPE and to rotate all of them at the new s at
every step. In PyTorch (model.PreRopeKeys, then attention) that is three passes over
the keys, where a static cache makes one, and no eager ordering of PyTorch ops avoids it:
on that path Dynamic-YaRN decodes at 0.64-0.73x the speed of static YaRN on a model whose decode the KV
cache dominates (docs/generation.md). The kernel rotates each key as attention reads it.

It is built with the system's C compiler ($CC, else cc) the first time a process needs it,
into a temporary folder (0.3-3 s, inside the first decoding step; nothing is cached on disk,
so a binary built for one CPU never runs on another). Without a compiler that builds and loads
it, or with YARN_MINIMAL_CPU_KERNEL=0, the PyTorch path runs instead and gives the same results
within float32 rounding (tests/test_decode_kernel.py), more slowly.
The flags never include -ffast-math: with it gcc links code that sets flush-to-zero for the whole
process, which would change every other result of torch.
The PyTorch path remains the reference a reader should read; this is its fast twin, for
float32 decoding steps (one new token) on the CPU only.
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

SOURCE = Path(__file__).with_name("kernels") / "decode_attention.c"
FAST_FLAGS = ["-O3", "-march=native", "-fopenmp",  # reductions may be reordered (vectorised), as SDPA does
              "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
PORTABLE_FLAGS = ["-O3"]  # a compiler without OpenMP or -march=native (Apple's clang)
MIN_POSITIONS_PER_THREAD = 1024  # fewer: the threads' start-up costs more than they save


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
            built = Path(folder) / "decode_attention.so"
            for flags in (FAST_FLAGS, PORTABLE_FLAGS):
                run = subprocess.run([*command, *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(built), "-lm"],
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
                return lib
    warnings.warn(f"the CPU decode kernel could not be built ({reason}); Dynamic Scaling decodes with the "
                  f"PyTorch path: the same results, more slowly (docs/generation.md)", stacklevel=2)
    return None


def applies(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor) -> bool:
    """A float32 decoding step (one query) on the CPU over a cache laid out as LayerCache keeps
    it, outside autograd, tracing and torch.compile (which cannot see into the kernel)."""
    B, Tq, H, D = q.shape
    T, Hkv = keys.shape[1], keys.shape[2]
    plain = all(type(t) is torch.Tensor and t.device.type == "cpu" for t in (q, keys, values, table))
    return (plain and Tq == 1 and q.dtype == keys.dtype == values.dtype == torch.float32
            and keys.shape == values.shape and keys.shape[0] == B and keys.shape[3] == D and D % 2 == 0
            and H % Hkv == 0 and table.dtype == torch.complex64 and table.shape[0] >= T and table.shape[1] == D // 2
            and keys.stride() == values.stride() and keys.stride()[1:] == (Hkv * D, D, 1)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, keys, values, table)))
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and enabled() and library() is not None)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """softmax(q (R_m k_m)^T / sqrt(|D|)) v over every cached position m (Eq. 2 with Eq. 5), where
    R_m is row m of `table` (complex64 (T, |D|/2), model.rotation_table at this step's s).
    q (B, 1, H, |D|) is rotated already; keys (before RoPE) and values are (B, T, Hkv, |D|).
    Call it where `applies` says so."""
    B, _, H, D = q.shape
    T, Hkv = keys.shape[1], keys.shape[2]
    q, table = q.contiguous(), torch.view_as_real(table[:T].contiguous())
    n_chunks = max(1, min(torch.get_num_threads(), T // MIN_POSITIONS_PER_THREAD))
    work = dict(dtype=torch.float32, device="cpu")  # not torch's defaults, which a caller may have changed
    out, scores, partial = torch.empty(B, 1, H, D, **work), torch.empty(H, T, **work), torch.empty(n_chunks, H, D + 2, **work)
    library().decode_attention(q.data_ptr(), keys.data_ptr(), values.data_ptr(), table.data_ptr(), out.data_ptr(),
                               B, T, H, Hkv, D, keys.stride(0), scores.data_ptr(), partial.data_ptr(), n_chunks)
    return out
