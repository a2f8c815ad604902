"""The kernels' self-check (stage1/engine/kernel_check.py) on this machine: every kernel set `auto` or an explicit
choice could run here, in each run dtype, with each kernel's verdict and the check's wall time (run fresh: the
verdict cache is bypassed). gpu_check.sh's `selfcheck` step; on a CPU it checks the native set.

    python benchmarks/kernel_selfcheck.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import json_line, print_header

from stage1.engine import kernel_check
from stage1.engine.backends import select_kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(parser.parse_args().device)
    print_header(device)
    print(json.dumps({"identity": kernel_check.device_identity(device)}))
    checks = []
    choices = ["triton"] if device.type == "cuda" else ["native"]
    for choice in choices:
        for dtype in (torch.bfloat16, torch.float32):
            try:
                kernels, run_dtype = select_kernels(choice, device).for_dtype(dtype, device)
            except ValueError as exc:
                print(json.dumps({"kernels": choice, "dtype": str(dtype), "unavailable": str(exc)}))
                continue
            start = time.perf_counter()
            verdicts = kernel_check._run_checks(kernels, device, run_dtype)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            checks.append({"kernels": choice, "dtype": str(dtype), "run_dtype": str(run_dtype),
                           "seconds": round(seconds, 3), "verdicts": [v.__dict__ for v in verdicts]})
            print(json.dumps(checks[-1]))
    print(json_line("kernel_selfcheck", {"device": str(device), "checks": len(checks),
                                         "seconds": round(sum(c["seconds"] for c in checks), 3)}, device))


if __name__ == "__main__":
    main()
