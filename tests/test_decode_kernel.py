"""fast/decode_kernel.py and fast/decode_attention.c: the CPU decoding step, over pre-RoPE keys
(Dynamic Scaling) and over keys rotated already (static methods).

Oracles: attention written out in float64 from the definitions (Eq. 5's rotation as explicit
cos/sin arithmetic on each interleaved pair, Eq. 2's softmax), and, through the model, the
full no-cache forward and the per-step brute force of test_generation.py. The kernel is also
run where it must not be (the PyTorch path then gives the same tokens)."""
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import yarn_minimal.fast.decode_kernel as decode_kernel
from yarn_minimal.model import CachedKeys
from test_generation import L, PROMPT, ROOT, full_forward_last, per_step_scale_oracle, record, rope_for
from test_model import tiny_model

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on this machine")


def cached(keys, values, table):
    """The cache's view of its keys, as model.LayerCache.update returns it for a decoding step."""
    return CachedKeys(keys, values, keys.shape[1] - 1, table)


def attention_by_definition(q, keys, values, table):
    """softmax(q . R_t k_t / sqrt(|D|)) v in float64, every step spelled out."""
    q, keys, values = q.double(), keys.double(), values.double()
    cos, sin = table.real.double()[:, None], table.imag.double()[:, None]  # (T, 1, |D|/2)
    k0, k1 = keys[..., 0::2], keys[..., 1::2]  # the pair (k_2d, k_2d+1) of each frequency d
    rotated = torch.stack((k0 * cos - k1 * sin, k0 * sin + k1 * cos), -1).flatten(-2)  # Eq. 5
    group = q.shape[2] // keys.shape[2]
    rotated, values = rotated.repeat_interleave(group, 2), values.repeat_interleave(group, 2)
    scores = torch.einsum("bhd,bthd->bht", q[:, 0], rotated) / q.shape[-1] ** 0.5
    return torch.einsum("bht,bthd->bhd", scores.softmax(-1), values)[:, None]


def random_case(B, T, H, Hkv, D, max_len=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, B + 1, max_len or T + 5, Hkv, D, generator=g) * 2  # a preallocated cache, partly used
    keys, values = cache[0, :B, :T], cache[1, :B, :T]
    q = torch.randn(B, 1, H, D, generator=g)
    angles = torch.rand(T, D // 2, generator=g) * 100
    table = torch.polar(0.5 + torch.rand(T, D // 2, generator=g), angles)  # |table| != 1: sqrt(1/t) included
    return q, keys, values, table


@needs_compiler
@pytest.mark.parametrize("D", [16, 32, 48, 64, 128])  # 32/64/128 are compiled apart from the others
@pytest.mark.parametrize("B,H,Hkv", [(1, 4, 4), (2, 8, 2)])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_equals_attention_by_definition(D, B, H, Hkv, threads):
    T = 2 * decode_kernel.MIN_FLOATS_PER_THREAD // (Hkv * D) + 77  # two chunks with two threads, one with one
    q, keys, values, table = random_case(B, T, H, Hkv, D)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert decode_kernel.applies(q, cached(keys, values, table))
        out = decode_kernel.decode_attention(q, keys, values, table)
    finally:
        torch.set_num_threads(before)
    ref = attention_by_definition(q, keys, values, table)
    assert out.shape == (B, 1, H, D) and out.dtype == torch.float32
    assert (out.double() - ref).abs().max().item() < 1e-5


@needs_compiler
@pytest.mark.parametrize("D", [16, 64, 128])
@pytest.mark.parametrize("B,H,Hkv", [(1, 4, 4), (2, 8, 2)])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_over_rotated_keys_equals_attention_by_definition(D, B, H, Hkv, threads):
    # a static method's cache holds keys rotated already: no table, no rotation (Eq. 2 alone);
    # the oracle rotates by 1 (cos 1, sin 0), which leaves every key as it is
    T = 2 * decode_kernel.MIN_FLOATS_PER_THREAD // (Hkv * D) + 77
    q, keys, values, _ = random_case(B, T, H, Hkv, D, seed=1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert decode_kernel.applies(q, cached(keys, values, None)) == (shutil.which("cc") is not None)
        out = decode_kernel.decode_attention(q, keys, values, None)
    finally:
        torch.set_num_threads(before)
    identity = torch.ones(T, D // 2, dtype=torch.complex64)
    assert (out.double() - attention_by_definition(q, keys, values, identity)).abs().max().item() < 1e-5


def test_the_kernel_never_serves_a_forward_without_a_cache():
    q, keys, values, table = random_case(1, 10, 4, 2, 16)
    assert not decode_kernel.applies(q, [(keys, values)])  # a plain list of blocks


@needs_compiler
@pytest.mark.parametrize("T", [1, 2, 5])
def test_kernel_with_few_positions(T):
    q, keys, values, table = random_case(2, T, 4, 2, 32)
    out = decode_kernel.decode_attention(q, keys, values, table)
    assert (out.double() - attention_by_definition(q, keys, values, table)).abs().max().item() < 1e-5


@needs_compiler
def test_kernel_softmax_does_not_overflow():
    # scores in the hundreds: exp(score) overflows float32, exp(score - largest) does not
    q, keys, values, table = random_case(1, 3000, 4, 4, 64)
    q = q * 40
    out = decode_kernel.decode_attention(q, keys, values, table)
    assert torch.isfinite(out).all()
    assert (out.double() - attention_by_definition(q, keys, values, table)).abs().max().item() < 1e-4


def test_where_the_kernel_does_not_apply(monkeypatch):
    q, keys, values, table = random_case(2, 10, 4, 2, 16)
    assert decode_kernel.applies(q, cached(keys, values, table)) == (shutil.which("cc") is not None)
    refused = {
        "a prefill chunk": (torch.cat([q, q], 1), keys, values, table),
        "bf16": (q.bfloat16(), keys.bfloat16(), values.bfloat16(), table),
        "other strides": (q, keys.transpose(1, 2).contiguous().transpose(1, 2), values, table),
        "meta": (q.to("meta"), keys.to("meta"), values.to("meta"), table.to("meta")),
        "a table too short": (q, keys, values, table[:5]),
        "a complex128 table": (q, keys, values, table.to(torch.complex128)),
        "heads not a multiple of kv heads": (q[:, :, :3], keys, values, table),
        "another batch size": (q[:1], keys, values, table),
        # autograd cannot see inside the kernel, whichever input needs a gradient
        "q needs a gradient": (q.clone().requires_grad_(), keys, values, table),
        "keys need a gradient": (q, keys.clone().requires_grad_(), values.clone(), table),
    }
    for why, inputs in refused.items():
        assert not decode_kernel.applies(inputs[0], cached(*inputs[1:])), why
    with torch.no_grad():
        assert decode_kernel.applies(q, cached(keys.clone().requires_grad_(), values.clone(), table)) == (shutil.which("cc") is not None)
    monkeypatch.setenv("YARN_MINIMAL_CPU_KERNEL", "0")
    assert not decode_kernel.applies(q, cached(keys, values, table))


@needs_compiler
def test_kernel_ignores_torch_default_dtype():
    q, keys, values, table = random_case(1, 50, 4, 2, 16)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = decode_kernel.decode_attention(q, keys, values, table)
    finally:
        torch.set_default_dtype(before)
    assert out.dtype == torch.float32
    assert (out.double() - attention_by_definition(q, keys, values, table)).abs().max().item() < 1e-5


@pytest.mark.parametrize("cc, expected", [("/nonexistent/cc", "no C compiler (/nonexistent/cc)"),
                                          pytest.param("cc --no-such-option", "error", marks=needs_compiler)])
def test_a_kernel_that_cannot_be_built_warns_once_and_decoding_still_works(cc, expected, monkeypatch):
    monkeypatch.setenv("CC", cc)
    decode_kernel.library.cache_clear()
    try:
        model = tiny_model(rope_for("yarn", dynamic=True), n_layers=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokens, logits = record(model, PROMPT, 2 * L)
        messages = [str(w.message) for w in caught if "decode kernel" in str(w.message)]
        assert len(messages) == 1 and expected in messages[0], messages
        seq = list(PROMPT)
        for step_logits, token in zip(logits, tokens):  # the PyTorch path: still exact (one layer)
            assert (step_logits - full_forward_last(model, seq)).abs().max().item() <= 1e-4
            seq.append(token)
    finally:
        decode_kernel.library.cache_clear()


@needs_compiler
def test_a_kernel_built_but_not_loadable_falls_back(monkeypatch):
    # e.g. a temporary folder mounted noexec, or a C library without the symbols it was built for
    def refuse(path):
        raise OSError(f"{path}: failed to map segment from shared object")
    monkeypatch.setattr(decode_kernel.ctypes, "CDLL", refuse)
    decode_kernel.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="built but not loaded: .*failed to map segment"):
            assert decode_kernel.library() is None
        q, keys, values, table = random_case(1, 10, 4, 2, 16)
        assert not decode_kernel.applies(q, cached(keys, values, table))
    finally:
        decode_kernel.library.cache_clear()


def count_kernel_calls(monkeypatch, kernel_name: str = "decode_attention") -> list:
    """A list that grows by one at every call of a kernel (which still runs)."""
    calls = []
    kernel = getattr(decode_kernel, kernel_name)
    monkeypatch.setattr(decode_kernel, kernel_name, lambda *a: calls.append(1) or kernel(*a))
    return calls


@needs_compiler
@pytest.mark.parametrize("method", ["yarn", "ntk-by-parts"])
def test_model_decodes_through_the_kernel_as_through_pytorch(method, monkeypatch):
    # The model's decoding steps really go through the kernel (counted), and give the brute
    # force's logits (two layers: test_generation.per_step_scale_oracle), as the PyTorch path does.
    calls = count_kernel_calls(monkeypatch)
    model = tiny_model(rope_for(method, dynamic=True), n_layers=2)
    fast_tokens, fast_logits = record(model, PROMPT, 3 * L)
    assert len(calls) == 2 * (3 * L - 1)  # every decoding step (not the prefill), both layers
    monkeypatch.setenv("YARN_MINIMAL_CPU_KERNEL", "0")
    slow_tokens, slow_logits = record(model, PROMPT, 3 * L)
    assert len(calls) == 2 * (3 * L - 1)
    oracle = per_step_scale_oracle(model, PROMPT, fast_tokens)
    assert fast_tokens == slow_tokens
    for fast, slow, ref in zip(fast_logits, slow_logits, oracle):
        assert (fast - ref).abs().max().item() <= 1e-4
        assert (slow - ref).abs().max().item() <= 1e-4


@needs_compiler
@pytest.mark.parametrize("method", ["none", "yarn"])
def test_static_decoding_goes_through_the_kernel(method, monkeypatch):
    # The same rule for static methods: every decoding step of every layer runs in the kernel
    # (over keys rotated once, on arrival), and gives the full no-cache forward's logits.
    calls = count_kernel_calls(monkeypatch)
    model = tiny_model(rope_for(method, dynamic=False), n_layers=2)
    tokens, logits = record(model, PROMPT, 2 * L)
    assert len(calls) == 2 * (2 * L - 1)
    seq = list(PROMPT)
    for step_logits, token in zip(logits, tokens):
        assert (step_logits - full_forward_last(model, seq)).abs().max().item() <= 1e-4
        seq.append(token)


def test_a_bad_switch_value_is_one_line():
    # the variable is read where the kernel could apply: a Dynamic Scaling decoding step on the CPU
    # (here with the embedded demo model)
    env = dict(os.environ, OMP_NUM_THREADS="1", YARN_MINIMAL_CPU_KERNEL="yes")
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--prompt", "the pass key",
                        "--max-new-tokens", "3", "--ignore-eos", "--dynamic", "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert ("YARN_MINIMAL_CPU_KERNEL='yes': expected 1 (the CPU decode kernel, the default) or 0 (the PyTorch path)"
            in r.stderr.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The linear layers' GEMV (decode_linear.c, fast.Linear)

@needs_compiler
@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 5), (192, 576), (1000, 33), (3, 1536)])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_kernel_equals_the_product_by_definition(rows, cols, threads):
    torch.manual_seed(rows * cols)
    weight, x = torch.randn(rows, cols), torch.randn(1, 1, cols)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert decode_kernel.linear_applies(x, weight)
        got = decode_kernel.decode_linear(x, weight)
    finally:
        torch.set_num_threads(before)
    # sum_i W[r, i] x[i] in float64, row by row
    expected = torch.tensor([[[sum(float(w) * float(v) for w, v in zip(row, x[0, 0])) for row in weight]]],
                            dtype=torch.float64) if rows * cols < 10_000 else (weight.double() @ x[0, 0].double())[None, None]
    assert got.shape == (1, 1, rows) and got.dtype == torch.float32
    assert (got.double() - expected).abs().max().item() <= 1e-5 * (1 + expected.abs().max().item())


def test_where_the_linear_kernel_does_not_apply(monkeypatch):
    weight, x = torch.randn(6, 4), torch.randn(1, 1, 4)
    assert decode_kernel.linear_applies(x, weight) == (shutil.which("cc") is not None)
    refused = {
        "two rows (a prefill chunk or a batch)": (torch.randn(2, 1, 4), weight),
        "bf16": (x.bfloat16(), weight.bfloat16()),
        "a weight not contiguous": (x, torch.randn(4, 6).t()),
        "meta": (x.to("meta"), weight.to("meta")),
        # autograd cannot see inside the kernel
        "x needs a gradient": (x.clone().requires_grad_(), weight),
        "the weight needs a gradient": (x, torch.nn.Parameter(weight.clone())),
    }
    for why, (xx, ww) in refused.items():
        assert not decode_kernel.linear_applies(xx, ww), why
    with torch.no_grad():  # generation: parameters that need gradients, outside autograd
        assert decode_kernel.linear_applies(x, torch.nn.Parameter(weight.clone())) == (shutil.which("cc") is not None)
    monkeypatch.setenv("YARN_MINIMAL_CPU_KERNEL", "0")
    assert not decode_kernel.linear_applies(x, weight)


@needs_compiler
def test_every_linear_layer_of_a_decoding_step_runs_in_the_kernel(monkeypatch):
    # 2 layers x (wq, wk, wv, wo, w1, w2, w3) + the output projection at every decoding step; in
    # the prefill only the output projection of the prompt's last position (one row); and the
    # tokens and logits of the PyTorch path (no kernel anywhere)
    calls = count_kernel_calls(monkeypatch, "decode_linear")
    model = tiny_model(rope_for("yarn", dynamic=False), n_layers=2)
    fast_tokens, fast_logits = record(model, PROMPT, 2 * L)
    assert len(calls) == (2 * 7 + 1) * (2 * L - 1) + 1
    monkeypatch.setenv("YARN_MINIMAL_CPU_KERNEL", "0")
    slow_tokens, slow_logits = record(model, PROMPT, 2 * L)
    assert fast_tokens == slow_tokens
    for fast, slow in zip(fast_logits, slow_logits):
        assert (fast - slow).abs().max().item() <= 1e-4
