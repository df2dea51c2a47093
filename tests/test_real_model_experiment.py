"""experiments/real_model.py: the grid it plans and a --quick smoke run on the demo model.

The smoke run goes through the project's own eval scripts (four subprocesses, ~35 s of CPU,
so it is marked slow: `python -m pytest -m slow tests/test_real_model_experiment.py`). Its
check is an identity of the paper, not the code against itself: under Dynamic Scaling s = max(1, l'/L) (Sec. 3.3), so at a window of L tokens Dynamic-YaRN is
plain RoPE, while static YaRN (s = 4, attention factor 0.1 ln 4 + 1) is not."""
import json
import shutil
from pathlib import Path

import pytest

from experiments import real_model

REPO = Path(__file__).resolve().parent.parent


def test_grid_follows_the_paper_windows():
    grid = {label: windows for label, _, windows in real_model.ppl_grid(8192, [4096, 8192, 16384, 32768])}
    assert grid["RoPE"] == [4096, 8192, 16384, 32768]
    assert grid["YaRN s=2"] == [4096, 8192, 16384]          # up to L' = s L (Eq. 11)
    assert grid["PI s=4"] == [4096, 8192, 16384, 32768]
    assert grid["Dynamic-YaRN"] == [16384, 32768]           # at or below L, s = 1: plain RoPE
    assert len(grid) == 1 + 2 * 4 + 4


def test_unknown_document_is_one_clear_line(capsys):
    with pytest.raises(SystemExit):
        real_model.main(["--documents", "nosuch", "--steps", "summary"])
    assert "--documents: unknown nosuch" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_open_question_on_the_demo_model(tmp_path):
    heldout = tmp_path / "heldout"
    heldout.mkdir()
    shutil.copy(REPO / "demo" / "heldout-sample.txt", heldout / "doc.txt")  # ~9k tokens, never trained on
    out = tmp_path / "out"
    real_model.main(["--quick", "--steps", "open", "--out", str(out), "--demo-heldout", str(heldout)])
    rows = {(r["label"], r["window"]): r["perplexity"]
            for r in json.loads((out / "open" / "perplexity.json").read_text())["results"]}
    assert set(rows) == {(lab, w) for lab in ("RoPE", "YaRN s=4", "Dynamic-YaRN") for w in (256, 1024)}
    assert rows["Dynamic-YaRN", 256] == pytest.approx(rows["RoPE", 256], rel=1e-6)
    assert abs(rows["YaRN s=4", 256] / rows["RoPE", 256] - 1) > 1e-3
    passkey = json.loads((out / "open" / "passkey-dynamic-yarn-1024.json").read_text())
    assert passkey["results"][0]["length"] == 1024 and passkey["results"][0]["iterations"] == 2
    summary = (out / "SUMMARY.md").read_text()
    assert "| Dynamic-YaRN |" in summary and (out / "open_ppl.png").is_file()
