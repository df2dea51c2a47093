"""Steps 6 and 7 of the miniature (experiments/curves.py): the numbers read off learning curves,
checked by hand, and the --quick run end to end."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from experiments import curves, miniature  # noqa: E402
from conftest import run_cli  # noqa: E402
from test_demo import demo, tiny_experiment_data  # noqa: E402,F401


def test_steps_to_target_reads_between_saved_steps():
    steps, ppl = [0, 4, 8, 16], [100.0, 60.0, 40.0, 30.0]
    assert curves.steps_to_target(steps, ppl, 100.0) == 0  # already there before fine-tuning
    assert curves.steps_to_target(steps, ppl, 40.0) == pytest.approx(8)  # exactly at a saved step
    assert curves.steps_to_target(steps, ppl, 29.0) is None  # never reached
    # sqrt(40 * 30) is half-way from 40 to 30 in log perplexity, so half-way from 8 to 16 in
    # log step: sqrt(8 * 16)
    assert curves.steps_to_target(steps, ppl, math.sqrt(40 * 30)) == pytest.approx(math.sqrt(8 * 16))
    # from step 0 the step axis is linear: half-way in log ppl between 100 and 60 is step 2
    assert curves.steps_to_target(steps, ppl, math.sqrt(100 * 60)) == pytest.approx(2.0)
    # the first crossing counts, not a later one after a rise
    assert curves.steps_to_target([0, 4, 8, 16], [50.0, 30.0, 45.0, 20.0], 40.0) == pytest.approx(
        4 * (math.log(50) - math.log(40)) / (math.log(50) - math.log(30)))


def test_fairest_lr_minimizes_the_worst_methods_gap_to_its_own_best():
    final = {"pi": {1e-4: 50.0, 5e-4: 40.0, 1e-3: 44.0},   # best at 5e-4
             "yarn": {1e-4: 30.0, 5e-4: 33.0, 1e-3: 36.0}}  # best at 1e-4
    lr, worst = curves.fairest_lr(final)
    # worst ratios: 1e-4 max(50/40, 1) = 1.25; 5e-4 max(1, 33/30) = 1.10; 1e-3 max(1.1, 1.2) = 1.2
    assert worst == pytest.approx({1e-4: 1.25, 5e-4: 1.10, 1e-3: 1.20})
    assert lr == 5e-4


def test_saved_steps_are_geometric():
    assert curves.saved_steps(128) == [4, 8, 16, 32, 64]
    assert curves.saved_steps(4) == [1, 2]
    assert curves.saved_steps(1) == []


def test_claim_table_targets_and_spread():
    def run(ppl):
        return {"results": [{"window": 2048, "step": s, "perplexity": p} for s, p in zip([0, 4, 8], ppl)]}
    runs = {"pi": {0: run([90, 60, 40]), 1: run([90, 64, 44])}, "yarn": {0: run([50, 40, 30]), 1: run([50, 42, 31])}}
    table, claim = curves.claim_table(runs, 2048, tokens_per_step=8192)
    # seed by seed: PI's own final value, and 1.03 x the best final of that seed
    assert claim["targets"]["PI's final perplexity"] == {0: 40, 1: 44}
    assert claim["targets"]["1.03 x the best final perplexity"] == pytest.approx({0: 1.03 * 30, 1: 1.03 * 31})
    needed = claim["steps_needed"]["PI's final perplexity"]
    assert needed["pi"] == [8, 8]  # PI reaches its own final value at its last step
    # yarn seed 1 crosses 44 between step 0 (50) and step 4 (42): linear in step from step 0
    assert needed["yarn"][1] == pytest.approx(4 * (math.log(50) - math.log(44)) / (math.log(50) - math.log(42)))
    # yarn seed 0 crosses 40 exactly at step 4
    assert needed["yarn"][0] == pytest.approx(4)
    assert claim["steps_needed"]["1.03 x the best final perplexity"]["pi"] == [None, None]
    assert "not reached by 2 of 2 seeds" in table and "| final perplexity | 42.00 (40.00-44.00) |" in table


def test_quick_learning_curves_end_to_end(tmp_path, demo):  # noqa: F811
    """`--quick --steps 6,7` in a scratch folder: every fine-tune, evaluation, table and plot."""
    data = tiny_experiment_data(tmp_path / "data", demo[1])
    out = tmp_path / "results"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "experiments.miniature", "--quick", "--steps", "6,7", "--data", data,
                           "--out", out], cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())["steps"]
    six = results["6"]
    assert six["lr"] in (5e-4, 1e-3) and set(six["curves"]) == set(curves.METHODS)
    for by_seed in six["curves"].values():
        steps, ppl = curves.curve(by_seed["0"], 2048)
        assert steps == [0, 1, 2, 4] and all(math.isfinite(p) and p > 1 for p in ppl)
    assert len(results["7"]["perplexity"]["0"]["results"]) == 3 * 3  # 3 models x windows L, 2L, 4L
    summary = (out / "SUMMARY.md").read_text()
    assert "## 6. How many fine-tuning steps" in summary and "## 7. s = 32 grown from s = 16" in summary
    for name in ("step6_learning_curves.png", "step6_tokens.png"):
        assert (out / name).stat().st_size > 0
    # --report-only writes the same SUMMARY.md again from results.json, running nothing
    (out / "SUMMARY.md").unlink()
    proc = subprocess.run([sys.executable, "-m", "experiments.miniature", "--report-only", "--overwrite", "--out", out],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "$ " not in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "SUMMARY.md").read_text() == summary


@pytest.mark.parametrize("flags, expected", [
    (["--seeds", "0,-1"], "seeds are >= 0"),
    (["--seeds", "a"], "expected whole numbers separated by commas"),
    (["--sweep-lrs", "1e-3,x"], "expected numbers separated by commas"),
    (["--sweep-lrs", "0,1e-3"], "learning rates are finite and > 0"),
    (["--sweep-lrs", "nan"], "learning rates are finite and > 0"),
    (["--curve-steps", "0"], "--curve-steps: must be a whole number >= 1, got 0"),
    (["--sweep-steps", "-2"], "--sweep-steps: must be a whole number >= 1"),
    (["--grow-steps", "1"], "--grow-steps 1: at least 2"),
])
def test_bad_step_6_and_7_flags_are_one_line(flags, expected, tmp_path, capsys):
    code, out, err = run_cli(miniature.main, ["--quick", "--steps", "6", "--out", str(tmp_path / "r"), *flags], capsys)
    lines = err.strip().splitlines()
    assert code != 0 and expected in lines[-1] and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_report_only_needs_results(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(miniature.main, ["--report-only", "--out", str(tmp_path / "empty")], capsys)
    assert code == 1 and "--report-only: " in err and "holds no results to report" in err.strip().splitlines()[-1]
    assert list((tmp_path / "empty").iterdir()) == []
