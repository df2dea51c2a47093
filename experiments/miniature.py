"""The YaRN paper's experiments in miniature, on the embedded demo model and a laptop CPU.

    python -m experiments.miniature                 # all steps: about 2 h on 2 CPU cores (measured:
                                                    # steps 1-5 15.0 min, steps 6-7 110.8 min)
    python -m experiments.miniature --steps 1,4     # only some steps
    python -m experiments.miniature --quick         # a tiny grid, about a minute, into results/tmp/

The demo model (demo/yarn-demo) was pre-trained at L = 256 tokens with plain RoPE, so
16 x L = 4096 tokens is "long context" for it. Every step runs the project's own scripts
(train.py, eval_perplexity.py, eval_passkey.py) as a user would, and writes JSON and PNG under
--out; the last step writes SUMMARY.md with every table. --out must be new or empty, or an
earlier miniature run's folder with --overwrite (its own files are replaced, nothing else; its
fine-tuned checkpoints are reused). A --quick run never writes into results/ (committed
figures): by default it goes to results/tmp/miniature-quick (git-ignored).

1. No fine-tuning (Table 1 / Figure 5 analogue): perplexity of the held-out documents,
   truncated to windows 1x..16x L (the Figure 1 protocol), for plain RoPE and every method at
   s = 16, static and dynamic.
2. Equal fine-tuning budget for PI, NTK-aware and YaRN at s = 8 on 8 x L sequences:
   perplexity at the same windows and passkey accuracy at 2x..16x L (Tables 1 and 5).
3. Train short, test long: YaRN at s = 16 fine-tuned only on 8 x L sequences, evaluated up
   to 16 x L (the s = 32 result of Table 2).
4. The temperature sweep of Appendix A.2 at s = 8 (no fine-tuning): perplexity against
   sqrt(1/t), with Eq. 22's 0.1 ln(s) + 1 marked.
5. alpha/beta for this model: the paper tunes them per model family (Sec. 3.2); YaRN s = 8
   without fine-tuning at 8 x L for a few (alpha, beta).
6. How many fine-tuning steps each method needs (the abstract's "2.5x less training steps"):
   learning curves at s = 8 for PI, NTK-aware, NTK-by-parts and YaRN (a learning-rate sweep,
   then 128 steps per method and seed, perplexity at L and 8 x L at steps 0, 4, 8, ..., 128),
   and the steps each needs to reach PI's final perplexity (experiments/curves.py).
7. s = 32 grown from s = 16 (Sec. 4.1): YaRN s = 16 for 64 steps, then s = 32 for 32 more,
   against s = 32 from the base model for 96; perplexity up to 32 x L and passkey.

Held-out documents and fine-tuning data come from `python -m experiments.demo_data`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from experiments import curves
from yarn_minimal.cli import positive_int
from yarn_minimal.files import Output, check_output, holds, write_json, write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"                 # committed figures: never written by a --quick run
SCRATCH = RESULTS / "tmp"                  # git-ignored
DEFAULT_CKPT = ROOT / "demo" / "yarn-demo"
DEFAULT_DATA = ROOT / "experiments" / "work" / "demo_data"
METHOD_NAMES = {"none": "RoPE", "pi": "PI", "ntk": "NTK-aware", "ntk-by-parts": "NTK-by-parts", "yarn": "YaRN"}
# what --out may be besides new or empty: an earlier run of this experiment (with --overwrite)
MINIATURE = Output("an earlier miniature run", holds("results.json", "SUMMARY.md", "log.txt", "checkpoints", "step[1-7]_*"),
                   folder=True)


ALL_STEPS = ("1", "2", "3", "4", "5", "6", "7")
ANALYSIS = "## Analysis"  # the hand-written reading of the numbers, at the end of SUMMARY.md


def write_summary(path: Path, generated: str) -> None:
    """SUMMARY.md: the generated tables, then the '## Analysis' of the earlier SUMMARY.md, if it
    has one. A rerun replaces the numbers, never the hand-written reading of them."""
    old = path.read_text() if path.is_file() else ""
    at = old.find("\n" + ANALYSIS)
    write_text(path, generated.rstrip("\n") + "\n" + old[at:] if at >= 0 else generated)


def out_folder(out: str | None, quick: bool, default: Path, quick_default: Path) -> Path:
    """--out, or its default; a --quick run is refused inside results/ (but for results/tmp/):
    a smoke test never replaces committed figures."""
    if out is None:
        return quick_default if quick else default
    path = Path(out)
    inside = lambda root: path.resolve().is_relative_to(root.resolve())
    if quick and inside(RESULTS) and not inside(SCRATCH):
        raise SystemExit(f"error: --out {out}: a --quick run never writes into {RESULTS.relative_to(ROOT)}/, "
                         f"which holds committed figures; use {SCRATCH.relative_to(ROOT)}/ or another folder")
    return path


def rel(path: Path) -> str:
    """path relative to the checkout when it is inside it (the scripts run there), else as given."""
    return os.path.relpath(path, ROOT) if Path(path).resolve().is_relative_to(ROOT) else str(path)


def run(cmd: list, log: Path) -> None:
    """Run one of the project's scripts; its output goes to a log file beside the results. Paths
    inside the checkout are passed relative to it (the scripts run there), so that the JSON they
    write names no folder of this machine."""
    cmd = [rel(c) if isinstance(c, Path) else c for c in cmd]
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "a") as f:
        f.write("$ " + " ".join(str(c) for c in cmd) + "\n")
        f.flush()
        proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise SystemExit(f"error: command failed with exit code {proc.returncode}; see {log}")


def original_length(ckpt: Path) -> int:
    rope = ckpt / "rope.json"
    return json.loads(rope.read_text())["original_length"] if rope.is_file() else 4096


class Miniature:
    rel = staticmethod(rel)  # for experiments/curves.py, which this module imports
    def __init__(self, args):
        self.args = args
        self.ckpt, self.data, self.out = Path(args.ckpt), Path(args.data), Path(args.out)
        self.L = original_length(self.ckpt)
        self.windows = [self.L * k for k in ((1, 2, 4) if args.quick else (1, 2, 4, 8, 16))]
        self.heldout = self.data / "heldout"
        self.log = self.out / "log.txt"
        self.work = self.out / "checkpoints"
        self.results = {}  # every step's results: those of an earlier run in --out, replaced as steps run

    def check_inputs(self) -> None:
        if not (self.ckpt / "params.json").is_file():
            raise SystemExit(f"error: {self.ckpt}: no params.json; pass --ckpt")
        for need in (self.heldout, self.data / f"train-{8 * self.L}"):
            if not need.exists():
                raise SystemExit(f"error: {need} is missing; build the data first with "
                                 f"`python -m experiments.demo_data --out {self.data}`")

    def perplexity(self, name: str, configs: list[str], windows: list[int], extra=(), plot=True) -> dict:
        out = self.out / name
        cmd = ["eval_perplexity.py", "--ckpt", self.ckpt, "--files", self.heldout, "--truncate",
               "--lengths", ",".join(map(str, windows)), "--max-documents", self.args.documents,
               "--out", out.with_suffix(".json"), *(["--plot", out.with_suffix(".png")] if plot else []),
               "--overwrite", *extra]
        for c in configs:
            cmd += ["--config", c]
        run(cmd, self.log)
        return json.loads(out.with_suffix(".json").read_text())

    def passkey(self, name: str, ckpt: Path, lengths: list[int], plot=True) -> dict:
        out = self.out / name
        run(["eval_passkey.py", "--ckpt", ckpt, "--lengths", ",".join(map(str, lengths)),
             "--iterations", self.args.passkey_iterations, "--seed", "1234", "--out", out.with_suffix(".json"),
             *(["--plot", out.with_suffix(".png")] if plot else []), "--overwrite"], self.log)
        return json.loads(out.with_suffix(".json").read_text())

    def finetune(self, method: str, scale: float, steps=None, lr=None, seed=0, name=None, init_from=None,
                 save_models_at=()) -> Path:
        """Equal budget for every method: same steps, batch, lr and data (8 x L sequences) unless
        asked otherwise. A finished fine-tune in --out is reused; an interrupted one is resumed
        from its last checkpoint (every 32 steps), or started over if it had none."""
        a = self.args
        steps, lr = steps or a.finetune_steps, lr or a.finetune_lr
        out = self.work / (name or f"{method}-s{scale:g}")
        if not (out / "final" / "params.json").is_file():
            again = ["--resume"] if (out / "latest").is_file() else ["--overwrite"] if out.exists() else []
            start = ["--init-from", init_from] if init_from else ["--ckpt", self.ckpt]
            saves = ["--save-models-at", ",".join(map(str, save_models_at))] if save_models_at else []
            run(["train.py", *start, "--method", method, "--yarn-scale", scale,
                 "--data", self.data / f"train-{8 * self.L}", "--out", out, "--steps", steps,
                 "--global-batch-size", a.finetune_batch, "--micro-batch-size", a.finetune_batch,
                 "--lr", lr, "--warmup-steps", max(1, steps // 10), "--save-every", 32, "--keep-checkpoints", 1,
                 "--seed", seed, "--device", "cpu", *saves, *again], self.log)
        return out / "final"

    # ---------------------------------------------------------------- the steps

    def step1(self) -> dict:
        s = 16
        configs = ["method=none,label=RoPE"]
        for dynamic in (False, True):
            for m in ("pi", "ntk", "ntk-by-parts", "yarn"):
                label = ("Dynamic-" if dynamic else "") + METHOD_NAMES[m] + ("" if dynamic else f" s={s}")
                configs.append(f"method={m},scale={1 if dynamic else s},dynamic={int(dynamic)},label={label}")
        return self.perplexity("step1_no_finetune", configs, self.windows)

    def step2(self) -> dict:
        s = 8
        ckpts = {m: self.finetune(m, s) for m in ("pi", "ntk", "yarn")}
        configs = [f"ckpt={rel(c)},label={METHOD_NAMES[m]} s={s} (fine-tuned)" for m, c in ckpts.items()]
        ppl = self.perplexity("step2_finetuned_perplexity", configs, self.windows)
        lengths = [self.L * k for k in ((2, 4) if self.args.quick else (2, 4, 8, 16))]
        passkey = {m: self.passkey(f"step2_passkey_{m}", c, lengths) for m, c in ckpts.items()}
        passkey["base"] = self.passkey("step2_passkey_base", self.ckpt, lengths)
        return {"perplexity": ppl, "passkey": passkey}

    def step3(self) -> dict:
        c16 = self.finetune("yarn", 16)
        c8 = self.finetune("yarn", 8)
        configs = [f"ckpt={rel(c8)},label=YaRN s=8 (fine-tuned on 8L)", f"ckpt={rel(c16)},label=YaRN s=16 (fine-tuned on 8L)"]
        ppl = self.perplexity("step3_train_short_test_long", configs, self.windows)
        lengths = [self.L * k for k in ((2, 4) if self.args.quick else (4, 8, 12, 16))]
        return {"perplexity": ppl, "passkey": self.passkey("step3_passkey_yarn_s16", c16, lengths)}

    def step4(self) -> dict:
        s = 8
        factors = "0.8,0.9,1.0,1.1,1.2,1.3,1.4,1.6" if not self.args.quick else "0.9,1.2"
        window = self.L * (4 if self.args.quick else 8)
        return self.perplexity("step4_temperature_sweep", [f"method=yarn,scale={s}"], [window],
                               extra=["--attention-factor-sweep", factors, "--segment-length", self.L])

    def step5(self) -> dict:
        s = 8
        pairs = [(1, 32), (1, 16), (1, 8), (0.5, 16), (2, 32)] if not self.args.quick else [(1, 32), (1, 8)]
        configs = [f"method=yarn,scale={s},alpha={a},beta={b},label=alpha={a} beta={b}" for a, b in pairs]
        return self.perplexity("step5_alpha_beta", configs, [self.L * k for k in ((1, 4) if self.args.quick else (1, 8))])

    def step6(self) -> dict:
        return curves.step6(self)

    def step7(self) -> dict:
        lr = self.results.get("6", {}).get("lr", self.args.finetune_lr)  # step 6's choice, when it has run
        return curves.step7(self, lr)


# -------------------------------------------------------------------- the summary

def table(results: list[dict], key="perplexity") -> str:
    labels = list(dict.fromkeys(r["label"] for r in results))
    windows = sorted({r["window"] for r in results})
    by = {(r["label"], r["window"]): r[key] for r in results}
    fmt = lambda x: "-" if x is None else (f"{x:.3g}" if x >= 1000 else f"{x:.2f}")
    lines = ["| setting | " + " | ".join(str(w) for w in windows) + " |", "|---" * (len(windows) + 1) + "|"]
    lines += ["| " + lab + " | " + " | ".join(fmt(by.get((lab, w))) for w in windows) + " |" for lab in labels]
    return "\n".join(lines)


def passkey_rows(named: dict) -> str:
    lengths = sorted({r["length"] for res in named.values() for r in res["results"]})
    lines = ["| model | " + " | ".join(map(str, lengths)) + " | passkey context |", "|---" * (len(lengths) + 2) + "|"]
    for name, res in named.items():
        acc = {r["length"]: r["accuracy"] for r in res["results"]}
        lines.append(f"| {name} | " + " | ".join(f"{100 * acc[n]:.0f}%" if n in acc else "-" for n in lengths)
                     + f" | {res.get('passkey_context') or 'none'} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import torch
    return f"{cpu}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}"


def seed_list(text: str) -> tuple[int, ...]:
    """argparse type of --seeds: "0,1" -> (0, 1), whole numbers >= 0."""
    try:
        seeds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None
    if any(x < 0 for x in seeds):
        raise argparse.ArgumentTypeError(f"seeds are >= 0, got {text!r}")
    return seeds


def rate_list(text: str) -> list[float]:
    """argparse type of --sweep-lrs: "5e-4,1e-3" -> [0.0005, 0.001], each finite and > 0."""
    try:
        rates = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not all(math.isfinite(x) and x > 0 for x in rates):
        raise argparse.ArgumentTypeError(f"learning rates are finite and > 0, got {text!r}")
    return rates


def settings(a) -> dict:
    """The flags a run's tables depend on, kept with its record in results.json."""
    return {"documents": a.documents, "finetune_steps": a.finetune_steps, "finetune_batch": a.finetune_batch,
            "finetune_lr": a.finetune_lr, "machine": machine()}


def summary(mini: Miniature, results: dict, runs: list[dict]) -> str:
    # the settings of the latest run that recorded them (--report-only reports that run, not its own flags)
    a = argparse.Namespace(**next((r["settings"] for r in reversed(runs) if "settings" in r), settings(mini.args)))
    parts = [f"# YaRN in miniature: results\n",
             *[f"Command: `{r['command']}` ({r['wall_s'] / 60:.1f} min)  " for r in runs],
             f"Machine: {getattr(a, 'machine', None) or machine()}  ",
             f"Model: `{mini.ckpt.relative_to(ROOT) if mini.ckpt.is_relative_to(ROOT) else mini.ckpt}` "
             f"(L = {mini.L}); {a.documents} held-out documents, truncated to each window (Figure 1 protocol).  ",
             f"Fine-tuning budget per method in steps 2-3: {a.finetune_steps} steps x {a.finetune_batch} sequences of "
             f"{8 * mini.L} tokens, lr {a.finetune_lr}.\n"]
    if "1" in results:
        parts += ["## 1. Without fine-tuning (Table 1 / Figure 5 analogue)\n", table(results["1"]["results"]),
                  "\n![step 1](step1_no_finetune.png)\n"]
    if "2" in results:
        parts += ["## 2. Equal fine-tuning budget at s = 8 (Tables 1 and 5 analogue)\n",
                  table(results["2"]["perplexity"]["results"]), "\n![step 2](step2_finetuned_perplexity.png)\n",
                  "Passkey accuracy (10 prompts per length unless --passkey-iterations says otherwise):\n",
                  passkey_rows({("base model, plain RoPE" if k == "base" else f"{METHOD_NAMES[k]} s=8 fine-tuned"): v
                                for k, v in results["2"]["passkey"].items()}), ""]
    if "3" in results:
        parts += ["## 3. Train short, test long: YaRN s = 16 fine-tuned on 8 x L (Table 2's s = 32 analogue)\n",
                  table(results["3"]["perplexity"]["results"]), "\n![step 3](step3_train_short_test_long.png)\n",
                  passkey_rows({"YaRN s=16, fine-tuned on 8L": results["3"]["passkey"]}), ""]
    if "4" in results:
        sweep = results["4"].get("sweep") or results["4"]
        parts += ["## 4. Attention temperature sweep at s = 8 (Appendix A.2, Figure 2 analogue)\n",
                  "| sqrt(1/t) | perplexity |", "|---|---|"]
        if "factors" in sweep:
            parts += [f"| {f:g}{' (best)' if p == min(sweep['perplexity']) else ''} | {p:.3f} |"
                      for f, p in zip(sweep["factors"], sweep["perplexity"])]
            parts += [f"\nEq. 22 recommends {sweep['recommended_factor']:.3f} at s = 8.\n"]
        parts += ["![step 4](step4_temperature_sweep.png)\n"]
    if "5" in results:
        parts += ["## 5. alpha and beta for this model (YaRN s = 8, no fine-tuning)\n", table(results["5"]["results"]), ""]
    if "6" in results:
        parts += curves.report6(results["6"], mini.L, mini.out)
    if "7" in results:
        parts += curves.summary7(results["7"])
    return "\n".join(parts) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.miniature", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT), help="the model to extend (default: the embedded demo model)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="output of `python -m experiments.demo_data`")
    p.add_argument("--out", default=None,
                   help="results folder, new or empty (default results/miniature; with --quick results/tmp/miniature-quick, "
                        "and never inside results/ but for results/tmp/)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's results in --out (its own files only; fine-tuned checkpoints are reused)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite SUMMARY.md and the plots made from results.json (step 6's) from --out's results.json, "
                        "running nothing (with --overwrite)")
    p.add_argument("--steps", default=",".join(ALL_STEPS), help="which steps to run, e.g. 1,4 (default all); the "
                   "results of the others, from an earlier run in --out, are kept")
    p.add_argument("--quick", action="store_true", help="tiny grid for a smoke test (~1-2 min), written outside results/")
    p.add_argument("--documents", type=int, default=None, help="held-out documents to score (default 12; quick 2)")
    p.add_argument("--finetune-steps", type=int, default=None, help="optimizer steps per fine-tune (default 30; quick 2)")
    p.add_argument("--finetune-batch", type=int, default=None, help="sequences per step (default 4; quick 1)")
    p.add_argument("--finetune-lr", type=float, default=5e-4, help="peak lr of the fine-tunes (default 5e-4)")
    p.add_argument("--passkey-iterations", type=int, default=None, help="prompts per length (default 10; quick 2)")
    p.add_argument("--seeds", type=seed_list, default=None, help="data-order seeds of steps 6-7 (default 0,1; quick 0)")
    p.add_argument("--sweep-lrs", type=rate_list, default=None,
                   help="step 6's learning rates (default 2.5e-4,5e-4,1e-3; quick 5e-4,1e-3)")
    p.add_argument("--sweep-steps", type=positive_int, default=None, help="steps per sweep fine-tune (default 32; quick 1)")
    p.add_argument("--curve-steps", type=positive_int, default=None, help="steps per learning curve (default 128; quick 4)")
    p.add_argument("--grow-steps", type=positive_int, default=None,
                   help="step 7's N: s = 16 for N steps, then s = 32 for N/2 (default 64; quick 2)")
    a = p.parse_args(argv)
    quick = a.quick
    a.documents = a.documents or (2 if quick else 12)
    a.finetune_steps = a.finetune_steps or (2 if quick else 30)
    a.finetune_batch = a.finetune_batch or (1 if quick else 4)
    a.passkey_iterations = a.passkey_iterations or (2 if quick else 10)
    a.seeds = a.seeds or ((0,) if quick else (0, 1))
    a.sweep_lrs = a.sweep_lrs or ([5e-4, 1e-3] if quick else [2.5e-4, 5e-4, 1e-3])
    a.sweep_steps = a.sweep_steps or (1 if quick else 32)
    a.curve_steps = a.curve_steps or (4 if quick else 128)
    a.grow_steps = a.grow_steps or (2 if quick else 64)
    if a.grow_steps < 2:
        p.error(f"--grow-steps {a.grow_steps}: at least 2 (the s = 32 continuation runs N/2 steps)")
    steps = sorted(set(a.steps.split(",")))
    if not set(steps) <= set(ALL_STEPS):
        p.error(f"--steps {a.steps}: choose from {','.join(ALL_STEPS)}")
    a.out = out_folder(a.out, quick, RESULTS / "miniature", SCRATCH / "miniature-quick")
    try:
        check_output(a.out, MINIATURE, a.overwrite)
    except ValueError as e:
        raise SystemExit(f"error: --out {e}") from None

    mini = Miniature(a)
    mini.results, runs = earlier_results(mini.out / "results.json")
    if a.report_only:
        if not mini.results:
            raise SystemExit(f"error: --report-only: {mini.out / 'results.json'} holds no results to report")
        generated = summary(mini, mini.results, runs)  # recomputes what is derived from the results
        write_json(mini.out / "results.json", {"steps": mini.results, "runs": runs})
        write_summary(mini.out / "SUMMARY.md", generated)
        return print(f"wrote {mini.out / 'SUMMARY.md'} from {mini.out / 'results.json'}")
    mini.check_inputs()
    mini.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    start = time.time()
    for s in steps:
        t = time.time()
        print(f"== step {s}", flush=True)
        mini.results[s] = getattr(mini, f"step{s}")()
        print(f"== step {s} done in {time.time() - t:.0f} s", flush=True)
    wall = time.time() - start
    command = f"python -m experiments.miniature --steps {','.join(steps)}{' --quick' if quick else ''}"
    runs = [r for r in runs if set(r["steps"]) - set(steps)] + [{"command": command, "steps": steps, "wall_s": wall,
                                                                  "settings": settings(a)}]
    results = dict(sorted(mini.results.items()))
    write_json(mini.out / "results.json", {"steps": results, "runs": runs})
    write_summary(mini.out / "SUMMARY.md", summary(mini, results, runs))
    print(f"wrote {mini.out / 'SUMMARY.md'} ({wall / 60:.1f} min)")


def earlier_results(path: Path) -> tuple[dict, list[dict]]:
    """The results.json of an earlier run in --out (with --overwrite): its steps' results, kept
    unless this run repeats them, and the commands that made them."""
    if not path.is_file():
        return {}, []
    old = json.loads(path.read_text())
    steps = old.get("steps", {})
    runs = old.get("runs") or [{"command": f"python -m experiments.miniature --steps {','.join(steps)}",
                                "steps": list(steps), "wall_s": old.get("wall_s", 0)}]
    return steps, runs

if __name__ == "__main__":
    main()
