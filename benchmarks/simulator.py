"""Benchmark: the batch simulator's throughput, and a 1,000,000 x 90-day logged run.

1. Customer-days per second for the batch simulator with the full catalogue, compliance
   masks (rules + capacity) and the playbook policy (epsilon 0.1), one core, no logging;
   beside a bare numpy step with the same array shapes (the same deciders x actions mask
   gather and argmax, the same per-customer state updates, no domain logic), same run.
2. ``--full``: 1,000,000 customers x 90 days under the playbook, every decision logged to
   Parquet; wall time and peak resident memory. The simulation runs on one thread; Parquet
   compression runs on the log writer's thread, which may use the second core.

Run: ``.venv/bin/python benchmarks/simulator.py --full``. Last line is JSON:
``{"customer_days_per_s", "bare_numpy_customer_days_per_s", "ratio", "million_x_90_s",
"peak_rss_gib"}`` (the last two are null without ``--full``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time

import numpy as np

from nextbest.catalog import load_catalog
from nextbest.compliance import DEFAULT_RULES_PATH, RuleEngine, load_rules
from simulators.policies import PlaybookPolicy
from simulators.rollout import run_policy
from simulators.scenario import DEFAULT_SCENARIO, load_scenario
from simulators.world import BatchSimulator


def bare_numpy_days(n: int, n_actions: int, decision_rate: float, days: int, seed: int) -> float:
    """Seconds for ``days`` steps of a domain-free numpy loop with the simulator's shapes."""
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 256, (4096, n_actions), dtype=np.uint8)
    state = rng.random((8, n), dtype=np.float32)
    ring = np.zeros((30, n, 6), np.uint8)
    start = time.perf_counter()
    for day in range(days):
        deciders = np.flatnonzero(rng.random(n, dtype=np.float32) < decision_rate)
        codes = table[rng.integers(0, 4096, len(deciders))]
        allowed = codes == 255
        action = allowed.argmax(axis=1)
        state[:, deciders] += action.astype(np.float32)
        ring[day % 30, deciders, action % 6] += 1
        state *= np.float32(0.99)
        state[0] = np.where(rng.random(n, dtype=np.float32) < 0.01, 0.0, state[0])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=20)
    parser.add_argument("--full", action="store_true", help="also run 1,000,000 x 90 days")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    all_cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if all_cores is not None:
        os.sched_setaffinity(0, {min(all_cores)})  # one core for the throughput figures

    catalog = load_catalog()
    engine = RuleEngine(load_rules(DEFAULT_RULES_PATH, catalog))
    scenario = load_scenario(DEFAULT_SCENARIO, catalog)
    policy = PlaybookPolicy(catalog, 0.1)

    sim = BatchSimulator(scenario, catalog, engine, args.customers, seed=args.seed)
    run_policy(sim, policy, 2, np.random.default_rng(1))  # warm-up
    start = time.perf_counter()
    run_policy(sim, policy, args.days, np.random.default_rng(2))
    sim_s = time.perf_counter() - start
    cdps = args.customers * args.days / sim_s
    bare_s = bare_numpy_days(
        args.customers, catalog.n_actions, scenario.behaviour.decision_rate, args.days, 3
    )
    bare_cdps = args.customers * args.days / bare_s
    print(
        f"simulator     {cdps:,.0f} customer-days/s ({args.customers:,} x {args.days} days, "
        f"{sim_s:.2f} s; target >= 2,000,000)"
    )
    print(f"bare numpy    {bare_cdps:,.0f} customer-days/s ({bare_s:.2f} s)")
    print(f"ratio         {cdps / bare_cdps:.2f}")

    full_s: float | None = None
    peak_gib: float | None = None
    if args.full:
        if all_cores is not None:
            os.sched_setaffinity(0, all_cores)  # the log writer thread may use the other core
        out = tempfile.mkdtemp(prefix="nextbest-bench-")
        try:
            start = time.perf_counter()
            big = BatchSimulator(scenario, catalog, engine, 1_000_000, seed=args.seed)
            summary = run_policy(big, policy, 90, np.random.default_rng(4), log_dir=out)
            full_s = time.perf_counter() - start
            size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        finally:
            shutil.rmtree(out, ignore_errors=True)
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        print(
            f"1M x 90 days  {full_s:.1f} s, {summary.rows_logged:,} decisions logged "
            f"({size / 1024**3:.2f} GiB Parquet), peak RSS {peak_gib:.2f} GiB "
            "(targets <= 120 s, <= 8 GiB)"
        )
    print(
        json.dumps(
            {
                "customer_days_per_s": round(cdps),
                "bare_numpy_customer_days_per_s": round(bare_cdps),
                "ratio": round(cdps / bare_cdps, 3),
                "million_x_90_s": None if full_s is None else round(full_s, 1),
                "peak_rss_gib": None if peak_gib is None else round(peak_gib, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
