"""Benchmark: training throughput.

Issue 4 asks for four figures: ``vw_ex_per_s``, ``vw_cli_ex_per_s``, ``vw_ratio`` (Vowpal
Wabbit through the project vs VW's own command-line driver) and ``neural_s_per_1m`` (one
epoch of the neural bandit over 1,000,000 logged decisions on 2 CPU cores).

Vowpal Wabbit, on a simulated playbook log (``retail_bank`` scenario, epsilon 0.3: real
contexts, about 110 allowed actions per decision) with the default ``vw_bandit`` config:

* ``vw_ex_per_s``: decisions per second of the project's learner end to end from the log's
  arrays, ``training.vw_bandit.train_vw_bandit``: input checks, writing the VW data file,
  VW learning through its parser, and the read-out of the weights as a linear model.
* ``vw_cli_ex_per_s``: ``python -m vowpalwabbit -d FILE <the same arguments>`` as a
  subprocess on the data file the project wrote (process start-up included), so VW's own
  driver pays for parsing and learning only, not for making the file.
* ``vw_ratio`` = ``vw_ex_per_s / vw_cli_ex_per_s`` (target >= 0.8). Each is the best of
  ``--repeats`` interleaved runs (the machine is noisy).

The neural figure is measured on a log of the real shapes with synthetic values.

Run: ``.venv/bin/python benchmarks/training.py``. Last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This file is named like the project's `training` package: keep its own folder off the
# import path so that `import training` finds the package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

from nextbest.catalog import ActionCatalog, load_catalog  # noqa: E402
from nextbest.compliance import DEFAULT_RULES_PATH, RuleEngine, load_rules  # noqa: E402
from nextbest.features import ContextEncoder, action_features  # noqa: E402
from simulators.policies import PlaybookPolicy  # noqa: E402
from simulators.rollout import run_policy  # noqa: E402
from simulators.scenario import DEFAULT_SCENARIO, load_scenario  # noqa: E402
from simulators.world import BatchSimulator  # noqa: E402
from training.config import VwBanditSpec  # noqa: E402
from training.logged_data import LoggedBandit, load_logged_bandit  # noqa: E402
from training.neural_bandit import NeuralBanditConfig, train_reward_model  # noqa: E402
from training.vw_bandit import train_vw_bandit, vw_arguments  # noqa: E402


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


def simulated_log(catalog: ActionCatalog, customers: int, days: int, out: Path) -> LoggedBandit:
    """A playbook log (epsilon 0.3) of the default scenario, loaded as arrays."""
    engine = RuleEngine(load_rules(DEFAULT_RULES_PATH, catalog))
    sim = BatchSimulator(load_scenario(DEFAULT_SCENARIO, catalog), catalog, engine, customers, 5)
    run_policy(sim, PlaybookPolicy(catalog, 0.3), days, np.random.default_rng(6), str(out))
    return load_logged_bandit(out, catalog.n_actions)


def vw_throughput(
    catalog: ActionCatalog, customers: int, days: int, repeats: int
) -> tuple[float, float, int]:
    """Best-of-``repeats`` decisions per second: (project learner, VW's CLI, decisions)."""
    spec = VwBanditSpec()
    with tempfile.TemporaryDirectory(prefix="bench-vw-") as scratch:
        log = simulated_log(catalog, customers, days, Path(scratch) / "log")
        data = Path(scratch) / "train.vw"
        cli = [sys.executable, "-m", "vowpalwabbit", *vw_arguments(spec), "--quiet"]
        project_s, cli_s = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            train_vw_bandit(log, catalog, spec, data_path=data)
            project_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            subprocess.run([*cli, "-d", str(data)], check=True, capture_output=True)
            cli_s.append(time.perf_counter() - start)
            mb = data.stat().st_size / 1e6
    n = log.n_rounds
    print(
        f"vowpal wabbit  {n:,} decisions ({log.candidates.sum() / n:.0f} allowed actions "
        f"each, {mb:.0f} MB data file): project {min(project_s):.2f} s "
        f"(runs {', '.join(f'{t:.2f}' for t in project_s)}), CLI {min(cli_s):.2f} s "
        f"(runs {', '.join(f'{t:.2f}' for t in cli_s)})"
    )
    return n / min(project_s), n / min(cli_s), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1_000_000)
    parser.add_argument("--vw-customers", type=int, default=24000)
    parser.add_argument("--vw-days", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    catalog = load_catalog()
    vw_per_s, cli_per_s, _ = vw_throughput(catalog, args.vw_customers, args.vw_days, args.repeats)
    ratio = vw_per_s / cli_per_s
    print(
        f"vowpal wabbit  project {vw_per_s:,.0f} decisions/s, VW CLI {cli_per_s:,.0f} "
        f"decisions/s: ratio {ratio:.2f} (target >= 0.8)"
    )
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
    print(
        json.dumps(
            {
                "vw_ex_per_s": round(vw_per_s),
                "vw_cli_ex_per_s": round(cli_per_s),
                "vw_ratio": round(ratio, 3),
                "neural_s_per_1m": round(per_1m, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
