"""The scoring service behind the routes: what happens between a parsed request and its answer.

:meth:`ScoringService.start` builds the heavy objects once (catalogue, rule engine, model
store, decision engine, decision journal, contact store, API keys); the FastAPI lifespan
calls it. A decision request then runs, on the event loop:

1. the customer id is pseudonymised (nothing downstream ever sees it in clear);
2. stored contacts of the customer are read (one SQLite query) and merged into the history
   the request brought, so caps and minimum gaps hold across requests and workers;
3. the decision engine computes features, the rules mask over the full catalogue, the
   model scores, the exploration draw and the ranking (numpy and ONNX Runtime, inline: a
   thread hop would cost more than the work for one customer);
4. the decision goes to the journal and the recommended contact to the contact store,
   which refuses it if another worker stored a contact of the customer since the lookup
   (then the decision is withdrawn from the journal and the customer decided again on that
   history); the answer waits until both are committed (group commit on the writers'
   threads): an acknowledged decision is never lost, and the next request on any worker
   sees the contact.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, NamedTuple, TypeVar

import numpy as np
from fastapi import HTTPException
from pydantic_core import to_json

from nextbest.catalog import ActionCatalog, load_catalog
from nextbest.compliance import RuleEngine, code_counts, load_rules
from nextbest.context import ContextBatch, CustomerContext, parse_customer
from nextbest.customer_columns import CustomerColumns, context_batch
from nextbest.decision_batch import DecisionBatch, new_decision_ids
from nextbest.decision_journal import JournalWriter
from nextbest.features import ContextEncoder
from nextbest.privacy import message_key, pseudonymise, pseudonymise_many
from nextbest.rewards import (
    ArchivedDecisionError,
    DecidedFor,
    RewardConflictError,
    RewardOutcome,
    RewardRule,
    RewardTimeError,
    UnknownDecisionError,
)
from nextbest.send_schedule import SendSchedule
from nextbest.timestamps import epoch_us, from_epoch_us
from serving import metrics
from serving.campaigns import Campaigns, load_campaigns
from serving.contact_history import (
    LONGEST_WINDOW,
    ContactBatch,
    ContactConflictError,
    ContactStore,
    merge_into_batch,
)
from serving.customer_restrictions import (
    Consent,
    Restriction,
    apply_restrictions,
    opt_outs_in_force,
)
from serving.decision_engine import DecisionEngine, Decisions, pick
from serving.model_store import LoadedModel, ModelStore
from serving.pseudonym_binding import PseudonymKeyError, bind_pseudonym_key
from serving.schemas import (
    EXAMPLE_CUSTOMER,
    BatchDecisionRequest,
    BlockedAction,
    ChosenAction,
    ConsentRequest,
    ConsentResponse,
    DecisionRequest,
    DecisionResponse,
    DeliveryRequest,
    DeliveryResponse,
    RankedAction,
    Readiness,
    ReloadResponse,
    RewardRequest,
    RewardResponse,
    batch_request_model,
)
from serving.security import ApiKeys, KeyFileError
from serving.settings import Settings, is_development_key
from serving.sqlite_contact_store import SqliteContactStore

log = logging.getLogger("nextbest.serving")
T = TypeVar("T")
_Counts = tuple[np.ndarray, np.ndarray]


PIPELINE_ROWS = 2_500
"""Customers per part of a batch request (see :meth:`ScoringService.decide_batch`)."""

INLINE_COMMIT_ROWS = 64
"""Decisions of one call at most for which the stores may commit on the event loop (a few
tens of microseconds); bigger writes always go to the writers' threads."""


async def _committed(future: Future[T]) -> T:
    """The result of a store write, awaited only if it is not already committed.

    Shielded: a request cancelled while it waits (its client went away) does not cancel
    the write, so a submitted part is committed to both stores or to neither by its own
    failure, never dropped from one of them half-way."""
    if future.done():
        return future.result()
    return await asyncio.shield(asyncio.wrap_future(future))


def oversized_batch(rows: int, max_rows: int) -> HTTPException:
    """The 413 of a batch of ``rows`` customers, over the ``max_rows`` a request may hold."""
    return HTTPException(413, f"batch of {rows} customers; at most {max_rows} per request")


def _failed(exc: BaseException) -> Future[Any]:
    """A future that failed with ``exc`` (a write refused before it was queued)."""
    future: Future[Any] = Future()
    future.set_exception(exc)
    return future


MAX_DECISION_ROUNDS = 8
"""Times a customer is decided at most, counting the first: each further time, another worker
stored a contact for them between this worker's lookup and its commit, so the customer's
caps end the rounds long before this (it only stops a pathological loop)."""


@dataclass(frozen=True, slots=True)
class _Part:
    """Customers decided and committed together, with all that deciding them again needs."""

    keys: list[str]
    """Pseudonymised customer keys ``(n,)``."""
    decision_ids: list[str]
    raw: ContextBatch
    """The customers as the requests described them (stored contacts not merged)."""
    candidates: np.ndarray | None
    """bool ``(A,)`` for every customer or ``(n, A)``; None: every action."""
    campaign: str | list[str | None] | None
    k: int
    explain: bool
    model: LoadedModel
    now: datetime

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, rows: np.ndarray | slice) -> _Part:
        """The part of ``rows`` (int ``(m,)`` or a slice)."""
        candidates = self.candidates
        if candidates is not None and candidates.ndim == 2:
            candidates = candidates[rows]
        campaign = self.campaign
        return _Part(
            pick(self.keys, rows),
            pick(self.decision_ids, rows),
            self.raw.take(rows),
            candidates,
            pick(campaign, rows) if isinstance(campaign, list) else campaign,
            self.k,
            self.explain,
            self.model,
            self.now,
        )


class _StillContactedError(Exception):
    """Some customers of a part were still refused after :data:`MAX_DECISION_ROUNDS`
    rounds; the others' decisions are served (journalled)."""

    def __init__(
        self, result: Decisions, decision_ids: list[str], rows: np.ndarray, rounds: int
    ) -> None:
        super().__init__(f"{len(rows)} customer(s) refused {rounds} times")
        self.result = result
        """The part's decisions; those of ``rows`` are not served."""
        self.decision_ids = decision_ids
        self.rows = rows
        """int ``(m,)``: the part's rows not served."""
        self.rounds = rounds

    def http(self) -> HTTPException:
        """The answer for a request of the refused customers: 503."""
        return HTTPException(
            503,
            "another worker contacted the customer while it was being decided, "
            f"{self.rounds} times in a row; ask again",
        )


def _replace_ids(ids: list[str], rows: np.ndarray, new_ids: list[str]) -> None:
    """Put ``new_ids`` ``(m,)`` at ``rows`` ``(m,)`` of ``ids``, in place."""
    for row, decision_id in zip(rows.tolist(), new_ids, strict=True):
        ids[row] = decision_id


@dataclass(frozen=True, slots=True)
class _Writes:
    """The store writes of one part's decisions, under way (:meth:`ScoringService.settle`
    awaits them)."""

    part: _Part
    result: Decisions
    done: Future[list[str]]
    """Resolves once the decisions are journalled and their contacts stored (or refused):
    to the decision ids whose contacts the store refused (:func:`_both_written`)."""


def _both_written(journalled: Future[int], recorded: Future[list[str]]) -> Future[list[str]]:
    """One future for the two writes of a part, resolved on the writers' threads once both
    are done (the event loop is woken once): the contact ids the store refused, or the
    first error."""
    done: Future[list[str]] = Future()
    waiting = [journalled, recorded]
    lock = threading.Lock()

    def one_done(_: Future[Any]) -> None:
        with lock:
            waiting.pop()
            if waiting:
                return
        try:
            error = journalled.exception() or recorded.exception()
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(recorded.result())
        except BaseException as exc:  # a cancelled write
            done.set_exception(exc)

    for future in list(waiting):
        future.add_done_callback(one_done)
    return done


def _warm_up_customer(catalog: ActionCatalog) -> CustomerContext:
    """The example customer without the channel and offer names it mentions: valid under
    any catalogue, it lets start-up warm the columnar path (pyarrow's first time casts
    cost ~0.3 s) whatever channels and offers the bank has."""
    return parse_customer(
        {
            **EXAMPLE_CUSTOMER,
            "holdings": [],
            "consented_channels": [],
            "contact_history": {
                "last_contact_at": EXAMPLE_CUSTOMER["contact_history"]["last_contact_at"]
            },
            "events": {},
        },
        catalog,
    )


@dataclass(frozen=True, slots=True)
class _ActionView:
    """Per-action fields of the responses, computed once per catalogue."""

    channel: tuple[str | None, ...]
    offer: tuple[str | None, ...]
    timing: tuple[str | None, ...]
    names: np.ndarray
    """Action names, an object array ``(A,)``: one action or many at once."""

    @classmethod
    def of(cls, catalog: ActionCatalog) -> _ActionView:
        return cls(
            tuple(a.channel for a in catalog.actions),
            tuple(a.offer for a in catalog.actions),
            tuple(a.timing for a in catalog.actions),
            np.array([a.name for a in catalog.actions], dtype=object),
        )

    def ranked(self, action: int, score: float) -> RankedAction:
        return RankedAction(
            action=self.names[action],
            action_index=action,
            channel=self.channel[action],
            offer=self.offer[action],
            timing=self.timing[action],
            score=score,
        )


@dataclass(frozen=True, slots=True)
class _Pending:
    """One single-customer request waiting to be decided with the others of its moment."""

    customer: CustomerContext
    key: str
    """Pseudonymised customer key."""
    mask: np.ndarray | None
    k: int
    explain: bool
    campaign_id: str | None


class _Coalescer:
    """Decides the single-customer requests that arrive together as one batch.

    The first request of a moment schedules a flush with ``call_soon``: every request the
    event loop reaches before that callback joins the batch, so a lone request waits for
    nothing, and under load the per-call costs (engine call, contact-store query, journal
    and contact-store transactions) are paid once for many requests.

    A group holds each customer once: a second request for a customer waits for the next
    group, which looks up the contact history after the first group's contacts were handed
    to the store (it counts them, committed or not), so caps and gaps hold between the two.
    A request whose input makes the group's decision fail is decided again alone, with the
    others alone too, so that only it fails.
    """

    def __init__(self, service: ScoringService, max_batch: int = 256) -> None:
        self._service = service
        self._max_batch = max_batch
        self._waiting: list[tuple[_Pending, asyncio.Future[tuple[Decisions, int, str]]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def decide(self, pending: _Pending) -> tuple[Decisions, int, str]:
        """The decisions of ``pending``'s batch, its row in them and its decision id."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Decisions, int, str]] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._flush)
        self._waiting.append((pending, future))
        return await future

    def _flush(self) -> None:
        while self._waiting:
            group, later, customers = [], [], set()
            for item in self._waiting:
                if len(group) < self._max_batch and item[0].key not in customers:
                    customers.add(item[0].key)
                    group.append(item)
                else:
                    later.append(item)
            self._waiting = later
            # tasks start in order, and each hands its contacts to the store before it
            # first waits, so a later group's lookup sees an earlier group's contacts
            task = asyncio.get_running_loop().create_task(self._run(group))
            self._tasks.add(task)  # keep a reference until done
            task.add_done_callback(self._tasks.discard)

    async def _run(
        self, group: list[tuple[_Pending, asyncio.Future[tuple[Decisions, int, str]]]]
    ) -> None:
        service = self._service
        pending = [p for p, _ in group]
        try:
            decided = service.decide_group(pending)
        except HTTPException as exc:  # the service's state (no model), not a request's input
            _fail(group, exc)
            return
        except Exception as exc:
            if len(group) > 1:  # nothing written yet: decide each request alone
                # tasks start in order, so each still sees the contacts of those before it
                await asyncio.gather(*(self._run([item]) for item in group))
                return
            _fail(group, exc)
            return
        except BaseException as exc:
            _fail(group, exc)
            raise
        unserved: set[int] = set()
        try:
            writes = service.submit(*decided)
            result, ids = await service.settle(writes)
        except _StillContactedError as exc:
            result, ids, unserved = exc.result, exc.decision_ids, set(exc.rows.tolist())
            _fail([group[row] for row in sorted(unserved)], exc.http())
        except BaseException as exc:
            _fail(group, exc)
            if not isinstance(exc, Exception):
                raise
            return
        for row, (_, future) in enumerate(group):
            if row not in unserved and not future.done():  # the caller may have gone
                future.set_result((result, row, ids[row]))
        if unserved:  # counted once every caller has its answer
            served = np.setdiff1d(np.arange(len(group)), sorted(unserved))
            service.count_served("single", result.take(served))
        else:
            service.count_served("single", result)


def _fail(
    group: list[tuple[_Pending, asyncio.Future[tuple[Decisions, int, str]]]], exc: BaseException
) -> None:
    """Fail every request of ``group`` still waiting with ``exc``."""
    for _, future in group:
        if not future.done():
            future.set_exception(exc)


_FIELDS = ("decision_id", "action", "propensity", "ranked", "scores")


class _BatchAnswer:
    """The ``decisions`` (one dict per decision) or ``columns`` (one list per field) of a
    batch answer, built part by part (:class:`~serving.schemas.BatchDecisionResponse`,
    :class:`~serving.schemas.BatchDecisionColumnsResponse`)."""

    def __init__(self, names: np.ndarray, columns: bool) -> None:
        self._names = names
        self._columns = columns
        self._parts: list[dict[str, list[Any]]] = []

    def add(self, result: Decisions, decision_ids: list[str]) -> None:
        """Append the decisions of one part, ``decision_ids`` ``(n,)`` in its order."""
        self._parts.append(self._fields(result, decision_ids))

    def replace(self, part: int, result: Decisions, decision_ids: list[str]) -> None:
        """Answer part ``part`` (0-based, in the order added) with ``result`` instead (some
        of its customers were decided again)."""
        self._parts[part] = self._fields(result, decision_ids)

    def _fields(self, result: Decisions, decision_ids: list[str]) -> dict[str, list[Any]]:
        names, ranked = self._names, result.ranked
        valid = ranked >= 0
        ranked_names = names[np.where(valid, ranked, 0)]
        ranked_scores = np.round(result.ranked_scores.astype(np.float64), 6)
        if valid.all():
            ranked_lists = ranked_names.tolist()
            score_lists = ranked_scores.tolist()
        else:  # fewer allowed actions than asked for: shorter lists, cut from flat ones
            # (two numpy calls a row: ~3 ms a 2,500-row part, against ~1 ms)
            ends = np.cumsum(valid.sum(axis=1)).tolist()
            cuts = list(zip([0, *ends[:-1]], ends, strict=True))
            flat_names, flat_scores = ranked_names[valid].tolist(), ranked_scores[valid].tolist()
            ranked_lists = [flat_names[a:b] for a, b in cuts]
            score_lists = [flat_scores[a:b] for a, b in cuts]
        return {
            "decision_id": decision_ids,
            "action": names[result.action].tolist(),
            "propensity": np.asarray(result.pscore, np.float64).tolist(),
            "ranked": ranked_lists,
            "scores": score_lists,
        }

    def body(self) -> dict[str, Any]:
        """``{"columns": {...}}`` or ``{"decisions": [...]}``."""
        parts = self._parts
        f = parts[0] if len(parts) == 1 else {n: [v for p in parts for v in p[n]] for n in _FIELDS}
        if self._columns:
            return {"columns": f}
        return {
            "decisions": [
                {"decision_id": d, "action": a, "propensity": p, "ranked": r, "scores": s}
                for d, a, p, r, s in zip(
                    f["decision_id"],
                    f["action"],
                    f["propensity"],
                    f["ranked"],
                    f["scores"],
                    strict=True,
                )
            ]
        }


class Configuration(NamedTuple):
    """What a service reads from its configuration files (:func:`load_configuration`)."""

    catalog: ActionCatalog
    rules: RuleEngine
    campaigns: Campaigns
    api_keys: ApiKeys


def load_configuration(settings: Settings) -> Configuration:
    """Read the catalogue, rule set, campaigns and API keys that ``settings`` name; the
    files only (no model, no state). ``nextbest serve`` calls it before starting workers,
    so that a bad file is one line of error rather than a worker's traceback.

    Raises
    ------
    nextbest.config_loading.ConfigError, serving.security.KeyFileError
        A bad configuration, named with its file and key.
    """
    catalog = load_catalog(settings.catalog_dir)
    return Configuration(
        catalog,
        RuleEngine(load_rules(settings.rules_path, catalog)),
        load_campaigns(settings.campaigns_path, catalog),
        ApiKeys.from_file(settings.api_keys_file),
    )


class ScoringService:
    """Everything a request needs, built once per worker process.

    Use :meth:`start` (it loads configs, the model and opens the stores) and :meth:`close`.
    """

    def __init__(
        self,
        settings: Settings,
        catalog: ActionCatalog,
        rules: RuleEngine,
        campaigns: Campaigns,
        models: ModelStore,
        engine: DecisionEngine,
        journal: JournalWriter,
        contacts: ContactStore,
        api_keys: ApiKeys,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.validation_context: dict[str, Any] = {"catalog": catalog}
        """What request bodies are validated with (:func:`serving.deps.parse_body`): channel and
        offer names against the catalogue."""
        self.batch_request = batch_request_model(settings.max_batch)
        """The batch body's model: more than ``max_batch`` customers are refused (413, whatever
        else is wrong with them)."""
        self.rules = rules
        self.campaigns = campaigns
        self.models = models
        self.engine = engine
        self.journal = journal
        self.contacts = contacts
        self.api_keys = api_keys
        self._keys_failure: str | None = None
        """The last keys-file error logged (:meth:`refresh_api_keys`)."""
        self._key = settings.pseudonym_key
        self._view = _ActionView.of(catalog)
        self._schedule = SendSchedule.of(catalog)
        self._counters = metrics.DecisionCounters(catalog.channel_names, rules.rule_ids)
        self._channel_of = {name: i for i, name in enumerate(catalog.channel_names)}
        self._exploration = settings.exploration
        self._model_version: str | None = None
        self._coalescer = _Coalescer(self)

    @classmethod
    def start(cls, settings: Settings) -> ScoringService:
        """Load the catalogue, rules, campaigns, API keys and model; open the stores.

        Raises
        ------
        nextbest.config_loading.ConfigError, serving.security.KeyFileError
            A bad configuration, named with its file and key.
        """
        catalog, rules, campaigns, api_keys = load_configuration(settings)
        if is_development_key(settings.pseudonym_key):
            log.warning(
                "pseudonyms are made with the public development key: anyone can recompute "
                "a customer's from the id (set NEXTBEST_PSEUDONYMISATION_KEY; only "
                "NEXTBEST_ENVIRONMENT=local allows this, and a state directory keeps its key)"
            )
        if settings.api_keys_file is None:
            log.warning(
                "authentication is off: NEXTBEST_API_KEYS_FILE is not set, so every request "
                "is served without a key (only NEXTBEST_ENVIRONMENT=local allows this; keys: "
                "python -m serving.security create)"
            )
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        # the journal and the contact store hold pseudonymised customers and their features:
        # the owner's only (the files themselves take the umask)
        settings.state_dir.chmod(0o700)
        models = ModelStore(
            settings.model_uri,
            tracking_uri=settings.tracking_uri,
            threads=settings.onnx_threads,
            expected_spec_version=ContextEncoder(catalog).spec.version,
            n_actions=catalog.n_actions,
        )
        engine = DecisionEngine(
            catalog,
            rules,
            models,
            exploration=settings.exploration,
            epsilon=settings.epsilon,
            temperature=settings.temperature,
            seed=settings.seed,
        )
        journal = JournalWriter(
            settings.state_dir,
            RewardRule.from_catalog(
                catalog, settings.complaint_penalty_cny, settings.attribution_window
            ),
            synchronous=settings.journal_synchronous,
        )
        contacts = SqliteContactStore(
            settings.state_dir, catalog.channel_names, synchronous=settings.journal_synchronous
        )
        try:  # both files exist now: a first start records the key's fingerprint
            bind_pseudonym_key(settings.state_dir, settings.pseudonym_key)
        except PseudonymKeyError:
            models.close()
            journal.close()
            contacts.close()
            raise
        service = cls(
            settings, catalog, rules, campaigns, models, engine, journal, contacts, api_keys
        )
        service.note_model()
        # the first columnar batch of a process pays pyarrow's set-up of time casts (~0.3 s)
        context_batch(
            CustomerColumns.from_contexts([_warm_up_customer(catalog)]), catalog, datetime.now(UTC)
        )
        return service

    def close(self) -> None:
        """Commit everything queued and close the stores and the model watcher."""
        self.models.close()
        self.journal.close()
        self.contacts.close()

    # ------------------------------------------------------------------ decisions

    def candidate_mask(
        self,
        candidates: list[str] | None,
        channels: list[str] | None,
        campaign_id: str | None,
    ) -> np.ndarray | None:
        """bool ``(A,)`` of the actions the request may get (None: all); HTTP 400 for an
        unknown action id, channel or campaign."""
        mask = None
        if candidates is not None:
            mask = self._candidates(tuple(candidates))
        if channels is not None:
            by_channel = self._channels(tuple(channels))
            mask = by_channel if mask is None else mask & by_channel
        if campaign_id is not None:
            if campaign_id not in self.campaigns:
                raise HTTPException(400, f"unknown campaign {campaign_id!r}")
            by_campaign = self.campaigns.mask(campaign_id)
            if by_campaign is not None:
                mask = by_campaign if mask is None else mask & by_campaign
        return mask

    @lru_cache(maxsize=256)  # noqa: B019 - one service per process, lives as long as it
    def _candidates(self, names: tuple[str, ...]) -> np.ndarray:
        unknown = [n for n in names if not self.catalog.has_action(n)]
        if unknown:
            raise HTTPException(400, f"unknown action id {unknown[0]!r} in candidates")
        mask = np.zeros(self.catalog.n_actions, bool)
        mask[[self.catalog.action_id(n) for n in names]] = True
        mask[0] = True  # waiting is always a candidate
        return mask

    @lru_cache(maxsize=256)  # noqa: B019
    def _channels(self, names: tuple[str, ...]) -> np.ndarray:
        unknown = [n for n in names if n not in self._channel_of]
        if unknown:
            raise HTTPException(
                400, f"unknown channel {unknown[0]!r}; known: {list(self.catalog.channel_names)}"
            )
        index = [self._channel_of[n] for n in names]
        return np.isin(self.catalog.channel_index, index) | (self.catalog.channel_index < 0)

    def _require_model(self) -> LoadedModel:
        """The model serving now; 503 before any work when none is loaded (the engine
        also refuses)."""
        model = self.models.current
        if model is None:
            raise HTTPException(503, "no model loaded (see /readyz for the reason)")
        return model

    async def decide_json(self, request: DecisionRequest) -> bytes:
        """:meth:`decide`, answered as the JSON body of its :class:`DecisionResponse`."""
        response = await self.decide(request)
        return DecisionResponse.__pydantic_serializer__.to_json(response)

    async def decide(self, request: DecisionRequest) -> DecisionResponse:
        """Decide for one customer; returns once the decision is durable in the journal.

        Concurrent single-customer requests are decided together (see :class:`_Coalescer`):
        one contact-store query, one engine call, one journal and one contact-store commit
        for all of them, so the per-request cost is mostly HTTP.
        """
        self._require_model()
        mask = self.candidate_mask(request.candidates, request.channels, request.campaign_id)
        key = pseudonymise(request.customer.customer_id, self._key)
        result, row, decision_id = await self._coalescer.decide(
            _Pending(request.customer, key, mask, request.k, request.explain, request.campaign_id)
        )
        chosen = int(result.action[row])
        view = self._view
        ranked = [
            view.ranked(a, s)
            for a, s in zip(
                result.ranked[row, : request.k].tolist(),
                result.ranked_scores[row, : request.k].tolist(),
                strict=True,
            )
            if a >= 0
        ]
        blocked = None
        if request.explain:
            blocked = [
                BlockedAction(action=view.names[a], rule=rule) for a, rule in result.blocked[row]
            ]
        return DecisionResponse(
            decision_id=decision_id,
            chosen=ChosenAction(
                action=view.names[chosen],
                action_index=chosen,
                channel=view.channel[chosen],
                offer=view.offer[chosen],
                timing=view.timing[chosen],
                score=float(result.scores[row, chosen]),
                propensity=float(result.pscore[row]),
            ),
            ranked=ranked,
            exploration=self._exploration,
            model_version=result.model_version,
            ruleset_version=self.rules.version,
            catalog_version=self.catalog.version,
            blocked=blocked,
        )

    def decide_group(
        self, pending: list[_Pending]
    ) -> tuple[_Part, Decisions, ContextBatch, int | None]:
        """Decide for the customers of several requests at once (stored contacts merged, one
        engine call), writing nothing: what :meth:`submit` takes. Each customer at most
        once (:class:`_Coalescer` sees to it)."""
        model = self._require_model()
        now = datetime.now(UTC)
        masks = [p.mask for p in pending]
        candidates = None
        if any(m is not None for m in masks):
            candidates = np.ones((len(pending), self.catalog.n_actions), bool)
            for i, m in enumerate(masks):
                if m is not None:
                    candidates[i] = m
        part = _Part(
            keys=[p.key for p in pending],
            decision_ids=new_decision_ids(len(pending)),
            raw=ContextBatch.from_contexts([p.customer for p in pending], self.catalog, now),
            candidates=candidates,
            campaign=[p.campaign_id for p in pending],
            k=max(p.k for p in pending),
            explain=any(p.explain for p in pending),
            model=model,
            now=now,
        )
        batch, position = self._merge_stored(part.keys, part.raw, now)
        return part, self._engine_decide(batch, part), batch, position

    async def decide_batch(self, request: BatchDecisionRequest) -> bytes:
        """Decide for every customer of a batch; the JSON body of a
        :class:`~serving.schemas.BatchDecisionResponse`, or with ``answer="columns"`` of a
        :class:`~serving.schemas.BatchDecisionColumnsResponse` (built without a pydantic
        object per decision: a 10,000-customer batch would spend more time there than
        deciding).

        The batch is decided in parts of :data:`PIPELINE_ROWS` customers, each handed to
        the writers as soon as it is decided: the writers commit one part while the next is
        decided (SQLite runs on the second core, without the GIL), and the answer is sent
        once every part is committed. One model decides the whole batch.
        """
        model = self._require_model()
        n = len(request)
        if n > self.settings.max_batch:
            raise oversized_batch(n, self.settings.max_batch)
        mask = self.candidate_mask(request.candidates, request.channels, request.campaign_id)
        now = datetime.now(UTC)
        keys = pseudonymise_many(request.customer_ids(), self._key)
        if request.columns is not None:
            raw = context_batch(request.columns, self.catalog, now)
        else:
            raw = ContextBatch.from_contexts(request.customers or [], self.catalog, now)
        whole = _Part(
            keys, new_decision_ids(n), raw, mask, request.campaign_id, request.k, False, model, now
        )
        batch, position = self._merge_stored(keys, raw, now)
        answer = _BatchAnswer(self._view.names, columns=request.answer == "columns")
        writes: list[_Writes] = []
        try:
            for start in range(0, n, PIPELINE_ROWS):
                rows = slice(start, start + PIPELINE_ROWS)
                part = whole if n <= PIPELINE_ROWS else whole.take(rows)
                one = batch if n <= PIPELINE_ROWS else batch.take(rows)
                more = start + PIPELINE_ROWS < n  # the writers hold the transaction for it
                writes.append(
                    self.submit(part, self._engine_decide(one, part), one, position, more)
                )
                answer.add(writes[-1].result, part.decision_ids)
        except Exception:
            # parts already handed to the writers are committed before the error is
            # answered, then withdrawn (below); refused decisions are not made again
            await self._withdraw_served(
                await asyncio.gather(
                    *(self.settle(w, decide_again=False) for w in writes), return_exceptions=True
                )
            )
            raise
        body = {
            "exploration": self._exploration,
            "model_version": model.version,
            "ruleset_version": self.rules.version,
            "catalog_version": self.catalog.version,
        }
        # the answer is encoded and counted while the last parts commit (again for a part
        # decided again)
        encoded = to_json({**answer.body(), **body})
        counts = [self.counts_of(w.result) for w in writes]
        # every part settled before any error is answered
        settled = await asyncio.gather(*(self.settle(w) for w in writes), return_exceptions=True)
        failure = next((o for o in settled if isinstance(o, BaseException)), None)
        if failure is not None:
            await self._withdraw_served(settled)
            if isinstance(failure, _StillContactedError):
                raise failure.http() from None
            raise failure
        decided_again = False
        for i, (write, outcome) in enumerate(zip(writes, settled, strict=True)):
            assert not isinstance(outcome, BaseException)  # no failure (above)
            result, ids = outcome
            if result is not write.result:  # some customers were decided again
                answer.replace(i, result, ids)
                decided_again = True
            self.count_served("batch", result, None if result is not write.result else counts[i])
        return to_json({**answer.body(), **body}) if decided_again else encoded

    async def _withdraw_served(
        self, settled: list[tuple[Decisions, list[str]] | BaseException]
    ) -> None:
        """A batch fails as a whole: withdraw the decisions its parts committed (``settled``:
        each part's :meth:`settle` outcome), so that the journal holds no decision of a
        request answered with an error. Their recommended contacts stay in the contact store
        and count towards caps for their windows: more blocking for a while, never less (a
        row removed could let a later row take its id, which
        :meth:`ContactStore.record_if_unchanged` relies on never happening)."""
        ids: list[str] = []
        for outcome in settled:
            if isinstance(outcome, _StillContactedError):  # its refused ones are withdrawn
                ids += outcome.decision_ids
            elif not isinstance(outcome, BaseException):
                ids += outcome[1]
            # another error: that part failed in settle(), which withdrew its decisions
        if ids:
            await self._withdraw_quietly(ids)

    def _merge_stored(
        self, keys: list[str], raw: ContextBatch, now: datetime
    ) -> tuple[ContextBatch, int | None]:
        """The customers with their stored contacts and restrictions (opt-outs, complaints
        reported with outcomes) merged in (two store queries), and the
        store's position for :meth:`ContactStore.record_if_unchanged`. None when
        recommendations are not counted (``count_recommended=False``): then another
        worker's recommendation cannot block either, and a delivery reported to another
        worker meanwhile is not checked for."""
        events, restrictions = self.contacts.lookup(keys, epoch_us(now - LONGEST_WINDOW))
        batch = raw
        if len(events.row):
            batch = merge_into_batch(
                raw, events, now, count_recommended=self.settings.count_recommended
            )
        batch = apply_restrictions(batch, restrictions, now)  # as it is without any
        return batch, events.position if self.settings.count_recommended else None

    def _engine_decide(self, batch: ContextBatch, part: _Part) -> Decisions:
        """The engine's decisions for ``part``, made on ``batch`` (its customers with their
        stored contacts)."""
        return self.engine.decide(
            batch, k=part.k, candidates=part.candidates, explain=part.explain, model=part.model
        )

    def submit(
        self,
        part: _Part,
        result: Decisions,
        batch: ContextBatch,
        position: int | None,
        more: bool = False,
    ) -> _Writes:
        """Start journalling the decisions (made on ``batch``) and recording the recommended
        contacts (refused for customers another worker contacted since the lookup at
        ``position``); the caller may prepare its answer meanwhile, and must :meth:`settle`
        before it. ``more``: the next part of the same batch follows at once (the stores
        then commit the parts in one transaction each)."""
        decisions = self._journal_batch(part, result)  # everything that can fail, first
        latest = self._schedule.latest_send_us(
            result.action, part.now, batch["local_hour"], batch["local_weekday"]
        )
        contacts = ContactBatch.recommended(
            part.decision_ids, part.keys, result.action, self.catalog, part.now, latest
        )
        # small writes commit inline when the writers are idle (no thread hand-off); under
        # load they queue and commit in groups on the writers' threads
        inline = len(part) <= INLINE_COMMIT_ROWS
        journalled = self.journal.submit(decisions, inline=inline, more=more)
        try:  # called without contacts too: the part may end a transaction kept open
            recorded = self.contacts.record_if_unchanged(
                contacts, position, inline=inline, more=more
            )
        except Exception as exc:  # the journal may commit them: settle() withdraws them
            recorded = _failed(exc)
        return _Writes(part, result, _both_written(journalled, recorded))

    def _journal_batch(self, part: _Part, result: Decisions) -> DecisionBatch:
        """The decisions of ``part`` as journal rows."""
        return result.journal_batch(
            decision_id=part.decision_ids,
            timestamp_us=epoch_us(part.now),
            customer_key=part.keys,
            context=result.features,
            pscore=result.pscore,
            campaign_id=part.campaign,
            policy=self._exploration,
            model_version=result.model_version,
            ruleset_version=self.rules.version,
            catalog_version=self.catalog.version,
            feature_spec_version=result.feature_spec_version,
            blocked_by=result.blocked_by,
            rule_ids=self.rules.rule_ids,
        )

    async def settle(
        self, writes: _Writes, decide_again: bool = True
    ) -> tuple[Decisions, list[str]]:
        """Wait for ``writes``; the decisions to serve and their ids (the caller counts
        those it serves: :meth:`count_served`).

        Customers whose contact the store refused (another worker contacted them after
        this one's lookup) have their decision withdrawn from the journal and are decided
        again, under new ids, on the history that includes that contact, up to
        :data:`MAX_DECISION_ROUNDS` times (``decide_again=False``: not at all, for a
        request that fails anyway).

        Raises
        ------
        _StillContactedError
            Some customers were refused in every round (their decisions are withdrawn; the
            others' stay journalled, to be served).
        Exception
            A write or a decision of a later round failed: every decision of ``writes`` is
            withdrawn (none is served).
        """
        started = asyncio.get_running_loop().time()
        result, ids = await self._served(writes, 1, MAX_DECISION_ROUNDS if decide_again else 1)
        metrics.JOURNAL_WAIT.observe(asyncio.get_running_loop().time() - started)
        return result, ids

    async def _withdraw_quietly(
        self, decision_ids: list[str], started: Future[int] | None = None
    ) -> None:
        """Withdraw decisions that are not served (if the journal has them), logging rather
        than raising a failure: the request's own outcome is the one to answer (a journal
        that cannot withdraw keeps them, and says so in the log). ``started``: the
        withdrawal, if already submitted."""
        try:
            withdrawal = started if started is not None else self.journal.withdraw(decision_ids)
            await _committed(withdrawal)
        except Exception as exc:
            log.warning("could not withdraw %d unserved decisions: %s", len(decision_ids), exc)

    def count_served(self, endpoint: str, result: Decisions, counts: _Counts | None = None) -> None:
        """Count served decisions in the metrics (actions by channel, blocks by rule);
        ``counts``: :meth:`counts_of` ``result``, if already taken."""
        self._counters.observe(endpoint, *(self.counts_of(result) if counts is None else counts))

    def counts_of(self, result: Decisions) -> _Counts:
        """What :meth:`count_served` adds up: the channel index of every chosen action
        ``(n,)`` and the blocked pairs per rule ``(n_rules,)``."""
        block_counts = code_counts(result.blocked_by)[: len(self.rules.rule_ids)]
        return self.catalog.channel_index[result.action].astype(np.int64), block_counts

    async def _served(
        self, writes: _Writes, round_: int, rounds: int
    ) -> tuple[Decisions, list[str]]:
        """:meth:`settle` without the metrics; ``round_`` counts the times decided, of
        ``rounds`` at most."""
        part, result = writes.part, writes.result
        try:
            refused = await _committed(writes.done)
        except Exception:  # one of the two writes failed: these decisions are not served
            await self._withdraw_quietly(part.decision_ids)
            raise
        if not refused:
            return result, part.decision_ids
        try:
            withdrawn = self.journal.withdraw(refused)
        except Exception as exc:  # logged below; the other decisions are still served
            withdrawn = _failed(exc)
        refused_ids = set(refused)
        again_rows = np.flatnonzero([i in refused_ids for i in part.decision_ids])
        ids = list(part.decision_ids)
        try:
            if round_ >= rounds:
                raise _StillContactedError(result, ids, again_rows, round_)
            metrics.DECIDED_AGAIN.inc(len(again_rows))
            sub = replace(part.take(again_rows), decision_ids=new_decision_ids(len(again_rows)))
            batch, position = self._merge_stored(sub.keys, sub.raw, sub.now)
            redone = self.submit(sub, self._engine_decide(batch, sub), batch, position)
            try:
                decided, new_ids = await self._served(redone, round_ + 1, rounds)
            except _StillContactedError as exc:  # in this part's rows
                _replace_ids(ids, again_rows, exc.decision_ids)
                merged = result.with_rows(again_rows, exc.result)
                raise _StillContactedError(merged, ids, again_rows[exc.rows], exc.rounds) from None
        except _StillContactedError:
            raise
        except Exception:  # deciding again failed: none of this part is served
            await self._withdraw_quietly(part.decision_ids)
            raise
        finally:
            await self._withdraw_quietly(refused, withdrawn)
        _replace_ids(ids, again_rows, new_ids)
        return result.with_rows(again_rows, decided), ids

    # ------------------------------------------------------------------ rewards, contacts

    async def record_reward(self, request: RewardRequest) -> RewardResponse:
        """Store the outcome of a decision (idempotent); 404 unknown decision, 409 a
        different outcome already stored, 400 an outcome dated before its decision, 410 a
        decision ``nextbest archive`` moved out of the journal.

        An opt-out or complaint in the report binds later decisions whatever the answer:
        also on a repeat, and on a refused (409, 400, 410) report, since the customer said
        it whether or not the journal takes the report. On a 409 the stored outcome's bind
        too: its own write may have failed before the retry with another body."""
        outcome = RewardOutcome(
            converted=request.converted,
            complaint=request.complaint,
            opted_out=request.opted_out,
            value_cny=request.value_cny,
            reward_at=request.occurred_at,
        )
        try:
            result = await asyncio.wrap_future(
                self.journal.submit_reward(request.decision_id, outcome)
            )
        except (ArchivedDecisionError, RewardConflictError, RewardTimeError) as exc:
            restrictions = self._restrictions_of(exc.decision, outcome, datetime.now(UTC))
            if isinstance(exc, RewardConflictError):
                restrictions += self._restrictions_of(exc.decision, exc.stored, exc.received_at)
            await self._restrict(restrictions)
            status = {ArchivedDecisionError: 410, RewardConflictError: 409}.get(type(exc), 400)
            raise HTTPException(status, str(exc)) from None
        except UnknownDecisionError as exc:
            raise HTTPException(404, str(exc)) from None
        # again for a duplicate: a retry after a crash in between stores them
        await self._restrict(
            self._restrictions_of(result.decision, result.outcome, result.received_at)
        )
        return RewardResponse(
            decision_id=result.decision_id,
            reward=result.reward,
            late=result.late,
            duplicate=result.duplicate,
            received_at=result.received_at,
        )

    async def _restrict(self, restrictions: list[Restriction]) -> None:
        """Store ``restrictions`` (if any) before answering."""
        if restrictions:
            await asyncio.wrap_future(self.contacts.restrict(restrictions))

    def _restrictions_of(
        self, decision: DecidedFor | None, outcome: RewardOutcome, received: datetime
    ) -> list[Restriction]:
        """What an outcome (first ``received`` then) asks of later decisions for the
        decision's customer: an opt-out of the channel that contacted them, and a complaint
        (every channel). The outcome happened when it says, or at ``received`` when it says
        nothing or a time before its decision; a complaint counts from then, an opt-out from
        the later of then and ``received`` (a consent must come after both to lift it). The
        channel is read only from the catalogue the decision was made with: for a decision
        of another catalogue version (its action ids may have moved), or without a channel,
        the opt-out is of every channel."""
        if decision is None:
            return []
        at = outcome.reward_at
        at = received if at is None or at < decision.decided_at else at
        out = []
        if outcome.opted_out:
            same = decision.catalog_version == self.catalog.version
            index = int(self.catalog.channel_index[decision.action]) if same else -1
            channel = self.catalog.channel_names[index] if index >= 0 else None
            out.append(
                Restriction(decision.customer_key, "opt_out", channel, epoch_us(max(at, received)))
            )
        if outcome.complaint:
            out.append(Restriction(decision.customer_key, "complaint", None, epoch_us(at)))
        return out

    async def record_delivery(self, request: DeliveryRequest) -> DeliveryResponse:
        """Record a delivered contact (keyed by its decision id, or the platform's message
        id); 400 for an unknown channel or offer, 409 for a decision made for another
        customer."""
        if request.channel not in self._channel_of:
            raise HTTPException(400, f"unknown channel {request.channel!r}")
        if request.offer is not None and request.offer not in self.catalog.offer_names:
            raise HTTPException(400, f"unknown offer {request.offer!r}")
        contact_id = request.contact_id
        stored_id = request.decision_id or message_key(contact_id, self._key)  # no raw ids
        contact = ContactBatch(
            contact_id=[stored_id],
            customer_key=[pseudonymise(request.customer_id, self._key)],
            channel=[request.channel],
            offer=[request.offer],
            at_us=epoch_us(request.delivered_at),
            kind="delivered",
        )
        try:
            written = await asyncio.wrap_future(self.contacts.record(contact))
        except ContactConflictError:
            raise HTTPException(
                409, f"{contact_id!r} was recorded for another customer than customer_id"
            ) from None
        return DeliveryResponse(contact_id=contact_id, recorded=bool(written))

    async def record_consent(self, request: ConsentRequest, reported_by: str) -> ConsentResponse:
        """Record that a customer consented again (to the named channels, or to every one),
        reported by API key ``reported_by``: the opt-outs the service stored for them stop
        binding, on every worker from the next decision on, where both dated and reported
        before the consent counts (:class:`~serving.customer_restrictions.Consent`); 400
        for an unknown channel. The answer says which channels the consent freed and which
        the stored opt-outs still block."""
        unknown = sorted(set(request.channels or ()) - set(self._channel_of))
        if unknown:
            raise HTTPException(400, f"unknown channel {unknown[0]!r}")
        key = pseudonymise(request.customer_id, self._key)
        consent = Consent(
            key,
            None if request.channels is None else tuple(dict.fromkeys(request.channels)),
            epoch_us(request.given_at),
            epoch_us(datetime.now(UTC)),
            reported_by,
        )
        before = self._stored_opt_outs(key)
        await asyncio.wrap_future(self.contacts.consent(consent))
        metrics.CONSENTS.inc()
        after = self._stored_opt_outs(key)
        names = self.catalog.channel_names
        return ConsentResponse(
            given_at=request.given_at,
            counted_from=from_epoch_us(consent.counted_from_us),
            lifted=[c for c, b, a in zip(names, before, after, strict=True) if b and not a],
            still_opted_out=[c for c, a in zip(names, after, strict=True) if a],
        )

    def _stored_opt_outs(self, key: str) -> np.ndarray:
        """bool ``(C,)``: the channels the stored opt-outs in force block for pseudonymised
        customer ``key``."""
        in_force = opt_outs_in_force(self.contacts.restrictions([key]), len(self._channel_of))
        if not len(in_force.rows):
            return np.zeros(len(self._channel_of), bool)
        return in_force.channels[0]

    # ------------------------------------------------------------------ model

    def refresh_api_keys(self) -> None:
        """Read the API keys file again if it changed (a key created or revoked). A changed
        file that cannot be read keeps the keys in force, and the reason is logged once."""
        try:
            fresh = self.api_keys.reloaded()
        except KeyFileError as exc:
            if str(exc) != self._keys_failure:
                self._keys_failure = str(exc)
                log.error("API keys not reloaded, the keys in force stay: %s", exc)
            return
        if fresh is not None:
            self.api_keys, self._keys_failure = fresh, None
            log.info("API keys reloaded from %s: %d keys", fresh.path, len(fresh))

    def note_model(self) -> None:
        """Publish the serving model's version in the metrics (after a load or reload)."""
        version = self.models.status().model_version
        metrics.set_model_version(version, self._model_version)
        self._model_version = version

    def readiness(self) -> Readiness:
        """Whether a model is loaded, which one, and the last load error."""
        status = self.models.status()
        return Readiness(
            ready=status.model_version is not None,
            model_uri=self.settings.model_uri,
            model_version=status.model_version,
            loaded_at=status.loaded_at,
            last_error=status.last_error,
            ruleset_version=self.rules.version,
            catalog_version=self.catalog.version,
        )

    def reload_model(self) -> ReloadResponse:
        """Load the model again now (a broken file keeps the old model serving)."""
        before = self.models.status().model_version
        self.models.reload()
        status = self.models.status()
        self.note_model()
        return ReloadResponse(
            model_version=status.model_version,
            changed=status.model_version != before,
            last_error=status.last_error,
        )
