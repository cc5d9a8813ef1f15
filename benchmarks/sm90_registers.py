"""Compile the Triton kernels for an H100/H200 (sm_90) without a GPU: registers, stack and spills per launch.

    python benchmarks/sm90_registers.py        # no TRITON_INTERPRET; needs triton's bundled ptxas/cuobjdump

Each configuration the launchers pick (`ce_config`, `clamp_config`) at the study's shapes and beyond is
compiled with triton's own NVIDIA backend (ptxas) and read back with cuobjdump. Prints one line per
kernel; exits 1 when one spills (local memory, or a stack over 64 bytes), 3 when this triton cannot
compile for sm_90 here (no bundled ptxas, or an interpreted triton).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

MAX_STACK = 64          # bytes; a spilling kernel shows kilobytes (the old clamp lookup: 2,848 at S = 27)


def _import():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels are interpreted, not compiled")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "ptxas").exists() or not (tools / "cuobjdump").exists():
        raise RuntimeError(f"no ptxas/cuobjdump in {tools}")
    try:
        import fastgrok.kernels  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        import fastgrok.kernels  # noqa: F401
    return triton, GPUTarget, ASTSource, tools


def _usage(cubin: bytes, tools: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([str(tools / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    line = next(x for x in out.splitlines() if "REG:" in x)
    return {k: int(v) for k, v in (kv.split(":") for kv in line.split() if ":" in kv and kv.split(":")[1].isdigit())}


def main() -> int:
    try:
        triton, GPUTarget, ASTSource, tools = _import()
    except (RuntimeError, ImportError) as e:
        print(f"sm90_registers: cannot compile for sm_90 here: {e}")
        return 3
    import torch

    import fastgrok.kernels.cross_entropy as ce
    import fastgrok.kernels.norm_clamp as nc
    target = GPUTarget("cuda", 90, 32)
    cuda = torch.device("cuda")
    ptr16 = [["tt.divisibility", 16]]

    def build(fn, sig, consts, num_warps):
        attrs = {(i,): ptr16 for i, n in enumerate(fn.arg_names) if n.endswith("_ptr")}
        src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
        return _usage(triton.compile(src, target=target, options={"num_warps": num_warps}).asm["cubin"], tools)

    rows = []
    for dt, V, N, mask, grad, kind in [
            ("fp32", 59, 3481, True, True, False), ("fp32", 97, 3481, True, True, False),
            ("fp32", 113, 3481, True, True, False), ("fp32", 59, 1392, False, True, False),
            ("fp32", 59, 3481, True, False, False), ("bf16", 113, 3481, True, True, False),
            ("fp32", 4099, 4096, True, True, False), ("fp32", 8192, 1024, True, True, False),
            ("fp32", 32768, 8192, True, True, False), ("fp32", 10007, 65, True, False, False),
            # per-model loss kinds (softmax CE, StableMax CE, MSE in one launch)
            ("fp32", 59, 3481, True, True, True), ("fp32", 113, 3481, True, True, True),
            ("fp32", 59, 3481, True, False, True), ("bf16", 113, 3481, True, True, True),
            ("fp32", 8192, 1024, True, True, True), ("fp32", 32768, 8192, True, True, True)]:
        bn, bv, nw = ce.ce_config(N, V, cuda)
        sig = {"z_ptr": f"*{dt}", "y_ptr": "*i64", "tau_ptr": "*fp32", "mask_ptr": "*i1" if mask else "*fp32",
               "inv_count_ptr": "*fp32", "kind_ptr": "*i32" if kind else "*fp32", "grad_ptr": f"*{dt}",
               "row_loss_ptr": "*fp32", "w_loss_ptr": "*fp32", "correct_ptr": "*i1", "collapsed_ptr": "*i1",
               "norm_ptr": "*fp32", "N": "i32", "V": "i32", "stride_ym": "i32", "n_blocks": "i32",
               "HAS_MASK": "constexpr", "HAS_KIND": "constexpr", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr",
               "SINGLE": "constexpr", "WRITE_GRAD": "constexpr"}
        consts = {"HAS_MASK": mask, "HAS_KIND": kind, "BLOCK_N": bn, "BLOCK_V": bv, "SINGLE": bv >= V,
                  "WRITE_GRAD": grad}
        rows.append((f"tempered_ce {dt} V={V} N={N} mask={mask} grad={grad} kind={kind} ({bn}x{bv}, {nw} warps)",
                     build(ce._tempered_ce_kernel, sig, consts, nw)))
    for dt, S in [("fp32", 1), ("fp32", 3), ("fp32", 9), ("fp32", 27), ("bf16", 3)]:
        blk, nw = nc.clamp_config(88192, S, cuda)
        # launch 2's BLOCK_C: the most chunks of one segment, at most all 88,192 columns in one
        consts2 = {"BLOCK": blk, "BLOCK_C": max(2, triton.next_power_of_2(triton.cdiv(88192, blk)))}
        sig1 = {"flat_ptr": f"*{dt}", "chunk_seg_ptr": "*i32", "chunk_col_ptr": "*i32", "bounds_ptr": "*i32",
                "partial_ptr": "*fp32", "stride_m": "i32", "C": "i32", "BLOCK": "constexpr"}
        sig2 = {"flat_ptr": f"*{dt}", "chunk_seg_ptr": "*i32", "chunk_col_ptr": "*i32", "bounds_ptr": "*i32",
                "seg_first_ptr": "*i32", "seg_count_ptr": "*i32", "partial_ptr": "*fp32", "target_ptr": "*fp32",
                "active_ptr": "*i1", "norms_ptr": "*fp32", "stride_m": "i32", "S": "i32", "C": "i32",
                "BLOCK": "constexpr", "BLOCK_C": "constexpr"}
        for fn, sig, consts in ((nc._sumsq_kernel, sig1, {"BLOCK": blk}), (nc._rescale_kernel, sig2, consts2)):
            rows.append((f"{fn.__name__} {dt} S={S} (BLOCK {blk}, {nw} warps)", build(fn, sig, consts, nw)))
    spills = 0
    print(f"triton {triton.__version__}, sm_90")
    for name, u in rows:
        bad = u.get("LOCAL", 0) > 0 or u.get("STACK", 0) > MAX_STACK
        spills += bad
        print(f"{name:70s} REG {u.get('REG', '?'):>3}  STACK {u.get('STACK', '?'):>4}  LOCAL {u.get('LOCAL', '?'):>4}"
              + ("  SPILLS" if bad else ""))
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
