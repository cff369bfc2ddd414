"""Static cost of the GPU kernels' main loops, read off their sm_90 machine code: no GPU needed.

    python benchmarks/sass_report.py [--triton 2048x4x2 4096x16x3 ...] [--dtype bfloat16]
        [--no-cuda] [--json out.json]

For the Triton kernel (kernels/logit_stats.py, one row per launch configuration
BLOCK_VxWARPSxSTAGES) and the CUDA kernel (csrc/cuda, the rows kernel for the same dtype on both
sides) it reports registers per thread, spill stack, how many entry pairs one thread folds per
trip round the main vocabulary loop (the longest backward branch), the loop's instructions, those
on its common path (the shortest way round: it skips the rare rescale, argmax update, -inf
recompute and narrow-load code, all longer) and the common path's instructions per entry pair,
exp2s, barriers and shuffles. Predicated instructions count as issued.

The budget to compare with: an H100 SM issues 4 warp instructions per clock (128 thread
instructions); reading bfloat16 pairs (4 bytes) at 2.7 TB/s over 132 SMs at 1.755 GHz leaves
about 44 thread instructions per pair, twice that for float32. Nothing here measures memory
behaviour (latency hiding, occupancy in practice): benchmarks/bench_gpu.py on a GPU does.

Needs triton (its bundled ptxas and cuobjdump) and, for the CUDA kernel, nvcc on PATH.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}  # fk::DType
TRITON_TYPES = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def cuobjdump() -> str:
    """Triton's bundled cuobjdump, else one on PATH."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if not found:
        sys.exit("cuobjdump not found (install triton, or the CUDA toolkit's binaries)")
    return found


def functions(cubin: Path) -> dict[str, dict]:
    """{kernel name: {regs, stack, sass: [(address, text)]}} for every function in a cubin."""
    tool = cuobjdump()
    res = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    usage = {}
    for name, body in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", res):
        usage[name] = {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", body)}
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    out = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", chunk)]
        out[name] = {"regs": usage.get(name, {}).get("reg"), "stack": usage.get(name, {}).get("stack"),
                     "sass": ins}
    return out


BRANCH = re.compile(r"^(@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:!?U?P\w+,\s*)?0x([0-9a-f]+)")


def main_loop(ins: list[tuple[int, str]]) -> dict:
    """The longest backward branch's body: all its instructions, and those on its shortest
    path from the top to the back edge (forward branches taken or not, whichever is shorter:
    the common path skips the rare rescale, argmax, -inf and narrow-load code, which is longer),
    with the MUFU.EX2, barrier and shuffle counts of that path."""
    best = None
    for addr, text in ins:
        m = BRANCH.search(text)
        if m and int(m.group(2), 16) < addr and (best is None or addr - int(m.group(2), 16) > best[1] - best[0]):
            best = (int(m.group(2), 16), addr)
    if best is None:
        return {"instructions": 0, "common": 0, "ex2": 0, "barriers": 0, "shuffles": 0}
    body = [(a, t) for a, t in ins if best[0] <= a <= best[1]]
    index = {a: i for i, (a, _) in enumerate(body)}
    inf = float("inf")
    # cost[i]: fewest instructions from the top to instruction i, inclusive; via[i]: predecessor
    cost, via = [inf] * len(body), [None] * len(body)
    cost[0] = 1
    for i, (addr, text) in enumerate(body):
        if cost[i] == inf or i == len(body) - 1:
            continue
        m = BRANCH.search(text)
        succ = []
        if m and index.get(int(m.group(2), 16), -1) > i:
            succ.append(index[int(m.group(2), 16)])
        if not (m and m.group(1) is None) and not text.startswith(("EXIT", "RET")):
            succ.append(i + 1)  # falls through unless an unconditional branch or an exit
        for j in succ:
            if cost[i] + 1 < cost[j]:
                cost[j], via[j] = cost[i] + 1, i
    path, i = [], len(body) - 1
    while i is not None and cost[i] < inf:
        path.append(body[i][1])
        i = via[i]
    return {"instructions": len(body), "common": len(path), "ex2": sum("MUFU.EX2" in t for t in path),
            "barriers": sum("BAR.SYNC" in t for t in path), "shuffles": sum("SHFL" in t for t in path)}


def load_triton_kernels():
    """kernels/logit_stats.py as a module (by path: no install needed)."""
    spec = importlib.util.spec_from_file_location("fk_triton_logit_stats", ROOT / "kernels" / "logit_stats.py")
    ks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ks)
    return ks


def compile_sm90(kernel, dt_a: str, dt_b: str, consts: dict, num_warps: int):
    """A Triton kernel of kernels/logit_stats.py compiled for an H100 (sm_90), no GPU needed:
    dt_a / dt_b are Triton pointer types ('*bf16', '*i16' for llama rows...); pointers and
    strides are declared 16-byte divisible, as a contiguous torch tensor's are."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("a_ptr", "b_ptr"):
            sig[name] = dt_a if name == "a_ptr" else dt_b
        elif name == "labels_ptr":
            sig[name] = "*i64"
        elif name in ("top1_ref_ptr", "top1_q_ptr", "rank_ref_ptr", "rank_q_ptr"):
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp64"
        else:
            sig[name] = "i64" if "stride" in name else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if sig[n] != "constexpr" and n != "cols_per_split"}
    compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps})
    assert compiled.asm.get("cubin"), "no cubin"
    return compiled


GROUPS = ("top2", "label", "tvd", "jsd")


def parse_extra(text: str) -> tuple[str, ...]:
    """--extra's comma list of optional output groups ("all": every one)."""
    names = [g for g in text.split(",") if g]
    groups = GROUPS if "all" in names else tuple(g for g in GROUPS if g in names)
    unknown = set(names) - set(GROUPS) - {"all"}
    if unknown:
        sys.exit(f"--extra: unknown group(s) {', '.join(sorted(unknown))}; expected {', '.join(GROUPS)}, all")
    return groups


def _row(kernel: str, dtype: str, fn: dict, pairs: int, sass_dir: Path | None) -> dict:
    loop = main_loop(fn["sass"])
    if sass_dir is not None:  # the full listing, to diff two builds instruction by instruction
        (sass_dir / (kernel.replace(" ", "_").replace(",", "+") + ".sass")).write_text(
            "\n".join(t for _, t in fn["sass"]) + "\n")
    return {"kernel": kernel, "dtype": dtype, "regs": fn["regs"], "stack": fn["stack"],
            "pairs_per_trip": pairs, **loop, "per_pair": round(loop["common"] / pairs, 1)}


def triton_rows(configs: list[str], dtype: str, workdir: Path, extra: tuple[str, ...] = (),
                sass_dir: Path | None = None) -> list[dict]:
    """One row per launch configuration for the statistics kernel as the default outputs
    build it; with extra groups, one row more for it as they build it ("+top2,label": its loop
    gains the second largest value and the label counts) and, for tvd/jsd, the distance pass."""
    ks = load_triton_kernels()
    rows = []
    top2, rank = "top2" in extra, "label" in extra
    dist = [g for g in ("tvd", "jsd") if g in extra]
    for cfg in configs:
        block_v, warps, stages = (int(x) for x in cfg.split("x"))
        pairs = block_v // (warps * 32)
        base = dict(A_LLAMA=False, B_LLAMA=False, PARITY=False, SPLIT=False, BLOCK_V=block_v,
                    FUSED=True, NUM_STAGES=stages)
        builds = [(f"triton {cfg}", ks._logit_stats_kernel,
                   dict(base, HAS_LABELS=False, TOP2=False, RANK=False, STATE=False))]
        tag = [g for g in ("top2", "label") if g in extra] + (["state"] if dist else [])
        if tag:
            builds.append((f"triton {cfg} +{','.join(tag)}", ks._logit_stats_kernel,
                           dict(base, HAS_LABELS=rank, TOP2=top2, RANK=rank, STATE=bool(dist))))
        if dist:
            builds.append((f"triton dist {cfg} +{','.join(dist)}", ks._logit_stats_dist_kernel,
                           dict(A_LLAMA=False, B_LLAMA=False, SPLIT=False, BLOCK_V=block_v, FUSED=True,
                                NUM_STAGES=stages, TVD="tvd" in dist, JSD="jsd" in dist, HW_LOG=True)))
        for name, kernel, consts in builds:
            compiled = compile_sm90(kernel, TRITON_TYPES[dtype], TRITON_TYPES[dtype], consts, warps)
            cubin = workdir / "triton.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            (fn,) = functions(cubin).values()
            # the distance loop comes out unrolled: count its pairs by their two exp2s
            trip = main_loop(fn["sass"])["ex2"] // 2 if "dist" in name else pairs
            rows.append(_row(name, dtype, fn, trip, sass_dir))
    return rows


def cuda_rows(dtype: str, workdir: Path, extra: tuple[str, ...] = (),
              sass_dir: Path | None = None) -> list[dict]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("nvcc not on PATH: no CUDA kernel rows", file=sys.stderr)
        return []
    cubin = workdir / "cuda.cubin"
    subprocess.run([nvcc, "-std=c++17", "-O3", "-cubin", "-arch=sm_90", "-I", str(ROOT / "csrc" / "include"),
                    "-o", str(cubin), str(ROOT / "csrc" / "cuda" / "logit_stats.cu")], check=True)
    code = DTYPE_CODES[dtype]
    kernel = rf"ILNS_5DTypeE{code}ELS2_{code}E"
    # (row name, mangled name): the rows kernel <DA, DB, kParity = false, kExtra>, and the
    # distance kernel <DA, DB, kJsd>
    builds = [("cuda rows", rf"rows_kernel{kernel}Lb0ELb0E")]
    tag = [g for g in ("top2", "label") if g in extra]
    if tag:
        builds.append((f"cuda rows +{','.join(tag)}", rf"rows_kernel{kernel}Lb0ELb1E"))
    if "jsd" in extra or "tvd" in extra:
        jsd = "jsd" in extra
        builds.append((f"cuda dist +{'tvd,jsd' if jsd else 'tvd'}", rf"dist_kernel{kernel}Lb{int(jsd)}E"))
    fns = functions(cubin)
    rows = []
    for label, pattern in builds:
        for name, fn in fns.items():
            if re.search(pattern, name):
                pairs = main_loop(fn["sass"])["ex2"] // 2  # kVec x unroll_steps<DA, DB>(): two exp2 a pair
                rows.append(_row(label, dtype, fn, pairs, sass_dir))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--triton", nargs="*", default=["2048x4x2", "2048x4x3", "4096x8x2", "4096x16x3"],
                    metavar="BLOCKxWARPSxSTAGES", help="Triton launch configurations (default: %(default)s)")
    ap.add_argument("--dtype", choices=sorted(DTYPE_CODES), default="bfloat16")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernel")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--extra", default="", metavar="GROUPS",
                    help="also the kernels as the optional output groups build them: a comma list of "
                         f"{', '.join(GROUPS)} or all (the default outputs' rows come first, unchanged)")
    ap.add_argument("--sass-dir", metavar="DIR", help="write each kernel's SASS listing here")
    args = ap.parse_args(argv)
    extra = parse_extra(args.extra)
    sass_dir = Path(args.sass_dir) if args.sass_dir else None
    if sass_dir is not None:
        sass_dir.mkdir(parents=True, exist_ok=True)
    os.environ.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = triton_rows(args.triton, args.dtype, work, extra, sass_dir)
        if not args.no_cuda:
            rows += cuda_rows(args.dtype, work, extra, sass_dir)
    budget = 44 * BYTES[args.dtype] // 2
    print(f"# sm_90 main loops, {args.dtype} on both sides (budget at 2.7 TB/s on an H100: about {budget} "
          "instructions per pair)")
    width = max([18] + [len(r["kernel"]) + 2 for r in rows])
    print(f"{'kernel':<{width}}{'regs':>5}{'stack':>6}{'pairs/trip':>11}{'loop':>6}{'common':>7}{'per pair':>9}"
          f"{'ex2':>5}{'bar':>5}{'shfl':>6}")
    for r in rows:
        print(f"{r['kernel']:<{width}}{r['regs']:>5}{r['stack']:>6}{r['pairs_per_trip']:>11}{r['instructions']:>6}"
              f"{r['common']:>7}{r['per_pair']:>9}{r['ex2']:>5}{r['barriers']:>5}{r['shuffles']:>6}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
