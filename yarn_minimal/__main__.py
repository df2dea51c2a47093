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
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

from yarn_minimal import cli  # noqa: E402


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
    if args.command == "convert":
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
    for add in (add_convert, add_checksums, add_verify, add_data):
        add(sub)
    status = run(p.parse_args(argv))
    if status:
        raise SystemExit(status)


def command(argv: Optional[list[str]] = None) -> None:
    """main() as a program runs it: a failure is one line (cli.run_main)."""
    cli.run_main(main, argv)


if __name__ == "__main__":
    command()
