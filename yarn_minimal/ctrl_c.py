"""Ctrl-C before a script's main() starts: one line, `interrupted`, and exit status 130.

Importing torch takes seconds, and Python's own Ctrl-C during an import is a KeyboardInterrupt
with a traceback as long as the import chain. So every script calls `exit_quietly(__name__)`
before its first heavy import (so does `python -m yarn_minimal`, in __main__.py);
cli.run_main hands Ctrl-C back to Python (`restore`) before main() runs, and turns the
KeyboardInterrupt into the same line. Standard library only: this module loads in milliseconds.
"""
import os
import signal


def _exit_interrupted(signum, frame) -> None:
    os.write(2, b"interrupted\n")
    os._exit(130)  # mid-import: nothing to clean up or flush, and no import can catch an exit


def exit_quietly(module_name: str = "__main__") -> None:
    """Ctrl-C exits at once with one line, for a script run as a program (module_name is
    "__main__"; tests that import a script keep Python's handler), unless Ctrl-C is ignored
    (a job started with `nohup`, or with `&` from a script)."""
    if module_name == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _exit_interrupted)


def restore() -> None:
    """Python's own handler (KeyboardInterrupt) again, where exit_quietly had replaced it."""
    if signal.getsignal(signal.SIGINT) is _exit_interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
