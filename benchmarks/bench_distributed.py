"""fidelity_kld.distributed on a local Ray cluster of 2 workers against the single-process
stream on the same pair of dumps, in the same run.

    python benchmarks/bench_distributed.py --dir /tmp/fk_dist --gb 4 [--vocab 152064]
        [--repeats 3] [--keep] [--json out.json]

Writes two fp16 .npy dumps of --gb GB each (the reference with a labels companion, so every
per-token array is computed and shipped), reads them once into the page cache, then times:
stream.compare_sources in this process on 2 threads (the baseline), and
distributed.compare_sources on `ray.init(num_cpus=2)` (2 tasks at a time, 1 core each)
with the default task count and with many smaller tasks, interleaved. The cost of one task:
one-token tasks spread over the dumps (the time outside the task bodies per task, and a
body's own fixed cost: opening the files, packing the result). Also: a no-op task's round trip, the cluster's start, and the bytes per token the driver
receives (measured on a packed task result, 1 and 2 models). Deletes the dumps unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np

from bench_stream import warm, write_dump  # same folder: the same dumps as issue 3's bench
from fidelity_kld import bench, distributed
from fidelity_kld.io import open_source
from fidelity_kld.stream import compare_sources


def received_bytes_per_token(ref_path: str, q_path: str, models: int) -> tuple[float, float]:
    """(array bytes, pickled bytes) per token of one task's result, `models` models."""
    with open_source(ref_path) as r, open_source(q_path) as q:
        rng = distributed.plan(r, [q] * models, tasks=max(1, r.n_tokens // 256))[0]
        out = distributed.compare_range(rng, r.labels[rng.start:rng.stop], threads=1,
                                        llama_parity=False, chunk_bytes=128 << 20, device="cpu")
    tokens = rng.stop - rng.start
    arrays = sum(a.nbytes for a in out["shared"].values()) + sum(
        a.nbytes for m in out["models"] for a in m.values())
    return arrays / tokens, len(pickle.dumps(out, protocol=5)) / tokens


def task_costs(ray, ref_src, q_src, n_tasks: int) -> dict:
    """n_tasks one-token ranges spread over the dumps, run as Ray tasks: the time a task
    spends outside its body (scheduling, argument and result transfer) is the workers' wall
    time less the time inside the bodies; a body's own fixed cost (opening the files,
    packing the result) is nearly all of a one-token body."""
    ranges = distributed.plan(ref_src, [q_src], tasks=ref_src.n_tokens)
    ranges = ranges[:: max(1, len(ranges) // n_tasks)][:n_tasks]
    remote = ray.remote(distributed.compare_range).options(num_cpus=1)
    kw = dict(threads=1, llama_parity=False, chunk_bytes=128 << 20, device="cpu")
    ray.get([remote.remote(r, ref_src.labels[r.start:r.stop], **kw) for r in ranges[:8]])
    t0 = time.perf_counter()
    out = ray.get([remote.remote(r, ref_src.labels[r.start:r.stop], **kw) for r in ranges])
    wall = time.perf_counter() - t0
    inside = [o["seconds"] for o in out]
    workers = 2
    return {"tiny_tasks": len(ranges), "tiny_wall_s": wall,
            "task_body_median_s": float(np.median(inside)),
            "task_outside_body_s": (workers * wall - sum(inside)) / len(ranges)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/fk_dist")
    ap.add_argument("--gb", type=float, default=4.0, help="size of each dump")
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--many-tasks", type=int, default=128)
    ap.add_argument("--tiny-tasks", type=int, default=256, help="one-token tasks for the per-task cost")
    ap.add_argument("--keep", action="store_true", help="keep the dumps")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import ray

    os.makedirs(args.dir, exist_ok=True)
    v = args.vocab
    n = int(args.gb * 1e9 / (2 * v))
    ref_path = os.path.join(args.dir, f"ref_{n}x{v}.npy")
    q_path = os.path.join(args.dir, f"q_{n}x{v}.npy")
    labels_path = ref_path[:-4] + ".labels.npy"
    try:
        write_dump(ref_path, n, v, 0)
        write_dump(q_path, n, v, 1, base=ref_path)
        np.save(labels_path, np.random.default_rng(2).integers(0, v, n))
        info = bench.machine()
        if not info["commit"]:  # installed package: ask the checkout this script is in
            info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], text=True,
                                            capture_output=True, cwd=os.path.dirname(__file__)).stdout.strip()
        print(f"# {info['cpu']}, {info['cores']} cores, simd={info['simd']}, commit {info['commit']}, "
              f"{info['date']}, ray {ray.__version__}")
        total = os.path.getsize(ref_path) + os.path.getsize(q_path)

        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        start_s = time.perf_counter() - t0

        @ray.remote(num_cpus=1)
        def noop(x):
            return x

        ray.get([noop.remote(0) for _ in range(20)])  # workers up
        t0 = time.perf_counter()
        ray.get([noop.remote(i) for i in range(500)])
        noop_throughput_s = (time.perf_counter() - t0) / 500
        lat = []
        for i in range(50):
            t0 = time.perf_counter()
            ray.get(noop.remote(i))
            lat.append(time.perf_counter() - t0)
        noop_latency_s = float(np.median(lat))

        srcs = [open_source(ref_path), open_source(q_path)]
        costs = task_costs(ray, srcs[0], srcs[1], args.tiny_tasks)
        counts = {}

        def single():
            compare_sources(srcs[0], srcs[1:], threads=2)

        def on_ray(tasks=None):
            def run():
                log = []
                distributed.compare_sources(srcs[0], srcs[1:], tasks=tasks, progress=log.append)
                counts[tasks] = log[-1].tasks_total
            return run

        warm(ref_path)
        warm(q_path)
        # interleaved, so that drift on this shared machine hits every variant alike
        t_single, t_ray, t_many = [], [], []
        on_ray()()  # first run: the workers import fidelity_kld
        for _ in range(args.repeats):
            t_single.append(bench.measure(single, warmup=0, repeats=1).median_s)
            t_ray.append(bench.measure(on_ray(), warmup=0, repeats=1).median_s)
            t_many.append(bench.measure(on_ray(args.many_tasks), warmup=0, repeats=1).median_s)
        for s in srcs:
            s.close()
        ray.shutdown()
        single_s, ray_s, many_s = (float(np.median(t)) for t in (t_single, t_ray, t_many))
        k_default, k_many = counts[None], counts[args.many_tasks]
        bpt1, pickled1 = received_bytes_per_token(ref_path, q_path, 1)
        bpt2, pickled2 = received_bytes_per_token(ref_path, q_path, 2)
    finally:
        if not args.keep:
            for p in (ref_path, q_path, labels_path):
                if os.path.exists(p):
                    os.remove(p)

    res = {
        "machine": info, "ray": ray.__version__, "dump_bytes_each": total // 2, "tokens": n,
        "vocab": v, "dtype": "float16", "ray_init_s": start_s,
        "single_process_s": single_s, "single_process_gb_s": total / single_s / 1e9,
        "ray_tasks_default": k_default, "ray_s": ray_s, "ray_gb_s": total / ray_s / 1e9,
        "overhead_ratio": ray_s / single_s,
        "ray_tasks_many": k_many, "ray_many_s": many_s, **costs,
        "noop_task_round_trip_s": noop_latency_s, "noop_task_throughput_s": noop_throughput_s,
        "driver_bytes_per_token_1_model": bpt1, "driver_bytes_per_token_2_models": bpt2,
        "pickled_bytes_per_token_1_model": pickled1, "pickled_bytes_per_token_2_models": pickled2,
        "times": {"single": t_single, "ray": t_ray, "ray_many": t_many},
    }
    print(f"ray.init(num_cpus=2)             : {start_s:.2f} s")
    print(f"single process, 2 threads        : {single_s:.3f} s  {total / single_s / 1e9:6.2f} GB/s")
    print(f"Ray, 2 workers, {k_default:3d} tasks        : {ray_s:.3f} s  {total / ray_s / 1e9:6.2f} GB/s  "
          f"({ray_s / single_s:.2f}x the single process)")
    print(f"Ray, 2 workers, {k_many:3d} tasks        : {many_s:.3f} s  {total / many_s / 1e9:6.2f} GB/s  "
          f"({many_s / single_s:.2f}x)")
    print(f"{costs['tiny_tasks']} one-token tasks: {1e3 * costs['task_outside_body_s']:.2f} ms per task outside its "
          f"body (scheduling, transfers), body {1e3 * costs['task_body_median_s']:.2f} ms (opening 2 files, 1 row)")
    print(f"no-op task: round trip {1e3 * noop_latency_s:.2f} ms, {1e3 * noop_throughput_s:.2f} ms each in a batch of 500")
    print(f"driver receives {bpt1:.0f} B/token (1 model), {bpt2:.0f} B/token (2 models); "
          f"pickled {pickled1:.0f} / {pickled2:.0f}; the dumps are {2 * v} B/token per model")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
