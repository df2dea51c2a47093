"""files.atomic_write: what a reader sees under the real name is the old content or the new one."""
import pytest

from yarn_minimal.files import atomic_write, temporary


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
