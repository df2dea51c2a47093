"""A seeded corruption campaign: every way a checkpoint file can be damaged on disk (truncated,
overwritten, a header byte flipped, a JSON key deleted) either loads weights identical to the
undamaged file's, or stops with one CheckpointError line that names the damaged file. Never
garbage weights, never another exception type.

Files: the demo model (Meta's layout + rope.json + checksums.json), the same folder without
checksums.json (as Meta's download comes), an HF export of it (config.json + model.safetensors),
the export's safetensors without checksums.json (header damage only: a foreign safetensors
file has no checksum over its data), and a training checkpoint from a 2-step train.py run.
The counts are in README.md's reliability line: keep them in step with CASES."""
import json
import os
import random
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import yarn_minimal
from yarn_minimal import training
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
    training.load_checkpoint(folder, model, optimizer, scheduler, training.DistEnv(0, 1, 0, torch.device("cpu")), same)
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
        training.check_dcp_metadata(tmp_path)
