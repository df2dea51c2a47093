"""Passkey retrieval (YaRN paper Sec. 4.3.2, Table 5): a five-digit key hidden at a random
depth in filler text, a prompt of exactly the length asked, greedy decoding; correct when the
first integer of the answer is the key.

    python eval_passkey.py --ckpt yarn-llama-2-7b-128k --lengths 8k,16k,32k,64k,96k,128k \\
        --iterations 10 --out passkey.json --plot passkey.png
    python eval_passkey.py --ckpt llama-2-7b --method yarn --yarn-scale 4 --dynamic \\
        --min-length 4096 --max-length 32768 --step 4096 --depths 0,0.25,0.5,0.75,1 --plot heat.png

Prints accuracy per length, the passkey context (largest length with accuracy >= 80%) and the
passkey accuracy of Table 5 (mean accuracy over the lengths up to the passkey context).
"""
from yarn_minimal import ctrl_c

ctrl_c.exit_quietly(__name__)  # before torch loads: Ctrl-C during the imports is one line, exit 130

import argparse
import sys
from dataclasses import asdict

from yarn_minimal import cli, eval_report as report, evaluation as ev
from yarn_minimal.checkpoint import load
from yarn_minimal.cli import (add_bos_arg, add_checkpoint_arg, add_device_args, add_rope_args, resolve_bos,
                              resolve_checkpoint, resolve_device_dtype, rope_from_args)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arg(p)
    add_rope_args(p)
    g = p.add_argument_group("lengths (give --lengths, or --min-length/--max-length/--step)")
    g.add_argument("--lengths", help="prompt lengths in tokens (BOS included), e.g. 8192,16384 or 8k,16k")
    g.add_argument("--min-length", type=int, help="first length of a range")
    g.add_argument("--max-length", type=int, help="last length of a range (included)")
    g.add_argument("--step", type=int, help="range step")
    p.add_argument("--iterations", type=int, default=10, help="prompts per length (and per depth); default 10 as the paper")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys and key positions (default 0)")
    p.add_argument("--depths", help="fixed key depths in [0, 1] (fraction of the filler before the key), e.g. "
                                    "0,0.25,0.5,0.75,1; default: a uniformly random depth per prompt")
    p.add_argument("--max-new-tokens", type=int, default=10, help="tokens decoded greedily per answer (default 10)")
    add_bos_arg(p)
    report.add_output_args(p, "write a PNG: accuracy vs length (and a length x depth heat map with --depths)")
    add_device_args(p)
    return p.parse_args(argv)


def lengths_from_args(args) -> list[int]:
    if args.lengths and any(x is not None for x in (args.min_length, args.max_length, args.step)):
        raise ev.EvalError("give either --lengths or --min-length/--max-length/--step, not both")
    if args.lengths:
        return report.parse_lengths(args.lengths)
    if None in (args.min_length, args.max_length, args.step):
        raise ev.EvalError("no lengths: give --lengths 8192,16384,... or all of --min-length, --max-length, --step")
    if not (0 < args.min_length <= args.max_length and args.step > 0):
        raise ev.EvalError(f"need 0 < --min-length <= --max-length and --step > 0, got {args.min_length}, "
                           f"{args.max_length}, {args.step}")
    return list(range(args.min_length, args.max_length + 1, args.step))


def main(argv=None):
    args = parse_args(argv)
    report.check_outputs(args)
    lengths = lengths_from_args(args)
    depths = report.parse_floats(args.depths, "--depths") if args.depths else None
    if depths and not all(0 <= d <= 1 for d in depths):
        raise ev.EvalError(f"--depths {args.depths}: every depth must be in [0, 1]")
    if args.iterations < 1 or args.max_new_tokens < 1:
        raise ev.EvalError(f"--iterations and --max-new-tokens must be >= 1, got {args.iterations}, {args.max_new_tokens}")
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    ckpt = resolve_checkpoint(args.ckpt)
    model, tokenizer = load(ckpt, device=device, dtype=dtype)
    model.set_rope(rope_from_args(args, model.rope))
    print(f"{ckpt}: {model.rope.describe()}", file=sys.stderr)

    bos = resolve_bos(args.bos, tokenizer)
    results = ev.run_passkey(model, tokenizer, lengths, args.iterations, args.seed, depths, args.max_new_tokens, bos)
    print(report.passkey_table(results))
    config = report.run_config(args, device, dtype, ckpt=str(ckpt), bos=bos, lengths=lengths, depths=depths,
                               rope=asdict(model.rope))
    if args.out:
        report.write_json(args.out, {"results": results, **ev.passkey_summary(results), "config": config})
        print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        report.plot_passkey(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    cli.run_main(main)
