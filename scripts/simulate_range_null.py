"""Size and power of the cohort analysis's range-restriction null, on simulated cohorts.

    python scripts/simulate_range_null.py --cohorts 200 --draws 300

For each design, `--cohorts` cohorts are simulated twice: once with the full-cohort relation
holding inside the silent zone (loss proportional to KLD everywhere, plus benchmark noise),
where the null should reject (p < 0.05) in about 5% of cohorts (its size), and once with the
zone's losses real but scrambled against KLD, where it should reject often (its power). Per
design it prints both rejection rates, the median simulated zone size against the observed
one and the share of null draws kept. Runs the installed fidelity_kld (or the one on
PYTHONPATH), so the same command measures the code before and after a change.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fidelity_kld.stats.cohort_data import Cohort
from fidelity_kld.stats.correlation import Correlation, correlate
from fidelity_kld.stats import zone as zone_module
from fidelity_kld.stats.zone import (prompt_bootstrap_deviations, range_restriction_null,
                                     relative_change, zone_mask)

THRESHOLD = 0.02


def _ref(p, rate, rng):
    ref = np.zeros(p)
    ref[rng.permutation(p)[: int(rate * p)]] = 1
    return ref


def _lose(ref, n, rng):
    """The reference row with n of its solved prompts turned to failures."""
    row = ref.copy()
    solved = np.flatnonzero(ref == 1)
    row[rng.choice(solved, min(int(n), solved.size), replace=False)] = 0
    return row


# Each design: tasks as (prompts, reference pass rate), the models' KLDs, and the loss
# (fraction of the reference's solved prompts lost) as a function of KLD.
DESIGNS = {
    # one task of 1,000 prompts, 20 models on a log grid of KLD; about 12 in the zone
    "one-task-1000": dict(tasks=((1000, 0.7),), kld=np.geomspace(0.001, 1.0, 20), slope=0.3),
    # the shape: two tasks of 560 and 800 prompts, 24 models, about 15 in the zone
    "two-tasks-560-800": dict(tasks=((560, 0.45), (800, 0.55)), kld=np.geomspace(0.0005, 1.5, 24), slope=0.3),
    # a large benchmark: 4,000 prompts, 16 models, about 9 in the zone
    "one-task-4000": dict(tasks=((4000, 0.7),), kld=np.geomspace(0.002, 0.6, 16), slope=0.3),
}


def simulate(design: dict, scrambled: bool, rng) -> Cohort:
    kld = design["kld"]
    loss_rate = design["slope"] * kld
    if scrambled:
        # the models within 2% of the reference in expectation (the composite's relative
        # change is the share of solved prompts lost) lose the same amounts, in an order
        # unrelated to KLD
        near = loss_rate < THRESHOLD
        loss_rate = loss_rate.copy()
        loss_rate[near] = rng.permutation(loss_rate[near])
    scores, ids = {}, {}
    for j, (p, rate) in enumerate(design["tasks"]):
        ref = _ref(p, rate, rng)
        rows = [ref] + [_lose(ref, rng.poisson(lr * ref.sum()), rng) for lr in loss_rate]
        scores[f"t{j}"] = np.array(rows)
        ids[f"t{j}"] = tuple(map(str, range(p)))
    return Cohort("ref", tuple(f"q{i}" for i in range(kld.size)), tuple(scores), ids, scores,
                  {"kld_mean": kld})


def null_for(cohort: Cohort, draws: int, rng):
    x = cohort.variants["kld_mean"]
    comp = cohort.composite()
    zone = zone_mask(relative_change(comp), THRESHOLD)
    full = correlate(x, comp[1:], n_bootstrap=0)
    obs = correlate(np.where(zone, x, np.nan), comp[1:], n_bootstrap=0)
    dev = prompt_bootstrap_deviations(cohort, draws, rng)
    if hasattr(zone_module, "effective_prompts"):
        null, _ = range_restriction_null(x, comp, zone, THRESHOLD, full, obs, dev, 0.0,
                                         zone_module.effective_prompts(cohort))
    else:  # the code before the flip-count floor
        null, _ = range_restriction_null(x, comp, zone, THRESHOLD, full, obs, dev, 0.0)
    return null, int(zone.sum()), obs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cohorts", type=int, default=200)
    ap.add_argument("--draws", type=int, default=300, help="null draws per cohort")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--designs", default=",".join(DESIGNS))
    args = ap.parse_args()
    print(f"{'design':<20} {'truth':<10} {'cohorts':>7} {'p<0.05':>7} {'zone n obs':>10} "
          f"{'sim zone n':>10} {'kept':>6}")
    for name in args.designs.split(","):
        for scrambled in (False, True):
            rng = np.random.default_rng([args.seed, zlib_key(name), int(scrambled)])
            rejected, zones, sims, kept, n = 0, [], [], [], 0
            t0 = time.perf_counter()
            for _ in range(args.cohorts):
                null, zone_n, obs = null_for(simulate(DESIGNS[name], scrambled, rng), args.draws, rng)
                if null.status != "ok" or not isinstance(obs, Correlation) or not obs.ok:
                    continue
                n += 1
                rejected += null.p < 0.05
                zones.append(zone_n)
                if hasattr(null, "zone_size_median"):
                    sims.append(null.zone_size_median)
                    kept.append(null.kept_fraction)
                else:  # the code before the null reported its simulated zones
                    sims.append(np.nan)
                    kept.append(null.draws / args.draws)
            print(f"{name:<20} {'scrambled' if scrambled else 'holds':<10} {n:>7} {rejected / max(n, 1):>7.1%} "
                  f"{np.median(zones):>10.1f} {np.median(sims) if sims else np.nan:>10.1f} "
                  f"{np.median(kept):>6.0%}   ({time.perf_counter() - t0:.0f} s)", flush=True)


def zlib_key(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


if __name__ == "__main__":
    main()
