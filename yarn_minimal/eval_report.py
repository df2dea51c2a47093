"""What eval_perplexity.py and eval_passkey.py share around the protocols of evaluation.py:
their flags (--lengths, --config), the result rows and tables they print, the JSON they write
and their plots (Figure 1's style, Figures 2-4, passkey accuracy). Nothing here changes a
number: every protocol is in evaluation.py."""
from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from . import files
from .checkpoint import load
from .cli import updated_rope
from .evaluation import EvalError, passkey_summary
from .files import Output, check_output, json_with, png_from
from .model import Transformer
from .rope import RopeConfig, effective_scale
from .tokenizer import Tokenizer


# ---------------------------------------------------------------------------------------
# Flags: --lengths, --depths, --attention-factor-sweep, --config
# ---------------------------------------------------------------------------------------

def parse_lengths(text: str, flag: str = "--lengths") -> list[int]:
    """"2048,4096,8k" -> [2048, 4096, 8192] (k = 1024)."""
    lengths = _comma_list(text, flag, lambda s: int(s[:-1]) * 1024 if s.lower().endswith("k") else int(s),
                          "an integer (or <n>k)")
    if min(lengths) <= 0:
        raise EvalError(f"{flag} {text!r}: lengths must be > 0, got {min(lengths)}")
    return lengths


def parse_floats(text: str, flag: str) -> list[float]:
    """"0,0.5,1" -> [0.0, 0.5, 1.0]."""
    return _comma_list(text, flag, float, "a number")


def _comma_list(text: str, flag: str, read: Callable[[str], object], what: str) -> list:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise EvalError(f"{flag} {text!r}: no values given")
    out = []
    for item in items:
        try:
            out.append(read(item))
        except ValueError:
            raise EvalError(f"{flag} {text!r}: {item!r} is not {what}") from None
    return out


# --config's keys and how each value is read: RopeConfig's fields, plus label (the name in
# tables and plots) and ckpt (the checkpoint to load). tests/test_evaluation.py checks that
# every RopeConfig field is here.
CONFIG_TYPES = {"label": str, "ckpt": str, "method": str, "scale": float, "original_length": int, "base": float,
                "dynamic": bool, "alpha": float, "beta": float, "ramp": str, "attention_factor": float,
                "attention_coefficient": float, "truncate": bool, "extended_length": int}
CONFIG_KEYS = tuple(CONFIG_TYPES)
BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def parse_config(spec: str) -> dict:
    """--config "method=yarn,scale=8,dynamic=1" -> {"method": "yarn", "scale": 8.0, "dynamic": True}."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip().replace("-", "_"), value.strip()
        if not sep or key not in CONFIG_TYPES:
            raise EvalError(f"--config {spec!r}: {item!r} is not key=value with a key among {', '.join(CONFIG_KEYS)}")
        kind = CONFIG_TYPES[key]
        try:
            out[key] = BOOLEANS[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError):
            raise EvalError(f"--config {spec!r}: {key}={value!r} is not a valid {kind.__name__}") from None
    return out


def apply_config(rope: RopeConfig, changes: dict, spec: str = "") -> RopeConfig:
    """The RopeConfig `rope` with a parsed --config's fields on top (label/ckpt ignored), read
    exactly as the shared rope flags are (cli.updated_rope)."""
    changes = {k: v for k, v in changes.items() if k not in ("label", "ckpt")}
    try:
        return updated_rope(rope, changes)
    except ValueError as e:
        raise EvalError(f"--config {spec!r}: {e}") from None


def iter_configs(specs: Sequence[str], ckpt: Path, rope_from_flags: Callable[[RopeConfig], RopeConfig],
                 device: torch.device, dtype: torch.dtype) -> Iterator[tuple[str, Path, Transformer, Tokenizer]]:
    """Yield (label, ckpt, model, tokenizer) for every --config (or once, for the shared flags
    alone), with the model's RoPE set. Each config starts from its checkpoint's own setting,
    then the shared rope flags (`rope_from_flags(base) -> RopeConfig`), then its own keys.
    A checkpoint is loaded once for consecutive configs that share it."""
    parsed = [(spec, parse_config(spec)) for spec in specs] or [("", {})]
    several_ckpts = len({c.get("ckpt", str(ckpt)) for _, c in parsed}) > 1
    loaded, labels = None, set()
    for spec, changes in parsed:
        path = Path(changes.get("ckpt", ckpt))
        if loaded is None or loaded[0] != path:
            loaded = model = tokenizer = None  # free the previous model before loading the next
            model, tokenizer = load(path, device=device, dtype=dtype)
            loaded = (path, model, tokenizer, model.rope)
        _, model, tokenizer, base = loaded
        rope = apply_config(rope_from_flags(base), changes, spec)
        model.set_rope(rope)
        label = changes.get("label") or rope.describe() + (f" [{path.name}]" if several_ckpts else "")
        while label in labels:
            label += "'"
        labels.add(label)
        yield label, path, model, tokenizer


# ---------------------------------------------------------------------------------------
# Result rows and tables
# ---------------------------------------------------------------------------------------

def rope_row(rope: RopeConfig) -> dict:
    """The RoPE columns of a result row."""
    return {"method": rope.method, "scale": rope.scale, "dynamic": rope.dynamic,
            "original_length": rope.original_length, "attention_factor": rope.attention_factor}


def warn_short_documents(label: str, window: int, short: int, total: int, scored: int) -> None:
    """A column labelled W over documents shorter than W is not perplexity at W: say so where
    the numbers are read, not only in the JSON."""
    if short:
        warnings.warn(f"{label}: window {window}: {short} of {total} documents are shorter than the window, "
                      f"so this column scores {scored} tokens at contexts below {window} (see short_documents "
                      "in --out; --min-tokens keeps only long documents)", stacklevel=2)


def scale_in_effect(rope: RopeConfig, window: int, documents: Sequence[Sequence[int]]) -> float:
    """s at the longest forward pass of a window-W column: under Dynamic Scaling it is
    max(s0, l/L) (Sec. 3.3) with l = W, or the longest document (+ BOS) when that is shorter."""
    longest = min(window, max(len(d) for d in documents) + 1)
    return effective_scale(rope, longest)


def format_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [list(map(str, header))] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else (f"{x:.3e}" if abs(x) >= 1e4 else f"{x:.3f}")
    return "-" if x is None else str(x)


def perplexity_tables(results: list[dict]) -> str:
    """One row per config, one column per window; then the per-window-mean variant."""
    labels = list(dict.fromkeys(r["label"] for r in results))
    windows = sorted({r["window"] for r in results})
    by = {(r["label"], r["window"]): r for r in results}
    out = []
    for key, title in (("perplexity", "perplexity (token-weighted)"),
                       ("perplexity_window_mean", "perplexity (mean over windows, the authors' variant)")):
        rows = [[lab] + [by[lab, w][key] if (lab, w) in by else None for w in windows] for lab in labels]
        out.append(title + "\n" + format_table(["config \\ window"] + windows, rows))
    if any(r.get("dynamic") and "scale_in_effect" in r for r in results):  # Sec. 3.3: s grows with the window
        rows = [[lab] + [by[lab, w].get("scale_in_effect") if (lab, w) in by else None for w in windows] for lab in labels]
        out.append("s in effect at each window (Dynamic Scaling: s = max(s0, W/L))\n"
                   + format_table(["config \\ window"] + windows, rows))
    return "\n\n".join(out)


def sweep_table(sweep: dict) -> str:
    header = ["sqrt(1/t)", "perplexity", "doc mean", "doc std"] + [f"{a}-{b} %" for a, b in sweep["segments"]]
    rows = [[f"{a:g}", p, m, s] + list(c) for a, p, m, s, c in zip(
        sweep["factors"], sweep["perplexity"], sweep["document_perplexity_mean"],
        sweep["document_perplexity_std"], sweep["segment_change_percent"])]
    return (f"attention factor sweep at s={sweep['scale']:g}, window {sweep['window']} "
            f"(Eq. 22 recommends sqrt(1/t) = {sweep['recommended_factor']:.3f}); "
            "segment columns: Eq. 26 change vs sqrt(1/t)=1, %\n" + format_table(header, rows))


def passkey_table(results: Sequence[dict]) -> str:
    rows = [[r["length"], r["iterations"], r["correct"], f"{100 * r['accuracy']:.1f}%"] for r in results]
    table = format_table(["length", "iterations", "correct", "accuracy"], rows)
    s = passkey_summary(results)
    if s["passkey_context"] is None:
        return table + "\npasskey context: none (no length reached 80% accuracy)"
    return (table + f"\npasskey context (largest length with accuracy >= 80%): {s['passkey_context']}"
            f"\npasskey accuracy (mean over lengths <= passkey context, Table 5): {100 * s['passkey_accuracy']:.1f}%")


# ---------------------------------------------------------------------------------------
# JSON and plots
# ---------------------------------------------------------------------------------------

def run_config(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, **extra) -> dict:
    """The JSON's "config": every flag as given, the device and dtype in effect, and `extra`."""
    return dict(vars(args), device=str(device), dtype=str(dtype).removeprefix("torch."), **extra)


# What --out and --plot may replace (with --overwrite): results JSON an evaluation wrote, and
# plots matplotlib made (this project's say "yarn_minimal" in their Software text chunk).
PLOT_SOFTWARE = "yarn_minimal"
RESULTS = Output("an evaluation's results JSON (an object with \"results\" and \"config\")",
                 json_with("results", "config"))
PLOT = Output("a plot (a PNG that matplotlib made)", png_from(PLOT_SOFTWARE, "Matplotlib"), suffix=".png")


def add_output_args(g, plot_help: str) -> None:
    g.add_argument("--out", help="write the results as JSON to this file")
    g.add_argument("--plot", help=plot_help)
    g.add_argument("--overwrite", action="store_true",
                   help="replace --out / --plot when they hold earlier results or plots (nothing else is ever "
                        "replaced); both are checked before the evaluation starts")


def check_outputs(args: argparse.Namespace) -> None:
    """--out and --plot, checked before the evaluation runs, not after (files.check_output)."""
    if args.out:
        check_output(args.out, RESULTS, args.overwrite)
    if args.plot:
        check_output(args.plot, PLOT, args.overwrite)


def write_json(path: str, obj: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(p, obj)


def pyplot():
    """matplotlib with the file-only Agg backend, imported only when a plot is asked for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """A PNG (or the format path's suffix names) written whole, marked as this project's."""
    fig.tight_layout()
    path = Path(path)
    fmt = path.suffix.lower().removeprefix(".") or "png"
    metadata = {"Software": PLOT_SOFTWARE} if fmt == "png" else None
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=150, metadata=metadata))
    pyplot().close(fig)


def plot_perplexity(results: Sequence[dict], path: str) -> None:
    """Figure 1's style: perplexity against context window (log-log), one line per config in
    its own colour, Dynamic Scaling's dashed. When a config blows up (past twice the range of each
    window's best), a second panel zooms in on the best ones."""
    plt = pyplot()
    labels = list(dict.fromkeys(r["label"] for r in results))
    colors = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20").colors
    windows = sorted({r["window"] for r in results})
    best = [min(r["perplexity"] for r in results if r["window"] == w) for w in windows]
    lo, hi = min(best) * 0.97, max(best) * 1.25  # room for every window's best few configs
    zoom = max(r["perplexity"] for r in results) > 2 * hi
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(13 if zoom else 8.5, 4.5), squeeze=False)
    for ax in axes[0]:
        for i, label in enumerate(labels):
            rows = sorted((r for r in results if r["label"] == label), key=lambda r: r["window"])
            ax.plot([r["window"] for r in rows], [r["perplexity"] for r in rows], marker="o", markersize=3,
                    color=colors[i % len(colors)], linestyle="--" if label.startswith("Dynamic") else "-",
                    label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(windows, [str(w) for w in windows])
        ax.set_xticks([], minor=True)
        ax.set_yscale("log")
        ax.set_xlabel("context window (tokens)")
        ax.set_ylabel("perplexity (lower is better)")
        ax.grid(True, which="both", alpha=0.3)
    if zoom:
        axes[0, 1].set_yscale("linear")
        axes[0, 1].set_ylim(lo, hi)
        axes[0, 1].set_title(f"the same, perplexity {lo:.3g}-{hi:.3g}", fontsize=9)
    axes[0, -1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    save_figure(fig, path)


def plot_segments(results: Sequence[dict], path: str, original_length: int) -> None:
    """Where along a long window the loss rises: each result's segment_perplexity (positions
    [k L_seg, (k+1) L_seg)) against the segment's first position, a line per (config, window),
    with the original context L marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for r in results:
        step = r["segment_length"]
        points = [(k * step, p) for k, p in enumerate(r["segment_perplexity"]) if p is not None]
        ax.plot(*zip(*points), marker="o", markersize=3, linestyle="--" if r["label"].startswith("Dynamic") else "-",
                label=f"{r['label']}, window {r['window']} (s = {r['scale_in_effect']:g})")
    ax.axvline(original_length, color="gray", linestyle=":", label=f"L = {original_length}")
    ax.set_yscale("log")
    ax.set_xlabel(f"token position (start of each {results[0]['segment_length']}-token segment)")
    ax.set_ylabel("perplexity of the segment")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    save_figure(fig, path)


def plot_sweep(sweep: dict, path: str) -> None:
    """Appendix A.2: Figure 2 (perplexity vs sqrt(1/t), +-1 std over documents), Figure 3
    (Eq. 26 change per position segment) and Figure 4 (documents best at each factor)."""
    plt = pyplot()
    f = np.array(sweep["factors"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    mean, std = np.array(sweep["document_perplexity_mean"]), np.array(sweep["document_perplexity_std"])
    axes[0].plot(f, mean, marker="o", label="mean over documents")
    axes[0].fill_between(f, mean - std, mean + std, alpha=0.25)
    axes[0].plot(f, sweep["perplexity"], linestyle="--", label="token-weighted")
    axes[0].axvline(sweep["recommended_factor"], color="gray", linestyle=":", label="Eq. 22")
    axes[0].set(xlabel="sqrt(1/t)", ylabel="perplexity", title=f"s={sweep['scale']:g}, window {sweep['window']}")
    axes[0].legend()
    change = np.array([[np.nan if c is None else c for c in row] for row in sweep["segment_change_percent"]])
    for k, (a, b) in enumerate(sweep["segments"]):
        axes[1].plot(f, change[:, k], marker=".", label=f"{a}-{b}")
    axes[1].axhline(0, color="gray", linewidth=0.8)
    axes[1].set(xlabel="sqrt(1/t)", ylabel="perplexity change vs t=1 (%)", title="Eq. 26 per position segment")
    axes[1].legend(fontsize=7)
    counts = np.array(sweep["best_factor_counts"])
    im = axes[2].imshow(counts, aspect="auto", origin="lower", cmap="viridis")
    axes[2].set_yticks(range(len(f)), [f"{x:g}" for x in f])
    axes[2].set_xticks(range(len(sweep["segments"])), [f"{a}" for a, _ in sweep["segments"]], rotation=45)
    axes[2].set(xlabel="segment start (token position)", ylabel="sqrt(1/t)", title="documents with lowest perplexity")
    fig.colorbar(im, ax=axes[2])
    save_figure(fig, path)


def plot_passkey(results: Sequence[dict], path: str) -> None:
    """Accuracy against length; with a depth grid, a length x depth heat map beside it."""
    plt = pyplot()
    has_depth = "by_depth" in results[0]
    fig, axes = plt.subplots(1, 2 if has_depth else 1, figsize=(12 if has_depth else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    ax.plot([r["length"] for r in results], [100 * r["accuracy"] for r in results], marker="o")
    ax.axhline(80, color="gray", linestyle=":", label="80% (passkey context threshold)")
    ax.set(xlabel="context length (tokens)", ylabel="passkey accuracy (%)", ylim=(-5, 105))
    ax.legend()
    if has_depth:
        depths = [d["depth"] for d in results[0]["by_depth"]]
        grid = np.array([[100 * d["accuracy"] for d in r["by_depth"]] for r in results]).T
        im = axes[0, 1].imshow(grid, aspect="auto", origin="lower", cmap="RdYlGn", vmin=0, vmax=100)
        axes[0, 1].set_xticks(range(len(results)), [str(r["length"]) for r in results], rotation=45)
        axes[0, 1].set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        axes[0, 1].set(xlabel="context length (tokens)", ylabel="key depth (fraction of filler)")
        fig.colorbar(im, ax=axes[0, 1], label="accuracy (%)")
    save_figure(fig, path)
