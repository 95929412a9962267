"""Benchmark: training throughput.

Issue 4 asks for four figures: ``vw_ex_per_s``, ``vw_cli_ex_per_s``, ``vw_ratio`` (Vowpal
Wabbit through the project vs VW's own command-line driver) and ``neural_s_per_1m`` (one
epoch of the neural bandit over 1,000,000 logged decisions on 2 CPU cores). The Vowpal
Wabbit learner is not built yet, so its three figures print as null; the neural figure is
measured on a log of the real shapes (85 context features, 361 actions) with synthetic
values.

Run: ``.venv/bin/python benchmarks/training.py``. Last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# This file is named like the project's `training` package: keep its own folder off the
# import path so that `import training` finds the package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

from nextbest.catalog import load_catalog  # noqa: E402
from nextbest.features import ContextEncoder, action_features  # noqa: E402
from training.logged_data import LoggedBandit  # noqa: E402
from training.neural_bandit import NeuralBanditConfig, train_reward_model  # noqa: E402


def synthetic_log(n: int, n_features: int, n_actions: int, seed: int) -> LoggedBandit:
    """A log with the real array shapes and random content."""
    rng = np.random.default_rng(seed)
    candidates = rng.random((1, n_actions)) < 0.3
    candidates[:, 0] = True
    return LoggedBandit(
        context=rng.normal(size=(n, n_features)).astype(np.float32),
        action=rng.choice(np.flatnonzero(candidates[0]), n).astype(np.int64),
        reward=rng.normal(size=n),
        pscore=rng.uniform(0.01, 1.0, n),
        candidates=np.broadcast_to(candidates, (n, n_actions)),
        logging_dist=None,
        feature_spec_version="bench",
        ruleset_version="bench",
        catalog_version="bench",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1_000_000)
    args = parser.parse_args()
    catalog = load_catalog()
    encoder = ContextEncoder(catalog)
    log = synthetic_log(args.rounds, encoder.n_features, catalog.n_actions, 0)
    config = NeuralBanditConfig(epochs=1, loss="ips", threads=2)
    start = time.perf_counter()
    train_reward_model(log, action_features(catalog), config)
    seconds = time.perf_counter() - start
    per_1m = seconds * 1_000_000 / args.rounds
    print(
        f"neural bandit  one epoch over {args.rounds:,} decisions: {seconds:.1f} s "
        f"({per_1m:.1f} s per 1M; target <= 60 s on 2 cores)"
    )
    print("vowpal wabbit  not built yet: figures null")
    print(
        json.dumps(
            {
                "vw_ex_per_s": None,
                "vw_cli_ex_per_s": None,
                "vw_ratio": None,
                "neural_s_per_1m": round(per_1m, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
