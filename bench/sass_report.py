"""Register and instruction report of the attention kernels compiled for the H100, on any machine:
``python -m bench.sass_report [--max-registers=N] [fwd|bwd] [d] [tiles ...]`` (no GPU needed: Triton's
bundled ptxas and cuobjdump do the work; TRITON_INTERPRET must be unset). It compiles with the local
Triton, whose code can differ from the GPU machine's version. ``--max-registers``: compile with that
register cap (Triton's ``maxnreg``), as the launchers do for launches of many programs.

For each tile choice it prints the registers per thread, the local-memory stack (register spills),
and for every loop of the SASS longer than 50 instructions: its size, its tensor-core instructions
(``GMMA`` = Hopper's wgmma, ``HMMA`` = the older mma.sync path) and its local loads/stores (spills
inside a loop cost on every iteration). Tiles: ``m,n,warps,stages`` for fwd (default: the launcher's
choice), ``kv,kv_q,q,q_kv,warps,stages[,1]`` for bwd (a
trailing 1: the split dK/dV programs, see ``_split_dkdv``). bf16 softmax, causal history, candidates with their
own key, no cutoffs; TMA copies where the GPU takes them (``_tma_rule``). Example:
``python -m bench.sass_report bwd 128 32,64,64,32,4,3 128,32,128,64,8,3``.
"""
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("unset TRITON_INTERPRET: this compiles for the GPU")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import gesr_kernels.target_attention as ta  # noqa: E402

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _pointer_type(name: str, dtype: str) -> str:
    """Triton type of the kernels' pointer argument ``name`` (tensors of ``dtype``)."""
    if any(s in name for s in ("off", "len")):
        return "*i64"                      # offsets and cutoffs
    if name == "skip_ptr":
        return "*i32"
    if name == "arrivals_ptr":
        return "*i32"
    if any(s in name for s in ("lse", "delta", "part", "stats")):
        return "*fp32"                     # row statistics and fp32 workspaces
    return "*" + dtype


def compile_for_h100(kernel, constexprs: dict, warps: int, stages: int, boxes=None, *, dtype: str = "bf16",
                     inductor: bool = False, max_registers=None):
    """Compile ``kernel`` for sm_90 (no GPU needed) with its arguments typed as a launch types them.
    ``inductor=False``: an eager launch on contiguous tensors: ``dtype`` tensors, fp32 statistics, int64
    offsets, i32 sizes; head-dim strides equal to 1 (constants), other strides, the pointers and d_qk/d_v
    divisible by 16 (Triton's launch-time specialization; without it the same kernel compiles to different
    code). ``inductor=True``: as torch.compile's inductor hands them to user kernels: Python floats as fp64,
    strides as i64, no specialization. ``boxes``: TMA descriptor argument -> its box (rows, cols); the
    others are pointers. Every tl.constexpr parameter must be given: a missing one would compile as a runtime
    integer, not the kernel that runs. ``max_registers``: Triton's ``maxnreg`` option (the launchers' register
    caps, see ``_fwd_register_cap`` / ``_bwd_register_cap``)."""
    missing = [kernel.arg_names[i] for i in kernel.constexprs if kernel.arg_names[i] not in constexprs]
    if missing:
        raise ValueError(f"constexpr parameters not given: {missing}")
    signature, constexprs, divisible = {}, dict(constexprs), []
    for index, name in enumerate(kernel.arg_names):
        if not inductor and name.startswith("stride") and name.endswith("d"):
            constexprs[name] = 1
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_desc"):
            signature[name] = ("tensordesc<%s[%d,%d]>" % ((dtype,) + tuple(boxes[name])) if boxes and name in boxes
                               else "*" + dtype)
        elif name.endswith("_ptr"):
            signature[name] = _pointer_type(name, dtype)
            divisible.append(index)
        elif inductor:
            floats, stride = name in ("scale", "out_scale"), name.startswith("stride")
            signature[name] = "fp64" if floats else "i64" if stride else "i32"
        else:
            signature[name] = "fp32" if name in ("scale", "out_scale") else "i32"
            if name.startswith("stride") or name in ("d_qk", "d_v"):
                divisible.append(index)
    attrs = {} if inductor else {(index,): [["tt.divisibility", 16]] for index in divisible}
    return triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages,
                                                                     **({"maxnreg": max_registers} if max_registers
                                                                        else {})})


def _tool(name: str, *args: str) -> str:
    return subprocess.run([os.path.join(TOOLS, name), *args], capture_output=True, text=True, check=True).stdout


def report(compiled, title: str) -> None:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = re.search(r"REG:(\d+) STACK:(\d+)", _tool("cuobjdump", "-res-usage", f.name))
        sass = _tool("cuobjdump", "-sass", f.name)
    finally:
        os.unlink(f.name)
    print(f"{title}: {usage.group(1)} registers, {usage.group(2)} bytes of stack (spills), "
          f"{compiled.metadata.shared} bytes of shared memory")
    instructions = [(int(m.group(1), 16), m.group(2)) for m in
                    (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines()) if m]
    for address, text in instructions:
        target = re.search(r"BRA\s.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:  # a backward branch closes a loop
            body = [t for a, t in instructions if int(target.group(1), 16) <= a <= address]
            if len(body) > 50:
                count = lambda what: sum(what in t for t in body)  # noqa: E731
                print(f"  loop of {len(body):5d} instructions: GMMA {count('GMMA'):3d}  HMMA {count('HMMA'):3d}  "
                      f"local loads {count('LDL'):4d}  stores {count('STL'):4d}")


def main(argv) -> int:
    cap = None
    if argv and argv[0].startswith("--max-registers="):
        cap, argv = int(argv[0].split("=", 1)[1]), argv[1:]
    kind = argv[0] if argv else "bwd"
    d = int(argv[1]) if len(argv) > 1 else 128
    flags = dict(HAS_LENGTHS=False, CAUSAL=True, HAS_SKIP=False, SILU=False, IS_FP64=False, BLOCK_DQK=d,
                 BLOCK_DV=d, EVEN_DQK=True, EVEN_DV=True)
    tiles = [tuple(int(x) for x in t.split(",")) for t in argv[2:]]
    # The code depends on the Triton version: e.g. Triton 3.9 leaves the q/dO loads of the backward's
    # history dK/dV loop unpipelined where Triton 3.6 (the H100's) pipelines them (bench/RESULTS.md).
    print(f"Triton {triton.__version__}, sm_90")
    if kind == "fwd":
        for m, n, warps, stages in tiles or [ta._fwd_blocks(1 << 20, 1, d, d, torch.bfloat16)]:
            tma = ta._tma_rule("fwd", torch.bfloat16, d, d, False)
            compiled = compile_for_h100(ta._target_attention_fwd_kernel,
                                        dict(flags, USE_TMA=tma, HAS_HISTORY=True, HAS_SELF=True, BLOCK_MH=m,
                                             BLOCK_MC=m, BLOCK_N=n, POSITIONAL=False, INTERLEAVED=False), warps, stages,
                                        tma and dict(k_desc=(n, d), v_desc=(n, d)), max_registers=cap)
            report(compiled, f"forward d={d} {m}x{n}, {warps} warps, {stages} stages{', TMA' if tma else ''}"
                             f"{f', cap {cap}' if cap else ''}")
    else:
        for kv, kv_q, q, q_kv, warps, stages, *split in tiles or [ta._bwd_blocks(d, d, torch.bfloat16)]:
            tma_dkdv = ta._tma_rule("dkdv", torch.bfloat16, d, d, False)
            tma_dq = ta._tma_rule("dq", torch.bfloat16, d, d, False)
            boxes = {name: (kv_q, d) for name in ("hq_desc", "cq_desc", "hdo_desc", "cdo_desc")} if tma_dkdv else {}
            boxes.update(dict(k_desc=(q_kv, d), v_desc=(q_kv, d)) if tma_dq else {})
            compiled = compile_for_h100(ta._target_attention_bwd_kernel,
                                        dict(flags, DKDV=True, DQ=True, TMA_DKDV=tma_dkdv, TMA_DQ=tma_dq,
                                             SPLIT_DKDV=bool(split and split[0]),
                                             HAS_HISTORY_Q=True, HAS_SELF=True, BLOCK_KV=kv, BLOCK_KV_Q=kv_q, BLOCK_Q=q,
                                             BLOCK_Q_KV=q_kv),
                                        warps, stages, boxes, max_registers=cap)
            report(compiled, f"backward d={d} dK/dV {kv}x{kv_q}{', TMA' if tma_dkdv else ''}"
                             f"{f', cap {cap}' if cap else ''}"
                             f"{', split' if split and split[0] else ''}, dQ {q}x{q_kv}"
                             f"{', TMA' if tma_dq else ''}, {warps} warps, {stages} stages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
