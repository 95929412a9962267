"""A decision log as arrays for off-policy evaluation and training.

Reads the logged-decision schema (``nextbest.decision_log``) from Parquet (a file or a
directory of parts) or from CSV. CSV is for logs brought from elsewhere: one row per decision
with the schema's column names; list columns (``context``, ``candidate_actions``,
``action_dist``) are space-separated numbers; ``timestamp`` is ISO 8601 with an offset; only
an empty cell is null (``nan`` is a number, refused where values must be finite).
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from nextbest.decision_log import (
    DECISION_SCHEMA,
    DecisionLogError,
    arrow_reason,
    check_column_names,
    read_decisions,
    validate_decisions,
    warn_unknown_columns,
)
from nextbest.privacy import PSEUDONYM_HEX_CHARS, PSEUDONYM_PATTERN, PSEUDONYM_PREFIX

LIST_COLUMNS = {"context": np.float32, "candidate_actions": np.int32, "action_dist": np.float32}
TEXT_COLUMNS = tuple(f.name for f in DECISION_SCHEMA if pa.types.is_string(f.type))
"""Schema columns a CSV log holds as text (ids, versions), whatever their cells look like."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoggedBandit:
    """Arrays of a decision log, in the OPE vocabulary.

    Attributes
    ----------
    context : float32 (n, F)
    action : int64 (n,)
    reward : float64 (n,)
    pscore : float64 (n,) or None when the log has no propensities
    candidates : bool (n, A), the actions the rules allowed
    logging_dist : float32 (n, A) or None, the logging policy's full distribution
    feature_spec_version, ruleset_version, catalog_version : str
    customer_key : object (n,) or None, the pseudonymised customer of each decision
    converted, complaint : bool (n,) or None, the logged outcome events when recorded
    """

    context: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    pscore: np.ndarray | None
    candidates: np.ndarray
    logging_dist: np.ndarray | None
    feature_spec_version: str
    ruleset_version: str
    catalog_version: str
    customer_key: np.ndarray | None = None
    converted: np.ndarray | None = None
    complaint: np.ndarray | None = None

    def take(self, rows: np.ndarray) -> LoggedBandit:
        """The sub-log of the given rows (bool mask or indices)."""

        def pick(arr: np.ndarray | None) -> np.ndarray | None:
            return None if arr is None else arr[rows]

        return LoggedBandit(
            context=self.context[rows],
            action=self.action[rows],
            reward=self.reward[rows],
            pscore=pick(self.pscore),
            candidates=self.candidates[rows],
            logging_dist=pick(self.logging_dist),
            feature_spec_version=self.feature_spec_version,
            ruleset_version=self.ruleset_version,
            catalog_version=self.catalog_version,
            customer_key=pick(self.customer_key),
            converted=pick(self.converted),
            complaint=pick(self.complaint),
        )

    def fingerprint(self, recipe: str | None = None) -> str:
        """16 hex characters of SHA-256 over these decisions as read: every array, the
        versions, and ``recipe`` (a simulated log's recipe as JSON). A run tags what it
        trained on, not the files read again: a service journal grows under a running
        service, and a log renamed or copied holds the same decisions."""
        digest = hashlib.sha256()
        for name in FINGERPRINTED:
            array = getattr(self, name)
            digest.update(f"{name}:{None if array is None else array.shape}".encode())
            if array is None:
                continue
            if array.dtype == object:  # customer keys: text, joined by a byte they never hold
                digest.update("\x1f".join(map(str, array)).encode())
            else:
                digest.update(np.ascontiguousarray(array).view(np.uint8).data)
        for text in (self.feature_spec_version, self.ruleset_version, self.catalog_version, recipe):
            digest.update(f"\x1e{text}".encode())
        return digest.hexdigest()[:16]

    @property
    def n_rounds(self) -> int:
        return len(self.action)

    @property
    def n_actions(self) -> int:
        return self.candidates.shape[1]


FINGERPRINTED = (
    "context",
    "action",
    "reward",
    "pscore",
    "candidates",
    "logging_dist",
    "customer_key",
    "converted",
    "complaint",
)
"""The arrays :meth:`LoggedBandit.fingerprint` covers (all of them)."""


def read_csv_decisions(path: str | Path, n_actions: int | None = None) -> pa.Table:
    """Read a CSV decision log into the decision schema and validate it.

    Raises
    ------
    DecisionLogError
        Naming the file, the column and the reason (a misspelt schema column,
        unparseable numbers in a list column, missing columns, and every check of
        ``validate_decisions``, times without their UTC offset among them). Other columns
        outside the schema are left out with a warning (``warn_unknown_columns``).
    """
    path = Path(path)
    if not path.exists():
        raise DecisionLogError(str(path), "*", "no such file")
    try:
        raw = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                # text columns stay text: ids "007" and "7", or a version hash "123456e78901",
                # would otherwise be read as numbers and come out as "7" and inf
                column_types={name: pa.string() for name in [*LIST_COLUMNS, *TEXT_COLUMNS]},
                # only the empty cell is null ("no outcome yet" for a reward); Arrow's default
                # null spellings would read "nan", "NaN", "NA" ... as null too, so a NaN reward
                # would pass as pending instead of being refused (as in Parquet)
                null_values=[""],
                strings_can_be_null=True,
            ),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise DecisionLogError(
            str(path), "*", f"not a readable CSV file: {arrow_reason(exc)}"
        ) from None
    warn_unknown_columns(check_column_names(raw.column_names, str(path)), str(path))
    columns = {}
    for name in raw.column_names:
        column = raw.column(name)
        if name in LIST_COLUMNS:
            column = _parse_list_column(column, name, LIST_COLUMNS[name], str(path))
        columns[name] = column
    table = pa.table(columns)
    return validate_decisions(table, n_actions, source=str(path))


def _parse_list_column(column: pa.ChunkedArray, name: str, dtype: type, source: str) -> pa.Array:
    """``"0 5 17"`` -> ``[0, 5, 17]``; an empty cell -> null."""
    tokens = pc.split_pattern_regex(pc.utf8_trim_whitespace(column), r"\s+")
    try:
        return pc.cast(tokens, pa.list_(pa.from_numpy_dtype(dtype)))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DecisionLogError(
            source, name, f"entries must be space-separated numbers: {arrow_reason(exc)}"
        ) from None


def _within(
    table: pa.Table, source: str, since: datetime | None, until: datetime | None
) -> pa.Table:
    """The decisions of ``table`` made in ``[since, until)``; refused when none is.

    Raises
    ------
    DecisionLogError
        No decision in the window (naming the log's own first and last).
    """
    for name, bound in (("since", since), ("until", until)):
        if bound is not None and bound.tzinfo is None:
            raise ValueError(f"{name} {bound.isoformat()} needs a time zone")
    if since is not None and until is not None and since >= until:
        raise ValueError(
            f"since ({since.isoformat()}) must come before until ({until.isoformat()})"
        )
    stamps = table.column("timestamp")
    inside = [
        compare(stamps, pa.scalar(bound, stamps.type))
        for compare, bound in ((pc.greater_equal, since), (pc.less, until))
        if bound is not None
    ]
    kept = table.filter(inside[0] if len(inside) == 1 else pc.and_(*inside))
    if kept.num_rows == 0:
        first, last = pc.min_max(stamps).values()
        raise DecisionLogError(
            source,
            "timestamp",
            f"no decision between {_moment(since)} and {_moment(until)}: the log runs from "
            f"{_moment(first.as_py())} to {_moment(last.as_py())}",
        )
    log.info("%s: %d of %d decisions in the time window", source, kept.num_rows, table.num_rows)
    return kept


def _moment(moment: datetime | None) -> str:
    """``moment`` to the microsecond (a live journal decides many times a second)."""
    return "the start" if moment is None else moment.isoformat()


def _mixed_versions(table: pa.Table, name: str) -> str:
    """Why a log mixing several values of version column ``name`` is refused: each with its
    decisions and time span, and how to keep the latest."""
    spans = table.group_by(name).aggregate(
        [("timestamp", "min"), ("timestamp", "max"), ("timestamp", "count")]
    )
    rows = sorted(spans.to_pylist(), key=lambda r: r["timestamp_min"])
    listed = "; ".join(
        f"{r[name]}: {r['timestamp_count']:,} decisions, {_moment(r['timestamp_min'])} to "
        f"{_moment(r['timestamp_max'])}"
        for r in rows
    )
    # workers move to a new version one by one: the versions overlap in time, and the
    # window that keeps only the latest starts after every other one's last decision
    latest = rows[-1][name]
    start = max(r["timestamp_max"] for r in rows[:-1]) + timedelta(microseconds=1)
    stamps = table.column("timestamp")
    early = pc.and_(
        pc.equal(table.column(name), latest), pc.less(stamps, pa.scalar(start, stamps.type))
    )
    lost = pc.sum(early).as_py() or 0
    caveat = f" ({lost:,} of {latest}'s decisions are earlier and left out)" if lost else ""
    return (
        f"mixes several versions ({listed}); evaluate each version separately: to keep only "
        f"{latest}, data.since: {_moment(start)} in a training config, --since "
        f"{_moment(start)} for nextbest train and evaluate{caveat}"
    )


LogPaths = str | Path | Sequence[str | Path]
"""One decision log, or several read as one (a journal and the archive its older decisions
were moved to, say)."""


def log_paths(logs: LogPaths) -> list[Path]:
    """``logs`` as a list of paths (one or more)."""
    return [Path(logs)] if isinstance(logs, str | Path) else [Path(p) for p in logs]


def describe_logs(logs: LogPaths) -> str:
    """The logs as messages name them: a path, or the paths joined with `` + ``."""
    return " + ".join(map(str, log_paths(logs)))


def read_logs(logs: LogPaths, n_actions: int) -> pa.Table:
    """The decisions of one or more logs (``.csv``, ``.parquet``, a directory of parts or a
    service journal), each validated, as one table in the decision schema. An empty log
    among others is left out with a warning (a live journal just started, say).

    Raises
    ------
    DecisionLogError
        Naming the file, for a log that cannot be read or fails validation, or every log
        being empty; naming the logs, for what they disagree on (a decision id in two of
        them, context widths, propensities in one and not another).
    """
    paths = log_paths(logs)
    if not paths:
        raise DecisionLogError("<logs>", "*", "no decision log given")
    read: list[tuple[Path, pa.Table]] = []
    for path in paths:
        table = (
            read_csv_decisions(path, n_actions)
            if path.suffix == ".csv"
            else read_decisions(path, n_actions=n_actions)
        )
        read.append((path, table))
    kept = [(path, table) for path, table in read if table.num_rows]
    if not kept:
        raise DecisionLogError(describe_logs(paths), "*", "the log holds no decisions")
    for path, table in read:
        if not table.num_rows:
            log.warning("%s: holds no decisions; read the other logs alone", path)
    if len(kept) == 1:
        return kept[0][1]
    _check_across_logs(kept)
    return pa.concat_tables([table for _, table in kept])


def _check_across_logs(logs: list[tuple[Path, pa.Table]]) -> None:
    """What each log's own validation cannot see: one decision id in two logs, two context
    widths, propensities in one log and not another (each log is all or none).

    Raises
    ------
    DecisionLogError
    """
    source = describe_logs([path for path, _ in logs])
    ids = pa.chunked_array([table.column("decision_id") for _, table in logs])
    counts = pc.value_counts(ids)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated):
        first = repeated[0].as_py()
        holders = [
            str(path)
            for path, table in logs
            if pc.any(pc.equal(table.column("decision_id"), first)).as_py()
        ]
        raise DecisionLogError(
            source,
            "decision_id",
            f"decision {first!r} is in {' and '.join(holders)}: a log given twice, or an "
            "archive step interrupted between its copy and its delete (run the same nextbest "
            "archive command again to finish it)",
        )
    widths = {path: len(table.column("context")[0]) for path, table in logs}
    if len(set(widths.values())) > 1:
        described = ", ".join(f"{path}: {width}" for path, width in widths.items())
        raise DecisionLogError(
            source, "context", f"the logs' contexts have different widths ({described})"
        )
    without = [str(path) for path, table in logs if table.column("pscore").null_count]
    if without and len(without) < len(logs):
        raise DecisionLogError(
            source,
            "pscore",
            f"{' and '.join(without)} {'has' if len(without) == 1 else 'have'} no propensities "
            "but the other logs have: give every "
            "decision its propensity, or none (a log without propensities can only be "
            "evaluated with DM)",
        )


def load_logged_bandit(
    path: LogPaths,
    n_actions: int,
    require_reward: bool = True,
    drop_pending: bool = False,
    since: datetime | None = None,
    until: datetime | None = None,
) -> LoggedBandit:
    """Load a decision log (``.csv``, ``.parquet``, a directory of parts or a service journal)
    as arrays; several logs (:func:`read_logs`) are loaded as one.

    Parameters
    ----------
    path : path, or a sequence of paths
    n_actions : int
        Catalogue size (the width of ``candidates`` and ``logging_dist``).
    require_reward : bool
        Refuse logs with decisions whose outcome has not arrived (null ``reward``).
    drop_pending : bool
        Instead, leave those decisions out (a live service journal always has some); only
        sound when callers report every outcome, converted or not, within the window.
    since, until : datetime, optional (with a time zone)
        Keep only the decisions made at or after ``since`` and before ``until``: a live
        journal outgrows what is worth learning from, and spans several model, rule-set or
        catalogue versions, which one evaluation cannot mix.

    Raises
    ------
    DecisionLogError
    """
    table = read_logs(path, n_actions)
    source = describe_logs(path)
    n = table.num_rows
    if since is not None or until is not None:
        table = _within(table, source, since, until)
        n = table.num_rows
    reward_col = table.column("reward")
    if reward_col.null_count == n and (require_reward or drop_pending):
        raise DecisionLogError(
            source,
            "reward",
            f"none of the {n} decisions has an outcome (the column is missing or empty): a "
            "log to learn from or evaluate needs the rewards of its decisions",
        )
    if reward_col.null_count and drop_pending:
        table = table.filter(pc.is_valid(reward_col))
        pending, n, reward_col = n - table.num_rows, table.num_rows, table.column("reward")
        log.warning(
            "%s: %d of %d decisions have no outcome yet: left out (drop_pending)",
            source,
            pending,
            n + pending,
        )
    if reward_col.null_count and require_reward:
        raise DecisionLogError(
            source,
            "reward",
            f"{reward_col.null_count} of {n} decisions have no outcome yet; evaluate "
            "after the attribution window, or leave them out (data.drop_pending: true in a "
            "training config, --drop-pending for nextbest evaluate)",
        )
    for name in ("feature_spec_version", "ruleset_version", "catalog_version"):
        if pc.count_distinct(table.column(name)).as_py() > 1:
            raise DecisionLogError(source, name, _mixed_versions(table, name))
    context = _dense_list(table.column("context"), np.float32)
    action = table.column("action").to_numpy().astype(np.int64)
    reward = reward_col.to_numpy(zero_copy_only=False).astype(np.float64)
    pscore_col = table.column("pscore")
    pscore = (
        None
        if pscore_col.null_count == n
        else pscore_col.to_numpy(zero_copy_only=False).astype(np.float64)
    )
    cand = table.column("candidate_actions")  # chunked: no 2**31-value limit
    widths = pc.list_value_length(cand).to_numpy(zero_copy_only=False)
    rows = np.repeat(np.arange(n), widths)
    ids = pc.list_flatten(cand).to_numpy()
    outside = (ids < 0) | (ids >= n_actions)
    if outside.any():  # read_decisions checks this too; CSV and Parquet both pass here
        raise DecisionLogError(
            source,
            "candidate_actions",
            f"action id {ids[outside][0]} is outside the catalogue (0..{n_actions - 1})",
            int(rows[np.flatnonzero(outside)[0]]),
        )
    candidates = np.zeros((n, n_actions), bool)
    candidates[rows, ids] = True
    keys = table.column("customer_key")
    plain = pc.sum(pc.invert(pc.match_substring_regex(keys, f"^{PSEUDONYM_PATTERN}$"))).as_py() or 0
    if plain:  # kept in memory only (the split, the fingerprint), but they should not exist
        log.warning(
            "%s: %d of %d customer keys are not pseudonyms (%s followed by %d hex digits): "
            "logs should never hold raw customer identifiers (nextbest.privacy.pseudonymise)",
            source,
            plain,
            n,
            PSEUDONYM_PREFIX,
            PSEUDONYM_HEX_CHARS,
        )
    dist_col = table.column("action_dist")  # chunked: no 2**31-value limit
    logging_dist = None
    if dist_col.null_count == 0:
        logging_dist = np.zeros((n, n_actions), np.float32)
        logging_dist[rows, ids] = pc.list_flatten(dist_col).to_numpy()
    return LoggedBandit(
        context=context,
        action=action,
        reward=reward,
        pscore=pscore,
        candidates=candidates,
        logging_dist=logging_dist,
        feature_spec_version=table.column("feature_spec_version")[0].as_py(),
        ruleset_version=table.column("ruleset_version")[0].as_py(),
        catalog_version=table.column("catalog_version")[0].as_py(),
        customer_key=table.column("customer_key").to_numpy(zero_copy_only=False),
        converted=_events(table.column("converted")),
        complaint=_events(table.column("complaint")),
    )


def _events(column: pa.ChunkedArray) -> np.ndarray | None:
    """A bool outcome column as an array, None unless every decision has it."""
    if column.null_count:
        return None
    return column.to_numpy(zero_copy_only=False).astype(bool)


def _dense_list(column: pa.ChunkedArray, dtype: type) -> np.ndarray:
    """Equal-length lists ``(n,)`` as a dense ``(n, width)`` array, chunk by chunk (one Arrow
    list array holds at most 2**31 values; a long journal's features hold more)."""
    n = len(column)
    values = pc.list_flatten(column).to_numpy().astype(dtype)
    return values.reshape(n, -1) if n else values.reshape(0, 0)


__all__ = ["DECISION_SCHEMA", "LoggedBandit", "load_logged_bandit", "read_csv_decisions"]


def customer_unit(keys: np.ndarray, salt: str) -> np.ndarray:
    """A uniform number in [0, 1) per customer key, float64 ``(n,)``, stable for a salt: the
    same customer gets the same number in every log and run, so splits made from it keep all
    of a customer's decisions on one side."""
    key = salt.encode()
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(str(k).encode(), key=key, digest_size=8).digest())
            for k in keys
        ],
        np.uint64,
    ) / np.float64(2**64)


def split_log(
    log: LoggedBandit, share: float, seed: int, purpose: str | None = None
) -> tuple[LoggedBandit, LoggedBandit, np.ndarray]:
    """Split into (kept, held out, held-out mask ``(n,)``), about ``share`` held out.

    By customer when the log names them (a customer's decisions are all on one side, so the
    held-out part measures fresh customers); otherwise by decision. ``purpose`` salts a
    split independent of the others made with the same seed (None: the evaluation holdout).

    Raises
    ------
    ValueError
        If one side would be empty.
    """
    if log.customer_key is not None:
        salt = str(seed) if purpose is None else f"{purpose}-{seed}"
        held = customer_unit(log.customer_key, salt) < share
    else:
        rng_seed = seed if purpose is None else [seed, zlib.crc32(purpose.encode())]
        held = np.random.default_rng(rng_seed).random(log.n_rounds) < share
    if held.all() or not held.any():
        raise ValueError(
            f"the log is too small to hold out a share of {share} "
            f"({log.n_rounds} decisions: one side would be empty)"
        )
    return log.take(~held), log.take(held), held
