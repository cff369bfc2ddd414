"""`fidelity-kld bench`: the microbenchmark suite on this machine (see fidelity_kld.bench)."""

from __future__ import annotations

import json
import sys

import click

from .._atomic import atomic_output


@click.command("bench")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--quick", is_flag=True, help="Small inputs and fewer cases: under a minute.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every number here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Save the scaling plot (PNG; needs matplotlib).")
@click.option("--no-torch", is_flag=True, help="Skip the torch baselines even if torch is installed.")
def command(device, quick, json_path, plot_path, no_torch):
    """Time the fused kernels, the llama.cpp decode path, streaming from files, the API's
    per-call overhead and the cohort analysis, against numpy/torch baselines and a memory
    roofline measured in the same run."""
    from .. import bench
    from ..io.paths import check_outputs

    try:
        check_outputs({"--json": json_path, "--plot": plot_path}, [])
    except ValueError as e:
        raise click.UsageError(str(e)) from None

    if device == "cuda":  # the GPU suite lives in the source tree (it needs torch/triton)
        import os
        import subprocess

        script = os.path.join("benchmarks", "bench_gpu.py")
        if not os.path.isfile(script):
            raise click.UsageError("--device cuda runs benchmarks/bench_gpu.py: run it from a "
                                   "source checkout")
        cmd = [sys.executable, script] + (["--json", json_path] if json_path else [])
        raise SystemExit(subprocess.call(cmd))
    # progress (one short line per case) on stderr; the tables once, on stdout
    result = bench.run_suite(quick=quick, torch_baselines=not no_torch,
                             log=lambda s: click.echo(s), progress=lambda s: click.echo(s, err=True))
    if json_path:
        with atomic_output(json_path) as tmp:
            with open(tmp, "w") as f:
                json.dump(result, f, indent=2)
    if plot_path:
        with atomic_output(plot_path, suffix=".png") as tmp:
            bench.plot_scaling(result, tmp)
    sys.stdout.flush()
