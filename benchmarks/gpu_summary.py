"""The one table a GPU check ends with: each figure of benchmarks/gpu_check.sh's result files beside its target.

    python benchmarks/gpu_summary.py benchmarks/results/gpu          # prints the table (gpu_check.sh: summary.txt)

Reads what is there and says what is missing (a step that failed, ran out of time or was not asked for): device.txt
(versions, whether stage1._C has its CUDA ops, each step's exit status), tests.txt (pytest's counts, and whether the
CUDA-graph capture test passed), bench_kernels.json (the sampler at 256 x 152,064: the fused kernel with the race
shortcut, its search path, the sort-based torch sampler), nano_0.5b.txt and nano_7b.txt (bench_generate.py
--workload nano: their last JSON line, partial or whole), bench_host.txt (host ms per decode step).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# the issue's targets
TARGETS = {"nano_0.5b_tok_s": 25_000, "nano_0.5b_vs_cb": 3.0, "nano_7b_tok_s": 8_000, "sampler_vs_torch_sort": 5.0}
CAPTURE_TEST = "tests/kernels/test_engine_triton.py::test_decode_graphs_give_the_eager_tokens"


def read(path: Path) -> str | None:
    return path.read_text(errors="replace") if path.is_file() else None


def last_json(text: str | None) -> dict | None:
    for line in reversed((text or "").splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def fmt(value, spec: str = ",.0f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def verdict(value, target, higher_is_better: bool = True) -> str:
    if value is None:
        return "no figure"
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "NOT met"


Row = tuple[str, str, str, str]  # figure, value, target, verdict


def device_notes(out: Path) -> list[str]:
    """device.txt: the GPU, the versions, whether stage1._C has its CUDA ops, each step's status."""
    device = read(out / "device.txt")
    if device is None:
        return ["device.txt missing"]
    lines = device.splitlines()
    header = next((i for i, l in enumerate(lines) if l.startswith("name,")), None)
    gpu = lines[header + 1] if header is not None and header + 1 < len(lines) else "?"
    versions = next((l for l in lines if l.startswith("torch ")), "torch ?")
    native = next((l for l in lines if l.startswith("stage1._C")), "stage1._C: ?")
    return [f"device: {gpu.strip()}", versions, native] + [l for l in lines if l.startswith("== ")]


def test_rows(out: Path) -> list[Row]:
    """tests.txt: pytest's counts, and whether the CUDA-graph capture test passed."""
    tests = read(out / "tests.txt")
    if tests is None:
        return [("tests (compiled kernels, engine, native)", "no file", "all pass", "no figure")]
    counts = [l for l in tests.splitlines() if re.search(r"\d+ (passed|failed|error)", l) and " in " in l]
    line = counts[-1].strip("= ") if counts else "no pytest summary line (cut short?)"
    failed = re.search(r"(\d+) (failed|error)", line)
    captured = f"PASSED {CAPTURE_TEST}" in tests
    return [("tests (compiled kernels, engine, native)", line, "all pass", "NOT met" if failed or not counts else "met"),
            ("CUDA-graph capture test", "passed" if captured else "not passed / not run", "passed",
             "met" if captured else "NOT met")]


def kernel_rows(out: Path) -> list[Row]:
    """bench_kernels.json: the sampler at 256 x 152,064 against sort-based torch, the decode attention."""
    kernels = read(out / "bench_kernels.json")
    if kernels is None:
        return [("sampler 256 x 152,064", "no bench_kernels.json", f">= {TARGETS['sampler_vs_torch_sort']}x "
                 "torch sort", "no figure")]
    facts, rows = json.loads(kernels), []
    sampling = [r for r in facts["rows"] if r["kernel"] == "sampling" and r["shape"].startswith("256x152064")]
    for shape in dict.fromkeys(r["shape"] for r in sampling):
        by = {r["impl"]: r["ms"] for r in sampling if r["shape"] == shape}
        mix = shape.split()[-1]
        fast, search, sort = by.get("triton"), by.get("triton_search"), by.get("torch_sort")
        speedup = sort / fast if fast and sort else None
        value = (f"race {fmt(fast, '.3f')} ms, search {fmt(search, '.3f')} ms, torch sort {fmt(sort, '.3f')} ms"
                 + (f": {speedup:.2f}x" if speedup else ""))
        if mix == "greedy":
            rows.append((f"sampler {mix}", f"{fmt(fast, '.3f')} ms vs argmax {fmt(by.get('torch_argmax'), '.3f')} "
                         "ms", "-", "-"))
        else:
            rows.append((f"sampler {mix}", value, f">= {TARGETS['sampler_vs_torch_sort']:.0f}x torch sort",
                         verdict(speedup, TARGETS["sampler_vs_torch_sort"])))
    attention = [r for r in facts["rows"] if r["kernel"].startswith("decode") and r["impl"] == "triton"]
    for r in attention[:1]:
        rows.append(("decode attention (triton)", f"{r['ms']:.3f} ms, {fmt(r.get('gbps'), '.0f')} GB/s", "-", "-"))
    return rows


def nano_rows(out: Path, name: str, label: str) -> list[Row]:
    """nano_<label>.txt's last JSON line (bench_generate.py --workload nano), partial or whole."""
    result = last_json(read(out / name))
    key = f"nano_{label}_tok_s"
    if result is None:
        return [(f"nano {label}: ours", f"no result in {name}", f">= {TARGETS[key]:,} tok/s", "no figure")]
    cut = " (partial: the run ended before its peers)" if result.get("partial") else ""
    rows = [(f"nano {label}: ours{cut}", fmt(result.get("ours_tok_s"), ",.0f", " tok/s"),
             f">= {TARGETS[key]:,} tok/s", verdict(result.get("ours_tok_s"), TARGETS[key]))]
    if result.get("ours_eager_tok_s"):
        rows.append((f"nano {label}: ours eager", fmt(result["ours_eager_tok_s"], ",.0f", " tok/s")
                     + f" (graphs {fmt(result.get('graphs_vs_eager'), '.2f', 'x')})", "-", "-"))
    if result.get("ours_sync_tok_s"):
        rows.append((f"nano {label}: ours without async scheduling", fmt(result["ours_sync_tok_s"], ",.0f", " tok/s")
                     + f" (async {fmt(result.get('async_vs_sync'), '.2f', 'x')})", "-", "-"))
    return rows + peer_rows(result, label)


def peer_rows(result: dict, label: str) -> list[Row]:
    """The peers of one nano result (transformers CB and generate) and its decode step against the roofline."""
    rows = []
    cb = result.get("cb") or {}
    if "cb_tok_s" in result or cb:
        trunc = " TRUNCATED (understates the peer)" if cb.get("truncated") else ""
        retry = " (retry without graphs)" if cb.get("retry_without_graphs") else ""
        target = f">= {TARGETS['nano_0.5b_vs_cb']:.0f}x" if label == "0.5b" else "-"
        rows.append((f"nano {label}: transformers CB{retry}{trunc}",
                     fmt(result.get("cb_tok_s"), ",.0f", " tok/s") + f", ours {fmt(result.get('ratio_vs_cb'), '.2f', 'x')}"
                     + (f" [{cb['error'][:80]}]" if cb.get("error") and result.get("cb_tok_s") is None else ""),
                     target, verdict(result.get("ratio_vs_cb"), TARGETS["nano_0.5b_vs_cb"]) if label == "0.5b"
                     else "-"))
    gen = result.get("generate") or {}
    if gen:
        trunc = " TRUNCATED (flatters the peer)" if gen.get("truncated") else ""
        rows.append((f"nano {label}: transformers generate{trunc}",
                     fmt(result.get("ref_tok_s"), ",.0f", " tok/s") + f", ours {fmt(result.get('ratio'), '.2f', 'x')}"
                     + (f" [{gen['error'][:80]}]" if gen.get("error") else ""), "-", "-"))
    roof = result.get("roofline") or {}
    if roof:
        rows.append((f"nano {label}: decode step vs roofline",
                     f"{roof['measured_step_ms']:.3f} ms vs {roof['roofline_step_ms']:.3f} ms "
                     f"({fmt(roof.get('roofline_fraction'), '.0%')} of roofline; batch {roof['mean_batch']}, "
                     f"context {roof['mean_context']}, {roof['bandwidth_b_s'] / 1e12:.1f} TB/s)", "-", "-"))
    return rows


def host_rows(out: Path) -> list[Row]:
    """bench_host.txt's last JSON line: host ms per decode step."""
    host = last_json(read(out / "bench_host.txt"))
    if host is None:
        return [("host ms per decode step", "no result in bench_host.txt", "-", "-")]
    per = host.get("host_ms_per_decode_step", {})
    return [("host ms per decode step", ", ".join(f"batch {b}: {v:.3f}" for b, v in per.items()), "-", "-")]


def summarize(out: Path) -> list[str]:
    rows = test_rows(out) + kernel_rows(out) + nano_rows(out, "nano_0.5b.txt", "0.5b") \
        + nano_rows(out, "nano_7b.txt", "7b") + host_rows(out)
    width = max(len(r[0]) for r in rows)
    vwidth = min(max(len(r[1]) for r in rows), 100)
    lines = [f"{'figure':<{width}}  {'value':<{vwidth}}  {'target':<16}  verdict"]
    lines += [f"{f:<{width}}  {v:<{vwidth}}  {t:<16}  {ok}" for f, v, t, ok in rows]
    return lines + [""] + device_notes(out)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/gpu")
    print("\n".join(summarize(out)))


if __name__ == "__main__":
    main()
