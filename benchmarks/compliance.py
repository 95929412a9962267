"""Benchmark: the compliance mask for 100,000 customers x the full catalogue, on one core.

Baseline, measured in the same run: a plain per-customer, per-action Python loop over the
same rules (the reference semantics, ``Condition.holds``). The loop is timed on a subsample
and scaled to 100,000 customers (it would take many minutes in full); its answers are also
checked against the engine's.

Run: ``.venv/bin/python benchmarks/compliance.py`` (or ``make bench``). The last line is JSON:
``{"mask_100k_s", "naive_100k_s", "speedup", "single_customer_us_p50", "n_actions"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from nextbest.catalog import load_catalog
from nextbest.compliance import DEFAULT_RULES_PATH, RuleEngine, load_rules
from nextbest.compliance.reference import reference_blocked_by
from nextbest.synthetic import random_context_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--naive-sample", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core

    catalog = load_catalog()
    ruleset = load_rules(DEFAULT_RULES_PATH, catalog)
    engine = RuleEngine(ruleset)
    batch = random_context_batch(catalog, args.customers, np.random.default_rng(args.seed))

    engine.evaluate(batch.take(slice(0, 1000)))  # warm-up
    batch_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        verdict = engine.evaluate(batch)
        batch_times.append(time.perf_counter() - start)
    mask_s = min(batch_times)

    rows = [batch.row(i) for i in range(args.naive_sample)]
    start = time.perf_counter()
    naive = [reference_blocked_by(ruleset, row) for row in rows]
    naive_sample_s = time.perf_counter() - start
    naive_s = naive_sample_s * args.customers / args.naive_sample
    if not np.array_equal(np.array(naive), verdict.blocked_by[: args.naive_sample]):
        raise SystemExit("engine and naive loop disagree: benchmark void")

    single_rows = [batch.row(i) for i in range(20_000)]
    for row in single_rows[:1000]:
        engine.evaluate_row(row)
    single_ns = []
    for row in single_rows:
        start = time.perf_counter_ns()
        engine.evaluate_row(row)
        single_ns.append(time.perf_counter_ns() - start)
    single_us = statistics.median(single_ns) / 1000

    print(
        f"customers x actions      {args.customers:,} x {catalog.n_actions} ({len(ruleset)} rules)"
    )
    print(
        f"engine mask              {mask_s:.3f} s (best of {args.repeats}: "
        f"{', '.join(f'{t:.3f}' for t in batch_times)})"
    )
    print(
        f"naive loop               {naive_s:.1f} s (scaled from {args.naive_sample:,} customers"
        f" in {naive_sample_s:.2f} s)"
    )
    print(f"speedup                  {naive_s / mask_s:.0f}x")
    print(f"single customer p50      {single_us:.1f} us (target <= 30)")
    print(f"mask target <= 0.5 s     {'met' if mask_s <= 0.5 else 'MISSED'}")
    print(
        json.dumps(
            {
                "mask_100k_s": round(mask_s, 4),
                "naive_100k_s": round(naive_s, 2),
                "speedup": round(naive_s / mask_s, 1),
                "single_customer_us_p50": round(single_us, 2),
                "n_actions": catalog.n_actions,
            }
        )
    )


if __name__ == "__main__":
    main()
