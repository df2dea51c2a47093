"""Sliding-window perplexity of long documents (YaRN paper Sec. 4.3.1, Tables 1, 2, 4,
Figure 1) and the attention temperature sweep (Appendix A.2), for one or several RoPE settings.

    # Table 1 style: several methods side by side, each document truncated to the window (as the
    # authors' evaluation does; without --truncate the windows slide with stride S = 256)
    python eval_perplexity.py --ckpt llama-2-7b --files proofpile/ --truncate --lengths 2048,4096,6144,8192,10240 \\
        --config method=pi,scale=2 --config method=ntk,scale=2 --config method=yarn,scale=2
    # Table 2 / Figure 1 style: documents truncated to each window, one pass each
    python eval_perplexity.py --ckpt yarn-llama-2-7b-64k --files proofpile/ --truncate --min-tokens 131072 \\
        --lengths 8k,32k,64k,96k,128k --plot figure1.png --out table2.json

The protocol is stated exactly in yarn_minimal/evaluation.py and docs/evaluation.md.
"""
from yarn_minimal import ctrl_c

ctrl_c.exit_quietly(__name__)  # before torch loads: Ctrl-C during the imports is one line, exit 130

import argparse
import sys
import warnings
from dataclasses import asdict

from yarn_minimal import cli, eval_report as report, evaluation as ev
from yarn_minimal.cli import (add_bos_arg, add_checkpoint_arg, add_device_args, add_rope_args, resolve_bos,
                              resolve_checkpoint, resolve_device_dtype, rope_from_args)
from yarn_minimal.rope import warn_beyond_window


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arg(p)
    add_rope_args(p)
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE,...",
                   help="one RoPE setting to evaluate; repeat to compare several in one run. Keys: "
                        f"{', '.join(report.CONFIG_KEYS)} (e.g. --config method=pi,dynamic=1,label=Dynamic-PI: s = max(1, W/L); a scale with dynamic=1 is the floor s0). "
                        "Each starts from its checkpoint's own setting plus the rope flags above. "
                        "Without --config, the rope flags alone give the one setting")
    g = p.add_argument_group("documents")
    g.add_argument("--files", nargs="+", required=True,
                   help="text files (one document each), .jsonl (one JSON object per line), .parquet, or folders of them")
    g.add_argument("--text-field", default="text", help="field/column holding the text in .jsonl and .parquet (default text)")
    g.add_argument("--min-tokens", type=int, default=0,
                   help="keep only documents with at least this many tokens (the paper: 131072 for Table 2)")
    g.add_argument("--max-documents", type=int, default=None, help="evaluate the first N documents kept")
    g = p.add_argument_group("protocol")
    g.add_argument("--lengths", required=True,
                   help="context windows W, comma-separated, e.g. 2048,4096,8k (k = 1024)")
    g.add_argument("--stride", type=int, default=256, help="sliding-window stride S (default 256, as the paper)")
    add_bos_arg(g)
    g.add_argument("--truncate", action="store_true",
                   help="cut each document to W - 1 tokens and score it in one pass (Table 2 / Figure 1); S is unused")
    g.add_argument("--attention-factor-sweep", metavar="A,B,C",
                   help="Appendix A.2: perplexity for each sqrt(1/t) at the fixed --yarn-scale (needs --method yarn "
                        "and one --lengths value); 1 is always added as the reference")
    g.add_argument("--segment-length", type=int, default=2048,
                   help="token positions per segment: the results' segment_perplexity and the sweep's "
                        "per-segment table (Figure 3); default 2048")
    report.add_output_args(p.add_argument_group("output"),
                           "write a PNG: perplexity vs window (Figure 1), or the sweep (Figures 2-4)")
    add_device_args(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    report.check_outputs(args)
    windows, factors = protocol_from_args(args)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    documents = ev.load_documents(args.files, args.text_field)
    print(f"{len(documents)} documents from {', '.join(args.files)}", file=sys.stderr)

    results, sweep, tokenized = [], None, {}
    configs = report.iter_configs(args.config, resolve_checkpoint(args.ckpt), lambda base: rope_from_args(args, base),
                                  device, dtype)
    for label, ckpt, model, tokenizer in configs:
        if tokenizer.path not in tokenized:  # configs that share a tokenizer share its token lists
            tokenized[tokenizer.path] = kept_documents(args, tokenizer, documents)
        docs, skipped = tokenized[tokenizer.path]
        bos_id = tokenizer.bos_id if resolve_bos(args.bos, tokenizer) else None  # None: windows without BOS
        row = {"label": label, "ckpt": str(ckpt), **report.rope_row(model.rope)}
        if factors:
            sweep = ev.attention_factor_sweep(model, docs, bos_id, windows[0], factors, args.stride,
                                              args.truncate, args.segment_length)
            sweep.update(label=label, ckpt=str(ckpt), rope=asdict(model.rope))
            results += [dict(row, label=f"{label} sqrt(1/t)={a:g}", attention_factor=a, window=windows[0],
                             perplexity=ppl, tokens=n)
                        for a, ppl, n in zip(sweep["factors"], sweep["perplexity"], sweep["tokens"])]
        else:
            results += [score_window(args, model, docs, skipped, bos_id, window, row) for window in windows]

    print(report.sweep_table(sweep) if sweep else report.perplexity_tables(results))
    output = {"results": results, "config": report.run_config(args, device, dtype, documents_read=len(documents))}
    if sweep:
        output["sweep"] = sweep
    if args.out:
        report.write_json(args.out, output)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        report.plot_sweep(sweep, args.plot) if sweep else report.plot_perplexity(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


def protocol_from_args(args) -> tuple[list[int], list[float] | None]:
    """The windows W and the sweep's sqrt(1/t) values (None: no sweep), checked together."""
    windows = report.parse_lengths(args.lengths)
    factors = report.parse_floats(args.attention_factor_sweep, "--attention-factor-sweep") if args.attention_factor_sweep else None
    if factors and (len(windows) != 1 or len(args.config) > 1):
        raise ev.EvalError(f"--attention-factor-sweep: give one --lengths value and at most one --config "
                           f"(got {len(windows)} lengths, {len(args.config)} configs)")
    ev.check_segment_length(args.segment_length)  # before any model runs, not after
    if args.stride > min(windows) - 1 and not args.truncate:
        warnings.warn(f"--stride {args.stride} > W - 1 = {min(windows) - 1}: the tokens between one window's end "
                      "and the next window's begin are not scored")
    return windows, factors


def kept_documents(args, tokenizer, documents: list[str]) -> tuple[list[list[int]], int]:
    """The documents' token lists that --min-tokens and --max-documents keep, and how many were skipped."""
    docs, skipped = ev.tokenize_documents(tokenizer, documents, args.min_tokens, args.max_documents)
    print(f"{len(docs)} documents kept, {skipped} skipped ({ev.skip_reason(args.min_tokens)})", file=sys.stderr)
    if not docs:
        raise ev.EvalError(f"no document left to score: {skipped} skipped ({ev.skip_reason(args.min_tokens)})"
                           + ("; lower --min-tokens or add longer documents" if args.min_tokens > 1 else ""))
    return docs, skipped


def score_window(args, model, docs: list[list[int]], skipped: int, bos_id, window: int, row: dict) -> dict:
    """One column of the table: the protocol at window W, and what it measured."""
    label = row["label"]
    warn_beyond_window(model.rope, window, f"{label}: window")
    scores = ev.score_documents(model, docs, bos_id, window, args.stride, args.truncate, desc=f"{label} W={window}")
    short = sum(len(d) < window - 1 for d in docs)
    report.warn_short_documents(label, window, short, len(docs), scores.tokens)
    return dict(row, window=window, bos=bos_id is not None,
                mode="truncate" if args.truncate else "sliding", stride=None if args.truncate else args.stride,
                perplexity=scores.perplexity, perplexity_window_mean=scores.perplexity_window_mean,
                nll=scores.nll, tokens=scores.tokens, windows=len(scores.window_mean_nll),
                segment_length=args.segment_length,
                segment_perplexity=scores.segment_perplexities(args.segment_length),
                documents=len(docs), skipped_documents=skipped, short_documents=short,
                scale_in_effect=report.scale_in_effect(model.rope, window, docs), rope=asdict(model.rope))


if __name__ == "__main__":
    cli.run_main(main)
