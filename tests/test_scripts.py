"""A careless user's commands (issue 13): every failure of every script is one line on stderr,
a non-zero exit and no traceback (`--debug` shows it), and leaves no empty or half-written
output folder. Most run in-process through cli.run_main, which is what each script's
`if __name__ == "__main__"` calls; two run as real processes to see the whole path."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from yarn_minimal import cli
import yarn_minimal.__main__ as commands
from yarn_minimal.cli import DEFAULT_CKPT

from conftest import run_cli as run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import eval_passkey  # noqa: E402
import eval_perplexity  # noqa: E402
import generate  # noqa: E402
import train  # noqa: E402


def one_line_error(code, err, *words):
    """Progress lines may come before it; the failure itself is one line, the last."""
    lines = [l for l in err.splitlines() if l.startswith(("error:", "interrupted"))]
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and err.rstrip("\n").endswith(lines[0]), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def corrupt_demo(tmp_path_factory):
    """The issue's reproduction: 200000 bytes of 0xff at offset 4,000,000 of the demo's shard,
    in a copy without checksums.json (as Meta's download comes)."""
    folder = tmp_path_factory.mktemp("corrupt") / "demo"
    shutil.copytree(DEFAULT_CKPT, folder, ignore=shutil.ignore_patterns("checksums.json", "README.md"))
    shard = folder / "consolidated.00.pth"
    raw = bytearray(shard.read_bytes())
    raw[4_000_000:4_200_000] = b"\xff" * 200_000
    shard.write_bytes(bytes(raw))
    return folder


def test_corrupt_shard_stops_generate_and_both_evals(corrupt_demo, tmp_path, capsys):
    doc = tmp_path / "doc"
    doc.write_text("some words " * 50)
    for main, argv in [(generate.main, ["--ckpt", str(corrupt_demo), "--prompt", "hi", "--max-new-tokens", "2"]),
                       (eval_perplexity.main, ["--ckpt", str(corrupt_demo), "--files", str(doc), "--lengths", "64"]),
                       (eval_passkey.main, ["--ckpt", str(corrupt_demo), "--lengths", "128", "--iterations", "1"])]:
        code, out, err = run(main, argv, capsys)
        one_line_error(code, err, "consolidated.00.pth", "corrupt")
        assert out == ""


def test_debug_shows_the_traceback(corrupt_demo, capsys):
    code, _, err = run(generate.main, ["--ckpt", str(corrupt_demo), "--prompt", "hi", "--debug"], capsys)
    assert code != 0 and "Traceback" in err and "consolidated.00.pth" in err


def test_ctrl_c_in_generate_during_prefill(capsys, monkeypatch):
    """The issue's report: Ctrl-C while the prompt is being processed printed a traceback."""
    def prefill_interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(generate, "stream", prefill_interrupted)
    code, _, err = run(generate.main, ["--prompt", "hi"], capsys)
    assert code == 130 and one_line_error(code, err) == "interrupted"


def test_ctrl_c_and_unexpected_errors_are_one_line(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    def broken(argv):
        raise TypeError("something the scripts did not foresee")

    code, _, err = run(interrupted, [], capsys)
    assert code == 130 and one_line_error(code, err) == "interrupted"
    code, _, err = run(broken, [], capsys)
    one_line_error(code, err, "TypeError", "--debug")


def test_bad_paths(tmp_path, capsys):
    code, _, err = run(generate.main, ["--ckpt", str(tmp_path / "nope")], capsys)
    one_line_error(code, err, "nope", "not a folder")
    code, _, err = run(eval_perplexity.main, ["--files", str(tmp_path / "missing.txt"), "--lengths", "64"], capsys)
    one_line_error(code, err, "missing.txt")
    code, _, err = run(commands.main, ["convert", str(tmp_path / "nope"), str(tmp_path / "out"), "--format", "hf"],
                       capsys)
    one_line_error(code, err, "nope")
    assert not (tmp_path / "out").exists()


def test_data_tool_failures_leave_no_folder(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    tokenizer = str(DEFAULT_CKPT / "tokenizer.model")
    for inputs, words in [([str(bad)], ("latin1.txt", "UTF-8")), ([str(tmp_path / "none.txt")], ("none.txt",))]:
        out = tmp_path / "out"
        code, _, err = run(commands.main, ["data", *inputs, "--tokenizer", tokenizer, "--seq-len", "16", "--out", str(out)], capsys)
        one_line_error(code, err, *words)
        assert not out.exists()
    short = tmp_path / "short.txt"
    short.write_text("hi")
    code, _, err = run(commands.main, ["data", str(short), "--tokenizer", tokenizer, "--seq-len", "4096", "--out",
                                   str(tmp_path / "out")], capsys)
    one_line_error(code, err, "fewer than one segment")
    assert not (tmp_path / "out").exists()


def test_checksums_protect_a_download(tmp_path, capsys):
    """`python -m yarn_minimal checksums FOLDER` on a download without checksums.json;
    a later change to its tokenizer (which has no checksum of its own) then stops the load."""
    folder = tmp_path / "download"
    shutil.copytree(DEFAULT_CKPT, folder, ignore=shutil.ignore_patterns("checksums.json"))
    code, _, err = run(commands.main, ["checksums", str(folder)], capsys)
    assert code in (0, None) and sorted(json.loads((folder / "checksums.json").read_text())) == \
        ["consolidated.00.pth", "params.json", "rope.json", "tokenizer.model"]
    raw = bytearray((folder / "tokenizer.model").read_bytes())
    raw[-100] ^= 1
    (folder / "tokenizer.model").write_bytes(bytes(raw))
    code, _, err = run(generate.main, ["--ckpt", str(folder), "--prompt", "hi"], capsys)
    one_line_error(code, err, "tokenizer.model", "CRC-32")


def test_params_json_without_dim_is_named(tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(DEFAULT_CKPT, folder, ignore=shutil.ignore_patterns("checksums.json", "README.md"))
    params = json.loads((folder / "params.json").read_text())
    del params["dim"]
    (folder / "params.json").write_text(json.dumps(params))
    code, _, err = run(generate.main, ["--ckpt", str(folder), "--prompt", "hi"], capsys)
    one_line_error(code, err, "params.json", "'dim'")


def test_labels_tell_the_truth(tmp_path, capsys, recwarn):
    """An extension-less text file is read; a window longer than the document warns with the
    tokens it scored; a dynamic row shows the s in effect at each window; --max-new-tokens 0
    prints no nan."""
    doc = tmp_path / "README"  # no extension
    doc.write_text(cli.DEMO_PROMPT.read_text()[:3000])
    out = tmp_path / "r.json"
    code, stdout, err = run(eval_perplexity.main, ["--files", str(doc), "--lengths", "256,4096", "--truncate",
                                                   "--config", "method=yarn,dynamic=1", "--out", str(out)], capsys)
    assert code in (0, None), err
    result = json.loads(out.read_text())["results"]
    long = next(r for r in result if r["window"] == 4096)
    assert long["short_documents"] == 1
    warned = " | ".join(str(w.message) for w in recwarn)  # printed as `warning: ...` lines by run_main
    assert f"window 4096: 1 of 1 documents are shorter than the window, so this column scores {long['tokens']} tokens" \
        in warned
    # s = max(1, l/L) with L = 256: 256 / 256 = 1 at W = 256; at W = 4096 the document (+ BOS) sets l
    n_doc = long["tokens"] + 1
    assert [r["scale_in_effect"] for r in result] == [1.0, n_doc / 256]
    assert "s in effect at each window" in stdout and "Dynamic-YaRN (s=max(1, l/L), L=256)" in stdout
    code, _, err = run(generate.main, ["--prompt", "hi", "--max-new-tokens", "0"], capsys)
    assert code in (0, None) and "nan" not in err and "not run" in err
    assert "effective scale s at the end: none (no forward pass ran)" in err  # not the default 1


def test_empty_document_gets_one_consistent_message(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run(eval_perplexity.main, ["--files", str(empty), "--lengths", "64"], capsys)
    assert "min-tokens" not in err and "0 documents kept, 1 skipped (empty)\n" in err, err
    assert one_line_error(code, err) == "error: no document left to score: 1 skipped (empty)"


def test_help_example_is_what_it_says():
    """eval_perplexity.py --help's Dynamic-PI example gives Dynamic PI with s = max(1, W/L)."""
    from yarn_minimal.eval_report import apply_config, parse_config
    from yarn_minimal.rope import RopeConfig, effective_scale

    text = eval_perplexity.parse_args.__code__.co_consts
    example = next(c for c in text if isinstance(c, str) and "label=Dynamic-PI" in c)
    spec = example.split("--config ")[1].split(":")[0].split(" ")[0]
    rope = apply_config(RopeConfig(original_length=4096), parse_config(spec), spec)
    assert rope.method == "pi" and rope.dynamic
    assert [effective_scale(rope, n) for n in (2048, 4096, 32768)] == [1.0, 1.0, 8.0]


def run_process(*argv, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=120, **kw)


def test_train_missing_data_as_a_process(tmp_path):
    res = run_process(str(ROOT / "train.py"), "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"))
    one_line_error(res.returncode, res.stderr, "no-data", "meta.json")
    assert not (tmp_path / "run").exists()


def test_closed_pipe_is_quiet():
    """`python -m yarn_minimal rope | head -1`: the reader is gone before the table is written."""
    p = subprocess.Popen([sys.executable, "-m", "yarn_minimal", "rope"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141 and err == "", err
