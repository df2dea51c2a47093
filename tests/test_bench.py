"""bench/decode_traffic.py and bench/memory_7b.py on tiny models, against the bytes counted by
hand from the shapes: every weight and every cached key and value read once per decode step;
weights + K + V live through generation. bench/bench_decode_kernel.py runs and prints its table."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_decode_kernel  # noqa: E402
import decode_traffic  # noqa: E402
import memory_7b  # noqa: E402
from yarn_minimal.model import ModelArgs  # noqa: E402
from yarn_minimal.rope import RopeConfig  # noqa: E402

L = 256
STATIC = RopeConfig(method="yarn", scale=8.0, original_length=L)
DYNAMIC = RopeConfig(method="yarn", dynamic=True, original_length=L)


D, LAYERS, HIDDEN = 512, 4, 1376  # head_dim 64 like Llama 2; hidden: 2/3 of 4 x 512 rounded up to 32


def tiny(rope):
    return ModelArgs(dim=D, n_layers=LAYERS, n_heads=8, vocab_size=96, multiple_of=32, rope=rope)


def by_hand(positions):
    """Weights and K + V bytes (bf16) from the shapes alone."""
    weights = 2 * (2 * 96 * D + LAYERS * (4 * D * D + 3 * D * HIDDEN + 2 * D) + D)
    kv = 2 * LAYERS * positions * D * 2
    return weights, kv


def test_decode_traffic_against_the_bytes_of_weights_and_cache():
    context = 8191
    weights, kv = by_hand(context + 1)
    static = decode_traffic.decode_traffic(tiny(STATIC), context)
    dynamic = decode_traffic.decode_traffic(tiny(DYNAMIC), context)
    assert (static["weights"], static["kv"]) == (weights, kv)
    assert dynamic["scale"] == pytest.approx((context + 1) / L) and static["scale"] == 8.0
    # static: each weight and each cached key and value read once, plus small activations
    assert weights + kv <= static["bytes"] <= 1.05 * (weights + kv)
    # dynamic, on top: every pre-RoPE key read and its rotation written (rope_op, one op),
    # the rotated keys read by attention instead of stored ones (same bytes), and the rotation
    # table of all positions at the new s: written once as complex64 (8 bytes per position and
    # pair; its two factors are 64 and context/64 rows) and read by each layer's rotation
    keys = kv // 2
    table = (context + 1) * 32 * 8 * (1 + LAYERS)
    extra = dynamic["bytes"] - static["bytes"]
    assert 2 * keys <= extra <= 1.05 * (2 * keys + table)


@pytest.mark.slow  # 15-30 s
def test_decode_traffic_7b_at_128k_dynamic_at_most_twice_static(capsys):
    decode_traffic.main(["--json"])
    assert json.loads(capsys.readouterr().out)["ratio"] <= 2.0


@pytest.mark.slow  # 3 minutes
def test_memory_7b_at_128k_fits_77_5_gib(capsys):
    memory_7b.main(["--json"])
    for name, row in json.loads(capsys.readouterr().out).items():
        assert row["floor"] == (6_738_415_616 * 2 + 2 * 32 * 131072 * 4096 * 2), name  # 12.55 + 64 GiB
        assert row["peak"] <= 77.5 * 2 ** 30, name


def test_memory_peak_against_weights_and_cache():
    prompt, new, chunk = 2000, 16, 512
    weights, kv = by_hand(prompt + new)
    for rope in (STATIC, DYNAMIC):
        r = memory_7b.peak_memory(tiny(rope), prompt, new, prefill_chunk=chunk)
        assert r["floor"] == weights + kv
        # above the floor: one forward pass's work. By hand, generously: a prefill chunk's
        # activations (residual, q/k/v/out, SwiGLU's three hidden-wide tensors, bf16), one
        # layer's rotated keys, the rotation table (complex64) with 8x that in temporaries
        activations = chunk * (8 * 256 + 3 * 704) * 2
        table = (prompt + new) * 32 * 8
        assert weights + kv < r["peak"] <= weights + kv + activations + kv // 4 + 9 * table, rope
    assert memory_7b.attention_module.flash_attn_func is not memory_7b.flash_attn_stand_in  # restored


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on this machine")
def test_bench_decode_kernel_prints_its_table(capsys):
    bench_decode_kernel.main(["--positions", "300", "2100", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                              "--layers", "2", "--rounds", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0] for row in rows] == ["| 300", "| 2100"]
    assert all(row.count("x |") == 2 for row in rows)


@pytest.mark.parametrize("argv, needle", [
    (["--positions", "0"], "--positions: must be >= 1, got 0"),
    (["--head-dim", "31"], "--head-dim must be even (RoPE rotates pairs) and --heads a multiple of --kv-heads; "
                           "got 31, 8 and 8"),
    (["--heads", "6", "--kv-heads", "4"], "got 32, 6 and 4"),
])
def test_bench_decode_kernel_bad_arguments(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        bench_decode_kernel.main(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


# generate.py --threads (issue 23, item 3): here with the other speed settings' tests

@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_generate_threads_one_runs(torch_threads, capsys):
    import generate
    from conftest import run_cli

    code, out, err = run_cli(generate.main, ["--threads", "1", "--prompt", "hi", "--max-new-tokens", "2"], capsys)
    assert code == 0 and torch.get_num_threads() == 1 and "generated: 2 tokens" in err


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_generate_threads_bad_value_is_one_line(value, torch_threads, capsys):
    import generate
    from conftest import run_cli

    code, _, err = run_cli(generate.main, ["--threads", value], capsys)
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and "--threads" in errors[0] and value in errors[0]


def test_generate_threads_default_is_the_physical_cores():
    import generate

    assert 1 <= generate.physical_cores() <= len(os.sched_getaffinity(0))


# bench/bench_vs_llamacpp.py (issue 23, item 4) on the demo model: no GGUF, so llama.cpp is skipped

def test_bench_vs_llamacpp_on_the_demo_model(torch_threads, capsys):
    import bench_vs_llamacpp

    bench_vs_llamacpp.main(["--ckpt", str(Path(__file__).resolve().parent.parent / "demo" / "yarn-demo"),
                            "--prompt-tokens", "64", "--new-tokens", "4", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "bound" in out and "| yarn-minimal | " in out and "%" in out.splitlines()[-2]
    assert "llama.cpp: skipped" in out.splitlines()[-1]


def test_bench_vs_llamacpp_without_llama_cpp_says_how_to_install(torch_threads, capsys, monkeypatch, tmp_path):
    import bench_vs_llamacpp

    real = bench_vs_llamacpp.importlib.util.find_spec
    monkeypatch.setattr(bench_vs_llamacpp.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    monkeypatch.setattr(bench_vs_llamacpp, "load", lambda path, dtype: demo_model())
    gguf = tmp_path / "model.gguf"
    bench_vs_llamacpp.main(["--ckpt", str(gguf), "--prompt-tokens", "16", "--new-tokens", "2", "--rounds", "1"])
    assert "pip install llama-cpp-python" in capsys.readouterr().out.splitlines()[-1]


def demo_model():
    from yarn_minimal.checkpoint import load

    return load(Path(__file__).resolve().parent.parent / "demo" / "yarn-demo")


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--new-tokens", "x"], ["--prompt-tokens", "-1"]])
def test_bench_vs_llamacpp_bad_arguments(argv, capsys):
    import bench_vs_llamacpp

    with pytest.raises(SystemExit) as e:
        bench_vs_llamacpp.main(argv)
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err
