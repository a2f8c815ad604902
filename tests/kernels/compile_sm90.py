"""Compiles the attention, rotary and sampler kernels for a Hopper GPU (sm_90; prefill for an A100's sm_80 too)
without one: Triton's code
generator, its passes and the ptxas bundled with triton, exactly as a launch would, but stopping at the binary.
Catches what the interpreter never sees (type errors in loops, layouts, shared memory) and prints ptxas's register
and spill counts.

    TRITON_INTERPRET=0 python tests/kernels/compile_sm90.py            # one line per kernel; exit 1 on any spill
    TRITON_INTERPRET=0 python tests/kernels/compile_sm90.py sampling   # only the sampler's (or: attention)

Run by test_attention_kernels.py and test_sampling_kernel.py in a subprocess (kernels are defined interpreted in
the test process).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from stage1.kernels import attention as A  # noqa: E402
from stage1.kernels import rotary as R  # noqa: E402
from stage1.kernels.sampling import launch as S  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
UNIT = {"stride_qd", "stride_od", "stride_cd", "stride_kd", "stride_vd", "stride_btb"}  # specialised to 1 by the JIT
DIVISIBLE = {"stride_qs", "stride_qh", "stride_qt", "stride_ckv", "stride_cb", "stride_cs", "stride_ch",
             "stride_os", "stride_oh", "stride_ot", "stride_kt", "stride_kh", "stride_vt", "stride_vh"}


def compile_one(kernel, dtype: torch.dtype, meta: dict, capability: int = 90) -> str:
    meta = dict(meta)
    options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages", 2)}
    t = TYPES[dtype]
    pointer = {"mid_o_ptr": "*fp32", "mid_lse_ptr": "*fp32", "block_tables_ptr": "*i32", "context_lens_ptr": "*i32",
               "cu_q_ptr": "*i32", "slot_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32"}
    signature, constants = {}, dict(meta)
    for name in kernel.arg_names:
        if name in meta or name in UNIT:
            signature[name] = "constexpr"
            constants.setdefault(name, 1)
        elif name.endswith("_ptr"):
            signature[name] = pointer.get(name, f"*{t}")
        else:
            signature[name] = "fp32" if name == "qk_scale" else ("i64" if name == "stride_ckv" else "i32")
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in kernel.arg_names
             if signature[n] != "constexpr" and (n.endswith("_ptr") or n in DIVISIBLE)}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", capability, 32), options=options)
    return ptxas_usage(compiled, capability)


# The sampler's pointers: fp32 and int32 scratch and parameters; the others (tokens, seeds, steps, top-k, the int64
# state) are int64. Compiled without the divisibility hints a launch adds for aligned arguments, as this check
# always has been (its register counts stay comparable).
SAMPLER_FLOATS = {"temp_ptr", "topp_ptr", "minp_ptr", "part_f_ptr", "race_v_ptr", "state_f_ptr", "cand_x_ptr",
                  "cand_z_ptr", "front_z_ptr"}
SAMPLER_INTS = {"part_i_ptr", "race_i_ptr", "ticket_ptr", "cand_n_ptr", "cand_i_ptr", "front_i_ptr", "front_k_ptr"}


def compile_sampler(kernel, dtype: torch.dtype, fuse: bool) -> str:
    """One sampler kernel as fused_sample launches it with GPU_CONFIG (FUSE set), for logits of `dtype`."""
    cfg = S.GPU_CONFIG
    meta = dict(BLOCK=cfg["BLOCK"], SBLOCK=cfg["SBLOCK"], NT=cfg["NT"], CAP=cfg["CAP"], FUSE=fuse, SPLITS_P2=8,
                VALUE_PASSES=S.VALUE_PASSES, MAX_PASSES=S.MAX_PASSES)
    meta = {name: value for name, value in meta.items() if name in kernel.arg_names}
    signature = {name: "constexpr" if name in meta else
                 f"*{TYPES[dtype]}" if name == "logits_ptr" else
                 "*fp32" if name in SAMPLER_FLOATS else "*i32" if name in SAMPLER_INTS else
                 "*i64" if name.endswith("_ptr") else "i32" for name in kernel.arg_names}
    constexprs = {(kernel.arg_names.index(name),): value for name, value in meta.items()}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg["num_warps"]})
    return ptxas_usage(compiled)


def ptxas_usage(compiled, capability: int = 90) -> str:
    """ptxas's register and spill counts for a compiled kernel, as `regs=N spill_bytes=M`."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        gpu = "sm_90a" if capability == 90 else f"sm_{capability}"
        info = subprocess.run([PTXAS, "-v", "--gpu-name", gpu, f.name, "-o", os.devnull], capture_output=True,
                              text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", info).group(1)
    spills = re.search(r"(\d+) bytes spill stores", info).group(1)
    return f"regs={regs} spill_bytes={spills}"


def main(groups: list[str]) -> int:
    unknown = set(groups) - {"attention", "sampling"}
    if unknown:
        raise SystemExit(f"compile_sm90: no kernel group {sorted(unknown)}: attention, sampling")
    bad = 0
    if "attention" in groups or not groups:
        bad += compile_attention()
    if "sampling" in groups or not groups:
        bad += compile_sampling()
    return 1 if bad else 0


def compile_sampling() -> int:
    """Each sampler kernel for bf16 logits with GPU_CONFIG's FUSE, and for fp32 with the other FUSE (--sweep's
    alternative; it changes only the statistics kernel)."""
    bad = 0
    fuse = S.GPU_CONFIG["FUSE"]
    for kernel in S.KERNELS:
        for dtype, kernel_fuse in ((torch.bfloat16, fuse), (torch.float32, not fuse)):
            result = compile_sampler(kernel, dtype, kernel_fuse)
            print(f"{kernel.__name__:18s} {TYPES[dtype]} FUSE={kernel_fuse!s:5s}: {result}")
            bad += not result.endswith("spill_bytes=0")
    return bad


def compile_attention() -> int:
    bad = 0
    for dtype in (torch.bfloat16,):  # fp16 compiles the same code with another element type
        for head_dim, group in [(64, 7), (128, 5), (128, 1)]:
            cases = {
                "write_kv": (A._write_kv_kernel, A.write_kv_meta(8, head_dim, 16)),
                "decode": (A._decode_split_kernel, A.decode_meta(group, head_dim, 16, False, dtype)),
                "decode_single": (A._decode_split_kernel, A.decode_meta(group, head_dim, 16, True, dtype)),
                "decode_reduce": (A._decode_reduce_kernel, A.decode_reduce_meta(head_dim, 16)),
                "prefill": (A._prefill_kernel, A.prefill_meta(group, head_dim, 16, dtype)),
                "rotary": (R._rotary_kernel, R.rotary_meta(head_dim)),
            }
            for name, (kernel, meta) in cases.items():
                result = compile_one(kernel, dtype, meta)
                print(f"{name:14s} {TYPES[dtype]} head_dim={head_dim} group={group}: {result}")
                bad += not result.endswith("spill_bytes=0")
            # an A100 (sm_80) has no wgmma: prefill takes its own launch options there
            result = compile_one(A._prefill_kernel, dtype, A.prefill_meta(group, head_dim, 16, dtype, (8, 0)), 80)
            print(f"{'prefill sm_80':14s} {TYPES[dtype]} head_dim={head_dim} group={group}: {result}")
            bad += not result.endswith("spill_bytes=0")
    # fp32 (no tensor-core dot) is reported, not held to zero: its smaller tiles still spill ~1.9 KB on sm_90 at
    # head_dim 128 (64-wide ones spilled 25-57 KB)
    for head_dim, group in [(64, 7), (128, 5)]:
        for capability in (90, 80):
            meta = A.prefill_meta(group, head_dim, 16, torch.float32, (capability // 10, 0))
            print(f"{'prefill fp32':14s} sm_{capability} head_dim={head_dim} group={group}: "
                  f"{compile_one(A._prefill_kernel, torch.float32, meta, capability)}")
    return bad


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
