"""train.py and yarn_minimal/training.py on CPU: the recipe's objects, 1 vs 2 processes (torchrun,
gloo, FSDP2), resume equality, clear stops, and the memory arithmetic."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import yarn_minimal
from hf_oracle import hf_model
from yarn_minimal import runs, sizing, training
from yarn_minimal.data import write_segments
from yarn_minimal.model import ModelArgs, Transformer
from yarn_minimal.rope import RopeConfig
from yarn_minimal.tokenizer import SentencePieceTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

SEQ = 33


@pytest.fixture(autouse=True)
def one_thread():
    """The in-process runs are tiny: one thread avoids oversubscribing a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path):
    """A tiny checkpoint with plain RoPE (L = 16) and 4 segments of 33 tokens."""
    tmp = tmp_path_factory.mktemp("train")
    tok = SentencePieceTokenizer(tokenizer_path)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, multiple_of=32,
                     rope=RopeConfig(original_length=16))
    model = Transformer(args)
    training.init_weights(model, seed=0)
    yarn_minimal.save(model, tok, tmp / "ckpt")
    segs = np.random.default_rng(0).integers(3, tok.vocab_size, size=(4, SEQ))
    write_segments(tmp / "data", segs, dict(vocab_size=tok.vocab_size, bos_id=1, eos_id=2))
    return tmp, segs


def flags(tmp, out, *extra):
    return ["--ckpt", str(tmp / "ckpt"), "--data", str(tmp / "data"), "--out", str(out), "--global-batch-size", "4",
            "--original-length", "16", "--lr", "1e-3", "--warmup-steps", "1", "--save-every", "2", *extra]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(folder):
    return torch.load(folder / "consolidated.00.pth", weights_only=True)


def rates(schedule_for, steps=401):
    """The rate each optimizer step uses under the scheduler schedule_for(optimizer) makes."""
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32, multiple_of=32))
    opt = training.make_optimizer(model)
    sched = schedule_for(opt)
    lrs = []
    for step in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_default_schedule_is_the_authors_linear_decay():
    """The authors' finetune.py: transformers' get_linear_schedule_with_warmup(20, 400). After
    warmup ours is that schedule exactly; in warmup ours is one step ahead ((k + 1) / 20, so
    that step 0 learns), and both reach 0 at step 400."""
    from transformers import get_linear_schedule_with_warmup

    ours = rates(training.make_scheduler)
    theirs = rates(lambda opt: get_linear_schedule_with_warmup(opt, 20, 400))
    assert ours[20:] == pytest.approx(theirs[20:], rel=1e-12, abs=0)
    assert ours[:20] == pytest.approx(theirs[1:21], rel=1e-12)
    assert ours[399] == pytest.approx(2e-5 / 380) and ours[400] == 0.0
    assert train.parse_args([]).schedule == "linear"


def test_recipe_objects():
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32, multiple_of=32))
    opt = training.make_optimizer(model)
    sched = training.make_scheduler(opt, schedule="constant")
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.95) and group["weight_decay"] == 0.0 and group["initial_lr"] == 2e-5
    assert len(group["params"]) == len(list(model.parameters()))
    lrs = []
    for step in range(401):  # the rate each optimizer step uses
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # --schedule constant: Sec. 4.1's linear warmup over 20 steps to 2e-5, then nothing more
    for step, factor in {0: 1 / 20, 10: 11 / 20, 19: 1.0, 20: 1.0, 400: 1.0}.items():
        assert lrs[step] == pytest.approx(2e-5 * factor, rel=1e-12), step
    args = train.parse_args([])
    assert (args.steps, args.global_batch_size, args.micro_batch_size, args.lr, args.warmup_steps, args.grad_clip) \
        == (400, 64, 1, 2e-5, 20, 1.0)


def test_rope_defaults_and_continuation():
    plain = RopeConfig()
    rope = train.choose_rope(train.parse_args([]), plain)
    assert (rope.method, rope.scale, rope.original_length) == ("yarn", 16.0, 4096)
    s16 = RopeConfig(method="yarn", scale=16.0)
    assert train.choose_rope(train.parse_args([]), s16) == s16  # a run's output keeps its own s
    rope = train.choose_rope(train.parse_args(["--yarn-scale", "32"]), s16)
    assert (rope.method, rope.scale) == ("yarn", 32.0)
    assert train.choose_rope(train.parse_args(["--method", "none"]), plain).method == "none"


def test_grad_clip_runs():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32, multiple_of=32))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 10
    expected = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))
    norm = training.grad_norm_and_clip(model, 1.0)
    assert norm.item() == pytest.approx(expected, rel=1e-5)  # reported before clipping
    after = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))
    assert after == pytest.approx(1.0, rel=1e-4)


def test_two_processes_match_one_and_an_independent_loss(setup, tokenizer_path):
    tmp, segs = setup
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(ROOT / "train.py"), *flags(tmp, tmp / "two", "--steps", "3", "--activation-checkpointing")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    train.main(flags(tmp, tmp / "one", "--steps", "3"))
    two, one = metrics(tmp / "two"), metrics(tmp / "one")
    assert [m["step"] for m in two] == [1, 2, 3]
    for m in two:
        assert set(m) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "max_memory_gb"}
        assert m["mfu"] is None and m["tokens_per_s"] > 0 and m["max_memory_gb"] > 0 and m["grad_norm"] > 0
    assert two[-1]["loss"] < two[0]["loss"] - 0.05  # the same 4 segments every step: loss falls
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == b["lr"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # warmup 1, then linear decay to 0 at step 3: (3 - k) / (3 - 1) for k = 1, 2
    assert [m["lr"] for m in two] == [1e-3, 1e-3, 5e-4]
    w1, w2 = weights(tmp / "one" / "final"), weights(tmp / "two" / "final")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-6)
    # first-step loss against transformers on the starting weights with the rope train.py chose
    start, _ = yarn_minimal.load(tmp / "ckpt", rope=RopeConfig(method="yarn", scale=16.0, original_length=16))
    hf = hf_model(start, max_position_embeddings=16)
    tokens = torch.from_numpy(segs)
    with torch.no_grad():
        logits = hf(tokens[:, :-1]).logits
    ref = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
    assert two[0]["loss"] == pytest.approx(ref, rel=1e-5)
    # the final model carries its rope: loading it needs no flags
    final, _ = yarn_minimal.load(tmp / "two" / "final")
    assert (final.rope.method, final.rope.scale, final.rope.original_length) == ("yarn", 16.0, 16)


def test_two_processes_bfloat16(setup):
    """The README's torchrun command in bf16 (FSDP2's MixedPrecisionPolicy casts every block's
    inputs, the Rotation dataclass included): one step runs, and its loss is the float32 loss to
    bf16 precision."""
    tmp, _ = setup
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(ROOT / "train.py"), *flags(tmp, tmp / "two-bf16", "--steps", "1", "--dtype", "bfloat16")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    train.main(flags(tmp, tmp / "one-f32", "--steps", "1"))
    bf16, f32 = metrics(tmp / "two-bf16")[0]["loss"], metrics(tmp / "one-f32")[0]["loss"]
    assert bf16 == pytest.approx(f32, rel=2e-2)


def test_resume_matches_uninterrupted(setup):
    """A run of 2 steps continued to 4 equals 4 steps straight (with the constant schedule,
    where --steps does not change the rate; the default decay is resumed in the Ctrl-C test)."""
    tmp, _ = setup
    train.main(flags(tmp, tmp / "straight", "--steps", "4", "--schedule", "constant"))
    train.main(flags(tmp, tmp / "resumed", "--steps", "2", "--schedule", "constant"))
    # a save killed half-way leaves only a .tmp folder, which resume ignores
    (tmp / "resumed" / "step-000004.tmp").mkdir()
    (tmp / "resumed" / "step-000004.tmp" / "__0_0.distcp").write_bytes(b"garbage")
    train.main(flags(tmp, tmp / "resumed", "--steps", "4", "--resume", "--schedule", "constant"))
    a, b = metrics(tmp / "straight"), metrics(tmp / "resumed")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6) and x["lr"] == y["lr"]
    w1, w2 = weights(tmp / "straight" / "final"), weights(tmp / "resumed" / "final")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-6, atol=1e-7)
    state = json.loads((tmp / "resumed" / "step-000004" / "trainer.json").read_text())
    assert state["step"] == 4 and state["scheduler"]["last_epoch"] == 4
    with pytest.raises(runs.RunError, match="global_batch_size was 4 in the checkpoint, now 2"):
        train.main(flags(tmp, tmp / "resumed", "--steps", "6", "--resume", "--schedule", "constant")
                   + ["--global-batch-size", "2"])
    with pytest.raises(runs.RunError, match="schedule was 'constant' in the checkpoint, now 'linear'"):
        train.main(flags(tmp, tmp / "resumed", "--steps", "6", "--resume"))
    # the restored scheduler holds the old peak rate: a new --lr is refused, not silently ignored
    with pytest.raises(runs.RunError, match="lr was 0.001 in the checkpoint, now 0.0005"):
        train.main(flags(tmp, tmp / "resumed", "--steps", "6", "--resume", "--schedule", "constant", "--lr", "5e-4"))


def test_from_scratch_demo_path(setup, tokenizer_path):
    tmp, _ = setup
    train.main(["--init", "random", "--tokenizer", tokenizer_path, "--dim", "64", "--n-layers", "2", "--n-heads", "4",
                "--multiple-of", "32", "--method", "none", "--original-length", "32", "--data", str(tmp / "data"),
                "--out", str(tmp / "scratch"), "--steps", "2", "--global-batch-size", "2", "--lr", "1e-3",
                "--save-every", "0"])
    model, tok = yarn_minimal.load(tmp / "scratch" / "final")
    assert model.rope.method == "none" and model.rope.original_length == 32 and model.args.vocab_size == tok.vocab_size
    assert len(metrics(tmp / "scratch")) == 2


def test_clear_stops(setup, tmp_path):
    tmp, _ = setup
    with pytest.raises(SystemExit, match="--seq-len 40 is longer than the data's segments \\(33 tokens\\)"):
        train.main(flags(tmp, tmp_path / "a", "--seq-len", "40"))
    with pytest.raises(SystemExit, match="4 segments, fewer than one global batch of 8"):
        train.main(flags(tmp, tmp_path / "a") + ["--global-batch-size", "8"])
    # a finite weight that overflows float32 in the forward pass (a NaN weight is refused at
    # load): stop at step 1 with the weights and the batch saved
    model, tok = yarn_minimal.load(tmp / "ckpt")
    with torch.no_grad():
        model.output.weight.fill_(3e38)
    yarn_minimal.save(model, tok, tmp_path / "nan")
    bad = flags(tmp, tmp_path / "b", "--steps", "2")
    bad[1] = str(tmp_path / "nan")
    with pytest.raises(SystemExit, match="step 1: non-finite loss"):
        train.main(bad)
    state = json.loads((tmp_path / "b" / "nonfinite-step-000001" / "trainer.json").read_text())
    assert sorted(state["segments"]) == [0, 1, 2, 3] and state["step"] == 0


def test_export_hf_writes_a_transformers_folder_or_stops_before_training(setup, tmp_path):
    tmp, _ = setup
    train.main(flags(tmp, tmp_path / "hf", "--steps", "1", "--export-hf"))  # YaRN s = 16: has an HF form
    config = json.loads((tmp_path / "hf" / "final-hf" / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "yarn" and config["rope_scaling"]["factor"] == 16.0
    with pytest.raises(SystemExit, match="--export-hf"):  # NTK-by-parts has none
        train.main(flags(tmp, tmp_path / "nbp", "--steps", "1", "--export-hf", "--method", "ntk-by-parts",
                              "--yarn-scale", "4"))
    assert not (tmp_path / "nbp" / "metrics.jsonl").exists()  # stopped before training


def test_memory_estimate_7b_64k_on_8x80gb():
    args = ModelArgs()  # Llama 2 7B
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(args).parameters())
    assert n == 6_738_415_616  # Llama 2 7B's published parameter count
    ac = sizing.estimate_memory(args, 65536, 8, activation_checkpointing=True)
    no_ac = sizing.estimate_memory(args, 65536, 8, activation_checkpointing=False)
    assert ac["n_params"] == n and ac["params"] + ac["grads"] + ac["adamw"] == 16 * n / 8
    assert ac["total"] < 0.9 * 80e9 < 80e9 < no_ac["total"]
    text = sizing.format_memory_estimate(args, 65536, 8, 1, 80.0)
    assert "with activation checkpointing: fits" in text and "without activation checkpointing: does NOT fit" in text


def test_parameter_counts_are_llama2s_published():
    """sizing.count_params (the model made on the meta device) against Meta's published totals,
    and the 70B block (grouped-query attention, ffn 28672) counted by hand:
    wq, wo 8192 x 8192; wk, wv 8192 x 1024; w1, w2, w3 8192 x 28672; two norms of 8192."""
    published = {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}
    for size, total in published.items():
        assert sizing.count_params(ModelArgs(**sizing.LLAMA2_SIZES[size]))["total"] == total, size
    n = sizing.count_params(ModelArgs(**sizing.LLAMA2_SIZES["70b"]))
    assert n["block"] == 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192
    assert n["embedding"] == n["output"] == 32000 * 8192 and n["norm"] == 8192


def test_activation_bytes_per_token_match_autograd():
    """The per-layer activation term against what autograd actually saves for one block (bf16)."""
    args = ModelArgs(dim=128, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=32)
    model = Transformer(args).to(torch.bfloat16).train()
    T = 256
    x = torch.randn(1, T, args.dim, dtype=torch.bfloat16, requires_grad=True)
    rotation = model.rotation(0, T)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[0](x, rotation)
    saved = sum(storages.values()) - x.numel() * 2 - rotation.table.numel() * 8  # minus input and the shared complex64 rotation
    per_token = sizing.estimate_memory(args, T, 1)["per_layer_per_token"]
    assert saved / T == pytest.approx(per_token, rel=0.15)


def test_help_says_what_the_paper_leaves_open(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "leaves open" in out and "--estimate-memory" in out and "--yarn-scale" in out


@pytest.mark.slow
def test_two_process_resume_matches_uninterrupted(setup):
    tmp, _ = setup
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))

    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(ROOT / "train.py"), *flags(tmp, out, *extra)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]

    torchrun(tmp / "straight2", "--steps", "4", "--schedule", "constant")
    torchrun(tmp / "resumed2", "--steps", "2", "--schedule", "constant")
    torchrun(tmp / "resumed2", "--steps", "4", "--resume", "--schedule", "constant")
    for x, y in zip(metrics(tmp / "straight2"), metrics(tmp / "resumed2")):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
    w1, w2 = weights(tmp / "straight2" / "final"), weights(tmp / "resumed2" / "final")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-6, atol=1e-7)


def test_models_saved_along_the_way_equal_shorter_runs(setup, tmp_path):
    """--save-models-at 1,3 (learning curves): OUT/model-step-000003 of a 4-step run holds the
    weights a 3-step run ends with (constant schedule: the rate does not depend on --steps),
    loads like final/, and --overwrite removes it with the rest of the run."""
    tmp, _ = setup
    train.main(flags(tmp, tmp_path / "long", "--steps", "4", "--schedule", "constant", "--save-models-at", "3,1"))
    train.main(flags(tmp, tmp_path / "short", "--steps", "3", "--schedule", "constant"))
    saved = tmp_path / "long" / "model-step-000003"
    a, b = weights(saved), weights(tmp_path / "short" / "final")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert (tmp_path / "long" / "model-step-000001" / "params.json").is_file()
    model, _ = yarn_minimal.load(saved)
    assert model.rope.original_length == 16
    train.main(flags(tmp, tmp_path / "long", "--steps", "1", "--overwrite"))
    assert not list((tmp_path / "long").glob("model-step-*"))
    with pytest.raises(SystemExit, match="--save-models-at 2,5: every step must be <= --steps 4"):
        train.main(flags(tmp, tmp_path / "x", "--steps", "4", "--save-models-at", "5,2"))


def test_a_finished_run_is_not_overwritten(setup, tmp_path):
    """train.py again into a finished --out: stop and ask for --resume or --overwrite; the old
    run's files are untouched until --overwrite is given."""
    tmp, _ = setup
    out = tmp_path / "run"
    train.main(flags(tmp, out, "--steps", "1"))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(runs.RunError, match="holds a run .*--resume.*--overwrite"):
        train.main(flags(tmp, out, "--steps", "1"))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    train.main(flags(tmp, out, "--steps", "2", "--overwrite"))
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000002"]


def test_float16_training_is_refused(setup, tmp_path):
    tmp, _ = setup
    with pytest.raises(SystemExit, match="float16 training needs loss scaling.*bfloat16"):
        train.main(flags(tmp, tmp_path / "f16", "--dtype", "float16"))
    assert not (tmp_path / "f16").exists()
    with pytest.raises(runs.RunError, match="no checkpoint to resume from"):  # --resume into a mistyped --out
        train.main(flags(tmp, tmp_path / "typo", "--resume"))
    assert not (tmp_path / "typo").exists()


def test_ctrl_c_says_which_step_is_saved_and_how_to_resume(setup, tmp_path, monkeypatch):
    tmp, _ = setup
    out = tmp_path / "run"
    calls = {"n": 0}
    clip = training.grad_norm_and_clip

    def interrupt_in_step_3(*a, **kw):  # Ctrl-C arrives inside the third step's backward/clip
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return clip(*a, **kw)

    monkeypatch.setattr(training, "grad_norm_and_clip", interrupt_in_step_3)
    with pytest.raises(SystemExit) as e:
        train.main(flags(tmp, out, "--steps", "4"))
    assert str(e.value.code) == (f"error: interrupted during step 3; the last checkpoint is {out / 'step-000002'} "
                                 "(step 2). Continue with the same command plus --resume")
    monkeypatch.setattr(training, "grad_norm_and_clip", clip)
    with pytest.raises(runs.RunError, match="steps was 4 in the checkpoint, now 6"):  # the decay depends on --steps
        train.main(flags(tmp, out, "--steps", "6", "--resume"))
    train.main(flags(tmp, out, "--steps", "4", "--resume"))
    # the same as 4 steps straight, under the default linear decay
    train.main(flags(tmp, tmp_path / "straight", "--steps", "4"))
    resumed, straight = metrics(out), metrics(tmp_path / "straight")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for x, y in zip(resumed, straight):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6) and x["lr"] == y["lr"]
    w1, w2 = weights(out / "final"), weights(tmp_path / "straight" / "final")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-6, atol=1e-7)


def test_random_init_on_the_meta_device_gives_init_weights_values():
    """--init random builds on the meta device and materializes block by block (under FSDP,
    each block is sharded before the next is made) with the values init_weights gives."""
    args = ModelArgs(dim=64, n_layers=3, n_heads=4, vocab_size=100, multiple_of=32)
    full = Transformer(args)
    training.init_weights(full, seed=5)
    with torch.device("meta"):
        lazy = Transformer(args)
    placed = []
    training.materialize_random(lazy, 5, place=placed.append)
    assert placed == [lazy.tok_embeddings, *lazy.layers, lazy.norm, lazy.output]
    for (k, a), b in zip(full.state_dict().items(), lazy.state_dict().values()):
        assert torch.equal(a, b), k
    # an independent draw: the first embedding row is the generator's first 64 normals x 0.02
    first = torch.randn(64, generator=torch.Generator().manual_seed(5)) * 0.02
    assert torch.equal(lazy.tok_embeddings.weight[0], first)


def test_ctrl_c_in_the_first_step_leaves_nothing(setup, tmp_path, monkeypatch):
    tmp, _ = setup

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "grad_norm_and_clip", interrupt)
    with pytest.raises(SystemExit, match="interrupted during step 1; nothing was saved or kept: run the same command"):
        train.main(flags(tmp, tmp_path / "run", "--steps", "2"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_process_random_init_matches_one(setup, tokenizer_path):
    """--init random under torchrun: each rank builds the model on the meta device and makes it
    block by block; after one step the model equals the single-process run's."""
    tmp, _ = setup
    scratch = ["--init", "random", "--tokenizer", tokenizer_path, "--dim", "64", "--n-layers", "2", "--n-heads", "4",
               "--multiple-of", "32", "--method", "none", "--original-length", "32", "--data", str(tmp / "data"),
               "--steps", "1", "--global-batch-size", "4", "--lr", "1e-3", "--save-every", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(ROOT / "train.py"), *scratch, "--out", str(tmp / "scratch2")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    train.main(scratch + ["--out", str(tmp / "scratch1")])
    assert metrics(tmp / "scratch1")[0]["loss"] == pytest.approx(metrics(tmp / "scratch2")[0]["loss"], rel=1e-5)
    w1, w2 = weights(tmp / "scratch1" / "final"), weights(tmp / "scratch2" / "final")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-6)
