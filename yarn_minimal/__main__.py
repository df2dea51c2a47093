"""The package's own commands: `python -m yarn_minimal COMMAND ...`.

    rope        what a RoPE setting or a checkpoint's config computes, dimension by dimension
    convert     a checkpoint from any layout to another (meta, hf, gguf)
    checksums   record a trusted download's sizes and CRC-32s, so that later damage is caught
    verify      check a downloaded file against the sha256 its site publishes
    data        tokenize documents into training segments (Sec. 4.1)

Argument parsing only: each command calls the library function that does the work (rope.py,
checkpoint.py, data.py), and cli.run_main turns a failure into one line.
"""
from yarn_minimal import ctrl_c

ctrl_c.exit_quietly(__name__)  # before torch loads: Ctrl-C during the imports is one line, exit 130

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

from yarn_minimal import cli  # noqa: E402
from yarn_minimal.rope import METHODS, RAMPS, RopeConfig, dimension_table, effective_scale, frequencies  # noqa: E402


def add_rope(sub) -> None:
    p = sub.add_parser("rope", help="what a RoPE setting or a checkpoint's config computes, dimension by dimension",
                       description="Print, for each RoPE frequency pair d, what an extension method does to it: "
                    "theta_d (Eq. 5), wavelength lambda_d (Eq. 13), r(d) = L/lambda_d (Eq. 17), the "
                    "ramp gamma (Eq. 18), the new frequency h(theta_d) and the ratio h/theta "
                    "(1 = extrapolated, 1/s = interpolated, in between = blended).")
    # defaults are None here so that --config can tell the flags given from the ones left out
    p.add_argument("--method", choices=METHODS, default=None, help="default yarn")
    p.add_argument("--scale", type=float, default=None,
                   help="s (Eq. 11); default 16, or with --dynamic (or --method none) the floor s0 of s = max(s0, N/L), default 1")
    p.add_argument("--original-length", type=int, default=None, help="L; default 4096 (Llama 2)")
    p.add_argument("--head-dim", type=int, default=None, help="|D|; default 128 (Llama 2)")
    p.add_argument("--base", type=float, default=None, help="b; default 10000")
    p.add_argument("--alpha", type=float, default=None, help="Eq. 18 lower bound; default 1")
    p.add_argument("--beta", type=float, default=None, help="Eq. 18 upper bound; default 32")
    p.add_argument("--ramp", default=None, choices=RAMPS, help="ramp form (see README); default code")
    p.add_argument("--dynamic", action="store_true", help="Dynamic Scaling (Sec. 3.3): s = max(1, N/L) for --seq-len N")
    p.add_argument("--seq-len", type=int, default=None, help="current length l' for --dynamic (or a --config whose RoPE depends on it: dynamic, longrope)")
    p.add_argument("--json", action="store_true", help='print {"inv_freq": [...], "attention_factor": x, "scale": s}')
    p.add_argument("--config", metavar="PATH",
                   help="read the RoPE setting of a checkpoint instead of the flags above (which it refuses): a "
                        "config.json of any architecture (llama, mistral, qwen2, deepseek, gpt_oss, phi3), a params.json, "
                        "a .gguf file or a model folder. Prints each value with the config key it came "
                        "from and flags what is ambiguous (defaults used, a factor that disagrees with "
                        "max_position_embeddings, constants that live in remote code)")
    p.set_defaults(parser=p)


def run_rope(args: argparse.Namespace) -> None:
    p = args.parser
    setting = ("method", "scale", "original_length", "head_dim", "base", "alpha", "beta", "ramp", "dynamic")
    given = [flag(name) for name in setting if getattr(args, name) not in (None, False)]
    if args.seq_len is not None and args.seq_len < 1:
        p.error(f"--seq-len: expected a positive integer, got {args.seq_len}")
    if args.config:
        if given:  # the file states the setting: flags beside it would be silently ignored
            p.error(f"--config reads the RoPE setting from {args.config}; {', '.join(given)} cannot be combined "
                    "with it (to run a checkpoint with another setting, give these flags to generate.py or the eval scripts)")
        return print_checkpoint_rope(args.config, args.seq_len, args.json, p)
    method = args.method or "yarn"
    defaults = dict(scale=1.0 if args.dynamic or method == "none" else 16.0, original_length=4096, head_dim=128,
                    base=10000.0, alpha=1.0, beta=32.0, ramp="code")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        cfg = RopeConfig(method=method, scale=args.scale, original_length=args.original_length, base=args.base,
                         dynamic=args.dynamic, alpha=args.alpha, beta=args.beta, ramp=args.ramp)
    except ValueError as e:  # "RopeConfig.scale: ..." names the field; say the flag
        p.error(re.sub(r"RopeConfig\.([\w/]+)", lambda m: "/".join(map(flag, m[1].split("/"))), str(e)))
    if args.head_dim <= 0 or args.head_dim % 2:
        p.error(f"--head-dim: RoPE rotates pairs of dimensions, so it must be a positive even number, got {args.head_dim}")
    if args.dynamic and args.seq_len is None:
        p.error("--dynamic needs --seq-len N (the current sequence length l')")
    s = effective_scale(cfg, args.seq_len or 0)
    inv_freq, factor = frequencies(cfg, args.head_dim, s)
    if args.json:
        print(json.dumps({"inv_freq": inv_freq.tolist(), "attention_factor": factor, "scale": s}))
        return
    print(f"# {cfg.describe()}  |D|={args.head_dim} b={args.base:g} L={args.original_length} "
          f"effective s={s:g}  ramp={args.ramp} alpha={args.alpha:g} beta={args.beta:g}  "
          f"attention factor sqrt(1/t)={factor:.4f}")
    print_table(cfg, args.head_dim, s)


def flag(field: str) -> str:
    """The command-line flag of a RopeConfig field (or of --head-dim, --seq-len)."""
    return "--" + field.replace("_", "-")


def print_table(cfg: RopeConfig, head_dim: int, scale: float) -> None:
    print(f"{'d':>3} {'theta_d':>11} {'lambda_d':>11} {'r(d)':>10} {'gamma':>7} {'h(theta_d)':>11} {'h/theta':>8}")
    for row in dimension_table(cfg, head_dim, scale):
        print(f"{row['d']:>3} {row['theta']:>11.4e} {row['wavelength']:>11.1f} {row['r']:>10.3f} "
              f"{row['gamma']:>7.3f} {row['h']:>11.4e} {row['h_over_theta']:>8.4f}")


def print_checkpoint_rope(path: str, seq_len: Optional[int], as_json: bool, p: argparse.ArgumentParser) -> None:
    """--config: what a checkpoint's RoPE computes (checkpoint.explain_config), key by key."""
    from yarn_minimal.checkpoint import CheckpointError, explain_config

    try:
        ex = explain_config(path, seq_len)
        static = seq_len is not None and explain_config(path, None).inv_freq.equal(ex.inv_freq)
    except CheckpointError as e:
        p.error(str(e))
    if static:  # a length that changes nothing would read as if it had been applied
        p.error(f"--seq-len: {path} states a static RoPE setting, whose frequencies do not depend on the length "
                "(Dynamic Scaling, HF's dynamic type and LongRoPE do); leave --seq-len out")
    if as_json:
        print(json.dumps(ex.as_json()))
        return
    print(f"# {path}: {ex.title}")
    width = max(len(r[0]) for r in ex.rows)
    for name, value, key in ex.rows:
        print(f"{name:<{width}}  {value:<40}  from: {key}")
    for note in ex.notes:
        print(f"! {note}")
    print(f"# per-dimension table at s = {ex.scale:g}" + (f" (--seq-len {seq_len})" if seq_len else ""))
    if ex.rope is not None:
        print_table(ex.rope, ex.head_dim, ex.scale)
    else:  # no paper form (LongRoPE): the frequencies alone
        print(f"{'d':>3} {'h(theta_d)':>11} {'wavelength':>11}")
        for d, h in enumerate(ex.inv_freq.tolist()):
            print(f"{d:>3} {h:>11.4e} {2 * math.pi / h:>11.1f}")


def add_convert(sub) -> None:
    c = sub.add_parser("convert", help="read SRC (any layout), write DST in --format",
                       description="Read SRC in any supported layout (Meta's raw download: params.json + "
                                   "consolidated.*.pth, any number of shards; a Hugging Face folder: config.json + "
                                   "*.safetensors; this project's own: Meta's + rope.json; llama.cpp's .gguf: any type "
                                   "the gguf package dequantizes) and write DST (GGUF written as F32 / F16 / BF16). The "
                                   "RoPE setting travels with the weights: rope.json, config.json's rope_scaling or "
                                   "the GGUF rope keys. DST is checked before SRC is read: it must be new, an empty "
                                   "folder, or (with --overwrite) a checkpoint this project saved (it holds "
                                   "checksums.json) or a GGUF file; nothing else is ever replaced.")
    c.add_argument("src", help="checkpoint folder (or .gguf file) to read")
    c.add_argument("dst", help="folder to write (hf, meta), or the .gguf file to write (gguf)")
    c.add_argument("--format", choices=("hf", "meta", "gguf"), required=True,
                   help="hf: config.json + model.safetensors (transformers, vLLM, llama.cpp); "
                        "meta: params.json + consolidated.00.pth + rope.json; "
                        "gguf: one llama.cpp / Ollama file with its rope-scaling metadata")
    c.add_argument("--dtype", "--outtype", choices=sorted(cli.DTYPES), default=None,
                   help="dtype of the written weights (gguf: F32 / F16 / BF16); default: SRC's own "
                        "(float32 for a quantized GGUF, whose weights dequantize exactly to it)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace DST when it holds an earlier checkpoint this project saved, or a GGUF file: only "
                        "the checkpoint's own files; anything else in the folder stays")


def add_checksums(sub) -> None:
    k = sub.add_parser("checksums", help="record the size and CRC-32 of FOLDER's files in FOLDER/checksums.json",
                       description="Write FOLDER/checksums.json (every file but *.md), which load() then verifies: "
                                   "run it once on a download you trust, and later damage to any of its files stops "
                                   "the load with a message naming the file.")
    k.add_argument("folder")
    k.add_argument("--overwrite", action="store_true",
                   help="replace an existing checksums.json (which would otherwise catch a file changed since): "
                        "only after a change you made yourself")


def add_verify(sub) -> None:
    v = sub.add_parser("verify", help="compare a downloaded file's sha256 with the digest its site publishes",
                       description="Compute the sha256 of FILE and compare it with the digest the download site "
                                   "lists for it (Hugging Face: the file's page, \"SHA256\"). For a folder, name each "
                                   "file: --sha256 model.safetensors=HEX --sha256 tokenizer.json=HEX. One line per "
                                   "file, match or mismatch with both digests; exit status 0 when all match, 1 if not.")
    v.add_argument("path", metavar="FILE_OR_FOLDER")
    v.add_argument("--sha256", action="append", required=True, metavar="HEX or NAME=HEX",
                   help="the published digest (64 hex digits); for a folder, NAME=HEX for each file to check")


def add_data(sub) -> None:
    d = sub.add_parser("data", help="tokenize documents into fixed-length training segments",
                       description="Tokenize local documents into fixed-length training segments (Sec. 4.1: PG19 in "
                                   "64k segments, each document bookended with BOS and EOS; here BOS where the model's "
                                   "tokenizer adds one, EOS always). Documents are concatenated in input order and the "
                                   "stream is cut every --seq-len tokens, so a segment may hold the end of one "
                                   "document and the start of the next; the last partial segment is dropped. "
                                   "Output: DIR/tokens.bin (memory-mapped uint16/uint32 ids) + DIR/meta.json.")
    d.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".txt (one document per file, as PG19 ships), .jsonl (one document per line), .parquet "
                        "(one per row) files, or folders of them (read recursively in sorted order)")
    d.add_argument("--tokenizer", required=True,
                   help="the model's tokenizer: its folder (tokenizer.model or tokenizer.json, with BOS/EOS from "
                        "tokenizer_config.json / generation_config.json), one of those files, or a .gguf file "
                        "(its vocabulary; no weights are read)")
    d.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start every document with BOS (--bos) or not (--no-bos); default: what the tokenizer's "
                        "own encoding does (Llama 2 and 3 add BOS, SmolLM2 does not). Every document ends with EOS")
    d.add_argument("--seq-len", type=int, required=True, help="tokens per segment (the paper: 65536)")
    d.add_argument("--out", required=True, help="output folder: new or empty (or an earlier one, with --overwrite)")
    d.add_argument("--overwrite", action="store_true",
                   help="replace the tokens.bin and meta.json of an earlier dataset in --out (nothing else in it)")
    d.add_argument("--text-field", default="text", help="jsonl field / parquet column holding the text (default text)")


def run(args: argparse.Namespace) -> Optional[int]:
    if args.command == "rope":
        run_rope(args)
    elif args.command == "convert":
        from yarn_minimal.checkpoint import convert
        convert(Path(args.src), Path(args.dst), args.format, cli.DTYPES[args.dtype] if args.dtype else None,
                args.overwrite)
    elif args.command == "checksums":
        from yarn_minimal.checkpoint import CHECKSUMS, record_checksums
        n = record_checksums(Path(args.folder), args.overwrite)
        print(f"wrote {Path(args.folder) / CHECKSUMS}: {n} files", file=sys.stderr)
    elif args.command == "verify":
        from yarn_minimal.checkpoint import verify
        return verify(Path(args.path), args.sha256)
    elif args.command == "data":
        from yarn_minimal.data import prepare
        meta = prepare(args.inputs, args.tokenizer, args.seq_len, args.out, args.text_field, bos=args.bos,
                       overwrite=args.overwrite)
        print(f"{args.out}: {meta['n_segments']} segments x {meta['seq_len']} tokens from {meta['n_documents']} "
              f"documents ({meta['n_tokens_read']} tokens read, {meta['n_tokens_dropped']} in the dropped tail; "
              f"{meta['tokenizer_kind']} tokenizer, {'BOS doc EOS' if meta['add_bos'] else 'doc EOS'} per document)")
    return None


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m yarn_minimal", description=__doc__.split("\n\n")[0],
                                epilog="`python -m yarn_minimal COMMAND --help` says more about each.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_rope, add_convert, add_checksums, add_verify, add_data):
        add(sub)
    status = run(p.parse_args(argv))
    if status:
        raise SystemExit(status)


def command(argv: Optional[list[str]] = None) -> None:
    """main() as a program runs it: a failure is one line (cli.run_main)."""
    cli.run_main(main, argv)


if __name__ == "__main__":
    command()
