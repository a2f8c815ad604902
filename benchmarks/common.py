"""What every benchmark uses: the machine it ran on and the run's facts (commit, date, torch) for its last line, one
JSON object; Qwen-2.5 shapes and random-weight checkpoints of them; prompt sets and LLM-like logits; timing.

The benchmarks are scripts (`python benchmarks/X.py`): Python puts a script's own folder first on sys.path, so
`from common import ...` finds this module. They import nothing from each other; what two of them need lives here.

    python benchmarks/common.py checkpoint qwen2.5-0.5b qwen2.5-7b   # write those random-weight checkpoints now
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import json
import math
import os
import platform
import statistics
import struct
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from stage1.engine.config import ModelConfig, parse_dtype
from stage1.engine.weights import checkpoint_layout

# Shapes of the published config.json files (see shared/reference/qwen25.md).
PRESETS = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rms_norm_eps=1e-6),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "qwen2.5-32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False, rms_norm_eps=1e-5),
    # not a published model: one small layer with the real vocabulary, for timing the host's share of a step
    "host-probe": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6),
    # not a published model: two small layers and a small vocabulary, for CPU smoke runs of the benchmarks' code
    # paths (bench_generate.py --config smoke): every figure it gives is meaningless
    "smoke": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False, rms_norm_eps=1e-6,
                  bos_token_id=2047, eos_token_id=2047),
}


def cache_root() -> Path:
    return Path(os.environ.get("STAGE1_CACHE", Path.home() / ".cache" / "stage1"))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def preset_config(preset: str, dtype: torch.dtype) -> dict:
    """The config.json of a Qwen-2.5 checkpoint of `preset`'s shape stored in `dtype`."""
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "max_position_embeddings": 32768, "rope_theta": 1_000_000.0, "use_sliding_window": False,
            "torch_dtype": dtype_name(dtype), "bos_token_id": 151643, "eos_token_id": 151643, **PRESETS[preset]}


def random_checkpoint(preset: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A checkpoint directory of `preset`'s shape with random weights, written once into the cache."""
    out = cache_root() / "bench" / f"{preset}-random-{dtype_name(dtype)}"
    if (out / "model.safetensors").is_file():
        return out
    raw = preset_config(preset, dtype)
    config = ModelConfig.from_dict(raw)
    # Drawn on the GPU when there is one: a 7B shape's 7.6e9 normal draws take minutes on a few CPU cores.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, target in checkpoint_layout(config).items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(target.shape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(target.shape, generator=g, device=device) * 0.02).to(dtype).cpu()
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(raw, indent=2))
    tmp.rename(out)
    return out


_ROWS_PER_DRAW = 1 << 14  # rows drawn at once: a 152064 x 3584 embedding in 36 slices of ~235 MB of fp32


def streamed_bf16_checkpoint(out: Path, preset: str, seed: int = 0) -> Path:
    """A random bf16 checkpoint of `preset`'s shape at `out` (written once: a finished one is reused), streamed
    tensor by tensor into one safetensors file, so the writer never holds more than a slice of one tensor (a 7B
    shape on a CPU host; random_checkpoint holds them all)."""
    if (out / "model.safetensors").is_file():
        return out
    raw = preset_config(preset, torch.bfloat16)
    layout = {name: target.shape for name, target in checkpoint_layout(ModelConfig.from_dict(raw)).items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in layout.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    with open(tmp / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape in layout.items():
            rows, rest = (shape[0], shape[1:]) if shape else (1, ())
            for start in range(0, rows, _ROWS_PER_DRAW):
                part = (min(_ROWS_PER_DRAW, rows - start), *rest)
                values = torch.ones(part) if name.endswith("norm.weight") else torch.randn(part, generator=g) * 0.02
                values.to(torch.bfloat16).view(torch.int16).numpy().tofile(f)
    (tmp / "config.json").write_text(json.dumps(raw, indent=2))
    tmp.rename(out)
    return out


def text_id_range(vocab: int) -> tuple[int, int]:
    """Where random prompt ids are drawn from: [100, vocab - 1000) on a real vocabulary (away from the byte tokens
    and the special tokens at its end), the middle half of a small one."""
    return (100, vocab - 1000) if vocab > 2200 else (vocab // 4, max(vocab // 4 + 1, 3 * vocab // 4))


def mixed_prompts(batch: int, vocab: int, min_len: int = 16, max_len: int = 256, seed: int = 0) -> list[list[int]]:
    """`batch` prompts of random token ids with lengths spread evenly over [min_len, max_len]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=g).tolist()
    return [torch.randint(*text_id_range(vocab), (n,), generator=g).tolist() for n in lengths]


def nano_workload(batch: int, vocab: int, min_len: int = 100, max_len: int = 1024,
                  seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """nano-vllm's offline benchmark: `batch` prompts of random token ids with lengths uniform in [min_len,
    max_len], and for each an output length (max_tokens, EOS ignored) uniform in the same range. Token ids are drawn
    from `text_id_range(vocab)`."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(min_len, max_len + 1, (batch,), generator=g).tolist()
    output_lens = torch.randint(min_len, max_len + 1, (batch,), generator=g).tolist()
    prompts = [torch.randint(*text_id_range(vocab), (n,), generator=g).tolist() for n in prompt_lens]
    return prompts, output_lens


def llm_like_logits(batch: int, vocab: int, dtype: torch.dtype = torch.float32, device=torch.device("cpu"),
                    seed: int = 0) -> torch.Tensor:
    """Logits shaped like an LLM's: N(0, 2^2) over the vocabulary plus 48 tokens per row lifted by 4..12, so top-p
    cuts fall among a few to a few hundred tokens, as with a real model."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g, device=device) * 2
    peaks = torch.randint(0, vocab, (batch, 48), generator=g, device=device)
    logits.scatter_add_(1, peaks, 4 + 8 * torch.rand(batch, 48, generator=g, device=device))
    return logits.to(dtype)


def device_and_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    return torch.device(device), parse_dtype(dtype)


def kernel_module(name: str, device: torch.device):
    """`stage1.kernels.<name>` and whether it runs interpreted: on a CPU it must, decided at first import."""
    if device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    module = importlib.import_module(f"stage1.kernels.{name}")
    from triton import knobs

    interpreted = bool(knobs.runtime.interpret)
    if device.type != "cuda" and not interpreted:
        raise RuntimeError(f"the Triton kernels run on a CPU only interpreted: set TRITON_INTERPRET=1 before "
                           f"stage1.kernels.{name} is imported")
    return module, interpreted


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (a CUDA device; nothing to wait for elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Frees what the last engine or model left (before the next one loads its copy)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_ms(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of `fn()`: CUDA events on a GPU, the wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        # keep the GPU busy ~0.2 s first: an idle GPU's clocks take a while to rise (the first benchmark of a run
        # measured 15% slower than the same kernel timed later)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        while time.perf_counter() - start < 0.2:
            fn()
            torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _cpuinfo(key: str) -> str | None:
    try:
        return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith(key)), None)
    except OSError:
        return None


def cpu_flags() -> str:
    """The vector ISA flags that matter to the native kernels, as /proc/cpuinfo reports them."""
    flags = set((_cpuinfo("flags") or "").split())
    if not flags:
        return "flags unknown"
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"]
    missing = [f for f in wanted if f not in flags]
    return "flags " + " ".join(f for f in wanted if f in flags) + (f" (no {' '.join(missing)})" if missing else "")


def memory_gib() -> float | None:
    try:
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        return None
    return kib / 2**20


def machine(device=None) -> str:
    """The machine in one line: the CPU (model, cores, torch's threads, memory, vector flags, OS) and, for a CUDA
    `device`, the GPU first."""
    mem = memory_gib()
    cpu = (f"{_cpuinfo('model name') or platform.processor()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
           f"threads, {'?' if mem is None else f'{mem:.1f}'} GiB RAM, {cpu_flags()}, {platform.system()} "
           f"{platform.release()}")
    if device is not None and torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(torch.device(device))}; host {cpu}"
    return cpu


def git_commit() -> str | None:
    """The commit the benchmark ran at, for result files; $STAGE1_COMMIT wins (a copied tree whose .git is stale,
    as on the device machine)."""
    if os.environ.get("STAGE1_COMMIT"):
        return os.environ["STAGE1_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_facts(device=None) -> dict:
    """What every result carries: the machine, the commit, the date (UTC) and the versions."""
    return dict(machine=machine(device), commit=git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, python=platform.python_version())


def print_header(device=None) -> None:
    """The first line a benchmark prints: the machine, the commit and torch."""
    print(f"machine: {machine(device)}; commit {git_commit()}; torch {torch.__version__}", flush=True)


def json_line(benchmark: str, fields: dict, device=None, **extra) -> str:
    """A benchmark's result as one JSON object: its name, its fields, then the run's facts (run_facts) where the
    fields do not name them. A script prints it as its last line (gpu_summary.py and the result files read it)."""
    return json.dumps({"benchmark": benchmark, **fields, **extra,
                       **{k: v for k, v in run_facts(device).items() if k not in fields and k not in extra}})


def write_rows(path: Path, rows: list[dict], device=None, **facts) -> dict:
    """Writes `rows` with the run's facts to `path` as one JSON document (bench_kernels.py merges them)."""
    document = {**run_facts(device), **facts, "rows": rows}
    Path(path).write_text(json.dumps(document, indent=2))
    return document


def kernel_parser(doc: str) -> argparse.ArgumentParser:
    """The options every kernel benchmark takes: --device (default: the GPU if there is one), --json, --out."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list at the end")
    parser.add_argument("--out", type=Path, help="write the rows and the run's facts to this JSON file")
    return parser


def kernel_device(args: argparse.Namespace) -> torch.device:
    """--device; off a GPU the Triton kernels run interpreted, which must be set before they are imported."""
    device = torch.device(args.device)
    if device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return device


def finish_rows(benchmark: str, rows: list[dict], args: argparse.Namespace, device=None, **fields) -> None:
    """A kernel benchmark's end: the rows to --out (bench_kernels.py reads them) and, with --json, printed as one
    list; then its last line (json_line)."""
    if getattr(args, "out", None):
        write_rows(args.out, rows, device)
    if getattr(args, "json", False):
        print(json.dumps(rows))
    print(json_line(benchmark, {"rows": len(rows), "device": str(device or "cpu"), **fields}, device))


def try_timing(fn):
    """fn() or None: one implementation failing (an old torch, no compiler) leaves the others' rows."""
    try:
        return fn()
    except Exception as exc:
        print(f"  skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return None


def kernel_rows(kernel: str, shape: str, timings: dict, device, interpreted: bool, extra: dict) -> list[dict]:
    """One row per implementation: ms, ratio_vs_triton (its ms / triton's, above 1: Triton is faster), and each
    `extra` figure computed from ms (e.g. gbps)."""
    base = timings.get("triton")
    rows = []
    for impl, ms in timings.items():
        row = dict(kernel=kernel, impl=impl, shape=shape, ms=ms,
                   ratio_vs_triton=(ms / base) if (base and ms is not None) else None,
                   device=str(device), interpreted=interpreted)
        if ms is not None:
            row.update({key: fn(ms) for key, fn in extra.items()})
        rows.append(row)
    return rows


def print_kernel_rows(rows: list[dict]) -> None:
    """The rows of kernel_rows, one block per kernel and shape."""
    if rows and rows[0]["interpreted"]:
        print("NOTE: Triton ran in the interpreter (TRITON_INTERPRET=1, no GPU): these are interpreter figures, not "
              "kernel speed.")
    for kernel, shape in dict.fromkeys((r["kernel"], r["shape"]) for r in rows):
        group = [r for r in rows if (r["kernel"], r["shape"]) == (kernel, shape)]
        print(f"{kernel}: {shape} on {group[0]['device']}")
        for r in group:
            if r["ms"] is None:
                print(f"  {r['impl']:16s} failed")
                continue
            extra = f"{r['gbps']:9.4g} GB/s" if "gbps" in r else f"{r['tflops']:9.4g} TFLOP/s" if "tflops" in r else ""
            ratio = f"{r['ratio_vs_triton']:6.2f}x triton's time" if r["ratio_vs_triton"] else ""
            notes = [f"max |err| vs SDPA {r['max_abs_err_vs_sdpa']:.2e}"] if r.get("max_abs_err_vs_sdpa") is not None \
                else []
            if r.get("same_tokens_as_reference") is not None:
                notes.append(f"tokens equal to the reference sampler's: {r['same_tokens_as_reference']:.1%}")
            if r.get("shortcut_rows") is not None:
                notes.append(f"rows drawn by the shortcut: {r['shortcut_rows']:.0%}")
            print(f"  {r['impl']:16s} {r['ms']:10.3f} ms {extra}  {ratio}{'  ' if notes else ''}{'; '.join(notes)}")


@contextlib.contextmanager
def overridden(config: dict, **changes):
    """A kernel module's launch-config dict with `changes` applied inside the block, restored after it (sweeps)."""
    saved = dict(config)
    config.update(changes)
    try:
        yield config
    finally:
        config.clear()
        config.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("checkpoint", help="write the random-weight checkpoints of these shapes (once)")
    write.add_argument("presets", nargs="+", choices=sorted(PRESETS))
    write.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    for preset in args.presets:
        print(preset, random_checkpoint(preset, parse_dtype(args.dtype)), flush=True)


if __name__ == "__main__":
    main()
