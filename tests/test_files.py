"""files.atomic_write: what a reader sees under the real name is the old content or the new one;
check_output: what a writer may write over; check_sha256."""
import pytest

from yarn_minimal.files import (Output, OutputError, atomic_write, check_output, check_sha256, holds, publish,
                                starts_with, temporary)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_folder_replaces_a_folder_whole(tmp_path):
    path = tmp_path / "final"
    path.mkdir()
    (path / "stale.bin").write_text("from an earlier save")
    temporary(path).mkdir()  # left by a killed run
    (temporary(path) / "junk").write_text("x")

    def write(tmp):
        tmp.mkdir()
        (tmp / "new.bin").write_text("new")

    atomic_write(path, write)
    assert sorted(p.name for p in path.iterdir()) == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no .tmp, no .old


# ---------------------------------------------------------------------------------------
# check_output: what a writer may write over


def test_check_output_for_a_file(tmp_path):
    gguf = Output("a GGUF file", starts_with(b"GGUF"), suffix=".gguf")
    assert check_output(tmp_path / "new.gguf", gguf) == tmp_path / "new.gguf"
    with pytest.raises(OutputError, match="not a .gguf file name"):
        check_output(tmp_path / "run", gguf)
    (tmp_path / "text.gguf").write_text("hello")
    (tmp_path / "old.gguf").write_bytes(b"GGUF...")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(OutputError, match="not a GGUF file; it is never replaced"):
        check_output(tmp_path / "text.gguf", gguf, overwrite=True)
    with pytest.raises(OutputError, match="an existing folder"):
        check_output(tmp_path / "dir.gguf", gguf, overwrite=True)
    with pytest.raises(OutputError, match="--overwrite"):
        check_output(tmp_path / "old.gguf", gguf)
    check_output(tmp_path / "old.gguf", gguf, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output(tmp_path / "file" / "x.gguf", gguf)


def test_check_output_for_a_folder(tmp_path):
    kind = Output("a dataset", holds("meta.json"), folder=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text("x")
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "meta.json").write_text("{}")
    (tmp_path / "file").write_text("x")
    check_output(tmp_path / "new", kind)
    check_output(tmp_path / "empty", kind)
    with pytest.raises(OutputError, match="a folder holding a.txt, not a dataset; nothing in it is replaced"):
        check_output(tmp_path / "other", kind, overwrite=True)
    with pytest.raises(OutputError, match="an existing file"):
        check_output(tmp_path / "file", kind, overwrite=True)
    with pytest.raises(OutputError, match="holds a dataset; pass --overwrite"):
        check_output(tmp_path / "ours", kind)
    check_output(tmp_path / "ours", kind, overwrite=True)


def test_publish_replaces_only_its_own_files(tmp_path):
    folder, new = tmp_path / "ckpt", tmp_path / "new"
    folder.mkdir()
    new.mkdir()
    for name in ("weights.bin", "checksums.json", "old-only.bin", "notes.txt"):
        (folder / name).write_text("old")
    for name in ("weights.bin", "checksums.json"):
        (new / name).write_text("new")
    publish(new, folder, remove=["old-only.bin"])
    assert {p.name: p.read_text() for p in folder.iterdir()} == \
        {"weights.bin": "new", "checksums.json": "new", "notes.txt": "old"}
    assert not new.exists()


def test_check_sha256(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc"), FIPS 180-2
    assert check_sha256(f, f"  {digest.upper()} ") == (True, digest)
    assert check_sha256(f, "0" * 64) == (False, digest)
    with pytest.raises(ValueError, match="64 hex digits"):
        check_sha256(f, "xyz")
    with pytest.raises(ValueError, match="a folder"):
        check_sha256(tmp_path, digest)
