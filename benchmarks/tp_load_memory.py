"""How much host memory does one rank use to load its shard, at TP=N against TP=1?

    python benchmarks/tp_load_memory.py                       # Qwen2.5-1.5B shape, random bf16 (~3.1 GB), TP 1 and 2
    python benchmarks/tp_load_memory.py --sizes 1,2,4 --keep  # keep the checkpoint for the next run

Writes a random-weight checkpoint of the shape under --dir (outside the repo), then, for each size N and rank r,
loads rank r's model at TP=N on the CPU in a fresh process (only the parallel state, no process group: loading
never communicates) and reports that process's peak resident memory (VmHWM: ru_maxrss would start from this
parent's peak) and the loader's own figures (bytes read, largest slice). On the CPU a rank's parameters are host
memory too, so the peak is about a rank's share of the checkpoint plus the largest slice plus the process's
baseline. For comparison, the same loads with safetensors' memory-mapped `get_slice` in place of the loader's
positional reads (`--no-mmap-comparison` skips them). Deletes the checkpoint at the end unless --keep. The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from common import json_line, print_header, random_checkpoint


def peak_rss() -> int:
    from stage1.engine.weights import peak_rss_bytes

    return peak_rss_bytes()


def child(model_dir: Path, size: int, rank: int, reader: str) -> None:
    """One rank's load in this fresh process; prints one JSON line."""
    import torch

    from stage1.engine import weights
    from stage1.engine.config import ModelConfig
    from stage1.engine.distributed import parallel_state

    if reader == "safetensors-mmap":
        weights.CheckpointFile = SafetensorsMmapFile
    reports = []
    handler = logging.Handler()
    handler.emit = lambda record: reports.append(record.load_report) if hasattr(record, "load_report") else None
    logging.getLogger("stage1").addHandler(handler)
    logging.getLogger("stage1").setLevel(logging.INFO)
    config = ModelConfig.from_dir(model_dir)
    baseline = peak_rss()
    with parallel_state(rank, size):
        model = weights.load_model(model_dir, config, torch.bfloat16, torch.device("cpu"))
    report = reports[-1]
    print(json.dumps(dict(size=size, rank=rank, reader=reader, peak_rss=peak_rss(), baseline_rss=baseline,
                          bytes_read=report.bytes_read, largest_read=report.largest_read,
                          param_bytes=report.param_bytes, checkpoint_bytes=report.checkpoint_bytes,
                          params=sum(p.numel() for p in model.parameters()))))


class SafetensorsMmapFile:
    """The loader's CheckpointFile interface over safetensors' own memory-mapped `safe_open` / `get_slice`."""

    def __init__(self, path):
        from safetensors import safe_open

        self._cm = safe_open(str(path), framework="pt", device="cpu")
        self._f = self._cm.__enter__()
        self._keys = set(self._f.keys())
        self.bytes_read = self.largest_read = 0

    def keys(self):
        return list(self._keys)

    def __contains__(self, name):
        return name in self._keys

    def get_slice(self, name):
        return _MmapSlice(self, self._f.get_slice(name))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        self._f = None


class _MmapSlice:
    def __init__(self, file, inner):
        import torch

        self.file, self.inner = file, inner
        self.dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[inner.get_dtype()]

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        t = self.inner[index]
        nbytes = t.numel() * t.element_size()
        self.file.bytes_read += nbytes
        self.file.largest_read = max(self.file.largest_read, nbytes)
        return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/stage1-tp-load-memory"),
                        help="where the random checkpoint goes (outside the repo)")
    parser.add_argument("--sizes", default="1,2", help="TP sizes to load, comma-separated")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--no-mmap-comparison", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "RANK", "READER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, rank, reader = args.child
        return child(args.dir / "ckpt", int(size), int(rank), reader)

    # random_checkpoint writes into $STAGE1_CACHE/bench/<preset>-random-bfloat16
    os.environ["STAGE1_CACHE"] = str(args.dir)
    import torch

    print_header()
    ckpt = args.dir / "ckpt"
    if not (ckpt / "model.safetensors").is_file():
        print(f"writing a random bf16 checkpoint of the Qwen2.5-1.5B shape under {args.dir} ...", flush=True)
        random_checkpoint("qwen2.5-1.5b", torch.bfloat16).rename(ckpt)
    file_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    print(f"checkpoint: {file_bytes / 1e9:.3f} GB on disk")
    readers = ["positional"] + ([] if args.no_mmap_comparison else ["safetensors-mmap"])
    rows = []
    try:
        for reader in readers:
            for size in map(int, args.sizes.split(",")):
                for rank in range(size):
                    out = subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--child", str(size),
                                          str(rank), reader], capture_output=True, text=True, check=True)
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                    rows.append(row)
                    print(f"{reader:17s} TP={size} rank {rank}: peak RSS {row['peak_rss'] / 1e9:6.3f} GB "
                          f"(baseline {row['baseline_rss'] / 1e9:.3f} GB before loading); read "
                          f"{row['bytes_read'] / 1e9:.3f} GB in slices, largest {row['largest_read'] / 1e6:.1f} MB; "
                          f"parameters {row['param_bytes'] / 1e9:.3f} GB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    summary = {}
    for reader in readers:
        base = next(r for r in rows if r["reader"] == reader and r["size"] == 1)
        for r in rows:
            if r["reader"] == reader and r["size"] > 1:
                ratio = r["peak_rss"] / base["peak_rss"]
                above = (r["peak_rss"] - r["baseline_rss"]) / (base["peak_rss"] - base["baseline_rss"])
                r.update(ratio_vs_tp1=ratio, load_increase_ratio_vs_tp1=above)
                print(f"{reader:17s} TP={r['size']} rank {r['rank']}: {ratio:.3f}x TP=1's peak RSS "
                      f"({above:.3f}x of what loading added above the baseline)")
                summary[f"{reader} tp{r['size']}"] = max(summary.get(f"{reader} tp{r['size']}", 0), ratio)
    print(json_line("tp_load_memory", dict(shape="qwen2.5-1.5b", dtype="bfloat16", device="cpu",
                                           checkpoint_bytes=file_bytes, rows=rows, worst_ratio_vs_tp1=summary)))


if __name__ == "__main__":
    main()
