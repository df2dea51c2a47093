"""The embedded demo model (demo/yarn-demo) and the miniature experiments command."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import yarn_minimal
from yarn_minimal.cli import DEFAULT_CKPT
from yarn_minimal.data import write_segments

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "demo" / "heldout-sample.txt"   # a held-out document: never trained on
CARD = DEFAULT_CKPT / "README.md"


@pytest.fixture(scope="module")
def demo():
    return yarn_minimal.load(DEFAULT_CKPT)


def test_demo_checkpoint_is_a_small_llama_in_metas_layout(demo):
    model, tok = demo
    for name in ("params.json", "consolidated.00.pth", "tokenizer.model", "rope.json", "README.md"):
        assert (DEFAULT_CKPT / name).is_file(), name
    assert sum(f.stat().st_size for f in DEFAULT_CKPT.iterdir()) < 20e6
    assert model.rope.method == "none" and model.rope.original_length == 256
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, model.args.vocab_size)
    text = "Unicode strings: ünïcödé, ✓, and 3.14159.\n    print('hi')"
    assert tok.decode(tok.encode(text)) == text  # byte fallback round-trips anything


def test_demo_heldout_loss_is_below_the_model_cards_bound(demo):
    model, tok = demo
    bound = float(re.search(r"held-out loss bound: ([0-9.]+)", CARD.read_text()).group(1))
    ids = tok.encode(SAMPLE.read_text(), bos=False)
    # the first 8 windows of L = 256 tokens, each [BOS] + 255 tokens, every token scored
    batch = torch.tensor([[tok.bos_id] + ids[i * 255:(i + 1) * 255] for i in range(8)])
    with torch.no_grad():
        loss = model(batch[:, :-1], targets=batch[:, 1:]).item()
    assert loss < bound


def test_generate_py_runs_with_only_yarn_scale():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "generate.py", "--yarn-scale", "16", "--max-new-tokens", "32"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip()) > 0
    assert "effective scale s at the end: 16" in proc.stderr


def tiny_experiment_data(folder: Path, tok) -> Path:
    """A held-out folder and an 8 x L training set, from the shipped held-out sample."""
    (folder / "heldout").mkdir(parents=True)
    text = SAMPLE.read_text()
    (folder / "heldout" / "a.txt").write_text(text)
    (folder / "heldout" / "b.txt").write_text(text[len(text) // 2:] + text[:len(text) // 2])
    ids = np.array(tok.encode(text, bos=True, eos=True))
    segments = ids[: 4 * 2048].reshape(4, 2048)
    write_segments(folder / "train-2048", segments, {"vocab_size": tok.vocab_size, "bos_id": 1, "eos_id": 2})
    return folder


def run_miniature(tmp_path, demo, steps):
    data = tiny_experiment_data(tmp_path / "data", demo[1])
    out = tmp_path / "results"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "experiments.miniature", "--quick", "--steps", steps,
                           "--data", data, "--out", out], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, json.loads((out / "results.json").read_text())


def test_miniature_quick_smoke(tmp_path, demo):
    out, results = run_miniature(tmp_path, demo, "1,4")
    step1 = results["steps"]["1"]["results"]
    assert {r["window"] for r in step1} == {256, 512, 1024}
    assert len({r["label"] for r in step1}) == 9  # RoPE + 4 methods x static/dynamic
    assert all(np.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in step1)
    sweep = results["steps"]["4"]["sweep"]
    assert sweep["recommended_factor"] == pytest.approx(0.1 * np.log(8) + 1)
    for name in ("step1_no_finetune.png", "step4_temperature_sweep.png", "SUMMARY.md"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
def test_miniature_quick_all_steps(tmp_path, demo):
    out, results = run_miniature(tmp_path, demo, "1,2,3,4,5")
    assert set(results["steps"]) == {"1", "2", "3", "4", "5"}
    assert {"pi", "ntk", "yarn", "base"} == set(results["steps"]["2"]["passkey"])
