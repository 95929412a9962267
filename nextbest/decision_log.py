"""The logged-decision record: one schema for simulated logs, served decisions and training.

Each row is one decision: the context features the policy saw, the actions the rules allowed
(``candidate_actions``), the chosen ``action`` with its propensity ``pscore``, the full
``action_dist`` (the probability of each candidate, aligned with ``candidate_actions``:
actions the rules blocked have probability 0 and are not stored) when known, the outcome
(filled in when it arrives), and the versions of model, rule set, catalogue and feature
spec. Files are Parquet; a directory of part files is one log. Readers validate before
anyone trains on a file.
"""

from __future__ import annotations

import difflib
import logging
import os
import queue
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_ID = "nextbest.decision-log/1"

DECISION_SCHEMA = pa.schema(
    [
        pa.field("decision_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("customer_key", pa.string(), nullable=False),
        pa.field("context", pa.list_(pa.float32()), nullable=False),
        pa.field("candidate_actions", pa.list_(pa.int32()), nullable=False),
        pa.field("action", pa.int32(), nullable=False),
        pa.field("pscore", pa.float64()),
        pa.field("action_dist", pa.list_(pa.float32())),
        pa.field("reward", pa.float64()),
        pa.field("converted", pa.bool_()),
        pa.field("complaint", pa.bool_()),
        pa.field("opted_out", pa.bool_()),
        pa.field("value_cny", pa.float64()),
        pa.field("reward_at", pa.timestamp("us", tz="UTC")),
        pa.field("campaign_id", pa.string()),
        pa.field("policy", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("ruleset_version", pa.string(), nullable=False),
        pa.field("catalog_version", pa.string(), nullable=False),
        pa.field("feature_spec_version", pa.string(), nullable=False),
    ],
    metadata={"schema": SCHEMA_ID},
)
"""Arrow schema of a decision log. ``pscore`` may be null only for logs without propensities."""

REQUIRED_COLUMNS = tuple(f.name for f in DECISION_SCHEMA if not f.nullable)
PARQUET_OPTIONS: dict[str, object] = {
    "compression": "zstd",
    # dictionary encoding pays only for the repetitive strings; it slows the float lists
    "use_dictionary": [
        "policy",
        "model_version",
        "ruleset_version",
        "catalog_version",
        "feature_spec_version",
        "campaign_id",
    ],
}
PSCORE_RTOL, PSCORE_ATOL = 1e-3, 1e-7
"""How far a row's ``pscore`` may be from its ``action_dist`` entry for the chosen action:
relative, so that a propensity of 1e-5 logged beside a distribution entry of 1e-4 (a
tenfold importance weight) is refused, with a floor for float32 rounding."""

log = logging.getLogger(__name__)


class DecisionLogError(ValueError):
    """A decision log that cannot be used: names the source, the column, the row and why;
    column ``"*"`` is the log as a whole (a missing file, an unreadable one ...)."""

    def __init__(self, source: str, column: str, reason: str, row: int | None = None) -> None:
        self.source, self.column, self.reason, self.row = source, column, reason, row
        where = "" if column == "*" else f" column {column!r}"
        where += f" row {row}" if row is not None else ""
        super().__init__(f"{source}:{where}: {reason}" if where else f"{source}: {reason}")


_ROW_COUNT = re.compile(r"Expected \d+ columns, got \d+")
_QUOTED = re.compile(r"(?<![A-Za-z])'.*'(?![A-Za-z])", re.DOTALL)
"""A quoted value: from an opening quote (not an apostrophe inside a word) to the last
closing one."""
_OPENING_QUOTE = re.compile(r"(?<![A-Za-z])['\"]")
_LONG_NUMBER = re.compile(r"\d[\d.]{4,}")
"""Five digits or more: a phone or an id number that a cast error prints unquoted."""


def arrow_reason(exc: BaseException) -> str:
    """pyarrow's reason for refusing a file or a column, without the data it quotes: a log's
    rows hold customer keys, and a user's file may hold personal data in any column, so
    neither a row's text nor a cell's value may reach a message (which lands in job logs).

    ``CSV parse error: Expected 13 columns, got 14: <the row>`` keeps its first part;
    ``Failed to parse string: 'value' as ...`` gets the value replaced; numbers of five
    digits or more (``Integer value 13812345678 not in range``) are replaced; what follows
    any other opening quote is cut.
    """
    text = (str(exc).splitlines() or [""])[0] or type(exc).__name__
    counted = _ROW_COUNT.search(text)
    if counted is not None:  # the row's text follows the counts
        return text[: counted.end()] + " (the row's text is not shown)"
    text = _LONG_NUMBER.sub("<number not shown>", _QUOTED.sub("<value not shown>", text))
    quote = _OPENING_QUOTE.search(text)
    return text if quote is None else text[: quote.start()] + "<not shown>"


def check_column_names(names: Sequence[str], source: str) -> list[str]:
    """Check the column names of a log file against the schema, before its columns are read;
    the columns outside the schema, to be left out (:func:`warn_unknown_columns`).

    A column that differs from a schema column only in case, surrounding spaces, ``-`` or
    ``_`` (``Pscore``, ``" pscore"``, ``candidate-actions``) is refused: it would be left out
    as unknown, and a log whose ``pscore`` is misspelt read as one without propensities.

    Raises
    ------
    DecisionLogError
        Naming ``source``, the column and the schema column it resembles.
    """
    repeated = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if repeated is not None:
        raise DecisionLogError(source, repeated, "the file has this column twice: drop one")
    unknown = [name for name in names if name not in DECISION_SCHEMA.names]
    for name in unknown:
        meant = _SPELLINGS.get(_spelling(name))
        if meant is not None:
            both = f" (the file also has {meant!r}: drop one)" if meant in names else ""
            raise DecisionLogError(
                source, name, f"not in the decision schema: did you mean {meant!r}?{both}"
            )
    return unknown


def warn_unknown_columns(unknown: Iterable[str], source: str) -> None:
    """One warning naming the columns of ``source`` (a file, or a directory of parts) that
    are left out, each with the schema column it may have meant; none if there are none."""
    described = []
    for name in dict.fromkeys(unknown):
        close = difflib.get_close_matches(name, DECISION_SCHEMA.names, n=1, cutoff=0.8)
        described.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    if described:
        log.warning(
            "%s: columns not in the decision schema, left out: %s", source, ", ".join(described)
        )


def _spelling(name: str) -> str:
    """A column name without its case, surrounding spaces, ``-`` and ``_``."""
    return name.strip().lower().replace("-", "").replace("_", "")


_SPELLINGS = {_spelling(name): name for name in DECISION_SCHEMA.names}
"""Schema column of each :func:`_spelling` (no two schema columns share one)."""


def decisions_table(columns: dict[str, object]) -> pa.Table:
    """Build a decision table from column arrays (missing nullable columns become nulls).

    Raises
    ------
    DecisionLogError
        If a required column is missing or columns have different lengths.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DecisionLogError("<columns>", missing[0], "required column is missing")
    unknown = [c for c in columns if c not in DECISION_SCHEMA.names]
    if unknown:
        raise DecisionLogError("<columns>", unknown[0], "not a column of the decision schema")
    lengths = {name: len(values) for name, values in columns.items()}  # type: ignore[arg-type]
    n = lengths["decision_id"]
    for name, length in lengths.items():
        if length != n:
            raise DecisionLogError("<columns>", name, f"has {length} rows but decision_id has {n}")
    arrays = []
    for field in DECISION_SCHEMA:
        if field.name in columns:
            try:
                arrays.append(pa.array(columns[field.name], type=field.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
                raise DecisionLogError(
                    "<columns>", field.name, f"cannot convert: {arrow_reason(exc)}"
                ) from None
        else:
            arrays.append(pa.nulls(n, type=field.type))
    return pa.Table.from_arrays(arrays, schema=DECISION_SCHEMA)


def validate_decisions(
    table: pa.Table,
    n_actions: int | None = None,
    n_features: int | None = None,
    source: str = "<table>",
) -> pa.Table:
    """Check a decision table against the schema and its invariants; return it in schema order.

    Checks: required columns present and non-null, times with a time zone (a naive time
    would be read as UTC), types castable to the schema, unique
    ``decision_id``, ``0 < pscore <= 1``, ``action`` within the catalogue and among the
    row's ``candidate_actions``, ``action_dist`` aligned with ``candidate_actions``, summing
    to 1 and agreeing with ``pscore``, and one context width.

    Raises
    ------
    DecisionLogError
    """
    for field in DECISION_SCHEMA:
        if field.name not in table.column_names:
            if not field.nullable:
                raise DecisionLogError(source, field.name, "required column is missing")
            table = table.append_column(field, pa.nulls(table.num_rows, type=field.type))
    table = table.select(DECISION_SCHEMA.names)
    for field in DECISION_SCHEMA:
        column_type = table.column(field.name).type
        if pa.types.is_timestamp(column_type) and column_type.tz is None:
            # the cast would read it as UTC: local times would shift by their offset
            raise DecisionLogError(
                source,
                field.name,
                "times must carry their UTC offset (a time zone; in CSV ISO 8601 with an "
                "offset, e.g. 2026-01-06T19:05:00+08:00 or 2026-01-06T11:05:00Z)",
            )
    # before the cast, which refuses a null in a non-nullable field without naming the row
    for name in REQUIRED_COLUMNS:
        if table.column(name).null_count:
            row = _first(pc.is_null(table.column(name)))
            raise DecisionLogError(source, name, "must not be null (or empty)", row)
    try:
        table = table.cast(DECISION_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, ValueError) as exc:
        for field in DECISION_SCHEMA:
            try:
                table.column(field.name).cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
                raise DecisionLogError(
                    source, field.name, f"cannot be read as {field.type}: {arrow_reason(exc)}"
                ) from None
        raise DecisionLogError(
            source, "*", f"cannot be read as the decision schema: {arrow_reason(exc)}"
        ) from None
    n = table.num_rows
    if n == 0:
        return table

    ids = table.column("decision_id")
    if pc.count_distinct(ids).as_py() != n:
        counts = pc.value_counts(ids)
        dup = next(v["values"].as_py() for v in counts if v["counts"].as_py() > 1)
        raise DecisionLogError(source, "decision_id", f"duplicate decision id {dup!r}")

    action = table.column("action").to_numpy()
    if n_actions is not None:
        bad = (action < 0) | (action >= n_actions)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DecisionLogError(
                source,
                "action",
                f"action id {action[row]} is outside the catalogue (0..{n_actions - 1})",
                row,
            )

    pscore_col = table.column("pscore")
    pscore = pscore_col.to_numpy(zero_copy_only=False).astype(np.float64)
    # an empty cell (null) is a missing propensity; a NaN is a bad one, refused below
    has_pscore = pscore_col.is_valid().to_numpy(zero_copy_only=False)
    bad = has_pscore & ~((pscore > 0) & (pscore <= 1))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DecisionLogError(source, "pscore", f"must be in (0, 1], got {pscore[row]}", row)
    if has_pscore.any() and not has_pscore.all():
        row = int(np.flatnonzero(~has_pscore)[0])
        raise DecisionLogError(
            source,
            "pscore",
            "is missing on this row but given on others: give every row its propensity, or "
            "none (a log without propensities can only be evaluated with DM)",
            row,
        )
    for name in ("reward", "value_cny"):
        values = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        # null (an outcome not known yet) reads as NaN; infinities are never valid
        bad = np.isinf(values) | (
            np.isnan(values) & table.column(name).is_valid().to_numpy(zero_copy_only=False)
        )
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DecisionLogError(source, name, f"must be finite, got {values[row]}", row)

    cand = table.column("candidate_actions")  # chunked: no 2**31-value limit
    lengths = pc.list_value_length(cand).to_numpy(zero_copy_only=False)
    if (lengths == 0).any():
        row = int(np.flatnonzero(lengths == 0)[0])
        raise DecisionLogError(source, "candidate_actions", "must not be empty", row)
    values = pc.list_flatten(cand).to_numpy()
    owner = np.repeat(np.arange(n), lengths)
    if n_actions is not None:
        outside = (values < 0) | (values >= n_actions)
        if outside.any():
            row = int(owner[np.flatnonzero(outside)[0]])
            raise DecisionLogError(
                source,
                "candidate_actions",
                f"action id {values[outside][0]} is outside the catalogue (0..{n_actions - 1})",
                row,
            )
    _check_distinct_candidates(values, owner, lengths, source)
    chosen_listed = np.bincount(owner, weights=values == action[owner], minlength=n) > 0
    if not chosen_listed.all():
        row = int(np.flatnonzero(~chosen_listed)[0])
        raise DecisionLogError(
            source, "action", f"action {action[row]} is not among the row's candidate_actions", row
        )

    context = table.column("context")  # chunked: no 2**31-value limit
    widths = pc.list_value_length(context).to_numpy(zero_copy_only=False)
    expected = n_features if n_features is not None else int(widths[0])
    if (widths != expected).any():
        row = int(np.flatnonzero(widths != expected)[0])
        raise DecisionLogError(
            source, "context", f"has {widths[row]} features, expected {expected}", row
        )
    features = pc.list_flatten(context).to_numpy(zero_copy_only=False)
    if not np.isfinite(features.sum(dtype=np.float64)):  # one pass when every value is finite
        cell = int(np.flatnonzero(~np.isfinite(features))[0])
        raise DecisionLogError(
            source, "context", f"feature {cell % expected} is {features[cell]}", cell // expected
        )

    dist_col = table.column("action_dist")  # chunked: no 2**31-value limit
    if dist_col.null_count < n:
        _check_action_dist(dist_col, cand, action, pscore, has_pscore, source)
    return table


def _check_distinct_candidates(
    values: np.ndarray, owner: np.ndarray, lengths: np.ndarray, source: str
) -> None:
    """Refuse a row listing a candidate twice (its probability would be counted twice).

    Rows in increasing order, as the journal writes them, pass in one vectorised step. The
    others are counted action by action, a block of rows at a time (a row x action table
    of at most :data:`_DISTINCT_CELLS` cells), so that a log of unsorted rows costs about
    as much as a sorted one."""
    same_row = owner[1:] == owner[:-1]
    suspects = np.unique(owner[1:][same_row & (values[1:] <= values[:-1])])
    if not suspects.size:
        return
    low = min(int(values.min()), 0)  # ids not checked against a catalogue may be negative
    width = int(values.max()) - low + 1
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    block = max(1, _DISTINCT_CELLS // width)
    for first in range(0, len(suspects), block):
        rows = suspects[first : first + block]
        sizes = lengths[rows]
        local = np.repeat(np.arange(len(rows)), sizes)
        # positions of these rows' entries in ``values``
        at = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        ids = values[at + np.repeat(starts[rows], sizes)] - low
        counts = np.bincount(local * width + ids, minlength=len(rows) * width)
        if (counts > 1).any():
            cell = int(np.flatnonzero(counts > 1)[0])
            raise DecisionLogError(
                source,
                "candidate_actions",
                f"lists action {cell % width + low} twice",
                int(rows[cell // width]),
            )


_DISTINCT_CELLS = 4_000_000
"""Cells of the row x action count table :func:`_check_distinct_candidates` builds at once
(32 MB of int64 counts at most)."""


def _check_action_dist(
    dist: pa.Array,
    cand: pa.Array,
    action: np.ndarray,
    pscore: np.ndarray,
    has_pscore: np.ndarray,
    source: str,
) -> None:
    present = ~dist.is_null().to_numpy(zero_copy_only=False)
    widths = pc.list_value_length(dist).to_numpy(zero_copy_only=False)
    cand_widths = pc.list_value_length(cand).to_numpy(zero_copy_only=False)
    bad = present & (widths != cand_widths)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DecisionLogError(
            source,
            "action_dist",
            f"has {widths[row]} entries but candidate_actions has {cand_widths[row]}",
            row,
        )
    rows = np.flatnonzero(present)
    keep = pa.array(present)
    probs = pc.list_flatten(dist.filter(keep)).to_numpy().astype(np.float64)
    ids = pc.list_flatten(cand.filter(keep)).to_numpy()
    owner = np.repeat(np.arange(len(rows)), cand_widths[rows])
    sums = np.bincount(owner, weights=probs, minlength=len(rows))
    negative = np.bincount(owner, weights=probs < 0, minlength=len(rows)) > 0
    bad_rows = ~(np.abs(sums - 1.0) <= 1e-3) | negative  # NaN sums are bad too
    if bad_rows.any():
        row = int(rows[np.flatnonzero(bad_rows)[0]])
        raise DecisionLogError(source, "action_dist", "must be non-negative and sum to 1", row)
    chosen = ids == action[rows][owner]
    chosen_p = np.bincount(owner, weights=np.where(chosen, probs, 0.0), minlength=len(rows))
    logged = pscore[rows]
    mismatch = has_pscore[rows] & (
        np.abs(chosen_p - logged) > PSCORE_ATOL + PSCORE_RTOL * np.maximum(chosen_p, logged)
    )
    if mismatch.any():
        i = int(np.flatnonzero(mismatch)[0])
        raise DecisionLogError(
            source,
            "pscore",
            f"{pscore[rows[i]]} differs from the action_dist entry of the chosen action "
            f"({chosen_p[i]:.6g})",
            int(rows[i]),
        )


def _first(mask: pa.ChunkedArray) -> int:
    return int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])


def write_decisions(table: pa.Table, path: str | Path) -> Path:
    """Write decisions as Parquet; atomic (a reader never sees a half-written file).

    ``path`` ending in ``.parquet`` is written as one file; otherwise ``path`` is a log
    directory and a new part file is added to it (existing parts are never touched).
    Returns the file written.
    """
    table = validate_decisions(table)
    path = Path(path)
    if path.suffix == ".parquet":
        target = path
        target.parent.mkdir(parents=True, exist_ok=True)
    else:
        path.mkdir(parents=True, exist_ok=True)
        target = path / f"part-{uuid.uuid4().hex}.parquet"
    tmp = target.with_name(f".{target.name}.tmp")
    pq.write_table(table, tmp, **PARQUET_OPTIONS)
    os.replace(tmp, target)
    return target


def read_decisions(
    path: str | Path, n_actions: int | None = None, n_features: int | None = None
) -> pa.Table:
    """Read and validate a decision log: one Parquet file, a directory of part files, or the
    service's decision journal (``journal.db``, or a state directory holding one).

    Raises
    ------
    DecisionLogError
        If the file is missing, unreadable, has a misspelt schema column
        (:func:`check_column_names`; other unknown columns are left out with one warning,
        for all the parts of a directory), or
        fails :func:`validate_decisions`.
    """
    path = Path(path)
    # imported here: the journal module builds on this one
    from nextbest.decision_journal import journal_file, read_journal

    journal = journal_file(path)
    if journal is not None:
        try:
            table = read_journal(journal)
        except sqlite3.Error as exc:
            raise DecisionLogError(str(journal), "*", f"not a readable journal: {exc}") from None
        return validate_decisions(table, n_actions, n_features, source=str(journal))
    if path.is_dir():
        files = sorted(p for p in path.glob("*.parquet") if not p.name.startswith("."))
        if not files:
            raise DecisionLogError(str(path), "*", "directory holds no .parquet files")
    elif path.exists():
        files = [path]
    else:
        raise DecisionLogError(str(path), "*", "no such file or directory")
    tables = []
    unknown: list[str] = []
    for file in files:
        try:
            part = pq.read_table(file)
        except (pa.ArrowInvalid, OSError) as exc:
            if file.suffix == ".parquet":
                reason = "not a readable Parquet file"
            else:  # a journal.db that is not a SQLite database lands here too
                reason = "neither a service journal (SQLite) nor a readable Parquet file"
            raise DecisionLogError(str(file), "*", f"{reason}: {arrow_reason(exc)}") from None
        unknown += check_column_names(part.column_names, str(file))
        tables.append(validate_decisions(part, n_actions, n_features, source=str(file)))
    warn_unknown_columns(unknown, str(path))  # once for all the parts
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if len(tables) > 1:
        validate_decisions(table, n_actions, n_features, source=str(path))
    return table


class DecisionLogWriter:
    """Streams decision batches into one new Parquet part file of a log directory.

    The part is written under a hidden temporary name and renamed into place by
    :meth:`close`, so readers never see a half-written file and existing parts are never
    touched. Compression and file writing run on a background thread (pyarrow releases the
    GIL), with at most ``queue_size`` batches waiting, so a producer such as the simulator
    keeps working meanwhile. Use as a context manager; on an exception the temporary file is
    removed.

    Parameters
    ----------
    directory : path
        Log directory (created if missing).
    n_actions : int, optional
        Catalogue size, for validation.
    validate : bool
        Validate each batch before queueing it (``read_decisions`` validates again on read).
    """

    def __init__(
        self,
        directory: str | Path,
        n_actions: int | None = None,
        validate: bool = True,
        queue_size: int = 2,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.n_actions = n_actions
        self.validate = validate
        self.path = self.directory / f"part-{uuid.uuid4().hex}.parquet"
        self._tmp = self.directory / f".{self.path.name}.tmp"
        self._writer = pq.ParquetWriter(self._tmp, DECISION_SCHEMA, **PARQUET_OPTIONS)
        self._queue: queue.Queue[pa.Table | None] = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="decision-log-writer", daemon=True)
        self._thread.start()
        self._closed = False
        self.rows = 0

    def _drain(self) -> None:
        while True:
            table = self._queue.get()
            if table is None:
                return
            if self._error is None:
                try:
                    self._writer.write_table(table)
                except BaseException as exc:  # surfaced to the producer on its next call
                    self._error = exc

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise DecisionLogError(str(self.path), "*", f"writing failed: {self._error}")

    def write(self, table: pa.Table) -> None:
        """Queue ``table`` (validated first when ``validate``) to be appended as a row group."""
        if self._closed:
            raise RuntimeError("the writer is closed")
        self._raise_pending()
        if self.validate:
            table = validate_decisions(table, self.n_actions, source=str(self.path))
        elif table.schema != DECISION_SCHEMA:
            table = table.cast(DECISION_SCHEMA)
        self._queue.put(table)
        self.rows += table.num_rows

    def _finish(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._writer.close()

    def close(self) -> Path | None:
        """Finish the part file and move it into place; None (and no file) if no rows."""
        if self._closed:
            return self.path if self.path.exists() else None
        self._finish()
        if self._error is not None:
            self._tmp.unlink(missing_ok=True)
            self._raise_pending()
        if self.rows == 0:
            self._tmp.unlink(missing_ok=True)
            return None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the unfinished part file."""
        if not self._closed:
            self._finish()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> DecisionLogWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
