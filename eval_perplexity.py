"""Sliding-window perplexity of long documents (YaRN paper Sec. 4.3.1, Tables 1, 2, 4,
Figure 1) and the attention temperature sweep (Appendix A.2), for one or several RoPE settings.

    # Table 1 style: several methods side by side, windows slide with S = 256
    python eval_perplexity.py --ckpt llama-2-7b --files proofpile/ --lengths 2048,4096,6144,8192,10240 \\
        --config method=pi,scale=2 --config method=ntk,scale=2 --config method=yarn,scale=2
    # Table 2 / Figure 1 style: documents truncated to each window, one pass each
    python eval_perplexity.py --ckpt yarn-llama-2-7b-64k --files proofpile/ --truncate --min-tokens 131072 \\
        --lengths 8k,32k,64k,96k,128k --plot figure1.png --out table2.json

The protocol is stated exactly in yarn_minimal/evaluation.py and docs/evaluation.md.
"""
import argparse
import sys
import warnings

from yarn_minimal import evaluation as ev
from yarn_minimal.cli import (add_bos_arg, add_checkpoint_arg, add_device_args, add_rope_args, resolve_bos,
                              resolve_checkpoint, resolve_device_dtype, rope_from_args)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arg(p)
    add_rope_args(p)
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE,...",
                   help="one RoPE setting to evaluate; repeat to compare several in one run. Keys: "
                        f"{', '.join(ev.CONFIG_KEYS)} (e.g. --config method=pi,scale=8,dynamic=1,label=Dynamic-PI). "
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
                   help="token positions per segment in the sweep's per-segment table (Figure 3; default 2048)")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="write the results as JSON to this file")
    g.add_argument("--plot", help="write a PNG: perplexity vs window (Figure 1), or the sweep (Figures 2-4)")
    add_device_args(p)
    return p.parse_args(argv)


def main(argv=None):
    ev.run_script(run, parse_args(argv))


def run(args):
    windows = ev.parse_lengths(args.lengths)
    factors = ev.parse_floats(args.attention_factor_sweep, "--attention-factor-sweep") if args.attention_factor_sweep else None
    if factors and (len(windows) != 1 or len(args.config) > 1):
        raise ev.EvalError(f"--attention-factor-sweep: give one --lengths value and at most one --config "
                           f"(got {len(windows)} lengths, {len(args.config)} configs)")
    if args.stride > min(windows) - 1 and not args.truncate:
        warnings.warn(f"--stride {args.stride} > W - 1 = {min(windows) - 1}: the tokens between one window's end "
                         "and the next window's begin are not scored")
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    documents = ev.load_documents(args.files, args.text_field)
    print(f"{len(documents)} documents from {', '.join(args.files)}", file=sys.stderr)

    results, sweep, tokenized = [], None, {}
    configs = ev.iter_configs(args.config, resolve_checkpoint(args.ckpt), lambda base: rope_from_args(args, base),
                              device, dtype)
    for label, ckpt, model, tokenizer in configs:
        if tokenizer.path not in tokenized:
            tokenized[tokenizer.path] = ev.tokenize_documents(tokenizer, documents, args.min_tokens, args.max_documents)
            docs, skipped = tokenized[tokenizer.path]
            print(f"{len(docs)} documents kept, {skipped} skipped (fewer than --min-tokens "
                  f"{max(args.min_tokens, 1)} tokens)", file=sys.stderr)
        docs, skipped = tokenized[tokenizer.path]
        bos_id = tokenizer.bos_id if resolve_bos(args.bos, tokenizer) else None  # None: windows without BOS
        if not docs:
            raise ev.EvalError(f"no document has at least --min-tokens {args.min_tokens} tokens "
                               f"({skipped} skipped); lower --min-tokens or add longer documents")
        if factors:
            sweep = ev.attention_factor_sweep(model, docs, bos_id, windows[0], factors, args.stride,
                                              args.truncate, args.segment_length)
            sweep.update(label=label, ckpt=str(ckpt), rope=model.rope.to_dict())
            for a, ppl, n in zip(sweep["factors"], sweep["perplexity"], sweep["tokens"]):
                results.append({"label": f"{label} sqrt(1/t)={a:g}", "ckpt": str(ckpt),
                                **ev.rope_row(model.rope), "attention_factor": a, "window": windows[0],
                                "perplexity": ppl, "tokens": n})
            continue
        for window in windows:
            ev.warn_beyond_window(model.rope, window, f"{label}: window")
            scores = ev.score_documents(model, docs, bos_id, window, args.stride, args.truncate,
                                        desc=f"{label} W={window}")
            results.append({
                "label": label, "ckpt": str(ckpt), **ev.rope_row(model.rope), "window": window, "bos": bos_id is not None,
                "mode": "truncate" if args.truncate else "sliding", "stride": None if args.truncate else args.stride,
                "perplexity": scores.perplexity, "perplexity_window_mean": scores.perplexity_window_mean,
                "nll": scores.nll, "tokens": scores.tokens, "windows": len(scores.window_mean_nll),
                "documents": len(docs), "skipped_documents": skipped,
                "short_documents": sum(len(d) < window - 1 for d in docs),
                "rope": model.rope.to_dict()})

    print(ev.sweep_table(sweep) if sweep else ev.perplexity_tables(results))
    config = {k: v for k, v in vars(args).items()}
    config.update(device=str(device), dtype=str(dtype).replace("torch.", ""), documents_read=len(documents))
    output = {"results": results, "config": config}
    if sweep:
        output["sweep"] = sweep
    if args.out:
        ev.write_json(args.out, output)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        ev.plot_sweep(sweep, args.plot) if sweep else ev.plot_perplexity(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
