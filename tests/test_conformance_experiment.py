"""experiments/conformance.py end to end: `--quick` on three configs (about 10 s on 2 cores).

The numbers it writes must come from the tools: transformers' inv_freq for Linear-PI is recomputed
here from transformers' own RoPE init and Eq. 10 written out (theta / s), and Yarn-Llama-2-64k's
factor is Eq. 25's form 0.1 ln 16 + 1; the tiny-model check must be able to fail (gpt-oss' truncate:
false, which llama.cpp cannot express, differs there by far more than its noise floor)."""
import json
import math

import pytest
import torch

from experiments import conformance

QUICK = ["Yarn-Llama-2-7b-64k", "gpt-oss-20b", "Linear-PI-factor-4"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("conformance") / "out"
    conformance.main(["--quick", "--configs", ",".join(QUICK), "--out", str(out)])
    return out, json.loads((out / "results.json").read_text())


def test_quick_run_writes_every_config(quick_run):
    out, res = quick_run
    assert [r["name"] for r in res["configs"]] == QUICK
    summary = (out / "SUMMARY.md").read_text()
    assert all(f"| {name} |" in summary for name in QUICK)
    assert str(out.parent) not in json.dumps(res) + summary  # no absolute paths in what it writes
    for r in res["configs"]:
        assert r["tokens"] == 1024 + conformance.PAST and r["effect"] > 1.0  # the RoPE change is visible at all


def test_transformers_numbers_are_transformers(quick_run):
    """Linear-PI: transformers' own init, against Eq. 10 written here, gives the written difference."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    _, res = quick_run
    row = next(r for r in res["configs"] if r["name"] == "Linear-PI-factor-4")
    conf = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=4096,
                       rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    inv, factor = ROPE_INIT_FUNCTIONS["linear"](conf, "cpu")
    pi = 10000.0 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128) / 4  # Eq. 10
    rel = ((inv.double() - pi).abs() / pi).max().item()
    cell = row["inv_freq"]["transformers"]
    assert 0 < rel < 1e-6 and cell["inv_freq_rel"] == pytest.approx(rel, rel=1e-9)
    assert cell["factor"] == factor == 1.0
    yarn = next(r for r in res["configs"] if r["name"] == "Yarn-Llama-2-7b-64k")
    assert yarn["inv_freq"]["transformers"]["factor"] == pytest.approx(0.1 * math.log(16) + 1, abs=1e-12)
    assert yarn["authors"]["factor"] == pytest.approx(1.2772588722, abs=1e-9)


def test_model_check_can_fail(quick_run):
    """gpt-oss: transformers honours truncate: false as the formulas do; llama.cpp always floors/ceils
    the ramp bounds, so its logits differ by far more than the plain-RoPE noise floor."""
    _, res = quick_run
    row = next(r for r in res["configs"] if r["name"] == "gpt-oss-20b")
    assert row["logits"]["transformers"]["agrees"]
    cell = row["logits"]["llama.cpp"]
    if "refused" in cell:
        assert "not installed" in cell["refused"]
        pytest.skip("llama-cpp-python is not installed")
    assert not cell["agrees"] and cell["diff"] > 100 * cell["floor"]


def test_quick_never_writes_into_results(tmp_path):
    with pytest.raises(SystemExit, match="never writes into results/"):
        conformance.main(["--quick", "--out", str(conformance.RESULTS / "conformance")])


def test_out_checked_before_any_work(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="nothing in it is replaced"):
        conformance.main(["--quick", "--out", str(tmp_path)])


def test_published_dicts_left_as_published(quick_run):
    """transformers standardises the rope_scaling dict it is handed in place; the run must copy it
    first, or a later tool reads transformers' rewrite (a top-level original length moved inside)."""
    from tests.conformance_configs import BY_NAME

    assert BY_NAME["Yarn-Llama-2-7b-64k"]["rope_scaling"] == {"factor": 16.0, "finetuned": True,
                                                              "original_max_position_embeddings": 4096, "type": "yarn"}
