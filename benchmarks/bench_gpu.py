"""Fused logit statistics on a CUDA GPU: the Triton kernel and the CUDA extension against torch
eager (log_softmax twice, KL, argmax), torch.compile of the same, and a read roofline (one
pass summing both inputs) measured in the same run.

    python benchmarks/bench_gpu.py [--dtype bfloat16 float16 float32]
        [--shape 4096x152064 8192x131072 512x152064 65536x32000]
        [--baselines headline|all|none] [--sweep] [--extra] [--budget 0.3] [--json out.json]

Reports ms, tokens/s and TB/s of input read (N * V * (bytes per ref entry + bytes per q entry)
per call) and the percentage of the roofline. Times come from CUDA events around a batch of
back-to-back calls (the median over batches), after a warm-up that includes JIT and
torch.compile compilation. Before timing, each backend's output on a few rows is checked
against the float64 reference (fidelity_kld.reference): numbers for wrong answers are useless.
The baselines are slow and torch.compile compiles for each shape, so by default they run on the
headline case only (bfloat16 4096 x 152064; the issue's target there is >= 2.7 TB/s).
--extra (issue 16) times each optional output group ("triton +top2", ..., "cuda +all") on the
headline case, with labels, beside the default outputs with the same labels ("... labels"):
the cost of asking for each one, each checked against the reference first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from fidelity_kld import _core, bench, gpu, reference
from fidelity_kld.ops import EXTRA_GROUPS as OUTPUT_GROUPS

SHAPES = ["4096x152064", "8192x131072", "512x152064", "65536x32000"]
DTYPES = ["bfloat16", "float16", "float32"]
HEADLINE = ("bfloat16", 4096, 152064)
EXTRA_GROUPS = ("top2", "label", "tvd", "jsd", "all")


def gpu_time(fn, budget_s: float, *, min_batches: int = 3) -> bench.Timing:
    """Median seconds per call over batches of back-to-back calls timed with CUDA events."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = max(time.perf_counter() - t0, 1e-6)
    per_batch = max(1, min(50, int(0.05 / once)))
    batches = max(min_batches, min(20, int(budget_s / (once * per_batch))))
    times = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(per_batch):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / per_batch)
    return bench.Timing.of(times)


def make_inputs(n: int, v: int, dtype: str, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn((n, v), device="cuda", dtype=torch.float32, generator=g).mul_(3.0)
    b = torch.randn((n, v), device="cuda", dtype=torch.float32, generator=g).mul_(0.3).add_(a)
    dt = getattr(torch, dtype)
    return a.to(dt), b.to(dt)


def torch_stats(a, b):
    """The baseline: what people write in torch for the same work (KLD and top-1 only)."""
    la = torch.log_softmax(a.float(), dim=-1)
    lb = torch.log_softmax(b.float(), dim=-1)
    kld = (la.exp() * (la - lb)).sum(-1)
    return kld, a.argmax(-1), b.argmax(-1)


def roofline_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def read_sum(a_ptr, b_ptr, n, out_ptr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(ITERS):
            offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
            m = offs < n
            acc += tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
            acc += tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(acc, 0))

    def run(a, b, out):
        n = a.numel()
        block, iters = 4096, 8
        grid = (triton.cdiv(n, block * iters),)
        read_sum[grid](a, b, n, out, BLOCK=block, ITERS=iters, num_warps=8)

    return run


def check_rows(name, out, a, b, rows=4):
    """A few rows of a backend's output against the float64 reference."""
    idx = torch.linspace(0, a.shape[0] - 1, rows, device=a.device).long()
    a64 = a[idx].double().cpu().numpy()
    b64 = b[idx].double().cpu().numpy()
    want = reference.logit_stats(a64, b64)
    got = {k: out[k][idx].cpu().numpy() for k in ("kld", "lse_ref", "top1_ref", "top1_q")}
    err = np.abs(got["kld"] - want["kld"])
    ok = (np.all(err <= 2e-6 + 2e-4 * np.abs(want["kld"]))
          and np.allclose(got["lse_ref"], want["lse_ref"], rtol=1e-6, atol=1e-6)
          and np.array_equal(got["top1_ref"], want["top1_ref"])
          and np.array_equal(got["top1_q"], want["top1_q"]))
    if not ok:
        print(f"!! {name}: output disagrees with the float64 reference (max kld err {err.max():.3g})",
              file=sys.stderr)
    return bool(ok)


def check_extra_rows(name, out, a, b, labels, rows=4):
    """A few rows of the optional outputs in ``out`` against the float64 reference."""
    idx = torch.linspace(0, a.shape[0] - 1, rows, device=a.device).long()
    want = reference.logit_stats(a[idx].double().cpu().numpy(), b[idx].double().cpu().numpy(),
                                 labels[idx].cpu().numpy())
    ok = True
    for key in sorted(set(out) & {k for names in OUTPUT_GROUPS.values() for k in names}):
        g, w = out[key][idx].cpu().numpy(), want[key]
        if key.startswith("rank"):
            good = np.array_equal(g, w)
        else:
            good = np.allclose(g, w, rtol=2e-4, atol=2e-6, equal_nan=True)
        if not good:
            print(f"!! {name}: {key} disagrees with the float64 reference", file=sys.stderr)
        ok &= good
    return bool(ok)


def cuda_runner(a, b, out, splits=0, labels=None):
    """The extension with pointers prepared once: what a harness calling it in a loop pays."""
    n, v = a.shape
    ptr = {k: t.data_ptr() for k, t in out.items()}
    dt = str(a.dtype).replace("torch.", "")
    stream = torch.cuda.current_stream().cuda_stream
    sa, sb = a.stride(0) * a.element_size(), b.stride(0) * b.element_size()
    y = 0 if labels is None else labels.data_ptr()

    def run():
        _core.logit_stats_cuda(a.data_ptr(), dt, sa, b.data_ptr(), dt, sb, n, v, stream=stream,
                               vocab_splits=splits, labels=y, **ptr)

    return run


def extra_cases(ks, a, b, budget, record, roof, nbytes, dtype):
    """The cost of each optional output group: the default outputs with labels, then each group
    asked for in turn, on both backends."""
    n, v = a.shape
    y = torch.from_numpy(np.random.default_rng(3).integers(0, v, n)).cuda()
    for group in ("labels",) + EXTRA_GROUPS:
        extra = () if group == "labels" else (group,)
        out = gpu.allocate_outputs(n, a.device, True, False, None, extra)

        def triton_run(out=out, extra=extra):
            return ks.logit_stats(a, b, y, out=out, extra=extra)

        runners = [("triton", triton_run)]
        if _core.has_cuda:
            runners.append(("cuda", cuda_runner(a, b, out, labels=y)))
        for backend, run in runners:
            label = f"{backend} {group}" if group == "labels" else f"{backend} +{group}"
            for t in out.values():
                t.fill_(0)
            run()
            ok = check_rows(label, out, a, b) and check_extra_rows(label, out, a, b, y)
            record(label, dtype, n, v, gpu_time(run, budget), nbytes, roof, ok)


def hidden_state_case(budget: float, n: int = 4096, h: int = 4096, v: int = 152064,
                      tile: int = 1024) -> dict:
    """Hidden-state scoring on the GPU (issue 14): per tile of `tile` tokens, torch's matmul
    of both models' final hidden states with the lm_head ([tile, H] x [H, V], float32 and
    bfloat16), then the fused kernel (fidelity_kld.compare on the CUDA tensors), against the
    two products alone in the same run. Not run yet: no GPU was lent when it was written."""
    from fidelity_kld import compare

    g = torch.Generator(device="cuda").manual_seed(0)
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        w = (torch.randn((v, h), device="cuda", generator=g) * (3 / h ** 0.5)).to(dt)
        ha = torch.randn((n, h), device="cuda", generator=g).to(dt)
        hb = (ha.float() + 0.05 * torch.randn((n, h), device="cuda", generator=g)).to(dt)

        def products():
            for s in range(0, n, tile):
                (ha[s:s + tile] @ w.T).float()
                (hb[s:s + tile] @ w.T).float()

        def full_path():
            for s in range(0, n, tile):
                compare((ha[s:s + tile] @ w.T).float(), (hb[s:s + tile] @ w.T).float(), device="cuda")

        a = (ha[:4] @ w.T).float()
        b = (hb[:4] @ w.T).float()
        got = compare(a, b, device="cuda")
        want = reference.logit_stats(a.cpu().numpy(), b.cpu().numpy())
        ok = bool(np.allclose(got.kld, want["kld"], rtol=2e-4, atol=2e-6))
        t_prod = gpu_time(products, budget).median_s
        t_full = gpu_time(full_path, budget).median_s
        name = str(dt).replace("torch.", "")
        out[name] = {"tokens": n, "hidden": h, "vocab": v, "tile": tile, "ok": ok,
                     "products_tokens_per_s": n / t_prod, "full_path_tokens_per_s": n / t_full,
                     "full_over_products_rate": t_prod / t_full}
        print(f"  hidden states {name:<9}{n}x{h} @ {h}x{v}: products alone {n / t_prod:,.0f} tokens/s, "
              f"with the fused kernel {n / t_full:,.0f} tokens/s ({100 * t_prod / t_full:.0f}%)"
              f"{'' if ok else '  WRONG'}")
        del w, ha, hb, a, b
        torch.cuda.empty_cache()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", nargs="+", default=DTYPES)
    ap.add_argument("--shape", nargs="+", default=SHAPES, help="NxV")
    ap.add_argument("--baselines", choices=["headline", "all", "none"], default="headline")
    ap.add_argument("--sweep", action="store_true",
                    help="also time Triton block sizes / warps and CUDA vocabulary splits on the headline case")
    ap.add_argument("--extra", action="store_true",
                    help="also time each optional output group (issue 16) on the headline case")
    ap.add_argument("--budget", type=float, default=0.3, help="seconds of timed work per measurement")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--hidden", action="store_true",
                    help="only the hidden-state case: lm_head products + fused kernel (issue 14)")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark", file=sys.stderr)
        return 2
    import triton

    if args.hidden:
        res = hidden_state_case(args.budget)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": bench.machine(), "hidden": res}, f, indent=1)
        return 0 if all(r["ok"] for r in res.values()) else 1
    props = torch.cuda.get_device_properties(0)
    info = bench.machine()
    info.update(gpu=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__, has_cuda_ext=bool(_core.has_cuda))
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}, CUDA extension: {_core.has_cuda}, commit {info['commit']}")
    ks = gpu.triton_kernels()
    roof_run = roofline_kernel()
    compiled = torch.compile(torch_stats) if args.baselines != "none" else None
    results = []

    def record(impl, dtype, n, v, t, nbytes, roof=None, ok=None, **extra):
        r = bench.row("logit_stats_gpu", impl, dtype, n, v, 0, t, nbytes, ok=ok, **extra)
        tbs = r.gb_per_s / 1e3
        r.extra["tb_per_s"] = tbs
        if roof:
            r.extra["pct_roofline"] = 100.0 * tbs / roof
        results.append(r)
        pct = f"{100 * tbs / roof:6.1f}%" if roof else "      "
        flag = "" if ok in (None, True) else "  WRONG"
        print(f"{impl:<26}{dtype:<9}{n:>7}{v:>8}{r.ms:>10.3f}{r.tokens_per_s:>14,.0f}{tbs:>8.3f}{pct}{flag}",
              flush=True)
        return tbs

    print(f"{'impl':<26}{'dtype':<9}{'N':>7}{'V':>8}{'ms':>10}{'tokens/s':>14}{'TB/s':>8}{'%roof':>7}")
    for dtype in args.dtype:
        for shape in args.shape:
            n, v = (int(x) for x in shape.lower().split("x"))
            a, b = make_inputs(n, v, dtype)
            nbytes = a.numel() * a.element_size() + b.numel() * b.element_size()
            part = torch.empty(triton.cdiv(a.numel(), 4096 * 8), device="cuda", dtype=torch.float32)
            t = gpu_time(lambda: roof_run(a, b, part), args.budget)
            roof = record("roofline(read both)", dtype, n, v, t, nbytes)
            out = {k: torch.empty(n, dtype=torch.float64, device="cuda")
                   for k in ("kld", "kld_reverse", "lse_ref", "lse_q", "entropy_ref")}
            out.update({k: torch.empty(n, dtype=torch.int32, device="cuda") for k in ("top1_ref", "top1_q")})

            def triton_run(**kw):
                return ks.logit_stats(a, b, out=out, **kw)

            triton_run()
            ok = check_rows("triton", out, a, b)
            record("triton", dtype, n, v, gpu_time(triton_run, args.budget), nbytes, roof, ok)
            if _core.has_cuda:
                run = cuda_runner(a, b, out)
                for k in out.values():
                    k.fill_(0)
                run()
                ok = check_rows("cuda", out, a, b)
                record("cuda", dtype, n, v, gpu_time(run, args.budget), nbytes, roof, ok)
            headline = (dtype, n, v) == HEADLINE
            if args.extra and headline:
                extra_cases(ks, a, b, args.budget, record, roof, nbytes, dtype)
            if args.sweep and headline:
                # (block_v, num_warps, num_stages, fused reductions); the default is 2048/4/2
                # (16 entries per thread); 4096/16/3 was the default before (8 per thread).
                variants = [(2048, 4, 3, True), (2048, 4, 1, True), (4096, 8, 2, True),
                            (1024, 2, 2, True), (2048, 8, 2, True), (4096, 16, 3, True),
                            (2048, 4, 2, False)]
                for bv, nw, st, fused in variants:
                    label = f"triton b{bv} w{nw} s{st}{'' if fused else ' unfused'}"

                    def variant(bv=bv, nw=nw, st=st, fused=fused):
                        return triton_run(block_v=bv, num_warps=nw, num_stages=st, fused_reduce=fused)

                    for k in out.values():
                        k.fill_(0)
                    variant()
                    ok = check_rows(label, out, a, b)
                    record(label, dtype, n, v, gpu_time(variant, args.budget / 2), nbytes, roof, ok)
            if args.baselines == "all" or (args.baselines == "headline" and headline):
                record("torch eager", dtype, n, v, gpu_time(lambda: torch_stats(a, b), args.budget,
                                                               min_batches=2), nbytes, roof)
                t0 = time.perf_counter()
                compiled(a, b)
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
                record("torch.compile", dtype, n, v, gpu_time(lambda: compiled(a, b), args.budget),
                       nbytes, roof, compile_s=compile_s)
            a = b = out = part = None  # free before the next case's inputs
            torch.cuda.empty_cache()

    if args.sweep and _core.has_cuda:  # few rows: the split-vocabulary path
        for n, v in [(8, 152064), (64, 152064)]:
            a, b = make_inputs(n, v, "bfloat16", seed=1)
            nbytes = 2 * a.numel() * a.element_size()
            out = {k: torch.empty(n, dtype=torch.float64, device="cuda")
                   for k in ("kld", "kld_reverse", "lse_ref", "lse_q", "entropy_ref")}
            out.update({k: torch.empty(n, dtype=torch.int32, device="cuda") for k in ("top1_ref", "top1_q")})
            for splits in (1, 0):
                run = cuda_runner(a, b, out, splits)
                run()
                ok = check_rows(f"cuda splits={splits}", out, a, b)
                record(f"cuda splits={'auto' if splits == 0 else splits}", "bfloat16", n, v,
                       gpu_time(run, args.budget / 2), nbytes, None, ok)
            for splits in (1, None):
                def run_t(s=splits):
                    return ks.logit_stats(a, b, out=out, splits=s)
                run_t()
                ok = check_rows("triton split", out, a, b)
                record(f"triton splits={'auto' if splits is None else splits}", "bfloat16", n, v,
                       gpu_time(run_t, args.budget / 2), nbytes, None, ok)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": [r.as_dict() for r in results]}, f, indent=1)
    # The short table: the headline numbers last.
    print("\n# summary (TB/s of input read; % of the read roofline measured in this run)")
    for r in results:
        if (r.impl in ("triton", "cuda", "torch eager", "torch.compile") or " +" in r.impl
                or r.impl.endswith(" labels")) and "pct_roofline" in r.extra:
            print(f"  {r.impl:<16}{r.dtype:<9}{r.n:>6}x{r.vocab:<7}{r.extra['tb_per_s']:7.3f} TB/s"
                  f"{r.extra['pct_roofline']:6.1f}%{'' if r.extra.get('ok') in (None, True) else '  WRONG'}")
    wrong = [r for r in results if r.extra.get("ok") is False]
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
