"""Steps 6 and 7 of the miniature: the paper's headline claim, how many fine-tuning steps each
method needs, and s = 32 grown from s = 16.

The abstract: YaRN extends the context "requiring 10x less tokens and 2.5x less training steps
than previous methods". Sec. 4.3.1 makes it concrete: Table 1's PI and "NTK-aware" models were
trained for 1000 steps (Chen et al.'s methodology), YaRN's for 400 with the same methodology. In
the miniature every method sees sequences of the same length in batches of the same size, so
tokens are steps times a constant: the miniature can test the 2.5x, and its token ratio equals
its step ratio (the paper's 10x compares with Code Llama's much longer training run).

6. Learning curves at s = 8 for PI, NTK-aware, NTK-by-parts and YaRN under one recipe: a short
   learning-rate sweep first (every method, one seed), then each method for --curve-steps steps
   at the rate that is fairest to all (the smallest worst-case gap of any method to its own best
   rate), one run per seed (the data order), its model saved at steps spaced geometrically.
   Perplexity at L and 8 L at every saved step, passkey at the end, and the steps each method
   needs to reach two targets at 8 L: PI's final perplexity and 3% above the best final one.
7. s = 32 from s = 16 (Sec. 4.1): YaRN s = 16 fine-tuned for N steps, continued at s = 32 for
   N / 2, against s = 32 fine-tuned from the base model for the same 1.5 N; perplexity up to
   32 L and passkey at 8, 16 and 32 L.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

METHODS = ("pi", "ntk", "ntk-by-parts", "yarn")
NAMES = {"pi": "PI", "ntk": "NTK-aware", "ntk-by-parts": "NTK-by-parts", "yarn": "YaRN"}
PLATEAU = 1.03  # the second target: within 3% of the best method's final perplexity at 8 L


# ------------------------------------------------------------------ the numbers, from the curves

def steps_to_target(steps: list[int], ppl: list[float], target: float) -> float | None:
    """The first step at which a learning curve reaches `target` (perplexity <= target), read
    between the two saved steps around the crossing: log perplexity interpolated linearly in
    log(step), or in step from step 0. None if the curve never gets there."""
    for i, (s, p) in enumerate(zip(steps, ppl)):
        if p <= target:
            if i == 0 or p == target:
                return float(s)
            s0, p0 = steps[i - 1], ppl[i - 1]
            f = (math.log(p0) - math.log(target)) / (math.log(p0) - math.log(p))
            if s0 == 0:
                return s0 + f * (s - s0)
            return math.exp(math.log(s0) + f * (math.log(s) - math.log(s0)))
    return None


def fairest_lr(final: dict[str, dict[float, float]]) -> tuple[float, dict[float, float]]:
    """The sweep's choice: final perplexity per method and learning rate -> the rate whose worst
    method is closest to that method's own best rate (the smallest max over methods of
    ppl(lr) / min over rates of ppl), and that worst ratio for every rate."""
    rates = sorted(set.intersection(*(set(by_lr) for by_lr in final.values())))
    worst = {lr: max(by_lr[lr] / min(by_lr.values()) for by_lr in final.values()) for lr in rates}
    return min(rates, key=lambda lr: (worst[lr], lr)), worst


def spread(values: list[float | None]) -> str:
    """'mean (min-max)' over seeds; '> N' style text is made by the caller for None."""
    if any(v is None for v in values):
        reached = [v for v in values if v is not None]
        return f"not reached by {len(values) - len(reached)} of {len(values)} seeds" + (
            f" (others {', '.join(f'{v:.0f}' for v in reached)})" if reached else "")
    mean = sum(values) / len(values)
    return f"{mean:.0f} ({min(values):.0f}-{max(values):.0f})" if len(values) > 1 else f"{mean:.0f}"


def curve(result: dict, window: int) -> tuple[list[int], list[float]]:
    """One run's saved steps and perplexities at one window, from its evaluation JSON."""
    rows = sorted((r["step"], r["perplexity"]) for r in result["results"] if r["window"] == window)
    return [s for s, _ in rows], [p for _, p in rows]


def claim_table(runs: dict[str, dict], window: int, tokens_per_step: int) -> tuple[str, dict]:
    """Steps (and tokens) each method needs to reach two targets at `window`, seed by seed (the
    same data order for every method): PI's final perplexity, which PI reaches at its last step
    by definition, and PLATEAU times the best method's final perplexity."""
    seeds = list(runs["pi"])
    final = {m: {seed: curve(r, window)[1][-1] for seed, r in by_seed.items()} for m, by_seed in runs.items()}
    targets = {"PI's final perplexity": {seed: final["pi"][seed] for seed in seeds},
               f"{PLATEAU:.2f} x the best final perplexity": {seed: PLATEAU * min(f[seed] for f in final.values())
                                                               for seed in seeds}}
    needed = {name: {m: [steps_to_target(*curve(runs[m][seed], window), t[seed]) for seed in seeds] for m in runs}
              for name, t in targets.items()}
    mean = lambda values: sum(values) / len(values)
    lines = ["| target at %d tokens (seeds' mean) | " % window + " | ".join(NAMES[m] for m in runs) + " |",
             "|---" * (len(runs) + 1) + "|"]
    for name, t in targets.items():
        lines.append(f"| {name} ({mean(list(t.values())):.2f}): steps | "
                     + " | ".join(spread(needed[name][m]) for m in runs) + " |")
        lines.append(f"| same, tokens | " + " | ".join(
            "-" if None in needed[name][m] else f"{mean(needed[name][m]) * tokens_per_step / 1e6:.2f} M" for m in runs) + " |")
    lines.append("| final perplexity | " + " | ".join(
        f"{mean(list(f.values())):.2f} ({min(f.values()):.2f}-{max(f.values()):.2f})" for f in final.values()) + " |")
    return "\n".join(lines), {"targets": targets, "steps_needed": needed, "final": final}


def ratios(needed: dict, a: str = "pi", b: str = "yarn") -> list[str]:
    """'YaRN needs N steps where PI needs M' for each target, per seed, with the ratio."""
    out = []
    for name, by_method in needed.items():
        pairs = list(zip(by_method[a], by_method[b]))
        text = ", ".join(f"{NAMES[b]} {y:.0f} vs {NAMES[a]} {x:.0f} ({x / y:.1f}x)" if x and y else
                         f"{NAMES[b]} {'-' if y is None else f'{y:.0f}'} vs {NAMES[a]} {'-' if x is None else f'{x:.0f}'}"
                         for x, y in pairs)
        out.append(f"- {name}: {text} (per seed)")
    return out


# ------------------------------------------------------------------ the plots

def plot_curves(runs: dict[str, dict[int, dict]], windows: list[int], targets: dict, path: Path,
                tokens_per_step: int | None = None) -> None:
    """Perplexity against fine-tuning steps (or tokens), log x, one line per method (the seeds'
    mean) with the seeds' range as a band; a panel per window; the targets dashed on 8 L's."""
    from yarn_minimal.eval_report import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(windows), figsize=(6 * len(windows), 4.5), squeeze=False)
    for ax, window in zip(axes[0], windows):
        for m, by_seed in runs.items():
            curves = [curve(r, window) for r in by_seed.values()]
            steps = curves[0][0]
            x = [max(s, 0.5) * (tokens_per_step or 1) for s in steps]  # step 0 drawn at 0.5 on the log axis
            ppl = list(zip(*(c[1] for c in curves)))
            mean = [sum(p) / len(p) for p in ppl]
            line, = ax.plot(x, mean, marker="o", ms=3, label=NAMES[m])
            if len(curves) > 1:
                ax.fill_between(x, [min(p) for p in ppl], [max(p) for p in ppl], color=line.get_color(), alpha=0.2)
        if window == max(windows):
            for i, (name, t) in enumerate(targets.items()):  # the higher label above its line, the lower below
                ax.axhline(t, color="grey", ls="--", lw=0.8)
                ax.text(0.01, t, name, transform=ax.get_yaxis_transform(), fontsize=7, color="grey",
                        va="bottom" if i == 0 else "top")
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{s}" if not tokens_per_step else f"{s * tokens_per_step / 1e6:.2g}M" for s in steps])
        ax.minorticks_off()
        ax.set_xlabel("tokens seen (log scale; 0 drawn at half a step)" if tokens_per_step else
                      "fine-tuning steps (log scale; 0 drawn at 0.5)")
        ax.set_ylabel(f"perplexity at {window} tokens")
        ax.set_title(f"held-out perplexity at {window} tokens")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    save_figure(fig, str(path))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------ the steps

def saved_steps(steps: int) -> list[int]:
    """Where a curve's model is saved besides the end: 4, 8, 16, ... below `steps` (1, 2, ...
    for a run shorter than 8 steps, as --quick's)."""
    return [n for n in (2 ** k for k in range(30)) if n < steps and (n >= 4 or steps < 8)]


def evaluate(mini, name: str, configs: list[str], windows: list[int], runs: list[Path]) -> dict:
    """Perplexity of configs labelled 'step N', kept in NAME.json: reused while it is newer than
    every fine-tune it scores (a rerun reuses finished fine-tunes, so their scores too)."""
    path = mini.out / f"{name}.json"
    newest = max((r.stat().st_mtime for r in runs), default=0)
    result = load(path) if path.is_file() and path.stat().st_mtime > newest else \
        mini.perplexity(name, configs, windows, plot=False)
    for r in result["results"]:
        r["step"] = int(r["label"].split()[-1]) if r["label"].startswith("step ") else None
    return result


def step6(mini) -> dict:
    a, s, L = mini.args, 8, mini.L
    # the learning-rate sweep: every method, one seed, --sweep-steps steps, perplexity at 8 L
    sweep = {(m, lr): mini.finetune(m, s, steps=a.sweep_steps, lr=lr, name=f"sweep-{m}-lr{lr:g}") for lr in a.sweep_lrs
             for m in METHODS}
    result = evaluate(mini, "step6_lr_sweep", [f"ckpt={mini.rel(c)},label={m} {lr:g}" for (m, lr), c in sweep.items()], [8 * L],
                      list(sweep.values()))
    final = {m: {} for m in METHODS}
    for r in result["results"]:
        m, lr = r["label"].split()
        final[m][float(lr)] = r["perplexity"]
    lr, worst = fairest_lr(final)
    print(f"# learning rate {lr:g} (worst method within {worst[lr]:.3f}x of its own best rate)", flush=True)

    # the curves: every method and seed at that rate, models saved at 4, 8, 16, ... steps
    saved = saved_steps(a.curve_steps)
    runs, passkey = {m: {} for m in METHODS}, {m: {} for m in METHODS}
    for seed in a.seeds:
        for m in METHODS:
            final_model = mini.finetune(m, s, steps=a.curve_steps, lr=lr, seed=seed, save_models_at=saved,
                                        name=f"curve-{m}-seed{seed}")
            run = final_model.parent
            configs = [f"method={m},scale={s},label=step 0"]
            configs += [f"ckpt={mini.rel(run / f'model-step-{n:06d}')},label=step {n}" for n in saved]
            configs += [f"ckpt={mini.rel(final_model)},label=step {a.curve_steps}"]
            runs[m][seed] = evaluate(mini, f"step6_curve_{m}_seed{seed}", configs, [L, 8 * L], [final_model])
            passkey[m][seed] = mini.passkey(f"step6_passkey_{m}_seed{seed}", final_model, [2 * L, 4 * L, 8 * L],
                                            plot=False)
    return {"lr": lr, "sweep": {m: {f"{k:g}": v for k, v in by_lr.items()} for m, by_lr in final.items()},
            "worst_ratio": {f"{k:g}": v for k, v in worst.items()}, "saved_steps": saved, "seeds": list(a.seeds),
            "tokens_per_step": a.finetune_batch * 8 * L, "curves": runs, "passkey": passkey}


def step7(mini, lr: float) -> dict:
    a, L, n = mini.args, mini.L, mini.args.grow_steps
    windows = [L * k for k in ((1, 2, 4) if a.quick else (1, 2, 4, 8, 16, 32))]
    lengths = [L * k for k in ((2, 4) if a.quick else (8, 16, 32))]
    perplexity, passkey = {}, {}
    for seed in a.seeds:
        s16 = mini.finetune("yarn", 16, steps=n, lr=lr, seed=seed, name=f"grow-s16-seed{seed}")
        grown = mini.finetune("yarn", 32, steps=n // 2, lr=lr, seed=seed, init_from=s16.parent,
                              name=f"grow-s16-s32-seed{seed}")
        direct = mini.finetune("yarn", 32, steps=n + n // 2, lr=lr, seed=seed, name=f"grow-s32-seed{seed}")
        models = {f"s=16 ({n} steps)": s16, f"s=16 then s=32 ({n} + {n // 2} steps)": grown,
                  f"s=32 from the base model ({n + n // 2} steps)": direct}
        perplexity[seed] = evaluate(mini, f"step7_seed{seed}", [f"ckpt={mini.rel(c)},label={k}" for k, c in models.items()],
                                    windows, list(models.values()))
        passkey[seed] = {k: mini.passkey(f"step7_passkey_{i}_seed{seed}", c, lengths, plot=False)
                         for i, (k, c) in enumerate(models.items()) if c is not s16}
    return {"lr": lr, "steps": n, "perplexity": perplexity, "passkey": passkey, "windows": windows}


# ------------------------------------------------------------------ SUMMARY.md sections

def markdown(header: list, rows: list[list]) -> list[str]:
    return ["| " + " | ".join(map(str, header)) + " |", "|---" * len(header) + "|",
            *["| " + " | ".join(map(str, row)) + " |" for row in rows]]


def report6(r: dict, L: int, out: Path) -> list[str]:
    """Step 6's SUMMARY.md section and plots, from its results (as step6 returns them or as
    results.json holds them): the numbers of the claim are computed here, from the curves."""
    table, claim = claim_table(r["curves"], 8 * L, r["tokens_per_step"])
    r["claim"] = claim  # kept in results.json for readers of the JSON
    r.pop("claim_table", None)
    mean_targets = {f"{name} (seeds' mean)": sum(t.values()) / len(t) for name, t in claim["targets"].items()}
    plot_curves(r["curves"], [L, 8 * L], mean_targets, out / "step6_learning_curves.png")
    plot_curves(r["curves"], [8 * L], mean_targets, out / "step6_tokens.png", tokens_per_step=r["tokens_per_step"])
    rates = list(r["worst_ratio"])
    sweep = markdown(["method", *rates], [[NAMES[m], *(f"{v:.2f}" for v in by_lr.values())] for m, by_lr in r["sweep"].items()]
                     + [["worst method / its best rate", *(f"{v:.3f}" for v in r["worst_ratio"].values())]])
    steps = curve(next(iter(r["curves"]["pi"].values())), 8 * L)[0]
    mean_spread = lambda v: f"{sum(v) / len(v):.2f}" + (f" ±{(max(v) - min(v)) / 2:.2f}" if len(v) > 1 else "")
    curves = markdown([f"method, perplexity at {8 * L}", *(f"step {n}" for n in steps)],
                      [[NAMES[m], *map(mean_spread, zip(*(curve(x, 8 * L)[1] for x in by_seed.values())))]
                       for m, by_seed in r["curves"].items()])
    lengths = [row["length"] for row in next(iter(r["passkey"]["pi"].values()))["results"]]
    accuracy = lambda by_seed, i: sum(res["results"][i]["accuracy"] for res in by_seed.values()) / len(by_seed)
    passkey = markdown(["method", *lengths], [[NAMES[m], *(f"{100 * accuracy(by_seed, i):.0f}%" for i in range(len(lengths)))]
                                              for m, by_seed in r["passkey"].items()])
    return [f"## 6. How many fine-tuning steps each method needs (s = 8; the abstract's 2.5x)\n",
            f"Learning-rate sweep ({'/'.join(rates)}; every method, seed 0, perplexity at {8 * L} after the sweep's "
            f"steps); the curves use **{r['lr']:g}**, the rate whose worst method is closest to its own best:\n",
            *sweep, "",
            f"Learning curves: seeds {', '.join(map(str, r['seeds']))} (the data order); mean ± half the seeds' range; "
            f"{r['tokens_per_step']:,} tokens per step.\n", *curves, "",
            "![learning curves](step6_learning_curves.png)\n", "![against tokens](step6_tokens.png)\n",
            "Steps (and tokens) to reach each target at 8 L, mean (min-max over seeds), read between saved steps "
            "(log perplexity linear in log step):\n", table, "", *ratios(claim["steps_needed"]), "",
            "Passkey accuracy of the final models (mean over seeds):\n", *passkey, ""]


def summary7(r: dict) -> list[str]:
    rows = []
    for seed, res in r["perplexity"].items():
        by = {(x["label"], x["window"]): x["perplexity"] for x in res["results"]}
        labels = list(dict.fromkeys(x["label"] for x in res["results"]))
        if not rows:
            rows = ["| model (seed) | " + " | ".join(map(str, r["windows"])) + " |", "|---" * (len(r["windows"]) + 1) + "|"]
        rows += [f"| {lab} ({seed}) | " + " | ".join(f"{by[(lab, w)]:.2f}" for w in r["windows"]) + " |" for lab in labels]
    pk = []
    for seed, models in r["passkey"].items():
        for name, res in models.items():
            if not pk:
                pk = ["| model (seed) | " + " | ".join(str(x["length"]) for x in res["results"]) + " |",
                      "|---" * (len(res["results"]) + 1) + "|"]
            pk.append(f"| {name} ({seed}) | " + " | ".join(f"{100 * x['accuracy']:.0f}%" for x in res["results"]) + " |")
    return ["## 7. s = 32 grown from s = 16 (Sec. 4.1), against s = 32 from the base model\n",
            f"Both fine-tuned on 8 L sequences at lr {r['lr']:g}; the same total steps.\n", *rows, "",
            "Passkey accuracy:\n", *pk, ""]
