"""A PyTorch neural bandit: a reward model over (context, action).

``RewardModel(context)`` scores every catalogue action, float ``(B, A)``, in reward units. Two
architectures (``NeuralBanditConfig.architecture``):

* ``embedding``: ``score[b, a] = <f(context_b), e_a + P x_a> + bias_a`` where ``f`` is an MLP
  over the context features, ``e_a`` a learned embedding of action ``a`` and ``x_a`` its
  catalogue features (channel, offer, timing, risk ...).
* ``factorised``: ``score[b, a] = sum_k g_k(context_b) [a has factor k] + bias_a``, one
  context-dependent term per action factor (the indicator columns of the action features:
  channel, offer, timing, credit ...; with ``pair_terms`` also every co-occurring pair, such as
  channel x offer). A funnel ``P = deliver(channel) * open(channel, timing) * convert(offer)``
  is a sum of such terms in log space, and every term learns from all the actions sharing it.

Either architecture can add aligned terms (``aligned_hidden``): the context columns that exist
once per channel, offer or timing slot (an offer's page views and holdings ...) go, for each
action, through one small network per factor shared by all its members, so a rarely logged
offer learns from every offer's outcomes how its own columns matter
(:func:`nextbest.features.aligned_context_columns`).

Trained on a decision log by regression on the logged
action's reward, unweighted (``direct``) or importance-weighted (``ips``: weights
``min(1 / pscore, clip)``, normalised to mean 1, which corrects for what the logging policy
chose more often). Acting: argmax or softmax over the actions the rules allow.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from nextbest.catalog import ActionCatalog
from nextbest.exploration import greedy_distribution, softmax_distribution
from nextbest.features import AlignedColumns
from training.config import neural_bandit_conflict
from training.logged_data import LoggedBandit, split_log


@dataclass(frozen=True)
class Economics:
    """What a decision earns, per action: ``reward = value * converted - cost - penalty *
    complaint``, the decision-log reward (values from the catalogue)."""

    value: np.ndarray
    """float ``(A,)``: value of a conversion of the action's offer, CNY (0 for no contact)."""
    cost: np.ndarray
    """float ``(A,)``: cost of the action's contact, CNY."""
    complaint_penalty: float
    """CNY charged per complaint."""
    contact: np.ndarray
    """bool ``(A,)``: the action contacts the customer (no contact has no outcome at all)."""

    @classmethod
    def from_catalog(cls, catalog: ActionCatalog, complaint_penalty: float) -> Economics:
        value = np.array([v or 0.0 for v in catalog.attribute("value_cny")], np.float32)
        cost = np.array([v or 0.0 for v in catalog.attribute("cost_cny")], np.float32)
        return cls(value, cost, float(complaint_penalty), catalog.channel_index >= 0)

    def residual(self, log: LoggedBandit) -> float:
        """Mean absolute gap between the logged reward and these economics applied to the
        logged outcome events (0 when the log's rewards follow them); NaN without events."""
        if log.converted is None or log.complaint is None:
            return float("nan")
        implied = (
            self.value[log.action] * log.converted
            - self.cost[log.action]
            - self.complaint_penalty * log.complaint
        )
        return float(np.abs(implied - log.reward).mean())


ARCHITECTURES = ("embedding", "factorised")
"""Reward-model architectures of the neural bandit."""


def _check_architecture(name: str) -> None:
    if name not in ARCHITECTURES:
        raise ValueError(
            f"`architecture` must be one of {', '.join(map(repr, ARCHITECTURES))}, got {name!r}"
        )


@dataclass(frozen=True)
class NeuralBanditConfig:
    """Hyperparameters of the neural bandit."""

    hidden: int = 128
    """Width of the context MLP's hidden layer."""
    embedding: int = 64
    """Dimension shared by context and action representations."""
    epochs: int = 5
    batch_size: int = 4096
    learning_rate: float = 3e-3
    weight_decay: float = 1e-6
    target: Literal["reward", "outcomes"] = "reward"
    """``reward``: regress the logged reward; ``outcomes``: classify conversion and complaint
    and price them with the catalogue's economics (needs the log's outcome events and
    ``economics``; the training config's default)."""
    loss: Literal["direct", "ips", "dr"] = "direct"
    """``direct``: unweighted; ``ips``: importance-weighted by ``1 / pscore``; ``dr``: after
    ``dr_warmup_epochs`` direct epochs, regress doubly-robust pseudo-outcomes over every
    allowed action."""
    ips_clip: float = 50.0
    """Largest importance weight (``ips`` and ``dr`` losses)."""
    dr_warmup_epochs: int = 2
    """Direct epochs that fit the first-stage model of the ``dr`` loss."""
    warm_start_epochs: int = 0
    """Behaviour-cloning epochs first: learn to rank the logging policy's choice on top."""
    seed: int = 0
    threads: int = 2
    """Torch intra-op threads."""
    architecture: Literal["embedding", "factorised"] = "embedding"
    """``embedding``: context vector dotted with action embeddings; ``factorised``: one
    context-dependent term per action factor (channel, offer, timing ...), summed per action
    (see the module docstring)."""
    pair_terms: bool = False
    """``factorised`` only: add a term for every co-occurring pair of action factors
    (channel x offer, channel x timing, offer x timing ...)."""
    depth: int = 1
    """Hidden layers (of width ``hidden``) of the context MLP."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """``cosine``: the learning rate falls from ``learning_rate`` to 0 over all the steps of
    ``warm_start_epochs + epochs`` (early stopping ends it before 0)."""
    decay_intercepts: bool = True
    """False: weight decay spares the layers' intercepts (``.bias``), among them each channel's,
    offer's and slot's own level in the factorised model (decay on them pulls a rarely logged
    offer's level to the overall base rate whatever its logged outcomes say), and the
    ``aligned_hidden`` networks, whose few weights every action shares. The per-action biases
    (``action_bias``, when ``train_action_bias``) are still decayed: each rests on one
    action's outcomes only."""
    aligned_hidden: int = 0
    """> 0: add, per action factor with aligned context columns (an offer's holdings and page
    views, a channel's contact counts, a slot's login-hour fit), one small MLP of this width
    shared by the factor's members (:func:`nextbest.features.aligned_context_columns`); 0: off."""
    value_weighting: float = 0.0
    """``outcomes`` target only: weight each decision's conversion loss by ``(value of the
    logged offer / mean logged value) ** value_weighting`` (0: unweighted; 1: in proportion to
    the offer's value, so errors on high-value offers cost most)."""
    reward_loss_weight: float = 0.0
    """``outcomes`` target only: add this times the squared error of the priced expected reward
    at the logged action against the logged reward (in units of the reward's variance)."""
    validation_share: float = 0.0
    """Share of the training customers held out to choose the epoch count: after every epoch
    the loss on them is measured and training stops once it has not improved for ``patience``
    epochs, keeping the best epoch's weights (``epochs`` is then the most run). 0: off."""
    patience: int = 2
    """Epochs without a better validation loss before training stops (``validation_share``)."""
    init_bias: bool = False
    """``outcomes`` target only: start every action's bias at the logit of the log's overall
    conversion (complaint) rate instead of 0, so the first epochs learn the context terms
    rather than the base rate of these rare events."""
    train_action_bias: bool = True
    """False: every action's own bias stays where it starts (0, or the base rate with
    ``init_bias``). In the factorised model an action's score then comes only from the terms
    it shares with other actions (its channel, offer and timing): a rarely logged action
    cannot get a high score from a few lucky outcomes of its own. (The embedding model's
    per-action embeddings still learn.)"""

    def __post_init__(self) -> None:
        _check_architecture(self.architecture)
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"`{field.name}` must be a finite number, got {value}")
        for name in ("hidden", "embedding", "epochs", "batch_size", "threads", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}")
        for name in ("dr_warmup_epochs", "warm_start_epochs", "aligned_hidden"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must not be negative, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be positive, got {self.learning_rate}")
        if self.loss not in ("direct", "ips", "dr"):
            raise ValueError(f"`loss` must be 'direct', 'ips' or 'dr', got {self.loss!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"`lr_schedule` must be 'constant' or 'cosine', got {self.lr_schedule!r}"
            )
        if self.target not in ("reward", "outcomes"):
            raise ValueError(f"`target` must be 'reward' or 'outcomes', got {self.target!r}")
        if not self.ips_clip >= 1:
            raise ValueError(f"`ips_clip` must be at least 1, got {self.ips_clip}")
        if not self.value_weighting >= 0 or not self.reward_loss_weight >= 0:
            raise ValueError("`value_weighting` and `reward_loss_weight` must not be negative")
        if not 0 <= self.validation_share < 1:
            raise ValueError(f"`validation_share` must be in [0, 1), got {self.validation_share}")
        if self.patience < 1:
            raise ValueError(f"`patience` must be a positive integer, got {self.patience}")
        problem = neural_bandit_conflict(self)
        if problem:
            raise ValueError(problem)


def action_factors(action_features: np.ndarray, pair_terms: bool = False) -> np.ndarray:
    """Membership of every action in every factor, float32 ``(K, A)`` of 0/1.

    The factors are the indicator (0/1) columns of the action features that some action has
    (no contact, each channel, offer and timing slot, credit, HNW), then with ``pair_terms``
    every pair of them that some action has both of; a factor with the same members as an
    earlier one is left out.
    """
    n_actions, n_features = action_features.shape
    singles = [
        action_features[:, j] > 0.5
        for j in range(n_features)
        if np.isin(action_features[:, j], (0.0, 1.0)).all() and action_features[:, j].any()
    ]
    terms = list(singles)
    if pair_terms:
        for i, first in enumerate(singles):
            for second in singles[i + 1 :]:
                if (both := first & second).any():
                    terms.append(both)
    seen: set[bytes] = set()
    kept = []
    for members in terms:
        key = np.packbits(members).tobytes()
        if key not in seen:
            seen.add(key)
            kept.append(members)
    if not kept:
        return np.zeros((0, n_actions), np.float32)
    return np.stack(kept).astype(np.float32)


class AlignedTerm(nn.Module):
    """One factor's aligned term: member ``m`` scores ``W2 relu(W1 x_m + b1) + b2``, with
    ``x_m`` the context columns aligned with ``m`` and the same weights for every member;
    ``(B, F) -> (B, M, H)``."""

    def __init__(self, block: AlignedColumns, hidden: int, heads: int) -> None:
        super().__init__()
        self.register_buffer("columns", torch.as_tensor(block.columns))
        self.register_buffer("members", torch.as_tensor(block.members))
        self.net = nn.Sequential(
            nn.Linear(block.columns.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, heads)
        )

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.net(context[:, self.columns])


class RewardModel(nn.Module):
    """Scores every action for a batch of contexts: ``(B, F) -> (B, A)``, reward units.

    Each head scores ``<f_h(x), e_ha + P_h x_a> + b_ha`` (architecture ``embedding``) or
    ``sum_k g_hk(x) M_ka + b_ha`` with ``M`` the :func:`action_factors` (``factorised``).
    Without ``economics`` one head predicts the (scaled) reward. With ``economics`` two heads
    give the logits of conversion and complaint, and the score is their priced sum: a
    product-form (funnel) model of conversion, which the additive reward regression cannot
    represent.
    """

    def __init__(
        self,
        n_context: int,
        action_features: np.ndarray,
        hidden: int,
        embedding: int,
        economics: Economics | None = None,
        architecture: str = "embedding",
        pair_terms: bool = False,
        depth: int = 1,
        aligned: Sequence[AlignedColumns] = (),
        aligned_hidden: int = 16,
    ) -> None:
        super().__init__()
        _check_architecture(architecture)
        n_actions, n_action_features = action_features.shape
        self.heads = 1 if economics is None else 2
        self.embedding = embedding
        self.architecture = architecture
        layers: list[nn.Module] = [nn.Linear(n_context, hidden), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        if architecture == "embedding":
            width = embedding * self.heads
            self.context_net = nn.Sequential(*layers, nn.Linear(hidden, width))
            self.action_embedding = nn.Embedding(n_actions, width)
            nn.init.normal_(self.action_embedding.weight, std=0.01)
            self.action_projection = nn.Linear(n_action_features, width, bias=False)
        else:
            factors = action_factors(action_features, pair_terms)
            self.n_terms = factors.shape[0]
            self.context_net = nn.Sequential(*layers, nn.Linear(hidden, self.heads * self.n_terms))
            self.register_buffer("factors", torch.as_tensor(factors))
        for block in aligned:
            if block.columns.size and int(block.columns.max()) >= n_context:
                raise ValueError(
                    f"aligned {block.factor} columns reach column {int(block.columns.max())}, "
                    f"the context has {n_context}"
                )
            if block.members.shape[1] != n_actions:
                raise ValueError(
                    f"aligned {block.factor} members cover {block.members.shape[1]} actions, "
                    f"the catalogue {n_actions}"
                )
        self.aligned_nets = nn.ModuleList(
            AlignedTerm(block, aligned_hidden, self.heads) for block in aligned
        )
        self.action_bias = nn.Parameter(torch.zeros(self.heads, n_actions))
        self.register_buffer(
            "action_features", torch.as_tensor(action_features, dtype=torch.float32)
        )
        self.register_buffer("reward_scale", torch.ones(()))
        self.priced = economics is not None
        value = np.zeros(n_actions) if economics is None else economics.value
        cost = np.zeros(n_actions) if economics is None else economics.cost
        self.register_buffer("value", torch.as_tensor(value, dtype=torch.float32))
        self.register_buffer("cost", torch.as_tensor(cost, dtype=torch.float32))
        penalty = 0.0 if economics is None else economics.complaint_penalty
        contact = np.ones(n_actions, bool) if economics is None else economics.contact
        # no contact can neither convert nor cause a complaint: its priced score is exactly 0
        self.register_buffer("contact", torch.as_tensor(contact, dtype=torch.float32))
        self.register_buffer("complaint_penalty", torch.tensor(float(penalty)))

    def action_vectors(self) -> torch.Tensor:
        """Representation of every action, ``(A, H * E)`` (architecture ``embedding``)."""
        return self.action_embedding.weight + self.action_projection(self.action_features)

    def aligned_terms(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per aligned factor, each member's term ``(B, M, H)`` and the membership ``(M, A)``."""
        return [(net(context), net.members) for net in self.aligned_nets]

    def head_logits(self, context: torch.Tensor) -> torch.Tensor:
        """Raw head outputs for every action, ``(B, H, A)``."""
        if self.architecture == "factorised":
            terms = self.context_net(context).reshape(-1, self.heads, self.n_terms)
            out = terms @ self.factors + self.action_bias
        else:
            hidden = self.context_net(context).reshape(-1, self.heads, self.embedding)
            vectors = self.action_vectors().reshape(-1, self.heads, self.embedding)
            out = torch.einsum("bhe,ahe->bha", hidden, vectors) + self.action_bias
        for term, members in self.aligned_terms(context):
            out = out + torch.einsum("bmh,ma->bha", term, members)
        return out

    def price(self, logits: torch.Tensor) -> torch.Tensor:
        """Head outputs ``(..., H, A)`` -> expected reward ``(..., A)`` in CNY."""
        if not self.priced:
            return logits[..., 0, :] * self.reward_scale
        convert, complaint = torch.sigmoid(logits[..., 0, :]), torch.sigmoid(logits[..., 1, :])
        outcome = convert * self.value - self.complaint_penalty * complaint
        return outcome * self.contact - self.cost

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """Predicted reward of every action, ``(B, A)``."""
        return self.price(self.head_logits(context))

    def logged_outputs(self, context: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Head outputs for the logged actions only, ``(B, H)``."""
        bias = self.action_bias[:, action].T
        if self.architecture == "factorised":
            terms = self.context_net(context).reshape(-1, self.heads, self.n_terms)
            members = self.factors[:, action].T  # (B, K)
            out = (terms * members[:, None, :]).sum(dim=2) + bias
        else:
            hidden = self.context_net(context).reshape(-1, self.heads, self.embedding)
            vectors = self.action_embedding(action) + self.action_projection(
                self.action_features[action]
            )
            vectors = vectors.reshape(-1, self.heads, self.embedding)
            out = (hidden * vectors).sum(dim=2) + bias
        for term, members in self.aligned_terms(context):
            out = out + torch.einsum("bmh,mb->bh", term, members[:, action])
        return out


@dataclass
class TrainingHistory:
    """Per-epoch metrics (namespaced keys, as logged to MLflow)."""

    epochs: list[dict[str, float]]


def train_reward_model(
    log: LoggedBandit,
    action_features: np.ndarray,
    config: NeuralBanditConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    economics: Economics | None = None,
    aligned: Sequence[AlignedColumns] = (),
) -> tuple[RewardModel, TrainingHistory]:
    """Fit a :class:`RewardModel` on a decision log.

    Parameters
    ----------
    log : LoggedBandit
    action_features : float32 (A, F_a)
        ``nextbest.features.action_features(catalog)``.
    config : NeuralBanditConfig
    on_epoch : callable, optional
        Called with the epoch index and its metrics.
    economics : Economics, required when ``config.target == "outcomes"``

    Raises
    ------
    ValueError
        If the loss needs ``pscore`` and the log has none, or the target needs outcome events
        (or economics) the caller did not provide.
    """
    if config.loss in ("ips", "dr") and log.pscore is None:
        raise ValueError(
            f"the {config.loss} loss needs `pscore`; this log has none: use loss 'direct' or "
            "log propensities"
        )
    if config.target == "outcomes":
        if economics is None:
            raise ValueError("target 'outcomes' needs the economics (values and costs)")
        if log.converted is None or log.complaint is None:
            raise ValueError(
                "target 'outcomes' needs the `converted` and `complaint` columns on every "
                "decision; this log lacks them: use target 'reward'"
            )
    if action_features.shape[0] != log.n_actions:
        raise ValueError(
            f"action_features has {action_features.shape[0]} actions, the log {log.n_actions}"
        )
    if config.aligned_hidden > 0 and not aligned:
        raise ValueError(
            "aligned_hidden > 0 needs the aligned context columns "
            "(nextbest.features.aligned_context_columns); none were given"
        )
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    generator = np.random.default_rng(config.seed)
    priced = economics if config.target == "outcomes" else None
    model = RewardModel(
        log.context.shape[1],
        action_features,
        config.hidden,
        config.embedding,
        priced,
        architecture=config.architecture,
        pair_terms=config.pair_terms,
        depth=config.depth,
        aligned=aligned if config.aligned_hidden > 0 else (),
        aligned_hidden=max(config.aligned_hidden, 1),
    )
    scale = float(np.std(log.reward)) or 1.0
    model.reward_scale.fill_(1.0 if priced is not None else scale)
    fit_log, validation = log, None
    if config.validation_share > 0:  # early stopping on held-out training customers
        fit_log, validation, _ = split_log(log, config.validation_share, config.seed, "validation")
    fit = _training_tensors(fit_log, config, priced, scale)
    if priced is not None and config.init_bias:
        rate = fit["target"].mean(dim=0).clamp(1e-6, 1 - 1e-6)
        with torch.no_grad():
            model.action_bias.copy_(torch.logit(rate)[:, None].expand_as(model.action_bias))
    model.action_bias.requires_grad_(config.train_action_bias)
    held = None if validation is None else _training_tensors(validation, config, priced, scale)
    optimiser = torch.optim.Adam(_parameter_groups(model, config), lr=config.learning_rate)
    history = TrainingHistory([])
    n = fit_log.n_rounds
    total_epochs = config.warm_start_epochs + config.epochs
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(
            optimiser, T_max=-(-n // config.batch_size) * total_epochs
        )
        if config.lr_schedule == "cosine"
        else None
    )
    first_stage: RewardModel | None = None
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    stale = 0
    for epoch in range(total_epochs):
        phase = _phase(config, epoch)
        if phase == "dr" and first_stage is None:
            first_stage = copy.deepcopy(model).eval()
        order = torch.from_numpy(generator.permutation(n))
        rate = float(optimiser.param_groups[0]["lr"])  # at the epoch's start
        total, seen = 0.0, 0
        model.train()
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            if phase == "clone":
                loss = _cloning_loss(
                    model, fit["context"][idx], fit["action"][idx], fit["allowed"][idx]
                )
            elif phase == "dr":
                assert first_stage is not None
                loss = _dr_loss(
                    model,
                    first_stage,
                    fit["context"][idx],
                    fit["action"][idx],
                    fit["allowed"][idx],
                    fit["target"][idx],
                    fit["weight"][idx],
                )
            else:
                loss = _fit_loss(model, fit, idx, config, weighted=phase == "ips")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if schedule is not None:
                schedule.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        metrics = {
            f"losses/{phase}": total / seen,
            "charts/epoch": float(epoch),
            "charts/learning_rate": rate,
        }
        stop = False
        if held is not None and phase != "clone":
            model.eval()
            with torch.no_grad():
                rows = torch.arange(validation.n_rounds)  # type: ignore[union-attr]
                value = sum(
                    float(_fit_loss(model, held, chunk, config, config.loss != "direct"))
                    * len(chunk)
                    for chunk in rows.split(65536)
                ) / len(rows)
            metrics["losses/validation"] = value
            if best is None or value < best[0]:
                best, stale = (value, copy.deepcopy(model.state_dict())), 0
            else:
                stale += 1
                stop = stale >= config.patience
        history.epochs.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if stop:
            break
    if best is not None:
        model.load_state_dict(best[1])
    model.eval()
    return model, history


def _parameter_groups(model: RewardModel, config: NeuralBanditConfig) -> list[dict[str, Any]]:
    """The trained parameters in optimiser groups: weight decay on all of them, or, without
    ``decay_intercepts``, not on the intercepts and the aligned-column networks."""
    decayed, spared = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        shared = name.endswith(".bias") or name.startswith("aligned_nets.")
        (spared if shared and not config.decay_intercepts else decayed).append(parameter)
    groups = [{"params": decayed, "weight_decay": config.weight_decay}]
    if spared:
        groups.append({"params": spared, "weight_decay": 0.0})
    return groups


def _training_tensors(
    log: LoggedBandit, config: NeuralBanditConfig, priced: Economics | None, scale: float
) -> dict[str, torch.Tensor]:
    """The log as the tensors the losses read (targets, importance and value weights)."""
    out = {
        "context": torch.from_numpy(np.ascontiguousarray(log.context, np.float32)),
        "action": torch.from_numpy(log.action),
        "allowed": torch.from_numpy(np.ascontiguousarray(log.candidates)),
        "reward": torch.from_numpy((log.reward / scale).astype(np.float32)),
        "reward_scale": torch.tensor(scale, dtype=torch.float32),
    }
    if priced is not None:
        assert log.converted is not None and log.complaint is not None
        out["target"] = torch.from_numpy(
            np.stack([log.converted, log.complaint], 1).astype(np.float32)
        )
    else:
        out["target"] = out["reward"][:, None]
    if config.loss == "direct":
        out["weight"] = torch.ones(log.n_rounds)
    else:
        assert log.pscore is not None
        w = np.minimum(1.0 / log.pscore, config.ips_clip)
        out["weight"] = torch.from_numpy((w / w.mean()).astype(np.float32))
    heads = torch.ones(log.n_rounds, 2 if priced is not None else 1)
    if priced is not None and config.value_weighting > 0:
        value = priced.value.astype(np.float64)
        mean = float(value[value > 0].mean()) if (value > 0).any() else 1.0
        relative = np.where(value > 0, value / mean, 1.0) ** config.value_weighting
        heads[:, 0] = torch.from_numpy(relative[log.action].astype(np.float32))
    out["heads"] = heads
    return out


def _fit_loss(
    model: RewardModel,
    data: dict[str, torch.Tensor],
    idx: torch.Tensor,
    config: NeuralBanditConfig,
    weighted: bool,
) -> torch.Tensor:
    """Loss of the direct and ips phases on rows ``idx``: per-head BCE (priced heads, the
    conversion head weighted by value) or squared error, plus the priced-reward term."""
    action = data["action"][idx]
    out = model.logged_outputs(data["context"][idx], action)
    w = data["weight"][idx] if weighted else torch.ones(len(idx))
    if model.priced:
        per_head = nn.functional.binary_cross_entropy_with_logits(
            out, data["target"][idx], reduction="none"
        )
    else:
        per_head = (out - data["target"][idx]) ** 2
    loss = (w[:, None] * data["heads"][idx] * per_head).sum(dim=1).mean()
    if model.priced and config.reward_loss_weight > 0:
        probability = torch.sigmoid(out) * model.contact[action, None]
        expected = (
            probability[:, 0] * model.value[action]
            - model.complaint_penalty * probability[:, 1]
            - model.cost[action]
        )
        error = (expected / data["reward_scale"] - data["reward"][idx]) ** 2
        loss = loss + config.reward_loss_weight * (w * error).mean()
    return loss


def _phase(config: NeuralBanditConfig, epoch: int) -> str:
    """Which loss an epoch uses: ``clone``, ``direct``, ``ips`` or ``dr``."""
    if epoch < config.warm_start_epochs:
        return "clone"
    fitted = epoch - config.warm_start_epochs
    if config.loss == "dr":
        return "direct" if fitted < config.dr_warmup_epochs else "dr"
    return config.loss


def _cloning_loss(
    model: RewardModel, context: torch.Tensor, action: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the logged action under a softmax of the scores over allowed actions
    (behaviour cloning: the logging policy's choice ranked first)."""
    scores = model(context) / model.reward_scale.clamp(min=1e-6)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return nn.functional.cross_entropy(scores, action)


def _dr_loss(
    model: RewardModel,
    first_stage: RewardModel,
    context: torch.Tensor,
    action: torch.Tensor,
    allowed: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """Squared error to doubly-robust pseudo-outcomes over every allowed action.

    For each head, ``y_hat(x, a) + 1[a = a_i] w_i (y_i - y_hat(x, a_i))`` with ``y_hat`` the
    first-stage model (probabilities for priced heads) and ``w_i`` the clipped, normalised
    importance weight: unbiased where the first stage is wrong and the propensities right.
    """

    def outputs(m: RewardModel) -> torch.Tensor:
        logits = m.head_logits(context)
        return torch.sigmoid(logits) if m.priced else logits

    with torch.no_grad():
        base = outputs(first_stage)
        rows = torch.arange(len(action))
        logged = base[rows, :, action]
        pseudo = base.clone()
        pseudo[rows, :, action] = logged + weight[:, None] * (target - logged)
    pred = outputs(model)
    err = ((pred - pseudo) ** 2).sum(dim=1) * allowed
    return err.sum(dim=1).mean() / allowed.float().sum(dim=1).mean()


def predict_rewards(model: RewardModel, context: np.ndarray, batch_size: int = 65536) -> np.ndarray:
    """Predicted reward of every action, float32 ``(n, A)``."""
    out = []
    with torch.no_grad():
        for start in range(0, len(context), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(context[start : start + batch_size]))
            out.append(model(chunk).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.action_bias.shape[0]), np.float32)


def greedy_policy(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """One-hot action distribution on the best allowed action, float64 ``(n, A)``."""
    return greedy_distribution(scores, allowed)


def softmax_policy(scores: np.ndarray, allowed: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax over the allowed actions, float64 ``(n, A)`` (blocked actions get 0)."""
    return softmax_distribution(scores, allowed, temperature)


def config_dict(config: NeuralBanditConfig) -> dict[str, object]:
    """The config as a flat dict (for run tracking)."""
    return asdict(config)


def predict_complaints(
    model: RewardModel, context: np.ndarray, batch_size: int = 65536
) -> np.ndarray:
    """Predicted complaint probability of every action, float32 ``(n, A)`` (priced models)."""
    if not model.priced:
        raise ValueError("complaint probabilities need the outcome heads (target: outcomes)")
    out = []
    with torch.no_grad():
        for start in range(0, len(context), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(context[start : start + batch_size]))
            logits = model.head_logits(chunk)[:, 1, :]
            out.append((torch.sigmoid(logits) * model.contact).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.action_bias.shape[0]), np.float32)


def guard_complaints(
    model: RewardModel,
    log: LoggedBandit,
    max_ratio: float,
    sample: int = 50_000,
    seed: int = 0,
) -> float:
    """Raise the price the greedy policy puts on a complaint until its predicted complaint
    rate is at most ``max_ratio`` times the logging policy's, on (a sample of) ``log``.

    The shadow price is added to the model's complaint penalty in place, so scoring and the
    ONNX export act on it; the reward the model predicts for OPE is unchanged in meaning only
    when the price is 0. Both rates are the model's predictions: the logging policy's at its
    logged actions, the greedy policy's at its own choices.

    Returns
    -------
    float
        The added price in CNY per complaint (0 when the policy already meets the bound).
    """
    rows = np.random.default_rng(seed).permutation(log.n_rounds)[:sample]
    context, allowed = log.context[rows], log.candidates[rows]
    complaints = predict_complaints(model, context)
    limit = max_ratio * float(complaints[np.arange(len(rows)), log.action[rows]].mean())
    base = float(model.complaint_penalty)

    def rate(extra: float) -> float:
        # scored by the model with the price set, in its own float32 arithmetic: the rate
        # found is then exactly the exported policy's
        model.complaint_penalty.fill_(base + extra)
        scores = predict_rewards(model, context)
        chosen = np.where(allowed, scores, -np.inf).argmax(axis=1)
        return float(complaints[np.arange(len(rows)), chosen].mean())

    if rate(0.0) <= limit:
        return 0.0
    low, high = 0.0, max(base, 100.0)
    while rate(high) > limit and high < 1e7:
        low, high = high, high * 4
    for _ in range(30):
        mid = 0.5 * (low + high)
        low, high = (low, mid) if rate(mid) <= limit else (mid, high)
    model.complaint_penalty.fill_(base + high)
    return high
