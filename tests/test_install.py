"""`pip install .` and `pip install -e .` into a fresh virtual environment, then `import
yarn_minimal` from another folder. --no-deps and --no-build-isolation keep it fast and offline:
the new environment sees this one's packages (torch, setuptools) through a .pth file, the way
--system-site-packages would show a system Python's."""
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_pip_install_then_import_from_another_folder(tmp_path, editable):
    source = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "yarn_minimal", source / "yarn_minimal", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    packages = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    (Path(packages) / "parent-env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                          "--no-build-isolation", "--no-index", "-q", *(["-e"] if editable else []), str(source)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # every module of the package is there (found without importing torch, which is slow here;
    # the rest of the suite runs the code itself)
    package = ROOT / "yarn_minimal"
    modules = sorted(".".join(("yarn_minimal",) + p.relative_to(package).with_suffix("").parts)
                     for p in package.rglob("*.py") if p.name != "__init__.py")
    probe = ("import importlib.util, sys, yarn_minimal; print(yarn_minimal.__file__); "
             f"print([m for m in {modules!r} if importlib.util.find_spec(m) is None])")
    res = subprocess.run([str(python), "-c", probe], cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    where, missing = res.stdout.splitlines()
    expected = source if editable else Path(packages)
    assert Path(where).is_relative_to(expected), where
    assert missing == "[]"
