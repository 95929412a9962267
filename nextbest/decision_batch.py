"""Decisions as arrays (:class:`DecisionBatch`), the unit the decision journal writes and
reads, and their ids (:func:`new_decision_ids`)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from nextbest.exploration import (
    epsilon_greedy_candidate_probabilities,
    epsilon_greedy_pscore,
)


@dataclass(frozen=True)
class DecisionBatch:
    """``n`` decisions as arrays, the input of
    :meth:`~nextbest.decision_journal.JournalWriter.submit`.

    Variable-length lists (candidates, action distribution) are flat arrays cut by
    ``candidate_offsets``, as in Arrow: the candidates of row ``i`` are
    ``candidate_actions[candidate_offsets[i]:candidate_offsets[i + 1]]``. The versions and the
    policy are one value per batch (a batch is served by one model). A row's candidates
    may come in any order (they are stored as a bitmap and read back sorted, each with its
    probability); an action listed twice in a row is refused. The scalar columns are
    serialised when the batch is submitted; the arrays are read when the writer thread gets
    to the batch: do not modify them until the future resolves.

    Parameters
    ----------
    decision_id : sequence of str ``(n,)``
    timestamp_us : int64 ``(n,)`` or int
        Decision time, microseconds since the epoch (UTC); one int for the whole batch.
    customer_key : sequence of str ``(n,)``
        Pseudonymised keys (:func:`nextbest.privacy.pseudonymise`), never raw identifiers.
    context : float32 ``(n, F)``
        Encoded features the policy saw.
    candidate_offsets : int ``(n + 1,)``
        Starts of each row's candidates in ``candidate_actions``; ``[0, ..., total]``.
    candidate_actions : int32 ``(total,)`` or None
        Allowed action ids of every row; None when ``candidate_mask`` holds them
        (:meth:`candidates` gives them either way).
    action : int32 ``(n,)``
    pscore : float64 ``(n,)`` or None
        Propensity of the chosen action, in (0, 1].
    action_dist : float32 ``(total,)`` or None
        Probability of each candidate, aligned with ``candidate_actions``.
    campaign_id : str, sequence of str ``(n,)`` or None
    policy, model_version, ruleset_version, catalog_version, feature_spec_version : str
    candidate_mask : bool ``(n, A)`` or None
        The allowed actions as a mask, instead of ``candidate_actions`` (exactly one of the
        two; :meth:`from_mask` keeps its mask): the journal packs it into its bitmap as it is.
    blocked_by : uint8 ``(n, A)`` or None
        For traceability: per action, the index in ``rule_ids`` of the first rule that
        blocked it, 255 (:data:`~nextbest.compliance.ALLOWED`) where the rules allowed it
        (an allowed action may still not be a candidate: the request left it out).
    rule_ids : sequence of str or None
        The rule set's rule ids in order (given with ``blocked_by``).
    """

    decision_id: Sequence[str]
    timestamp_us: np.ndarray | int
    customer_key: Sequence[str]
    context: np.ndarray
    candidate_offsets: np.ndarray
    candidate_actions: np.ndarray | None
    action: np.ndarray
    pscore: np.ndarray | None
    action_dist: np.ndarray | None
    policy: str
    model_version: str
    ruleset_version: str
    catalog_version: str
    feature_spec_version: str
    campaign_id: str | Sequence[str | None] | None = None
    candidate_mask: np.ndarray | None = None
    blocked_by: np.ndarray | None = None
    rule_ids: Sequence[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.decision_id)
        if self.blocked_by is not None:
            blocked = np.asarray(self.blocked_by)
            if blocked.ndim != 2 or len(blocked) != n or blocked.dtype != np.uint8:
                raise ValueError(
                    f"blocked_by must be uint8 of shape (n={n}, A), got {blocked.dtype} "
                    f"{blocked.shape}"
                )
            if self.rule_ids is None:
                raise ValueError("blocked_by needs rule_ids (the rules its codes index)")
            if self.candidate_mask is not None:  # the same actions as the mask
                width = self.candidate_mask.shape[1]
                fits = blocked.shape[1] == width
            else:  # at least every listed candidate
                width = int(np.max(self.candidate_actions, initial=-1)) + 1
                fits = blocked.shape[1] >= width
            if not fits:
                raise ValueError(
                    f"blocked_by has {blocked.shape[1]} actions, the candidates {width}"
                )
        if self.candidate_mask is not None and (
            self.candidate_mask.ndim != 2 or len(self.candidate_mask) != n
        ):
            raise ValueError(
                f"candidate_mask must have shape (n={n}, A), got {self.candidate_mask.shape}"
            )
        context = np.asarray(self.context)
        if context.ndim != 2 or len(context) != n:
            raise ValueError(f"context must have shape (n={n}, F), got {context.shape}")
        offsets = np.asarray(self.candidate_offsets)
        if (self.candidate_actions is None) == (self.candidate_mask is None):
            raise ValueError("give exactly one of candidate_actions and candidate_mask")
        total = (
            len(self.candidate_actions) if self.candidate_actions is not None else int(offsets[-1])
        )
        if (
            offsets.shape != (n + 1,)
            or offsets[0] != 0
            or offsets[-1] != total
            or (np.diff(offsets) <= 0).any()
        ):
            raise ValueError(
                f"candidate_offsets must be increasing, shape ({n + 1},), from 0 to "
                f"len(candidate_actions)={total}, with no empty row"
            )
        if (
            self.candidate_mask is not None
            and (np.count_nonzero(self.candidate_mask, axis=1) != np.diff(offsets)).any()
        ):
            raise ValueError("candidate_offsets must count each row's allowed actions in the mask")
        lengths = {
            "customer_key": len(self.customer_key),
            "action": len(self.action),
        }
        if self.pscore is not None:
            lengths["pscore"] = len(self.pscore)
        if np.ndim(self.timestamp_us):
            lengths["timestamp_us"] = len(np.asarray(self.timestamp_us))
        if self.campaign_id is not None and not isinstance(self.campaign_id, str):
            lengths["campaign_id"] = len(self.campaign_id)
        for name, length in lengths.items():
            if length != n:
                raise ValueError(f"{name} has {length} rows but decision_id has {n}")
        if self.pscore is not None:  # NaN: unknown for that row (stored as null)
            pscore = np.asarray(self.pscore, np.float64)
            bad = np.flatnonzero(~np.isnan(pscore) & ~((pscore > 0) & (pscore <= 1)))
            if len(bad):
                raise ValueError(
                    f"pscore must be in (0, 1], got {float(pscore[bad[0]])} at row {int(bad[0])}"
                )
        campaigns = self.campaign_id
        texts = {
            "decision_id": "".join(self.decision_id),
            "customer_key": "".join(self.customer_key),
            "campaign_id": campaigns
            if campaigns is None or isinstance(campaigns, str)
            else "".join(c for c in campaigns if c is not None),
            **{name: getattr(self, name) for name in VERSION_FIELDS},
        }
        for name, text in texts.items():
            if text is not None and "\x00" in text:  # SQLite's JSON text would end there
                raise ValueError(f"{name} contains a NUL character")
        if self.action_dist is not None and len(self.action_dist) != total:
            raise ValueError(
                f"action_dist has {len(self.action_dist)} entries but candidate_actions {total}"
            )

    def __len__(self) -> int:
        return len(self.decision_id)

    def candidates(self) -> np.ndarray:
        """Allowed action ids of every row, int32 ``(total,)`` (read from the mask when the
        batch has no list)."""
        if self.candidate_actions is not None:
            return np.asarray(self.candidate_actions)
        mask = np.asarray(self.candidate_mask)
        return (np.flatnonzero(mask) % mask.shape[1]).astype(np.int32)

    @classmethod
    def from_mask(
        cls,
        allowed: np.ndarray,
        action_dist: np.ndarray | None,
        action: np.ndarray,
        epsilon_greedy: tuple[np.ndarray, float] | None = None,
        **fields: Any,
    ) -> DecisionBatch:
        """Decisions from dense per-action arrays, as a scorer produces them.

        Parameters
        ----------
        allowed : bool ``(n, A)``
            Actions the rules allowed (the candidates); every row needs one.
        action_dist : float ``(n, A)`` or None
            Probability of each action (0 where not allowed); only allowed entries are kept.
        action : int ``(n,)``
            Chosen actions.
        epsilon_greedy : (greedy int ``(n,)``, epsilon), optional
            Instead of ``action_dist``: the epsilon-greedy distribution around each row's
            greedy action (which must be allowed), computed on the allowed entries only.
        **fields
            The other fields of :class:`DecisionBatch` (``pscore`` defaults to the chosen
            action's probability under the distribution given).
        """
        allowed = np.asarray(allowed, bool)
        n, n_actions = allowed.shape
        # flat positions of the allowed entries: one pass over the mask (np.nonzero's row
        # and column arrays cost ten times as much on a 10,000 x 361 mask); the batch keeps
        # the mask instead of a list of action ids (see candidates())
        flat = np.flatnonzero(allowed)
        # each row's start among them (a bool row count would cast the whole mask to int)
        offsets = np.searchsorted(flat, np.arange(n + 1) * n_actions).astype(np.int64)
        counts = np.diff(offsets)
        dist = None
        if epsilon_greedy is not None:
            if action_dist is not None:
                raise ValueError("give action_dist or epsilon_greedy, not both")
            greedy, epsilon = epsilon_greedy
            greedy = np.asarray(greedy, np.int64)
            if not allowed[np.arange(n), greedy].all():
                raise ValueError("every row's greedy action must be allowed")
            # the greedy action's place among the sorted flat positions of the allowed ones
            greedy_index = np.searchsorted(flat, np.arange(n) * n_actions + greedy)
            dist = epsilon_greedy_candidate_probabilities(counts, greedy_index, epsilon)
            if "pscore" not in fields:
                fields["pscore"] = epsilon_greedy_pscore(allowed, greedy, action, epsilon, counts)
        elif action_dist is not None:
            dense = np.asarray(action_dist)
            if dense.shape != allowed.shape:
                raise ValueError(
                    f"action_dist has shape {dense.shape}, allowed {allowed.shape}: they must match"
                )
            dist = dense.reshape(-1).take(flat).astype(np.float32)
            fields.setdefault("pscore", dense[np.arange(n), action].astype(np.float64))
        return cls(
            candidate_offsets=offsets,
            candidate_actions=None,
            action=np.asarray(action, np.int32),
            action_dist=dist,
            candidate_mask=allowed,
            **{"pscore": None, **fields},
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> DecisionBatch:
        """The decisions of a table in :data:`~nextbest.decision_log.DECISION_SCHEMA`
        (outcome columns ignored; one value of each version column expected)."""
        versions = {}
        for name in VERSION_FIELDS:
            values = table.column(name).unique().to_pylist()
            if len(values) > 1:
                raise ValueError(f"{name} must have one value per batch, got {values[:3]}")
            versions[name] = values[0] if values else ""
        cand = table.column("candidate_actions").combine_chunks()
        context = table.column("context").combine_chunks()
        dist = table.column("action_dist").combine_chunks()
        n = table.num_rows
        ts = table.column("timestamp").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        pscore = table.column("pscore")
        return cls(
            decision_id=table.column("decision_id").to_pylist(),
            timestamp_us=ts.to_numpy(),
            customer_key=table.column("customer_key").to_pylist(),
            context=context.flatten().to_numpy().reshape(n, -1) if n else np.zeros((0, 0)),
            candidate_offsets=_list_offsets(cand),
            candidate_actions=cand.flatten().to_numpy(),
            action=table.column("action").to_numpy(),
            pscore=None if pscore.null_count == n else pscore.to_numpy(),
            action_dist=dist.flatten().to_numpy() if n and dist.null_count == 0 else None,
            campaign_id=table.column("campaign_id").to_pylist(),
            **versions,
        )


def _list_offsets(array: pa.Array) -> np.ndarray:
    offsets = array.offsets.to_numpy()
    return offsets - offsets[0]


def new_decision_ids(n: int) -> list[str]:
    """``n`` unique, time-ordered decision ids: 32 hex characters, UUIDv7-like (48 bits of
    milliseconds, then 76 random bits).

    Time-ordered ids keep appends to the journal's id index local (random ids scatter them
    over the whole index); they reveal nothing about the customer.
    """
    ms = time.time_ns() // 1_000_000
    head = f"{ms & 0xFFFF_FFFF_FFFF:012x}7"
    tails = os.urandom(10 * n).hex()
    return [head + tails[20 * i : 20 * i + 19] for i in range(n)]


VERSION_FIELDS = (
    "policy",
    "model_version",
    "ruleset_version",
    "catalog_version",
    "feature_spec_version",
)
"""What served a decision; stored once per combination in ``versions``."""
