"""Benchmark: how good is the learned policy, judged by the simulator's ground truth.

Issue 4: log about 500,000 decisions from the playbook with epsilon 0.1, train the bandit
config, and judge it on customers the training never saw (the run's held-out customers) by
replaying the simulator: true value per decision against the playbook and the myopic oracle,
violations (chosen actions a rule blocks), complaints against the playbook's, and how close
the doubly-robust OPE estimate and its 95% interval come to the truth.

Targets: ``lift_vs_playbook`` >= 0.30, ``oracle_ratio`` >= 0.85, ``violations`` == 0,
``complaint_ratio`` <= 1, ``dr_rel_error`` <= 0.05, ``ci_covers`` true. Also reported (no
target): ``dr_ess``, the effective number of held-out decisions DR's importance-weighted
correction rests on, and ``dr_exact_*``: DR with the simulator's exact reward model, whose
distance from the truth is the correction's noise alone (``dr_exact_half_width``: half its
interval's width over the true value; above 0.05, no reward model gives DR a 5% accuracy to
rely on with this log).

Run: ``.venv/bin/python benchmarks/policy_quality.py --scenario configs/scenarios/retail_bank.yaml``
(and ``configs/scenarios/digital_bank.yaml``). Last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

# The project has a `training` package; keep this folder (with training.py) off the path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from nextbest.catalog import load_catalog  # noqa: E402
from nextbest.compliance import RuleEngine, load_rules  # noqa: E402
from simulators.ground_truth import ORACLE, SimulationRecipe, simulate_log  # noqa: E402
from training.config import load_training_config  # noqa: E402
from training.train import run_training  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PILOT_CUSTOMERS = 5_000


def customers_for(
    target: int, scenario: Path, days: int, seed: int, catalog, engine: RuleEngine
) -> int:
    """Customers that make about ``target`` decisions in ``days`` (from a small pilot run)."""
    pilot = SimulationRecipe.create(
        scenario, PILOT_CUSTOMERS, days, "playbook", 0.1, seed, catalog, engine
    )
    rows = int(simulate_log(pilot, catalog, engine, None).kpis.decisions.sum())
    if rows == 0:
        raise SystemExit(f"{scenario}: the playbook makes no decisions in {days} days")
    return max(1, math.ceil(target * PILOT_CUSTOMERS / rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario", type=Path, default=ROOT / "configs/scenarios/retail_bank.yaml"
    )
    parser.add_argument(
        "--config", type=Path, default=ROOT / "configs/training/neural_bandit_outcomes.yaml"
    )
    parser.add_argument("--decisions", type=int, default=500_000)
    parser.add_argument("--days", type=int, default=36)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rules", type=Path, default=ROOT / "configs/compliance/default.yaml")
    args = parser.parse_args()

    catalog = load_catalog()
    engine = RuleEngine(load_rules(args.rules, catalog))
    config = load_training_config(args.config)
    started = time.perf_counter()
    customers = customers_for(args.decisions, args.scenario, args.days, args.seed, catalog, engine)
    with tempfile.TemporaryDirectory(prefix="nextbest-policy-quality-") as tmp:
        work = Path(tmp)
        recipe = SimulationRecipe.create(
            args.scenario, customers, args.days, "playbook", 0.1, args.seed, catalog, engine
        )
        logged = simulate_log(recipe, catalog, engine, work / "logs").rows_logged
        simulated_s = time.perf_counter() - started
        config = config.model_copy(
            update={
                "data": config.data.model_copy(update={"logs": work / "logs"}),
                "tracking": config.tracking.model_copy(update={"uri": f"sqlite:///{work}/ml.db"}),
                "export": config.export.model_copy(update={"dir": work / "models"}),
                "evaluation": config.evaluation.model_copy(update={"ground_truth": True}),
            }
        )
        result = run_training(config, catalog, engine)
    if result.truth is None:
        raise SystemExit("no ground truth: the simulated log lost its recipe")
    truth = {str(row["policy"]): row for row in result.truth}
    dr = next(r for r in result.ope if r["policy"] == "model" and r["estimator"] == "dr")
    model, playbook, oracle = truth["model"], truth["logging"], truth[ORACLE]
    value = float(model["value"])
    figures = {
        "scenario": args.scenario.stem,
        "config": args.config.stem,
        "decisions": logged,
        "customers": customers,
        "playbook_value": round(float(playbook["value"]), 4),
        "bandit_value": round(value, 4),
        "oracle_value": round(float(oracle["value"]), 4),
        "lift_vs_playbook": round(value / float(playbook["value"]) - 1.0, 4),
        "oracle_ratio": round(value / float(oracle["value"]), 4),
        "violations": result.violations,
        "complaint_ratio": round(
            float(model["complaint_rate"]) / float(playbook["complaint_rate"]), 4
        ),
        "dr_value": round(float(dr["value"]), 4),
        "dr_lower": round(float(dr["lower"]), 4),
        "dr_upper": round(float(dr["upper"]), 4),
        "dr_rel_error": round(abs(float(dr["value"]) - value) / abs(value), 4),
        "ci_covers": bool(float(dr["lower"]) <= value <= float(dr["upper"])),
        "dr_ess": round(float(dr["ess"]), 1),
        "dr_exact_value": round(float(model["dr_exact_value"]), 4),
        "dr_exact_lower": round(float(model["dr_exact_lower"]), 4),
        "dr_exact_upper": round(float(model["dr_exact_upper"]), 4),
        "dr_exact_rel_error": round(abs(float(model["dr_exact_value"]) - value) / abs(value), 4),
        "dr_exact_half_width": round(
            (float(model["dr_exact_upper"]) - float(model["dr_exact_lower"])) / 2 / abs(value), 4
        ),
        "simulate_s": round(simulated_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
    }
    targets = {
        "lift_vs_playbook >= 0.30": figures["lift_vs_playbook"] >= 0.30,
        "oracle_ratio >= 0.85": figures["oracle_ratio"] >= 0.85,
        "violations == 0": figures["violations"] == 0,
        "complaint_ratio <= 1": figures["complaint_ratio"] <= 1.0,
        "dr_rel_error <= 0.05": figures["dr_rel_error"] <= 0.05,
        "ci_covers": figures["ci_covers"],
    }
    for row in result.ope:
        if row["policy"] in ("model", "logging"):
            print(
                f"ope {row['policy']:>8} {row['estimator']:>9} {float(row['value']):9.4f} "
                f"[{float(row['lower']):9.4f}, {float(row['upper']):9.4f}]"
            )
    for row in result.truth:
        print(f"truth {row['policy']:>14} {float(row['value']):9.4f}")
    print(
        f"DR with the exact reward model {figures['dr_exact_value']:.4f} "
        f"[{figures['dr_exact_lower']:.4f}, {figures['dr_exact_upper']:.4f}] for a true "
        f"{value:.4f}: the importance-weighted correction's noise alone"
    )
    for name, met in targets.items():
        print(f"{'met ' if met else 'MISS'}  {name}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
