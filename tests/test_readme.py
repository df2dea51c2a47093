"""The commands that README.md, the demo model's card and docs/ show stay runnable: every
`python <script>.py ...` and `python -m <module> ...` line in their bash blocks is parsed by that
script's own argument parser (nothing else of the script runs), so a renamed or removed flag,
a bad choice or a missing required argument fails here, not in a reader's terminal."""
from __future__ import annotations

import argparse
import importlib
import re
import runpy
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", ROOT / "demo" / "yarn-demo" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_commands(markdown: str) -> list[str]:
    """The command lines of the ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", markdown, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def python_invocations(command: str) -> list[tuple[str, list[str]]]:
    """(script or -m module, its arguments) for each python call of a shell line, e.g.
    `OMP_NUM_THREADS=2 torchrun --nproc_per_node 2 train.py --steps 2 | head` -> ("train.py", [...])."""
    command = command.replace("$'", "'")  # bash's $'...' quoting: shlex reads it as '...'
    found = []
    for part in re.split(r"\s(?:&&|\|\||\||;)\s", command):
        part = part.split(" #")[0]  # a trailing comment
        try:
            words = shlex.split(part)
        except ValueError:
            continue
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            words = words[1:]  # environment assignments
        if not words:
            continue
        if words[0] == "torchrun":  # torchrun's own options come before the script
            script = next(i for i, w in enumerate(words) if w.endswith(".py"))
            words = ["python"] + words[script:]
        if words[0] not in ("python", "python3"):
            continue
        if words[1:2] == ["-m"] and len(words) > 2 and words[2].split(".")[0] in ("yarn_minimal", "experiments", "bench"):
            found.append((words[2], words[3:]))
        elif len(words) > 1 and words[1].endswith(".py"):
            found.append((words[1], words[2:]))
    return found


CASES = [(doc, script, args) for doc in DOCUMENTS if doc.is_file()
         for command in shell_commands(doc.read_text(encoding="utf-8"))
         for script, args in python_invocations(command)]


class Parsed(Exception):
    pass


def test_the_documents_show_commands():
    scripts = {script for _, script, _ in CASES}
    assert {"generate.py", "eval_passkey.py", "eval_perplexity.py", "train.py"} <= scripts, scripts


@pytest.mark.parametrize("doc,script,args", CASES,
                         ids=[f"{d.relative_to(ROOT)}:{s}:{i}" for i, (d, s, _) in enumerate(CASES)])
def test_documented_command_parses(doc, script, args, monkeypatch):
    if script.endswith(".py"):
        path = ROOT / script
        assert path.is_file(), f"{doc.name} runs {script}, which does not exist"
        main = runpy.run_path(str(path), run_name="readme_check")["main"]
    else:  # python -m yarn_minimal COMMAND runs the package's __main__.py
        main = importlib.import_module(script + ".__main__" if script == "yarn_minimal" else script).main
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        raise Parsed(original(self, argv, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        main(args)
    except Parsed:
        return
    except SystemExit as e:
        pytest.fail(f"{doc.relative_to(ROOT)}: `{script} {shlex.join(args)}` is refused by its parser (exit {e.code})")
    pytest.fail(f"{script}: main() returned without parsing its arguments")
