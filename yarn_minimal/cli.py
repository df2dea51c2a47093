"""Command-line pieces shared by generate.py, eval_passkey.py, eval_perplexity.py and train.py:
the rope flags, the checkpoint flag and the device/dtype flags, so that every script spells
them the same way; and run_main, how every script (and `python -m yarn_minimal.*`) ends on a
failure: one line on stderr, a non-zero exit, the traceback only with --debug."""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import traceback
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

import torch

from . import ctrl_c
from .rope import METHODS, RAMPS, RopeConfig

# The embedded demo model shipped with the repository (see its card, demo/yarn-demo/README.md).
DEFAULT_CKPT = Path(__file__).resolve().parent.parent / "demo" / "yarn-demo"
DEMO_PROMPT = DEFAULT_CKPT.parent / "heldout-sample.txt"  # a document the demo model never saw

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# every layout checkpoint.load reads, for the --ckpt help of every script
CHECKPOINT_LAYOUTS = ("Meta's folder (params.json + consolidated.*.pth), a Hugging Face Llama or Mistral folder "
                      "(config.json + *.safetensors), a folder this project saved (Meta's + rope.json), or a "
                      "llama.cpp .gguf file")


def step_list(text: str) -> tuple[int, ...]:
    """argparse type of a list of optimizer steps: "4,16,64" -> (4, 16, 64), each >= 1."""
    return tuple(sorted({positive_int(part) for part in text.split(",") if part.strip()}))


def positive_int(text: str) -> int:
    """argparse type of a count flag (--threads, --rounds, ...): a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value}")
    return value


def add_checkpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", default=None,
                   help=f"the model: {CHECKPOINT_LAYOUTS}; default: the embedded demo model ({DEFAULT_CKPT.name})")


def resolve_checkpoint(ckpt: Optional[str]) -> Path:
    if ckpt is not None:
        return Path(ckpt)
    if (DEFAULT_CKPT / "params.json").is_file():
        return DEFAULT_CKPT
    raise SystemExit(f"error: no --ckpt given and the embedded demo model is not at {DEFAULT_CKPT}. "
                     "Point --ckpt at Llama 2 weights, e.g. --ckpt /data/llama-2-7b (Meta's download: "
                     "params.json, consolidated.00.pth, tokenizer.model beside it).")


def add_rope_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("RoPE extension (default: the checkpoint's own setting)")
    g.add_argument("--method", choices=METHODS, default=None,
                   help="none | pi | ntk (NTK-aware) | ntk-by-parts | yarn; default yarn when --yarn-scale "
                        "or --dynamic is given")
    g.add_argument("--yarn-scale", "--scale", dest="scale", type=float, default=None,
                   help="scale factor s = L'/L (Eq. 11); with --dynamic, the floor s0 of s = max(s0, l'/L)")
    g.add_argument("--original-length", type=int, default=None,
                   help="L, the context the model was pre-trained at (Llama 2: 4096)")
    g.add_argument("--dynamic", action="store_true", default=None,
                   help="Dynamic Scaling (Sec. 3.3): s = max(s0, l'/L) at every forward pass, where s0 is "
                        "--yarn-scale or the checkpoint's own s (1 for a model never fine-tuned: the paper's max(1, l'/L))")
    g.add_argument("--alpha", type=float, default=None, help="Eq. 18 lower ramp bound (default 1)")
    g.add_argument("--beta", type=float, default=None, help="Eq. 18 upper ramp bound (default 32)")
    g.add_argument("--ramp", choices=RAMPS, default=None, help="ramp form: code (default) or paper (Eq. 18)")
    g.add_argument("--attention-factor", type=float, default=None,
                   help="sqrt(1/t) for yarn; default Eq. 22: 0.1 ln(s) + 1")


# RopeConfig field -> the flag that sets it, so that an error names what the user typed
ROPE_FLAGS = {"method": "--method", "scale": "--yarn-scale", "original_length": "--original-length",
              "dynamic": "--dynamic", "alpha": "--alpha", "beta": "--beta", "ramp": "--ramp",
              "attention_factor": "--attention-factor"}


def updated_rope(base: RopeConfig, changes: dict, names: Optional[dict[str, str]] = None) -> RopeConfig:
    """`base` with the given RopeConfig fields changed, the way every script reads its flags
    (and eval_perplexity.py its --config): a scale or dynamic=True without a method on a
    plain-RoPE base means YaRN / Dynamic-YaRN, and method none means s = 1, static. A method
    that would run at s = 1 (no scale given, none in the base, not dynamic) is refused: there
    every method equals plain RoPE, and a silent no-op reads as a result. Raises ValueError
    naming the field for a bad value, as `names` spells it (ROPE_FLAGS: the flag)."""
    name = lambda field: (names or {}).get(field, field)
    changes = dict(changes)
    if "method" not in changes and base.method == "none" and ("scale" in changes or changes.get("dynamic")):
        changes["method"] = "yarn"
    if changes.get("method") == "none":  # plain RoPE: no s, nothing dynamic (the checkpoint's own are dropped)
        changes.setdefault("scale", 1.0)
        changes.setdefault("dynamic", False)
    try:
        rope = replace(base, **changes)
    except ValueError as e:  # RopeConfig names its field ("RopeConfig.scale: ..."): say it as the user wrote it
        fields = re.match(r"RopeConfig\.([\w/]+): ", str(e))
        if fields is None:
            raise
        raise ValueError("/".join(map(name, fields[1].split("/"))) + ": " + str(e)[fields.end():]) from None
    if "method" in changes and "scale" not in changes and rope.method != "none" and rope.scale == 1 \
            and not rope.dynamic:
        raise ValueError(f"{name('method')} {rope.method} without {name('scale')} or {name('dynamic')} would run at "
                         f"s = 1, where it equals plain RoPE; give {name('scale')} S (S > 1: a context of S x L = "
                         f"S x {rope.original_length} tokens) or {name('dynamic')}")
    return rope


def rope_from_args(args: argparse.Namespace, base: RopeConfig) -> RopeConfig:
    """The checkpoint's RopeConfig `base`, with whatever the flags say on top (updated_rope)."""
    changes = {f: getattr(args, f) for f in ROPE_FLAGS if f != "dynamic" and getattr(args, f, None) is not None}
    if args.dynamic:
        changes["dynamic"] = True
    try:
        return updated_rope(base, changes, ROPE_FLAGS)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def add_bos_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start every sequence with the BOS token (--bos) or not (--no-bos); default: the "
                        "checkpoint's own setting (tokenizer_config.json's add_bos_token, else what its tokenizer "
                        "does: Llama 2 and 3 add BOS, SmolLM2 does not)")


def resolve_bos(flag: Optional[bool], tokenizer) -> bool:
    """--bos/--no-bos, or the checkpoint's own add_bos; a clear error when BOS is asked for and
    the checkpoint has none."""
    bos = tokenizer.add_bos if flag is None else flag
    if bos and tokenizer.bos_id is None:
        raise SystemExit(f"error: --bos: {tokenizer.path} states no BOS token (tokenizer_config.json bos_token, "
                         "generation_config.json or config.json bos_token_id); use --no-bos")
    return bos


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...; default cuda when available")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="model dtype; default bfloat16 on CUDA, float32 on CPU")
    # listed for --help only: run_main takes --debug out of the command line before parsing
    p.add_argument("--debug", action="store_true", help="on a failure, show the Python traceback")


def resolve_device_dtype(device: Optional[str], dtype: Optional[str]) -> tuple[torch.device, torch.dtype]:
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:  # torch's message lists every device type it knows
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise SystemExit(f"error: --device {device}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device} asked for CUDA, but torch sees no CUDA device "
                         f"(torch {torch.__version__}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise SystemExit(f"error: --device {device}: torch sees {n} CUDA device{'s' if n > 1 else ''}: "
                         + ("cuda:0" if n == 1 else f"cuda:0 to cuda:{n - 1}"))
    dt = DTYPES[dtype] if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if dev.type == "cpu" and dt == torch.float16:
        raise SystemExit("error: --dtype float16 is not supported on CPU; use float32 or bfloat16")
    return dev, dt


@contextlib.contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """argparse's errors (a bad flag value, a missing argument, and the scripts' own p.error) as
    one line `error: ...` like every other failure, still with exit status 2: by default argparse
    prints the whole usage block above it. --help still shows the usage."""
    error = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = lambda parser, message: parser.exit(2, f"error: {message}\n")
    try:
        yield
    finally:
        argparse.ArgumentParser.error = error


def run_main(main, argv=None) -> None:
    """Run a script's main(argv) so that no failure ends in a traceback: an error is one line
    `error: ...` on stderr and exit status 1; Ctrl-C is `interrupted` and 130; a closed pipe
    (`... | head`) ends quietly with 141, as `seq` does. `--debug` anywhere on the command
    line (taken out before main sees it) shows warnings and errors with their tracebacks."""
    ctrl_c.restore()  # from here on Ctrl-C is a KeyboardInterrupt, turned into `interrupted` below
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not debug:
        warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    try:
        with one_line_usage_errors():
            main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except SystemExit as e:  # argparse's usage errors and the scripts' own `error: ...` lines
        if debug and e.code not in (0, None):
            traceback.print_exc()
        raise
    except BrokenPipeError:
        # the reader went away: point stdout at /dev/null so that the interpreter's final
        # flush does not fail a second time, and exit like a process killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if debug:
            traceback.print_exc()
        # our own errors (CheckpointError, EvalError, ValueError from a bad value) already name
        # the file and the value; anything else also says what kind of failure it was, in its
        # message's first line (torch's can go on with C++ frames)
        message = (str(e).strip().splitlines() or [""])[0]
        if isinstance(e, (ValueError, OSError)) and message:
            sys.exit(f"error: {message}")
        sys.exit(f"error: {type(e).__name__}: {message}" + ("" if debug else " (--debug shows the traceback)"))
