"""No writer deletes or replaces what it did not write (issue 22). Every program that writes a
file or a folder the user names is tried against (1) an existing unrelated file, (2) an existing
folder with content and (3) its own earlier output: (1) and (2) are refused with one line naming
the path, before any work (the work itself is made to fail, so a late check would show), and
nothing on disk changes; (3) is refused without --overwrite and replaced with it, while an
unrelated file beside it stays. Run in-process through cli.run_main, as each script's
`__main__` does; one real process shows the issue's reproduction end to end."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import yarn_minimal.__main__ as commands
from yarn_minimal import checkpoint, cli, data, files
from yarn_minimal import evaluation as ev
from yarn_minimal.cli import DEFAULT_CKPT

from conftest import run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import eval_passkey  # noqa: E402
import eval_perplexity  # noqa: E402
import gpu_check  # noqa: E402
import train  # noqa: E402
from experiments import demo_data, miniature, real_model  # noqa: E402

DOC = DEFAULT_CKPT.parent / "heldout-sample.txt"


def run(main, argv, capsys):
    """(exit status, stderr) of `script ARGV` as cli.run_main runs it."""
    code, _, err = run_cli(main, argv, capsys)
    return code or 0, err


def refused(main, argv, capsys, path, *words):
    """One `error:` line naming path (and words), no traceback, exit 1."""
    code, err = run(main, argv, capsys)
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    for w in (str(path), *words):
        assert w in lines[0], (w, lines[0])
    return lines[0]


def ok(main, argv, capsys):
    code, err = run(main, argv, capsys)
    assert code == 0, err


def tree(root: Path) -> dict:
    """Every file and folder under root, with a digest of each file's bytes and its inode."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_ino) if p.is_file()
            else "dir" for p in sorted(root.rglob("*"))}


def stamps(folder: Path) -> dict:
    """name -> (size, mtime) of a folder's entries: committed results, too many to hash here."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()} if folder.is_dir() else {}


def no_work(monkeypatch, *targets):
    """Make the work of a writer fail loudly: a check that came after it would show as this error."""
    def boom(*_, **__):
        raise AssertionError("the work started before the output was checked")
    for owner, name in targets:
        monkeypatch.setattr(owner, name, boom)


@pytest.fixture
def places(tmp_path):
    """An unrelated file and a folder with content, in their own room."""
    room = tmp_path / "room"
    (room / "folder" / "sub").mkdir(parents=True)
    (room / "folder" / "a.txt").write_text("keep\n")
    (room / "folder" / "sub" / "b.txt").write_text("keep too\n")
    (room / "README.md").write_text("# not an output\n")
    return room


def refuses_unrelated(main, argv_for, capsys, monkeypatch, room, targets, file_name="README.md"):
    """Cases (1) and (2): argv_for(path) is refused for an unrelated file and a folder with
    content, before the work, and nothing under room changes."""
    no_work(monkeypatch, *targets)
    before = tree(room)
    refused(main, argv_for(room / file_name), capsys, room / file_name)
    refused(main, argv_for(room / "folder"), capsys, room / "folder")
    assert tree(room) == before
    monkeypatch.undo()


def replaces_own(main, argv, capsys, outputs, beside=None, first_run=True):
    """Case (3): after a first run, the same command is refused (nothing changes), and with
    --overwrite its outputs are replaced (new inodes: renamed into place) and the unrelated file
    `beside` them stays as it was."""
    if first_run:
        ok(main, argv, capsys)
    if beside is not None:
        beside.write_text("mine, not the program's\n")
    root = Path(outputs[0]).parent
    before = tree(root)
    refused(main, argv, capsys, "", "--overwrite")
    assert tree(root) == before
    ok(main, argv + ["--overwrite"], capsys)
    after = tree(root)
    for out in outputs:
        rel = str(Path(out).relative_to(root))
        assert rel in after and after[rel] != before[rel], out
    if beside is not None:
        assert beside.read_text() == "mine, not the program's\n"


# ---------------------------------------------------------------------------------------
# convert, to each format


def test_the_issues_reproduction_as_a_process(tmp_path):
    """`convert demo x --format gguf` onto a folder with content: one line, exit 1, x intact."""
    x = tmp_path / "x"
    (x / "sub").mkdir(parents=True)
    (x / "a.txt").write_text("keep\n")
    res = subprocess.run([sys.executable, "-m", "yarn_minimal", "convert", str(DEFAULT_CKPT), str(x),
                          "--format", "gguf"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert str(x) in res.stderr and ".gguf" in res.stderr
    assert sorted(p.name for p in x.iterdir()) == ["a.txt", "sub"] and (x / "a.txt").read_text() == "keep\n"


@pytest.mark.parametrize("fmt", ["gguf", "hf", "meta"])
def test_convert(fmt, tmp_path, places, capsys, monkeypatch):
    argv = lambda dst: ["convert", str(DEFAULT_CKPT), str(dst), "--format", fmt]
    refuses_unrelated(commands.main, argv, capsys, monkeypatch, places, [(checkpoint, "load")])
    if fmt == "gguf":  # a .gguf name that is not a GGUF file, and a folder named *.gguf
        (places / "notes.gguf").write_text("text\n")
        (places / "dir.gguf").mkdir()
        refuses_unrelated(commands.main, argv, capsys, monkeypatch, places, [(checkpoint, "load")], "notes.gguf")
        refused(commands.main, argv(places / "dir.gguf"), capsys, places / "dir.gguf", "folder")
        replaces_own(commands.main, argv(tmp_path / "out" / "demo.gguf"), capsys, [tmp_path / "out" / "demo.gguf"],
                     beside=tmp_path / "out" / "notes.txt")
    else:
        # a download that this project did not save is never replaced, even with --overwrite
        download = tmp_path / "download"
        (download).mkdir()
        (download / "params.json").write_text("{}\n")
        refused(commands.main, argv(download) + ["--overwrite"], capsys, download, "not a checkpoint this project saved")
        out = tmp_path / "out"
        replaces_own(commands.main, argv(out), capsys, [out / "consolidated.00.pth" if fmt == "meta" else
                                                          out / "model.safetensors", out / "checksums.json"],
                     beside=out / "notes.txt")
        checkpoint.load(out)  # what --overwrite left loads, its checksums verified


def test_convert_into_an_earlier_checkpoint_of_another_layout(tmp_path, capsys):
    """--overwrite of an hf export with a meta one: the hf files go (load() would read them
    beside the new ones), the user's own file stays, and the result loads as the new layout."""
    out = tmp_path / "out"
    ok(commands.main, ["convert", str(DEFAULT_CKPT), str(out), "--format", "hf"], capsys)
    (out / "notes.txt").write_text("mine\n")
    ok(commands.main, ["convert", str(DEFAULT_CKPT), str(out), "--format", "meta", "--overwrite"], capsys)
    assert sorted(p.name for p in out.iterdir()) == ["checksums.json", "consolidated.00.pth", "notes.txt",
                                                     "params.json", "rope.json", "tokenizer.model",
                                                     "tokenizer_config.json"]
    checkpoint.load(out)


def test_convert_keeps_the_source_dtype(tmp_path, capsys):
    """float32 stays float32 (the demo's greedy output would change in bf16); --dtype converts."""
    import torch

    f32 = tmp_path / "f32"
    ok(commands.main, ["convert", str(DEFAULT_CKPT), str(f32), "--format", "hf", "--dtype", "float32"], capsys)
    ok(commands.main, ["convert", str(f32), str(tmp_path / "f32.gguf"), "--format", "gguf"], capsys)
    assert checkpoint.stored_dtype(tmp_path / "f32.gguf") == torch.float32
    assert checkpoint.stored_dtype(DEFAULT_CKPT) == torch.bfloat16  # the demo as shipped


def test_checksums_command(tmp_path, capsys):
    """An existing checksums.json is what catches a file changed since: replaced only with --overwrite."""
    folder = tmp_path / "download"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 10)
    ok(commands.main, ["checksums", str(folder)], capsys)
    before = tree(folder)
    refused(commands.main, ["checksums", str(folder)], capsys, folder / "checksums.json", "--overwrite")
    assert tree(folder) == before
    ok(commands.main, ["checksums", str(folder), "--overwrite"], capsys)


def test_verify_sha256(tmp_path, capsys):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF and some bytes")
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    code, _ = run(commands.main, ["verify", str(f), "--sha256", digest.upper()], capsys)
    assert code == 0
    with pytest.raises(SystemExit) as e:
        cli.run_main(commands.main, ["verify", str(f), "--sha256", "0" * 64])
    out = capsys.readouterr().out
    assert e.value.code == 1 and out.count("\n") == 1 and "MISMATCH" in out and digest in out and "0" * 64 in out
    code, _ = run(commands.main, ["verify", str(tmp_path), "--sha256", f"model.gguf={digest}"], capsys)
    assert code == 0
    refused(commands.main, ["verify", str(f), "--sha256", "abc"], capsys, "abc", "64 hex digits")
    refused(commands.main, ["verify", str(tmp_path), "--sha256", digest], capsys, str(tmp_path), "NAME=HEX")


# ---------------------------------------------------------------------------------------
# the evaluations' --out and --plot


PASSKEY = ["--lengths", "128", "--iterations", "1", "--max-new-tokens", "6"]
PERPLEXITY = ["--files", str(DOC), "--lengths", "64", "--truncate", "--max-documents", "1"]


@pytest.mark.parametrize("script", ["passkey", "perplexity"])
def test_evaluations(script, tmp_path, places, capsys, monkeypatch):
    main, flags, work = {"passkey": (eval_passkey.main, PASSKEY, [(eval_passkey, "load")]),
                         "perplexity": (eval_perplexity.main, PERPLEXITY, [(ev, "load_documents")])}[script]
    (places / "mine.json").write_text('{"a": 1}\n')
    (places / "photo.png").write_bytes(files.PNG_SIGNATURE + b"\0" * 64)  # a PNG no plotting library made
    for flag in ("--out", "--plot"):
        refuses_unrelated(main, lambda p: flags + [flag, str(p)], capsys, monkeypatch, places, work,
                          "mine.json" if flag == "--out" else "photo.png")
    no_work(monkeypatch, *work)
    refused(main, flags + ["--plot", str(places / "plot")], capsys, places / "plot", ".png")  # not plot.png
    monkeypatch.undo()
    out = tmp_path / "results"
    replaces_own(main, flags + ["--out", str(out / "r.json"), "--plot", str(out / "r.png")], capsys,
                 [out / "r.json", out / "r.png"], beside=out / "notes.txt")
    assert json.loads((out / "r.json").read_text())["config"]["overwrite"] is True


# ---------------------------------------------------------------------------------------
# data: the data tool, train.py


def test_data_tool(tmp_path, places, capsys, monkeypatch):
    argv = lambda out: ["data", str(DOC), "--tokenizer", str(DEFAULT_CKPT), "--seq-len", "64", "--out", str(out)]
    refuses_unrelated(commands.main, argv, capsys, monkeypatch, places, [(data, "load_tokenizer")])
    out = tmp_path / "tokens"
    replaces_own(commands.main, argv(out), capsys, [out / "tokens.bin", out / "meta.json"], beside=out / "notes.txt")


def test_train_out(tmp_path, places, capsys, monkeypatch):
    """--out: an unrelated file or folder is refused before the data is read; --overwrite of an
    earlier run deletes only what a run writes (the user's file in the folder stays)."""
    import torch

    torch.set_num_threads(1)
    segs = np.random.default_rng(0).integers(3, 4096, size=(2, 17))
    data.write_segments(tmp_path / "data", segs, dict(vocab_size=4096, bos_id=1, eos_id=2))
    argv = lambda out: ["--ckpt", str(DEFAULT_CKPT), "--data", str(tmp_path / "data"), "--out", str(out),
                        "--global-batch-size", "2", "--steps", "1", "--save-every", "0", "--device", "cpu"]
    refuses_unrelated(train.main, argv, capsys, monkeypatch, places, [(train, "open_segments")])
    out = tmp_path / "run"
    ok(train.main, argv(out), capsys)
    (out / "notes.txt").write_text("mine\n")
    before, written = tree(out), (out / "final" / "consolidated.00.pth").stat().st_mtime_ns
    refused(train.main, argv(out), capsys, out, "--resume", "--overwrite")
    assert tree(out) == before
    ok(train.main, argv(out) + ["--overwrite"], capsys)
    assert (out / "notes.txt").read_text() == "mine\n"
    assert (out / "final" / "consolidated.00.pth").stat().st_mtime_ns > written  # the same weights, written again
    # a name a run writes, holding something the run did not write: refused, nothing deleted
    (out / "final" / "my-eval.json").write_text("{}\n")
    before = tree(out)
    refused(train.main, argv(out) + ["--overwrite"], capsys, "final", "my-eval.json", "nothing was deleted")
    assert tree(out) == before


# ---------------------------------------------------------------------------------------
# experiments and bench


def test_miniature(tmp_path, places, capsys, monkeypatch):
    """--out as every writer; a --quick run never writes into results/."""
    fake = tmp_path / "demo_data"
    for need in ("heldout", "train-2048"):
        (fake / need).mkdir(parents=True)
    step1 = {"results": [{"label": "RoPE", "window": 256, "perplexity": 10.0}]}
    monkeypatch.setattr(miniature.Miniature, "step1", lambda self: step1)  # the steps' scripts are tested elsewhere
    argv = lambda out: ["--data", str(fake), "--steps", "1", "--out", str(out)]
    refuses_unrelated(miniature.main, argv, capsys, monkeypatch, places, [(miniature.Miniature, "check_inputs")])
    monkeypatch.setattr(miniature.Miniature, "step1", lambda self: step1)
    out = tmp_path / "mini"
    replaces_own(miniature.main, argv(out), capsys, [out / "results.json", out / "SUMMARY.md"],
                 beside=out / "notes.txt")
    # the hand-written reading at the end of SUMMARY.md survives a rerun that replaces the numbers
    summary = out / "SUMMARY.md"
    summary.write_text(summary.read_text() + "\n## Analysis\n\nWritten by hand.\n")
    ok(miniature.main, argv(out) + ["--overwrite"], capsys)
    assert summary.read_text().count("## Analysis") == 1 and summary.read_text().endswith("Written by hand.\n")
    assert "| RoPE |" in summary.read_text()
    before = stamps(ROOT / "results" / "miniature")
    for folder in ("results/miniature", "results/new"):
        refused(miniature.main, ["--quick", "--out", str(ROOT / folder)], capsys, folder, "--quick", "results/tmp")
    assert stamps(ROOT / "results" / "miniature") == before and not (ROOT / "results" / "new").exists()
    parser_help = miniature.__doc__
    assert "15.0 min" in parser_help and "110.8 min" in parser_help  # results/miniature/SUMMARY.md's wall times


def test_real_model(tmp_path, places, capsys, monkeypatch):
    """An earlier run of its own is continued (calls whose JSON exists are skipped, --overwrite
    reruns them); anything else is refused; --quick never writes into results/."""
    argv = lambda out: ["--quick", "--steps", "summary", "--out", str(out)]
    refuses_unrelated(real_model.main, argv, capsys, monkeypatch, places, [(real_model, "RealModel")])
    out = tmp_path / "rm"
    ok(real_model.main, argv(out), capsys)
    (out / "notes.txt").write_text("mine\n")
    ok(real_model.main, argv(out), capsys)
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "SUMMARY.md").is_file()
    before = stamps(ROOT / "results" / "real_model")
    refused(real_model.main, ["--quick", "--out", str(ROOT / "results" / "real_model")], capsys,
            "results/real_model", "--quick")
    assert stamps(ROOT / "results" / "real_model") == before


def test_demo_data(tmp_path, places, capsys, monkeypatch):
    from test_demo_data import MIN_CHARS, N_HELDOUT, VOCAB, _write_corpus

    source = tmp_path / "src"
    _write_corpus(source)
    argv = lambda out: ["--out", str(out), "--source-dir", str(source), "--vocab-size", str(VOCAB), "--seq-lens",
                        "256", "--heldout", str(N_HELDOUT), "--heldout-min-chars", str(MIN_CHARS)]
    refuses_unrelated(demo_data.main, argv, capsys, monkeypatch, places, [(demo_data, "read_documents")])
    out = tmp_path / "demo"
    ok(demo_data.main, argv(out), capsys)
    (out / "heldout" / "my-notes.txt").write_text("mine\n")
    heldout = sorted((out / "heldout").iterdir())
    replaces_own(demo_data.main, argv(out), capsys, [out / "manifest.json", out / "tokenizer.model",
                                                     out / "train-256" / "tokens.bin"], beside=out / "notes.txt",
                 first_run=False)
    assert sorted((out / "heldout").iterdir()) == heldout  # the held-out files again, and the user's note
    assert (out / "heldout" / "my-notes.txt").read_text() == "mine\n"


def test_gpu_check(tmp_path, places, capsys, monkeypatch):
    argv = lambda out: ["--dry-run", "--only", "memory", "--out", str(out)]
    refuses_unrelated(gpu_check.main, argv, capsys, monkeypatch, places, [(gpu_check, "dry_setup")])
    out = tmp_path / "gpu"
    replaces_own(gpu_check.main, argv(out), capsys, [out / "gpu_check.json", out / "gpu_check.md"],
                 beside=out / "notes.txt")


# ---------------------------------------------------------------------------------------
# the helper itself


def test_move_into_place_never_puts_a_file_over_a_folder(tmp_path):
    folder = tmp_path / "run"
    (folder / "step-1").mkdir(parents=True)
    with pytest.raises(files.OutputError, match="a folder"):
        files.atomic_write(folder, lambda tmp: tmp.write_bytes(b"GGUF"))
    assert (folder / "step-1").is_dir()
