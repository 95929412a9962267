"""The ``nextbest`` command line: the one module that wires the rooms together."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Annotated, Any, cast

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nextbest.catalog import DEFAULT_CATALOG_DIR, ActionCatalog, load_catalog
from nextbest.compliance import DEFAULT_RULES_PATH, RuleEngine, RuleSet, load_rules
from nextbest.config_loading import MAX_BOOTSTRAP, MAX_SEED, ConfigError
from nextbest.features import ContextEncoder
from nextbest.rewards import ATTRIBUTION_WINDOW
from nextbest.segments import VALUE_TIERS, value_tier
from nextbest.synthetic import random_context_batch

app = typer.Typer(
    name="nextbest",
    help="Next-best-action for retail-bank marketing: channel, offer and timing under compliance.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(soft_wrap=True)
PIPED_WIDTH = 200
"""Columns a table may take when the output is not a terminal (a file, a pager, a test):
rich would otherwise assume 80 and cut names short."""


def _print_table(table: Table, min_width: int = 0) -> None:
    """Print ``table`` as wide as the terminal (at least ``min_width``), or, piped, as wide
    as it needs up to :data:`PIPED_WIDTH`."""
    width = console.width if console.is_terminal else PIPED_WIDTH
    Console(width=max(width, min_width)).print(table)


SCENARIOS_DIR = DEFAULT_CATALOG_DIR.parent / "scenarios"
DEFAULT_TRAINING_CONFIG = DEFAULT_CATALOG_DIR.parent / "training" / "neural_bandit_outcomes.yaml"
"""The factorised outcome model: the best measured on small (the demo's) and large logs."""


MAX_CUSTOMERS = 50_000_000
"""A simulated population at most (a million customers take ~1.8 GiB)."""


class PolicyName(StrEnum):
    """Logging policies the simulator can run."""

    playbook = "playbook"
    uniform = "uniform"


CatalogOption = Annotated[
    Path, typer.Option("--catalog", help="Directory with channels.yaml, offers.yaml, timing.yaml.")
]
RulesOption = Annotated[Path, typer.Option("--rules", help="Compliance rule-set YAML file.")]
SinceOption = Annotated[
    str | None,
    typer.Option(
        help="Only the decisions made at or after this time: ISO 8601 with a time zone "
        "(2026-11-20T00:00:00+08:00). A live journal spans several model and rule-set "
        "versions, which one run cannot mix."
    ),
]
UntilOption = Annotated[
    str | None,
    typer.Option(help="Only the decisions made before this time (ISO 8601, with a time zone)."),
]
JournalOption = Annotated[
    Path, typer.Option(help="The service's state directory or its journal.db.")
]
DEFAULT_STATE_DIR = Path("data/serving")
AttributionDaysOption = Annotated[
    float,
    typer.Option(
        min=0.0,
        help="The service's attribution window, in days (NEXTBEST_ATTRIBUTION_WINDOW): "
        "decisions whose outcome may still be reported are left alone.",
    ),
]


def _moment_option(name: str, value: str | None) -> datetime | None:
    """Option ``name``'s ``value`` as a time with a time zone (None when not given); exit 2
    with the reason otherwise."""
    if value is None:
        return None
    from pydantic import AwareDatetime, TypeAdapter, ValidationError

    try:
        return TypeAdapter(AwareDatetime).validate_python(value)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"]
        console.print(
            f"[bold red]bad {name}[/] {escape(repr(value))}: {escape(reason)} (ISO 8601 with "
            "a time zone, such as 2026-11-20T00:00:00+08:00)"
        )
        raise typer.Exit(code=2) from None


def _load(catalog_dir: Path, rules_path: Path) -> tuple[ActionCatalog, RuleSet]:
    """The catalogue and rule set; exit 2 naming the file and key at fault."""
    catalog = _load_catalog(catalog_dir)
    try:
        return catalog, load_rules(rules_path, catalog)
    except ConfigError as exc:
        console.print(f"[bold red]config error[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from None


def _load_catalog(catalog_dir: Path) -> ActionCatalog:
    """The catalogue; exit 2 naming the file and key at fault."""
    try:
        return load_catalog(catalog_dir)
    except ConfigError as exc:
        console.print(f"[bold red]config error[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from None


@app.command()
def check(
    catalog_dir: CatalogOption = DEFAULT_CATALOG_DIR,
    rules_path: RulesOption = DEFAULT_RULES_PATH,
) -> None:
    """Validate the catalogue and rule set; print their versions (exit 2 on a bad config)."""
    catalog, ruleset = _load(catalog_dir, rules_path)
    RuleEngine(ruleset)
    encoder = ContextEncoder(catalog)
    console.print(f"catalogue  {catalog.n_actions} actions, version {catalog.version}")
    console.print(f"rule set   {ruleset.name!r}, {len(ruleset)} rules, version {ruleset.version}")
    console.print(f"features   {encoder.n_features} context features, spec {encoder.spec.version}")


@app.command()
def catalog(
    catalog_dir: CatalogOption = DEFAULT_CATALOG_DIR,
) -> None:
    """Print the action catalogue: offers with their risk level, eligibility and channels."""
    cat = _load_catalog(catalog_dir)
    table = Table(title=f"{cat.n_actions} actions (catalogue {cat.version})")
    for col in ("offer", "family", "risk", "min AUM", "ages", "value CNY", "channels", "ids"):
        table.add_column(col)
    for i, offer in enumerate(cat.offers):
        ids = np.flatnonzero(cat.offer_index == i)
        table.add_row(
            offer.name,
            offer.family,
            f"R{offer.risk_level}" if offer.risk_level else "-",
            f"{offer.min_aum_cny:,.0f}",
            f"{offer.min_age}-{offer.max_age}",
            f"{offer.value_cny:,.0f}",
            ", ".join(offer.channels),
            f"{ids.min()}-{ids.max()}",
        )
    _print_table(table)


@app.command(
    short_help="Simulate, train, evaluate, register and serve a policy, end to end.",
)
def demo(
    customers: Annotated[
        int, typer.Option(min=1, max=MAX_CUSTOMERS, help="Customers in the simulation.")
    ] = 5_000,
    days: Annotated[int, typer.Option(min=1, max=365, help="Days to simulate.")] = 30,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Random seed.")] = 7,
    out: Annotated[Path, typer.Option(help="Where the demo writes its run folders.")] = Path(
        "data/demo"
    ),
    tracking_uri: Annotated[
        str, typer.Option(help="MLflow tracking URI for the demo's training run.")
    ] = "sqlite:///mlflow.db",
    catalog_dir: CatalogOption = DEFAULT_CATALOG_DIR,
    rules_path: RulesOption = DEFAULT_RULES_PATH,
) -> None:
    """Run the loop end to end: simulate a small population under the bank's playbook
    (logging every decision), train a neural bandit on the log, evaluate it off-policy and
    register it in MLflow, show what the compliance rules allow and why not, then start the
    scoring service on the registered model, send it a few requests over HTTP and stop it."""
    from nextbest.model_source import unwritable_directory
    from training.tracking import tracking_client

    try:  # before the simulation: a bad URI would only show after it
        tracking_client(tracking_uri)
    except ValueError as exc:
        console.print(f"[bold red]bad --tracking-uri[/] {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    problem = unwritable_directory(out)
    if problem:
        console.print(f"[bold red]bad --out[/] {escape(str(out))} {escape(problem)}")
        raise typer.Exit(code=2)
    run_dir = out / datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S-%f")
    console.rule("[bold]nextbest demo 1/4: simulate the playbook")
    simulate(
        scenario=SCENARIOS_DIR / "retail_bank.yaml",
        customers=customers,
        days=days,
        policy=PolicyName.playbook,
        epsilon=0.1,
        seed=seed,
        out=run_dir / "logs",
        catalog_dir=catalog_dir,
        rules_path=rules_path,
    )
    console.rule("[bold]nextbest demo 2/4: train, evaluate off-policy, register in MLflow")
    try:
        train(
            config=DEFAULT_TRAINING_CONFIG,
            logs=[run_dir / "logs"],
            tracking_uri=tracking_uri,
            epochs=None,
            export_dir=run_dir / "models",
            catalog_dir=catalog_dir,
        )
    except typer.Exit as exc:
        if exc.exit_code == 2:  # its config, catalogue and tracking URI are checked: the log
            console.print(
                "[yellow]the demo trains on the log it just simulated[/]: give it more "
                f"--customers or --days (now {customers:,} and {days}; defaults 5,000 and 30)"
            )
        raise
    rules_demo(customers=customers, seed=seed, catalog_dir=catalog_dir, rules_path=rules_path)
    serving_demo(
        model="models:/nextbest@challenger",
        tracking_uri=tracking_uri,
        state_dir=run_dir / "serving",
        catalog_dir=catalog_dir,
        rules_path=rules_path,
    )


def rules_demo(customers: int, seed: int, catalog_dir: Path, rules_path: Path) -> None:
    """Score a random sample population against the rules; print what is blocked and why."""
    cat, ruleset = _load(catalog_dir, rules_path)
    engine = RuleEngine(ruleset)
    console.rule("[bold]nextbest demo 3/4: compliance over a sample population")
    console.print(
        f"catalogue {cat.version}: {cat.n_actions} actions; "
        f"rule set {ruleset.name!r} {ruleset.version}: {len(ruleset)} rules"
    )
    batch = random_context_batch(cat, customers, np.random.default_rng(seed))
    verdict = engine.evaluate(batch)
    features = ContextEncoder(cat).encode(batch)
    console.print(
        f"{customers:,} customers x {cat.n_actions} actions; "
        f"{verdict.allowed.mean():.1%} of pairs allowed; "
        f"features {features.shape}"
    )

    counts = verdict.block_counts()
    customers_hit = {
        rule_id: int((verdict.blocked_by == i).any(axis=1).sum())
        for i, rule_id in enumerate(verdict.rule_ids)
    }
    table = Table(title="Why actions were blocked (first blocking rule per pair)")
    table.add_column("rule")
    table.add_column("blocked pairs", justify="right")
    table.add_column("share of pairs", justify="right")
    table.add_column("customers affected", justify="right")
    total = verdict.blocked_by.size
    for rule in ruleset.rules:
        table.add_row(
            rule.id,
            f"{counts[rule.id]:,}",
            f"{counts[rule.id] / total:.1%}",
            f"{customers_hit[rule.id]:,}",
        )
    _print_table(table)

    tiers = value_tier(batch["aum_cny"])
    by_tier = Table(title="Allowed contact actions per customer, by value tier")
    by_tier.add_column("tier")
    by_tier.add_column("customers", justify="right")
    by_tier.add_column("mean allowed", justify="right")
    by_tier.add_column("only 'wait' allowed", justify="right")
    contact_allowed = verdict.allowed[:, 1:].sum(axis=1)
    for t, name in enumerate(VALUE_TIERS):
        sel = tiers == t
        if sel.any():
            by_tier.add_row(
                name,
                f"{sel.sum():,}",
                f"{contact_allowed[sel].mean():.1f}",
                f"{(contact_allowed[sel] == 0).mean():.1%}",
            )
    console.print(by_tier)

    console.rule("[bold]three customers explained")
    for i in range(3):
        row = batch.row(i)
        allowed_ids = np.flatnonzero(verdict.allowed[i])
        sample = ", ".join(cat.actions[a].name for a in allowed_ids[1:4]) or "(only no_contact)"
        console.print(
            f"customer {i}: age {row['age']:.0f}, AUM {row['aum_cny']:,.0f} CNY, "
            f"tolerance C{row['risk_tolerance'] or '-'}: "
            f"{len(allowed_ids)} allowed, e.g. {sample}"
        )
        for name in (
            "app_push:wealth_r5:now",
            "sms:consumer_loan:now",
            "relationship_manager:family_trust:morning",
        ):
            a = cat.action_id(name)
            why = engine.explain_row(row, a)
            console.print(
                f"    {name}: " + ("allowed" if not why else "blocked by " + ", ".join(why))
            )


def serving_demo(
    model: str, tracking_uri: str, state_dir: Path, catalog_dir: Path, rules_path: Path
) -> None:
    """Start ``nextbest serve`` on ``model``, send it real HTTP requests, print the answers,
    stop it."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    console.rule("[bold]nextbest demo 4/4: the scoring service over HTTP")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "NEXTBEST_ENVIRONMENT": "local",
        "NEXTBEST_STATE_DIR": str(state_dir),
        "NEXTBEST_TRACKING_URI": tracking_uri,
        "NEXTBEST_CATALOG_DIR": str(catalog_dir),
        "NEXTBEST_RULES_PATH": str(rules_path),
    }
    command = [sys.executable, "-m", "nextbest", "serve", "--port", str(port), "--model", model]
    console.print(f"$ nextbest serve --port {port} --model {model}")
    server = subprocess.Popen(command, env=env)

    def call(method: str, path: str, body: object | None = None) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw, status = resp.read(), resp.status
        except urllib.error.HTTPError as err:
            raw, status = err.read(), err.code
        text = raw.decode()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def show(method: str, path: str, body: object | None = None) -> object:
        status, answer = call(method, path, body)
        console.print(f"[bold]{method} {path}[/] -> {status}")
        console.print_json(data=answer) if not isinstance(answer, str) else console.print(answer)
        return answer

    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                console.print("[bold red]the service exited before it was ready[/]")
                raise typer.Exit(code=1)
            try:
                if call("GET", "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                console.print("[bold red]the service did not become ready in 120 s[/]")
                raise typer.Exit(code=1)
            time.sleep(0.2)
        show("GET", "/readyz")
        customer = {
            "customer_id": "demo-customer-0001",
            "age": 31,
            "aum_cny": 180_000.0,
            "income_band": "middle",
            "risk_tolerance": "C3",
            "risk_assessed_on": (datetime.now(UTC).date().replace(day=1)).isoformat(),
            "lifecycle_stage": "growth",
            "tenure_months": 18,
            "app_logins_30d": 11,
            "consented_channels": ["app_push", "sms", "wechat"],
            "events": {"offer_views_30d": {"fund_sip": 4}, "usual_login_hour": 20},
        }
        decision = show(
            "POST", "/v1/decisions", {"customer": customer, "k": 3, "campaign_id": "always_on"}
        )
        show(
            "POST",
            "/v1/decisions",
            {
                "customer": {
                    **customer,
                    "customer_id": "demo-customer-0002",
                    "age": 67,
                    "risk_tolerance": "C1",
                },
                "k": 2,
                "explain": True,
            },
        )
        show(
            "POST",
            "/v1/decisions/batch",
            {
                "customers": [{**customer, "customer_id": f"demo-batch-{i}"} for i in range(3)],
                "k": 2,
            },
        )
        show(  # the same batch form for a whole campaign, one array per field
            "POST",
            "/v1/decisions/batch",
            {
                "columns": {
                    "customer_id": ["demo-column-0", "demo-column-1"],
                    "age": [29, 58],
                    "aum_cny": [35_000.0, 2_400_000.0],
                    "income_band": ["low", "very_high"],
                    "risk_tolerance": ["C2", "C4"],
                    "risk_assessed_on": [customer["risk_assessed_on"]] * 2,
                    "lifecycle_stage": ["new", "mature"],
                    "tenure_months": [3, 140],
                    "app_logins_30d": [25, 2],
                    "consented_channels": [["app_push", "sms"], ["sms", "outbound_call"]],
                    "offer_views_30d": {"fund_sip": [4, 0]},
                },
                "k": 2,
            },
        )
        if isinstance(decision, dict) and "decision_id" in decision:
            reward = {"decision_id": decision["decision_id"], "converted": True, "value_cny": 300.0}
            show("POST", "/v1/rewards", reward)
            show("POST", "/v1/rewards", reward)
        show("POST", "/v1/decisions", {"customer": {**customer, "age": -3}, "k": 0})
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        console.print(f"service stopped; its journal is {state_dir / 'journal.db'}")


@app.command(
    short_help="Run the scoring API on the registry's champion or an ONNX file.",
)
def serve(
    model: Annotated[
        str | None,
        typer.Option(
            help="An .onnx file, models:/<name>@<alias> (or /<version>) or runs:/<run id>/<path> "
            "(default: NEXTBEST_MODEL_URI, else models:/nextbest@champion)."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes.")] = 1,
) -> None:
    """Run the scoring API (uvicorn with uvloop and httptools). Settings come from the
    NEXTBEST_* environment (see serving/settings.py); outside NEXTBEST_ENVIRONMENT=local the
    unsafe development defaults are refused."""
    import os
    import socket

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from serving.http_protocol import CoalescingHttpToolsProtocol
    from serving.metrics import multiprocess_dir
    from serving.pseudonym_binding import PseudonymKeyError, bind_pseudonym_key
    from serving.reuse_port import (
        STARTUP_FAILURE,
        ReusePortListener,
        check_port_free,
        reuse_port_supported,
    )
    from serving.security import KeyFileError
    from serving.service import load_configuration
    from serving.settings import SettingsError, load_settings, unknown_variables
    from serving.supervision import mark_supervisor

    if model is not None:
        os.environ["NEXTBEST_MODEL_URI"] = model
    for variable in unknown_variables(os.environ):
        console.print(f"[yellow]not a setting, ignored[/]: {escape(variable)}")
    try:
        settings = load_settings()  # validated here, once more in each worker
        load_configuration(settings)  # the files too: each worker reads them again
        bind_pseudonym_key(settings.state_dir, settings.pseudonym_key, record=False)
    except PseudonymKeyError as exc:
        console.print(f"[bold red]cannot serve[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    except SettingsError as exc:
        console.print(f"[bold red]bad settings[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    except (ConfigError, KeyFileError) as exc:
        console.print(f"[bold red]config error[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    options: dict[str, Any] = {
        "factory": True,
        "host": host,
        "port": port,
        "workers": workers,
        "loop": "uvloop",
        "http": CoalescingHttpToolsProtocol,  # httptools, one write per answer
        "access_log": False,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": 30,
    }
    reuse_port = workers > 1 and reuse_port_supported()
    if reuse_port:  # before anything is written: another server may be using the state
        try:
            check_port_free(host, port)
        except OSError as exc:
            console.print(f"[bold red]cannot serve[/]: {escape(str(exc))}")
            raise typer.Exit(code=STARTUP_FAILURE) from None
    if workers > 1:  # every worker writes its samples here; /metrics adds them up
        metrics_dir = multiprocess_dir(settings.state_dir, os.getpid())
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())
        mark_supervisor()  # a worker stops if this process is killed
    if not reuse_port:
        uvicorn.run("serving.app:create_app", **options)
        return
    # a listening socket per worker, so that connections spread evenly over the workers
    console.print(f"serving on http://{host}:{port} with {workers} workers, a socket each")
    listener = cast(socket.socket, ReusePortListener(host, port))
    supervisor = Multiprocess(uvicorn.Config("serving.app:create_app", **options), [listener])
    supervisor.run()
    if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes):
        raise typer.Exit(code=STARTUP_FAILURE)  # a worker could not start: the supervisor stopped


@app.command()
def simulate(
    scenario: Annotated[
        Path, typer.Option(help="Scenario YAML (population and behaviour).")
    ] = SCENARIOS_DIR / "retail_bank.yaml",
    customers: Annotated[
        int, typer.Option(min=1, max=MAX_CUSTOMERS, help="Population size.")
    ] = 100_000,
    days: Annotated[int, typer.Option(min=1, max=3650, help="Days to simulate.")] = 90,
    policy: Annotated[PolicyName, typer.Option(help="Logging policy.")] = PolicyName.playbook,
    epsilon: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Exploration rate of the playbook.")
    ] = 0.1,
    seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="Random seed (same seed, same run).")
    ] = 7,
    out: Annotated[
        Path | None, typer.Option(help="Directory for the decision log (Parquet) and KPIs.")
    ] = None,
    catalog_dir: CatalogOption = DEFAULT_CATALOG_DIR,
    rules_path: RulesOption = DEFAULT_RULES_PATH,
) -> None:
    """Simulate customer journeys under a logging policy; log decisions and print KPIs."""
    from rich.progress import Progress

    from nextbest.model_source import unwritable_directory
    from simulators.ground_truth import SimulationRecipe, simulate_log
    from simulators.scenario import load_scenario

    cat, ruleset = _load(catalog_dir, rules_path)
    try:
        world = load_scenario(scenario, cat)
    except ConfigError as exc:
        console.print(f"[bold red]config error[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    problem = None if out is None else unwritable_directory(out)
    if problem:
        console.print(f"[bold red]bad --out[/] {escape(str(out))} {escape(problem)}")
        raise typer.Exit(code=2)
    if out is not None and out.exists() and any(out.glob("*.parquet")):
        console.print(
            f"[bold red]refused[/]: {escape(str(out))} already holds a decision log; "
            "choose a new --out"
        )
        raise typer.Exit(code=2)
    engine = RuleEngine(ruleset)
    recipe = SimulationRecipe.create(
        scenario, customers, days, policy.value, epsilon, seed, cat, engine
    )
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"simulating {customers:,} customers", total=days)
        summary = simulate_log(recipe, cat, engine, out, on_day=lambda _day: progress.advance(task))
    rows = summary.table()
    table = Table(title=f"{world.name}: {policy.value} (epsilon {epsilon:g}), {days} days")
    headers = {
        "segment": "segment",
        "customers": "customers",
        "decisions": "decisions",
        "contact_rate": "contact",
        "conversion_per_contact": "conv/contact",
        "complaints_per_contact": "compl/contact",
        "opt_outs_per_contact": "opt-out/contact",
        "monthly_churn": "churn/month",
        "value_per_customer": "value/cust",
    }
    for key, label in headers.items():
        table.add_column(label, justify="left" if key == "segment" else "right")
    for row in rows:
        table.add_row(*[_fmt(key, row[key]) for key in headers])
    _print_table(table, 130)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "kpis.json").write_text(
            json.dumps(
                {
                    "scenario": world.name,
                    "policy": policy.value,
                    "epsilon": epsilon if policy == PolicyName.playbook else 1.0,
                    "seed": seed,
                    "customers": customers,
                    "days": days,
                    "segments": rows,
                },
                indent=2,
            )
        )
        console.print(f"logged {summary.rows_logged:,} decisions to {out}")
    else:
        console.print("no --out: the KPIs above only, no decision log written")


@app.command(
    short_help="Off-policy evaluation of a decision log; prints the OPE table.",
)
def evaluate(
    logs: Annotated[
        list[Path],
        typer.Option(
            help="Decision log: a .parquet file, a directory of parts, .csv or a service "
            "journal; repeat it to evaluate several as one (a journal and its archive)."
        ),
    ],
    policy: Annotated[
        list[str] | None,
        typer.Option(help="Target policy to evaluate (repeatable): logging, uniform, no_contact."),
    ] = None,
    estimator: Annotated[
        list[str] | None,
        typer.Option(
            help="Estimator (repeatable): ips, snips, dm, dr, switch-dr. Default: every one "
            "the log supports (IPS, SNIPS and DR need its pscore; DM and DR need --model)."
        ),
    ] = None,
    alpha: Annotated[float, typer.Option(min=0.001, max=0.5, help="1 - confidence level.")] = 0.05,
    bootstrap: Annotated[
        int, typer.Option(min=10, max=MAX_BOOTSTRAP, help="Bootstrap resamples.")
    ] = 1000,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Bootstrap seed.")] = 0,
    model: Annotated[
        str | None,
        typer.Option(
            help="Also evaluate a model acting greedily over the allowed actions: an .onnx "
            "file, models:/<name>@<alias> (or /<version>) or runs:/<run id>/<path> (DM, DR and "
            "Switch-DR then use its scores)."
        ),
    ] = None,
    tracking_uri: Annotated[
        str, typer.Option(help="MLflow tracking URI for models:/ URIs.")
    ] = "sqlite:///mlflow.db",
    drop_pending: Annotated[
        bool,
        typer.Option(
            help="Leave out decisions whose outcome is not known yet (a live service's "
            "journal has some); without it they are refused."
        ),
    ] = False,
    since: SinceOption = None,
    until: UntilOption = None,
    catalog_dir: CatalogOption = DEFAULT_CATALOG_DIR,
) -> None:
    """Off-policy evaluation of target policies on a decision log (IPS and SNIPS with
    bootstrap intervals, and DM/DR/Switch-DR for a --model); prints the OPE table. A log
    without propensities is valued by DM only (with a --model)."""
    from nextbest.decision_log import DecisionLogError
    from nextbest.model_source import ModelSourceError
    from training.evaluation import (
        BASELINE_POLICIES,
        baseline_action_dist,
        choose_estimators,
        model_scores,
        no_estimator_message,
        ope_table,
        reasons_left_out,
    )
    from training.logged_data import describe_logs, load_logged_bandit
    from training.neural_bandit import greedy_policy
    from training.ope import ESTIMATORS, OpeInputError

    cat = _load_catalog(catalog_dir)
    names = policy or list(BASELINE_POLICIES)
    unknown = [p for p in names if p not in BASELINE_POLICIES]
    if unknown:
        console.print(
            f"[bold red]bad --policy[/] {escape(unknown[0])!r}: known {list(BASELINE_POLICIES)}"
        )
        raise typer.Exit(code=2)
    unknown = [e for e in estimator or [] if e not in ESTIMATORS]
    if unknown:
        console.print(
            f"[bold red]bad --estimator[/] {escape(unknown[0])!r}: known {list(ESTIMATORS)}"
        )
        raise typer.Exit(code=2)
    left_out: dict[str, str] = {}
    try:
        log = load_logged_bandit(
            logs,
            cat.n_actions,
            drop_pending=drop_pending,
            since=_moment_option("--since", since),
            until=_moment_option("--until", until),
        )
        if log.catalog_version != cat.version:
            raise DecisionLogError(
                describe_logs(logs),
                "catalog_version",
                f"the log was made with catalogue {log.catalog_version}, this is {cat.version}",
            )
        if not policy and log.logging_dist is None:
            names = [name for name in names if name != "logging"]  # no logged distribution
        # made one at a time by the table (each is (n, A) float64)
        dists: dict[str, Callable[[], np.ndarray]] = {
            name: partial(baseline_action_dist, name, log) for name in names
        }
        scores = None
        if model is not None:
            resolved, scores = model_scores(model, tracking_uri, log)
            greedy = partial(greedy_policy, scores, log.candidates)
            dists = {f"model {resolved.version}": greedy, **dists}
        usable, left_out = choose_estimators(
            estimator or tuple(ESTIMATORS), log, scores is not None
        )
        if estimator and left_out:  # asked for by name: refused, not silently dropped
            name, why = next(iter(left_out.items()))
            raise ValueError(f"--estimator {name}: {why}{_estimator_hint(why)}")
        if not usable:
            message = no_estimator_message(left_out)
            raise ValueError(f"{message}{_estimator_hint(message)}")
        rows = ope_table(
            log,
            dists,
            estimators=usable,
            estimated_rewards=scores,
            alpha=alpha,
            n_bootstrap_samples=bootstrap,
            seed=seed,
        )
    except (DecisionLogError, OpeInputError, ModelSourceError, ValueError) as exc:
        console.print(f"[bold red]cannot evaluate[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    _print_ope_table(
        f"Off-policy evaluation: {log.n_rounds:,} logged decisions, "
        f"mean logged reward {log.reward.mean():.4f}",
        rows,
        alpha,
    )
    for why, names_left_out in reasons_left_out(left_out).items():
        console.print(
            f"[yellow]left out[/] {', '.join(names_left_out)}: {escape(why)}"
            f"{escape(_estimator_hint(why))}"
        )


def _estimator_hint(reasons: str) -> str:
    """What to do about the reasons of :func:`training.evaluation.choose_estimators`."""
    from training.evaluation import MISSING_PSCORE

    if MISSING_PSCORE in reasons:
        return (
            " (log the behaviour policy's propensities; without them only DM, with --model, "
            "can value a policy)"
        )
    return " (give --model)"


def _print_ope_table(title: str, rows: list[dict[str, float | str]], alpha: float) -> None:
    """The OPE table: policy, estimator, value, interval bounds and the effective sample
    size of the policy's importance weights."""
    from training.evaluation import ess_text

    level = f"{100 * (1 - alpha):g}%"
    table = Table(title=title)
    for col in ("policy", "estimator", "value", f"{level} lower", f"{level} upper", "ESS"):
        table.add_column(col, justify="left" if col in ("policy", "estimator") else "right")
    for row in rows:
        table.add_row(
            str(row["policy"]),
            str(row["estimator"]),
            *(_number(row[key]) for key in ("value", "lower", "upper")),
            ess_text(float(row["ess"])),
        )
    _print_table(table, 100)


def _number(value: object) -> str:
    number = float(value)  # type: ignore[arg-type]
    return "undefined" if np.isnan(number) else f"{number:.4f}"


@app.command(
    short_help="Train, evaluate off-policy, export to ONNX and register in MLflow.",
)
def train(
    config: Annotated[Path, typer.Option(help="Training config YAML.")] = DEFAULT_TRAINING_CONFIG,
    logs: Annotated[
        list[Path] | None,
        typer.Option(
            help="Decision log to learn from (overrides data.logs); repeat it to learn from "
            "several as one (a journal and its archive)."
        ),
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (overrides tracking.uri).")
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Passes over the training data (overrides neural_bandit.epochs, or "
            "vw_bandit.passes for the Vowpal Wabbit learner).",
        ),
    ] = None,
    export_dir: Annotated[
        Path | None, typer.Option(help="Where the ONNX model goes (overrides export.dir).")
    ] = None,
    drop_pending: Annotated[
        bool,
        typer.Option(
            help="Leave out decisions whose outcome is not known yet, as a live service's "
            "journal has (sets data.drop_pending); without it they are refused."
        ),
    ] = False,
    since: SinceOption = None,
    until: UntilOption = None,
    catalog_dir: CatalogOption = DEFAULT_CATALOG_DIR,
    rules_path: RulesOption = DEFAULT_RULES_PATH,
) -> None:
    """Train a policy on a decision log, evaluate it off-policy on held-out decisions (and
    against the simulator's ground truth for simulated logs), export it to ONNX, and track
    the run in MLflow (registered with the alias 'challenger')."""
    from pydantic import ValidationError

    from nextbest.decision_log import DecisionLogError
    from training.config import TrainingConfig, load_training_config
    from training.ope import OpeInputError
    from training.train import run_training

    cat, ruleset = _load(catalog_dir, rules_path)
    try:
        cfg = load_training_config(config)
    except ConfigError as exc:
        console.print(f"[bold red]config error[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    raw = cfg.model_dump()
    if logs:
        raw["data"]["logs"] = logs[0] if len(logs) == 1 else logs
    if tracking_uri is not None:
        raw["tracking"]["uri"] = tracking_uri
    if export_dir is not None:
        raw["export"]["dir"] = export_dir
    if drop_pending:
        raw["data"]["drop_pending"] = True
    for key, value in (("since", since), ("until", until)):
        if value is not None:
            raw["data"][key] = _moment_option(f"--{key}", value)
    if epochs is not None:
        section, key = (
            ("vw_bandit", "passes") if cfg.learner == "vw_bandit" else ("neural_bandit", "epochs")
        )
        raw[section][key] = epochs
    try:  # the whole config again: options meet the rules between fields (and sections)
        cfg = TrainingConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors()
        )
        given = [
            f"--{name} {value}"
            for name, value in (("epochs", epochs), ("since", since), ("until", until))
            if value is not None
        ]
        option = ", ".join(given) or "options"
        console.print(f"[bold red]{option}[/]: {escape(problems)}")
        raise typer.Exit(code=2) from None
    # a SIGTERM ends the run as failed, as Ctrl-C does (it stayed RUNNING for good)
    main = threading.current_thread() is threading.main_thread()  # handlers live there only
    previous = signal.signal(signal.SIGTERM, _terminated) if main else None
    try:
        result = run_training(cfg, cat, RuleEngine(ruleset))
    except (DecisionLogError, OpeInputError, ValueError) as exc:
        console.print(f"[bold red]cannot train[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    _print_ope_table(
        f"Held-out off-policy evaluation (run {result.run_id[:8]})",
        result.ope,
        cfg.evaluation.alpha,
    )
    if result.truth is not None:
        truth = Table(title="Ground truth on the same held-out decisions (simulator replay)")
        for header in ("policy", "value", "regret", "of oracle", "complaints", "contact"):
            truth.add_column(header, justify="left" if header == "policy" else "right")
        for row in result.truth:
            truth.add_row(
                str(row["policy"]),
                _number(row["value"]),
                _number(row["regret"]),
                f"{float(row['oracle_ratio']):.1%}",
                f"{float(row.get('complaint_rate', float('nan'))):.4%}",
                f"{float(row.get('contact_rate', float('nan'))):.1%}",
            )
        _print_table(truth)
        model = next((r for r in result.truth if r["policy"] == "model"), {})
        if "dr_exact_value" in model:
            interval = f"[{_number(model['dr_exact_lower'])}, {_number(model['dr_exact_upper'])}]"
            console.print(
                f"DR with an exact reward model: {_number(model['dr_exact_value'])} "
                f"{escape(interval)} for a true {_number(model['value'])} (how close any DR "
                "can come on this log)",
                highlight=False,
            )
    thin = [row for row in result.evidence or [] if row["thin"]]
    if thin:
        listed = "; ".join(
            f"{row['offer']}: chosen for {float(row['policy_share']):.0%}, "  # type: ignore[arg-type]
            f"{row['conversions']} conversion{'' if row['conversions'] == 1 else 's'} in "
            f"{row['logged']:,} logged decisions"
            for row in thin[:3]
        )
        more = f"; {len(thin) - 3} more" if len(thin) > 3 else ""
        console.print(
            f"[yellow]thin evidence[/] {escape(listed)}{more} (all offers: "
            "choice_evidence.json and the model card)"
        )
    console.print(
        f"compliance: {result.violations} chosen actions blocked by a rule; "
        f"registered {cfg.tracking.registered_model} v{result.model_version} as "
        f"{result.model_uri}; ONNX at {result.onnx_path}"
    )
    if result.violations:
        raise typer.Exit(code=1)


@app.command(
    short_help="Export a model (registry or file) as a checked .onnx file with its feature spec.",
)
def export(
    model: Annotated[
        str, typer.Option(help="An .onnx file or models:/<name>@<alias> (or /<version>).")
    ],
    out: Annotated[Path, typer.Option(help="Where to write the .onnx file (spec beside it).")],
    tracking_uri: Annotated[
        str, typer.Option(help="MLflow tracking URI for models:/ URIs.")
    ] = "sqlite:///mlflow.db",
    catalog_dir: CatalogOption = DEFAULT_CATALOG_DIR,
) -> None:
    """Export a scoring model for deployment: fetch it (from the registry or a file), check
    it reads this catalogue's features and scores every action in ONNX Runtime, and write
    the .onnx file with its feature spec beside it (for a service without registry access)."""
    import json
    import tempfile

    import onnx

    from nextbest.features import ContextEncoder
    from nextbest.model_source import (
        ModelSourceError,
        is_registry_uri,
        resolve_model,
        unwritable_directory,
    )
    from nextbest.onnx_scoring import (
        SOURCE_KEY,
        ModelSpecError,
        OnnxScorer,
        set_metadata,
        spec_path,
    )
    from nextbest.synthetic import random_context_batch

    cat = _load_catalog(catalog_dir)
    if out.suffix != ".onnx":
        console.print(f"[bold red]bad --out[/] {escape(str(out))}: must end in .onnx")
        raise typer.Exit(code=2)
    problem = "is a directory" if out.is_dir() else unwritable_directory(out.parent)
    if problem:
        where = out if out.is_dir() else out.parent
        console.print(f"[bold red]bad --out[/] {escape(str(where))} {escape(problem)}")
        raise typer.Exit(code=2)
    encoder = ContextEncoder(cat)
    # a registry model's download lives only while it is checked and written out
    with tempfile.TemporaryDirectory(prefix="nextbest-export-") as download:
        try:
            resolved = resolve_model(model, tracking_uri, download)
            scorer = OnnxScorer(resolved.path, content=resolved.content)
            scorer.require_features(
                encoder.spec.version,
                model,
                "this catalogue and encoder make",
                "retrain on a log of this catalogue",
            )
            probe = encoder.encode(random_context_batch(cat, 1000, np.random.default_rng(0)))
            scores = scorer.scores(probe)
            if scores.shape != (1000, cat.n_actions) or not np.isfinite(scores).all():
                raise ModelSpecError(
                    f"model {model!r} gives scores of shape {scores.shape} (finite: "
                    f"{bool(np.isfinite(scores).all())}), expected (1000, {cat.n_actions}) finite"
                )
        except (ModelSourceError, ModelSpecError) as exc:
            console.print(f"[bold red]cannot export[/]: {escape(str(exc))}")
            raise typer.Exit(code=2) from None
        partial = out.with_suffix(".onnx.partial")
        spec_partial = spec_path(out).with_suffix(".json.partial")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            # one self-contained file: registry artifacts may keep weights in external data files
            exported = onnx.load(str(resolved.path))
            if is_registry_uri(model):  # where it came from, for the service that serves the file
                set_metadata(exported, **{SOURCE_KEY: resolved.version})
            onnx.save(exported, str(partial))
            spec_partial.write_text(json.dumps(scorer.spec, indent=2))
            # both written before either replaces the old pair; each rename is atomic (a
            # service watching the path never reads half a file)
            spec_partial.replace(spec_path(out))
            partial.replace(out)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            spec_partial.unlink(missing_ok=True)
            console.print(f"[bold red]cannot export[/] to {escape(str(out))}: {escape(str(exc))}")
            raise typer.Exit(code=2) from None
    console.print(
        f"exported {escape(resolved.version)} ({scorer.model_kind}, features "
        f"{scorer.spec_version}, {cat.n_actions} actions) to {out}"
    )


@app.command(
    short_help="Move 'champion' to the challenger only if its DR lower bound beats the champion.",
)
def promote(
    tracking_uri: Annotated[str, typer.Option(help="MLflow tracking URI.")] = "sqlite:///mlflow.db",
    model: Annotated[str, typer.Option(help="Registered model name.")] = "nextbest",
) -> None:
    """Move the 'champion' alias to the challenger only if the challenger's DR lower bound
    beats the champion's DR value (exit 1 when it does not)."""
    import mlflow

    from training.tracking import promote as promote_model
    from training.tracking import tracking_client

    try:
        client = tracking_client(tracking_uri, must_exist=True)
    except ValueError as exc:
        console.print(f"[bold red]cannot promote[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    try:
        client.get_registered_model(model)
    except mlflow.exceptions.MlflowException:  # a mistyped --model: not a refusal on evidence
        console.print(f"[bold red]bad --model[/] {escape(model)!r}: no such registered model")
        raise typer.Exit(code=2) from None
    promoted, reason = promote_model(client, model)
    verdict = "[bold green]promoted[/]: " if promoted else "[bold yellow]kept[/]: "
    console.print(verdict + escape(reason))
    if not promoted:
        raise typer.Exit(code=1)


@app.command(
    short_help="Move a service journal's decisions made before a time into an archive journal.",
)
def archive(
    before: Annotated[
        str,
        typer.Option(
            help="Move the decisions made before this time: ISO 8601 with a time zone "
            "(2026-10-01T00:00:00+08:00); at least the attribution window ago."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="The archive's directory: a new one, or an earlier archive of the same journal."
        ),
    ],
    journal: JournalOption = DEFAULT_STATE_DIR,
    attribution_days: AttributionDaysOption = ATTRIBUTION_WINDOW / timedelta(days=1),
) -> None:
    """Move the decisions of a service journal made before --before, with their outcomes,
    withdrawals and rule blocks, into an archive journal (whole committed parts, oldest
    first, while the service keeps writing). The archive reads as a journal: nextbest
    train, evaluate and trace take its directory."""
    import sqlite3

    from nextbest.decision_journal import JournalCorruptError, JournalSchemaError
    from nextbest.journal_archive import ArchiveError, archive_journal

    cutoff = _moment_option("--before", before)
    assert cutoff is not None  # the option is required
    try:
        result = archive_journal(journal, cutoff, out, timedelta(days=attribution_days))
    except (ArchiveError, JournalSchemaError, JournalCorruptError, OSError, sqlite3.Error) as exc:
        console.print(f"[bold red]cannot archive[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    console.print(
        f"archived {result.decisions:,} decisions ({result.chunks:,} committed parts) into "
        f"{escape(str(result.archive))}; {result.kept:,} stay in {escape(str(journal))}"
    )


@app.command(
    "forget-archived",
    short_help="Forget whom archived decisions made before a time were for (their tombstones).",
)
def forget_archived(
    before: Annotated[
        str,
        typer.Option(
            help="Forget the archived decisions made before this time: ISO 8601 with a time "
            "zone; at least the attribution window ago."
        ),
    ],
    journal: JournalOption = DEFAULT_STATE_DIR,
    attribution_days: AttributionDaysOption = ATTRIBUTION_WINDOW / timedelta(days=1),
) -> None:
    """Delete the live journal's record of whom each archived decision made before --before
    was for. It lets an opt-out or complaint reported late for an archived decision bind
    (410); once forgotten, such a report is answered 404 as an unknown decision, and the
    platform must carry the opt-out in the customer's own opt-outs. The record otherwise
    grows with every archived decision."""
    import sqlite3

    from nextbest.decision_journal import JournalSchemaError
    from nextbest.journal_archive import ArchiveError
    from nextbest.journal_archive import forget_archived as forget

    cutoff = _moment_option("--before", before)
    assert cutoff is not None  # the option is required
    try:
        forgotten = forget(journal, cutoff, timedelta(days=attribution_days))
    except (ArchiveError, JournalSchemaError, OSError, sqlite3.Error) as exc:
        console.print(f"[bold red]cannot forget[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    console.print(
        f"forgot whom {forgotten:,} archived decisions made before "
        f"{escape(cutoff.isoformat())} were for; a reward reported for one of them is now "
        "answered 404"
    )


@app.command(
    short_help="Which rule blocked which action for one served decision (from the journal).",
)
def trace(
    decision_id: Annotated[str, typer.Argument(help="The decision id the service answered.")],
    journal: JournalOption = DEFAULT_STATE_DIR,
    catalog_dir: CatalogOption = DEFAULT_CATALOG_DIR,
    every: Annotated[
        bool, typer.Option("--all", help="Name every blocked action, not the first few per rule.")
    ] = False,
) -> None:
    """Audit one decision after the fact: when it was made, for whom (the pseudonymised
    key), what was chosen under which rule set, and for every action not chosen whether a
    rule blocked it (which) or the request left it out."""
    from nextbest.decision_journal import JournalSchemaError, decision_trace
    from nextbest.rewards import UnknownDecisionError

    cat = _load_catalog(catalog_dir)
    try:
        found = decision_trace(journal, decision_id)
    except (FileNotFoundError, JournalSchemaError) as exc:
        console.print(f"[bold red]bad --journal[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    except UnknownDecisionError:
        console.print(f"[bold red]unknown decision[/] {escape(decision_id)} in {journal}")
        raise typer.Exit(code=1) from None
    names = [a.name for a in cat.actions]
    if found.catalog_version != cat.version:  # its action ids name other actions here
        console.print(
            f"[bold red]catalogue mismatch[/]: the decision was made with catalogue "
            f"{escape(found.catalog_version)}, {escape(str(catalog_dir))} is {cat.version} "
            "(pass the catalogue it was made with: --catalog)"
        )
        raise typer.Exit(code=2)
    console.print(
        f"decision {escape(found.decision_id)} at {found.timestamp.isoformat()} for "
        f"{escape(found.customer_key)}: {escape(names[found.action])} "
        f"(rule set {escape(found.ruleset_version)}; "
        f"{int(found.candidate.sum())} of {len(names)} actions were candidates)"
    )
    if found.blocked_by is None:
        console.print("the journal holds no rule per action for this decision")
        return
    table = Table(title="Actions not open to the decision")
    for column in ("rule", "actions", "which"):
        table.add_column(column)
    rows = [*found.blocked().items(), ("(left out by the request)", found.left_out())]
    for rule, actions in rows:
        if not actions:
            continue
        shown = actions if every else actions[:3]
        which = ", ".join(names[a] for a in shown) + ("" if len(shown) == len(actions) else ", ...")
        table.add_row(escape(rule), str(len(actions)), escape(which))
    _print_table(table)


def _terminated(signum: int, _frame: object) -> None:
    """SIGTERM as an exception: the MLflow run in progress ends FAILED on the way out."""
    raise SystemExit(128 + signum)


def _fmt(key: str, value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if key == "value_per_customer" else f"{value:.2%}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def main() -> None:
    """Entry point for ``python -m nextbest``."""
    app()
