"""rope.py against independent computations: transformers' RoPE code, the paper's worked
numbers, and Eq. 17 to Eq. 20 recomputed here in plain Python."""
import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from yarn_minimal.rope import (RopeConfig, effective_scale, frequencies, ntk_aware_base, rope_frequencies,
                               rope_tables, yarn_attention_factor)

L = 4096


def hf_inv_freq(rope_parameters, head_dim, max_pos=L, seq_len=None):
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=max_pos,
                      rope_parameters=rope_parameters)
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](cfg, "cpu", seq_len=seq_len)
    return inv_freq.double(), factor


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scale", [2.0, 4.5, 16.0])
def test_pi_matches_transformers_linear(head_dim, scale):
    ours, factor = frequencies(RopeConfig(method="pi", scale=scale), head_dim, scale)
    ref, ref_factor = hf_inv_freq({"rope_type": "linear", "factor": scale, "rope_theta": 10000.0}, head_dim)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert factor == ref_factor == 1.0


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seq_len", [1000, L, 6000, 3 * L + 7, 32768])
def test_dynamic_ntk_matches_transformers_dynamic(head_dim, seq_len):
    cfg = RopeConfig(method="ntk", scale=1.0, dynamic=True, original_length=L)
    s = effective_scale(cfg, seq_len)
    ours, _ = frequencies(cfg, head_dim, s)
    ref, _ = hf_inv_freq({"rope_type": "dynamic", "factor": 1.0, "rope_theta": 10000.0}, head_dim, seq_len=seq_len)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scale", [2.0, 4.5, 16.0, 32.0])
@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_matches_transformers_yarn(head_dim, scale, truncate):
    cfg = RopeConfig(method="yarn", scale=scale, original_length=L, truncate=truncate)
    ours, factor = frequencies(cfg, head_dim, scale)
    ref, ref_factor = hf_inv_freq({"rope_type": "yarn", "factor": scale, "rope_theta": 10000.0, "truncate": truncate,
                                   "original_max_position_embeddings": L}, head_dim, max_pos=int(scale * L))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    assert factor == pytest.approx(ref_factor, rel=1e-12)


def test_eq25_attention_factor_at_s8():
    # Eq. 25: s = 8 gives sqrt(1/t) ~= 1.208
    assert round(yarn_attention_factor(8.0), 3) == 1.208
    cos, sin = rope_tables(RopeConfig(method="yarn", scale=8.0), 128, torch.arange(1), 8.0)
    assert cos[0].tolist() == pytest.approx([0.1 * math.log(8) + 1] * 64)  # position 0: cos = sqrt(1/t)
    assert yarn_attention_factor(1.0) == 1.0


def test_ntk_aware_base_table1():
    # Table 1's "NTK (theta = 20k)" row: |D| = 128, s = 2 gives b' ~= 20221
    assert ntk_aware_base(10000.0, 2.0, 128) == pytest.approx(20221, abs=1)
    # Eq. 23: the lowest frequency is divided by exactly s
    ntk, _ = frequencies(RopeConfig(method="ntk", scale=2.0), 128, 2.0)
    theta = [10000.0 ** (-2 * d / 128) for d in range(64)]
    assert ntk[-1].item() == pytest.approx(theta[-1] / 2, rel=1e-12)
    assert ntk[0].item() == 1.0


def paper_eq17_20(head_dim, base, L, s, alpha, beta):
    """Eq. 17 to Eq. 20 written out independently, one pair at a time."""
    out = []
    for d in range(head_dim // 2):
        theta = base ** (-2 * d / head_dim)
        r = L / (2 * math.pi / theta)
        if r < alpha:
            gamma = 0.0
        elif r > beta:
            gamma = 1.0
        else:
            gamma = (r - alpha) / (beta - alpha)
        out.append((r, theta, (1 - gamma) * theta / s + gamma * theta))
    return out


@pytest.mark.parametrize("scale", [2.0, 16.0, 7.3])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_ntk_by_parts_paper_ramp_is_eq18(scale, head_dim):
    cfg = RopeConfig(method="ntk-by-parts", scale=scale, ramp="paper")
    ours, factor = frequencies(cfg, head_dim, scale)
    ref = paper_eq17_20(head_dim, 10000.0, L, scale, 1.0, 32.0)
    assert factor == 1.0
    for d, (r, theta, h) in enumerate(ref):
        assert ours[d].item() == pytest.approx(h, rel=1e-12)
        if r > 32:
            assert ours[d].item() == theta            # high frequencies: exactly unchanged
        if r < 1:
            assert ours[d].item() == theta / scale    # low frequencies: exactly PI


def test_code_ramp_llama2_worked_numbers():
    # notes: for Llama 2 at s = 16 the code's ramp spans pairs 20..46 and at pair 33 the
    # extrapolation weight is 0.50 where Eq. 18 gives 0.15
    s = 16.0
    code, _ = frequencies(RopeConfig(method="yarn", scale=s), 128, s)
    paper, _ = frequencies(RopeConfig(method="yarn", scale=s, ramp="paper"), 128, s)
    theta = rope_frequencies(128, 10000.0)
    weight = lambda h, d: ((h[d] - theta[d] / s) / (theta[d] - theta[d] / s)).item()
    assert weight(code, 33) == pytest.approx(0.50, abs=0.005)
    assert weight(paper, 33) == pytest.approx(0.15, abs=0.005)
    assert all(code[d] == theta[d] for d in range(21))
    assert all(code[d] == theta[d] / s for d in range(46, 64))


def test_dynamic_scale_never_below_floor():
    cfg = RopeConfig(method="yarn", dynamic=True, original_length=100)
    assert [effective_scale(cfg, n) for n in (1, 50, 100, 150, 1000)] == [1.0, 1.0, 1.0, 1.5, 10.0]
    tuned = RopeConfig(method="yarn", scale=4.0, dynamic=True, original_length=100)
    assert [effective_scale(tuned, n) for n in (1, 400, 800)] == [4.0, 4.0, 8.0]
    static = RopeConfig(method="yarn", scale=4.0, original_length=100)
    assert effective_scale(static, 10_000) == 4.0
    # below L dynamic YaRN is plain RoPE: same tables, no temperature
    plain = rope_tables(RopeConfig(), 64, torch.arange(50), 1.0)
    dyn = rope_tables(cfg, 64, torch.arange(50), effective_scale(cfg, 50))
    torch.testing.assert_close(dyn, plain, rtol=0, atol=0)


def test_tables_are_float32_and_precise_at_long_context():
    cfg = RopeConfig(method="yarn", scale=32.0)
    pos = torch.tensor([131071])
    cos, sin = rope_tables(cfg, 128, pos, 32.0)
    assert cos.dtype == torch.float32
    inv, factor = frequencies(cfg, 128, 32.0)
    exact = [math.cos(131071 * f) * factor for f in inv.tolist()]
    assert cos[0].tolist() == pytest.approx(exact, abs=1e-6)


@pytest.mark.parametrize("kwargs, field", [
    (dict(method="linear"), "method"), (dict(scale=0.5), "scale"), (dict(original_length=0), "original_length"),
    (dict(ramp="cosine"), "ramp"), (dict(alpha=32, beta=1), "alpha"), (dict(scale=4.0), "method .none."),
    (dict(dynamic=True), "method .none."),
])
def test_bad_config_is_a_clear_error(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RopeConfig(**kwargs)


def test_odd_head_dim_is_a_clear_error():
    with pytest.raises(ValueError, match="head_dim"):
        rope_frequencies(63, 10000.0)


def test_cli_table_and_json(capsys):
    from conftest import rope_command as main
    main(["--method", "ntk", "--scale", "2", "--json"])
    out = capsys.readouterr().out
    import json
    data = json.loads(out)
    assert len(data["inv_freq"]) == 64 and data["attention_factor"] == 1.0
    assert data["inv_freq"][-1] == pytest.approx(10000 ** (-126 / 128) / 2)
    main(["--method", "yarn", "--dynamic", "--seq-len", "32768", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["scale"] == 8.0 and data["attention_factor"] == pytest.approx(0.1 * math.log(8) + 1)
    main(["--method", "yarn", "--scale", "16"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 64 and lines[1].split()[0] == "d"


def run_python(*argv: str, path: str = "") -> "subprocess.CompletedProcess":
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), path])), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-W", "error::RuntimeWarning", *argv], env=env, capture_output=True,
                          text=True, timeout=120)


def test_module_command_line_runs_without_runpy_warning():
    """`python -m yarn_minimal rope` (and its old name, `python -m yarn_minimal.rope`) with RuntimeWarnings as errors: runpy warns when importing the
    package has already run the module it is about to run as __main__, which plain imports in
    __init__.py would do. Any other import of the package gets the whole API."""
    import json

    import yarn_minimal

    for command in (["yarn_minimal", "rope"], ["yarn_minimal.rope"]):
        r = run_python("-m", *command, "--method", "ntk", "--scale", "2", "--json")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert json.loads(r.stdout)["inv_freq"][-1] == pytest.approx(10000 ** (-126 / 128) / 2)  # Eq. 16: lowest / s
    where = dict(RopeConfig="rope", load="checkpoint", generate="generation", GenerationConfig="generation",
                 Transformer="model", open_tokenizer="tokenizer")
    assert all(getattr(yarn_minimal, name).__module__ == f"yarn_minimal.{module}" for name, module in where.items())
    assert all(hasattr(yarn_minimal, name) for name in yarn_minimal.__all__)


@pytest.mark.slow  # a process that imports the whole package: 3-7 s on two shared cores
def test_package_api_is_complete_while_another_package_starts_with_python_m(tmp_path):
    # __init__.py leaves its API out only while runpy starts one of yarn_minimal's own modules
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "__init__.py").write_text("import yarn_minimal\nprint(yarn_minimal.load.__module__)\n")
    (tmp_path / "other" / "tool.py").write_text("")
    r = run_python("-m", "other.tool", path=str(tmp_path))
    assert r.returncode == 0 and r.stdout.split() == ["yarn_minimal.checkpoint"], r.stderr
