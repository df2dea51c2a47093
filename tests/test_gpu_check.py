"""bench/gpu_check.py --dry-run: the GPU checklist's logic on the CPU (tiny shapes, gloo, SDPA),
so that the script a GPU machine will run is known to work end to end before it gets one."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_writes_every_check(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = report["checks"]
    assert report["dry_run"] is True and "torch" in report and "machine" in report
    assert list(checks) == ["memory", "generate_128k", "flash_vs_sdpa", "compile_decode", "fsdp_resume", "train_mfu"]
    assert checks["memory"]["status"] == "skipped" and "CUDA" in checks["memory"]["skipped"]
    for name in list(checks)[1:]:
        assert checks[name]["status"] == "ok", (name, checks[name])
        assert checks[name]["seconds"] >= 0
    gen = checks["generate_128k"]
    static, dynamic = gen["static YaRN s=32"], gen["Dynamic-YaRN"]
    assert static["final_scale"] == 32.0 and 1.0 < dynamic["final_scale"] <= 32.0  # s = l'/L at the last step
    assert static["decode_tok_s"] > 0 and dynamic["decode_tok_s"] > 0 and static["peak_gib"] is None  # no CUDA
    flash = checks["flash_vs_sdpa"]
    assert flash["Tq"] < flash["Tk"] and flash["greedy_tokens_equal"] is True
    assert flash["max_abs_logit_diff_prefill_chunk"] < 1e-4  # float32 stand-in vs SDPA: the same function
    decode = checks["compile_decode"]
    assert decode["bound_tok_s"] > 0 and decode["eager_tok_s"] > 0 and decode["compile_tok_s"] is None
    resume = checks["fsdp_resume"]
    assert resume["bitwise_equal"] is True and resume["losses_straight"] == resume["losses_resumed"]
    mfu = checks["train_mfu"]
    assert mfu["tokens_per_s"] > 0 and mfu["mfu"] is None and mfu["loss"] > 0  # no peak FLOP/s for a CPU
    table = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in table and all(f"| {name} |" in table for name in checks)


def test_a_failing_check_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    def broken(setup):
        raise ValueError("broken on purpose")

    monkeypatch.setitem(gpu_check.CHECKS, "generate_128k", broken)
    results = gpu_check.run_checks(gpu_check.dry_setup(), ["generate_128k", "memory"])
    assert results["generate_128k"]["status"] == "failed" and "broken on purpose" in results["generate_128k"]["error"]
    assert results["memory"]["status"] == "skipped"
    assert "broken on purpose" in gpu_check.markdown({"dry_run": True, "machine": "x", "checks": results})
