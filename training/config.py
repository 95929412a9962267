"""Training configs (``configs/training/*.yaml``), validated once at load."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AwareDatetime,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from nextbest.config_loading import MAX_BOOTSTRAP, MAX_SEED, StrictModel, error_message, load_model

MAX_WIDTH = 16_384
"""Hidden and embedding sizes at most."""


class TrainingSection(StrictModel):
    """Base of every training-config section (:class:`StrictModel`: unknown keys, booleans
    for numbers and non-finite floats refused; ``gt``/``ge`` bounds alone let ``.inf``
    through, and a learning rate of ``.inf`` would train a model of NaN scores)."""


class DataSpec(TrainingSection):
    logs: Path | list[Path] = Field(union_mode="left_to_right")
    """Decision log to learn from: ``.parquet``, a directory of parts, ``.csv`` or a service
    journal; or a list of them, read as one (a journal and its archive, say)."""
    holdout_share: float = Field(default=0.3, gt=0.0, lt=1.0)
    """Share of decisions kept out of training and used for off-policy evaluation."""
    split_seed: int = Field(default=0, ge=0, le=MAX_SEED)
    drop_pending: bool = False
    """Leave out decisions whose outcome has not arrived (a live service journal) instead of
    refusing the log."""
    since: AwareDatetime | None = None
    """Learn only from decisions made at or after this time (with a time zone): a live
    journal spans several model, rule-set or catalogue versions, and grows."""
    until: AwareDatetime | None = None
    """... and before this time."""

    @field_validator("logs")
    @classmethod
    def _some_log(cls, value: Path | list[Path]) -> Path | list[Path]:
        if isinstance(value, list) and not value:
            raise ValueError("name at least one decision log")
        return value

    @model_validator(mode="after")
    def _window(self) -> DataSpec:
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError(
                f"since ({self.since.isoformat()}) must come before until "
                f"({self.until.isoformat()})"
            )
        return self


class NeuralBanditSpec(TrainingSection):
    """The PyTorch neural bandit (see ``training.neural_bandit.NeuralBanditConfig``)."""

    hidden: int = Field(default=128, ge=1, le=MAX_WIDTH)
    embedding: int = Field(default=64, ge=1, le=MAX_WIDTH)
    epochs: int = Field(default=6, ge=1)
    batch_size: int = Field(default=4096, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=1e-6, ge=0)
    """Adam's L2 penalty on the weights."""
    target: Literal["reward", "outcomes"] = "reward"
    """``reward``: regress the logged reward; ``outcomes``: conversion and complaint heads
    priced with the catalogue's economics."""
    loss: Literal["direct", "ips", "dr"] = "direct"
    ips_clip: float = Field(default=50.0, ge=1)
    dr_warmup_epochs: int = Field(default=2, ge=0)
    """First-stage (direct) epochs of the ``dr`` loss."""
    warm_start_epochs: int = Field(default=0, ge=0)
    """Behaviour-cloning epochs on the logging policy's choices before learning rewards."""
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    architecture: Literal["embedding", "factorised"] = "embedding"
    """``embedding``: context vector dotted with action embeddings; ``factorised``: one
    context-dependent term per channel, offer, timing ... summed per action."""
    pair_terms: bool = False
    """``factorised`` only: also a term per co-occurring factor pair (channel x offer ...)."""
    depth: int = Field(default=1, ge=1)
    """Hidden layers of the context MLP."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """``cosine``: the learning rate falls from ``learning_rate`` to 0 over the warm-start and
    training epochs."""
    decay_intercepts: bool = True
    """False: weight decay spares the intercepts (each channel's, offer's and slot's own level)
    and the aligned-column networks, which every action shares; per-action biases stay
    decayed."""
    aligned_hidden: int = Field(default=0, ge=0, le=MAX_WIDTH)
    """> 0: one small MLP of this width per action factor over the context columns aligned
    with its members (an offer's holdings and page views ...), shared by all members; 0: off."""
    init_bias: bool = False
    """``outcomes`` only: start the action biases at the logit of the log's base rates."""
    train_action_bias: bool = True
    """False: the action biases stay at their start; with ``architecture: factorised`` an
    action's score then comes from its shared channel/offer/timing terms only (the embedding
    architecture's per-action embeddings still learn)."""
    value_weighting: float = Field(default=0.0, ge=0)
    """``outcomes`` only: conversion loss weighted by ``(offer value / mean) ** this``."""
    reward_loss_weight: float = Field(default=0.0, ge=0)
    """``outcomes`` only: weight of an extra squared error of the priced expected reward."""
    validation_share: float = Field(default=0.0, ge=0, lt=1)
    """Share of training customers held out for early stopping (``epochs`` the most); 0: off."""
    patience: int = Field(default=2, ge=1)
    """Early stopping: epochs without a better validation loss before stopping."""

    @model_validator(mode="after")
    def _consistent(self) -> NeuralBanditSpec:
        problem = neural_bandit_conflict(self)
        if problem:
            raise ValueError(problem)
        return self


def neural_bandit_conflict(settings: Any) -> str | None:
    """What makes neural-bandit settings contradict each other, or None: the rules between
    fields, shared by the YAML section (:class:`NeuralBanditSpec`) and the trainer's
    ``training.neural_bandit.NeuralBanditConfig``."""
    if settings.pair_terms and settings.architecture != "factorised":
        return "pair_terms needs architecture 'factorised'"
    if (
        settings.init_bias or settings.value_weighting or settings.reward_loss_weight
    ) and settings.target != "outcomes":
        return "init_bias, value_weighting and reward_loss_weight need target 'outcomes'"
    if settings.loss == "dr" and settings.dr_warmup_epochs >= settings.epochs:
        return (
            f"dr_warmup_epochs ({settings.dr_warmup_epochs}) must be below epochs "
            f"({settings.epochs}): the dr loss needs epochs after the warm-up"
        )
    return None


VW_SHARED_NAMESPACE = "x"
"""VW namespace of the customer-context features (the shared line of each decision)."""
VW_ACTION_NAMESPACES = {
    "c": "channel one-hot",
    "o": "offer one-hot",
    "t": "timing-slot one-hot",
    "p": "no-contact flag and offer/channel attributes (risk, credit, HNW, log value, log cost)",
    "a": "action identity (one feature per catalogue id)",
}
"""VW namespaces of the per-action features (one ADF line per allowed action)."""


class VwBanditSpec(TrainingSection):
    """The Vowpal Wabbit ``--cb_explore_adf`` learner (see ``training.vw_bandit``).

    Every decision is a multi-line ADF example: a shared line with the context features in
    namespace ``x`` and one line per allowed action with its features in namespaces ``c``
    (channel), ``o`` (offer), ``t`` (timing), ``p`` (attributes) and ``a`` (identity).
    """

    exploration: Literal["epsilon", "squarecb", "bag", "softmax"] = "epsilon"
    """VW's exploration over the allowed actions when it acts itself; ``bag`` also changes
    learning (bootstrapped models, the exported score is their mean)."""
    epsilon: float = Field(default=0.05, ge=0.0, le=1.0)
    """``--epsilon``: uniform exploration share (``epsilon`` and ``bag``)."""
    gamma_scale: float = Field(default=10.0, gt=0.0)
    """``--gamma_scale`` of ``squarecb`` (larger: greedier)."""
    bag: int = Field(default=5, ge=2, le=100)
    """``--bag``: number of bootstrapped models (``bag``)."""
    softmax_lambda: float = Field(default=1.0, gt=0.0)
    """``--lambda`` of ``softmax`` (inverse temperature over VW's costs)."""
    cb_type: Literal["mtr", "ips", "dr", "dm"] = "mtr"
    """``--cb_type``: ``mtr``, ``ips`` and ``dr`` weight by the logged propensity (``pscore``);
    ``dm`` regresses the logged cost unweighted and needs no propensities."""
    learning_rate: float = Field(default=0.5, gt=0.0)
    """``-l``: VW's learning rate (adaptive, normalised updates)."""
    power_t: float = Field(default=0.5, ge=0.0)
    """``--power_t``: decay exponent of the learning rate."""
    l2: float = Field(default=0.0, ge=0.0)
    """``--l2``: L2 regularisation per example."""
    passes: int = Field(default=1, ge=1)
    """``--passes`` over the training log (more than 1 uses a VW cache file, holdout off)."""
    bits: int = Field(default=18, ge=10, le=28)
    """``-b``: log2 of the weight-table size; features and interactions are hashed into it."""
    interactions: tuple[str, ...] = ("xc", "xo", "xt", "xp")
    """``-q`` pairs of namespaces; each must keep the score linear in the context: context
    (``x``) with an action namespace, or two different action namespaces."""
    constant: bool = True
    """Learn a constant (bias) feature; False passes ``--noconstant``."""
    cost_scale_cny: float | None = Field(default=None, ge=1e-3, le=1e6)
    """CNY per unit of VW cost (``cost = -reward / cost_scale_cny``); None: the standard
    deviation of the training rewards. Scores are returned in CNY either way. Bounded: a
    scale of 1e-300 made every cost astronomic and VW diverge, blamed on its learning rate."""
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    """``--random_seed`` (bag's bootstrap draws)."""

    @field_validator("interactions")
    @classmethod
    def _linear_interactions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = {VW_SHARED_NAMESPACE, *VW_ACTION_NAMESPACES}
        for pair in value:
            if len(pair) != 2 or not set(pair) <= known:
                raise ValueError(
                    f"{pair!r} must be two namespace letters from {''.join(sorted(known))}"
                )
            if pair[0] == pair[1]:
                raise ValueError(f"{pair!r} pairs a namespace with itself")
        pairs = [frozenset(p) for p in value]
        if len(set(pairs)) != len(pairs):
            raise ValueError(f"lists an interaction twice: {list(value)}")
        return value

    @model_validator(mode="after")
    def _squarecb_mtr(self) -> VwBanditSpec:
        if self.exploration == "squarecb" and self.cb_type != "mtr":
            raise ValueError(
                "exploration 'squarecb' needs cb_type 'mtr' (VW has no other), "
                f"got {self.cb_type!r}"
            )
        return self


class RewardSpec(TrainingSection):
    """How the log's reward is made (the simulator's and the bank's economics)."""

    complaint_penalty_cny: float = Field(default=300.0, ge=0)
    """CNY charged per complaint in the logged reward."""


class PolicySpec(TrainingSection):
    kind: Literal["greedy", "softmax"] = "greedy"
    temperature: float = Field(default=1.0, gt=0)
    max_complaint_ratio: float | None = Field(default=None, gt=0)
    """Bound on the policy's predicted complaint rate, as a multiple of the logging policy's:
    a shadow price on complaints is raised until it holds (needs outcome heads). None: off."""


class EvaluationSpec(TrainingSection):
    alpha: float = Field(default=0.05, gt=0, le=0.5)
    """1 - the confidence level of the OPE intervals; ``nextbest promote`` compares the 95%
    lower bound and refuses runs evaluated at another level."""
    bootstrap: int = Field(default=500, ge=10, le=MAX_BOOTSTRAP)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    ground_truth: bool = True
    """For simulated logs (with ``simulation.json``): replay the simulator and log every
    policy's true value next to its estimates."""
    crossfit_folds: int = Field(default=2, ge=0, le=50)
    """DM and DR use a reward model cross-fitted on the held-out decisions in this many folds
    (by customer), independent of the policy's own scores, which are optimistic about the
    actions they pick; 0 uses the policy's scores."""

    reward_model: dict[str, Any] = Field(default_factory=dict)
    """Neural bandit only: the cross-fitted DM/DR reward model's settings that differ from
    the ``neural_bandit`` section (e.g. ``{init_bias: false}``). The policy's settings are
    chosen for the actions it picks; the estimator needs accurate rewards for every action,
    including the rarely logged ones the policy picks."""

    @model_validator(mode="after")
    def _folds(self) -> EvaluationSpec:
        if self.crossfit_folds == 1:
            raise ValueError("crossfit_folds must be 0 (off) or at least 2, got 1")
        return self


class TrackingSpec(TrainingSection):
    uri: str = Field(default="sqlite:///mlflow.db", min_length=1)
    experiment: str = Field(default="nextbest", min_length=1)
    registered_model: str = Field(default="nextbest", min_length=1, max_length=256)
    """Name the ONNX model is registered under (``models:/<name>@<alias>``)."""

    @field_validator("uri", "experiment", "registered_model")
    @classmethod
    def _no_outer_space(cls, value: str) -> str:
        if value != value.strip() or not value.strip():
            raise ValueError(
                f"{value!r} is blank or starts or ends with white space (a name that looks "
                "like another in the MLflow UI)"
            )
        return value

    @field_validator("registered_model")
    @classmethod
    def _registrable(cls, value: str) -> str:
        problem = registered_model_name_problem(value)
        if problem:
            raise ValueError(f"{value!r} {problem}")
        return value


def registered_model_name_problem(name: str) -> str | None:
    """Why MLflow's model registry (or a ``models:/<name>@<alias>`` URI) would refuse
    ``name``, or None: checked at load so that a bad name fails before any training.

    MLflow (``mlflow.utils.validation._validate_model_name``) refuses blank names, ``/`` and
    ``:``, and names that resolve to another path (``.``, ``..x``); ``@`` would be read as
    the start of an alias in a model URI.
    """
    if not name.strip():
        return "is blank"
    bad = sorted({c for c in name if c in "/:@"})
    if bad:
        listed = " or ".join(repr(c) for c in bad)
        return f"must not contain {listed} (MLflow model names, models:/<name>@<alias> URIs)"
    if name == "." or name.startswith(".."):
        return "must not be '.' or start with '..' (MLflow treats names as paths)"
    return None


class ExportSpec(TrainingSection):
    dir: Path = Path("data/models")


class TrainingConfig(TrainingSection):
    """A training job: data, learner, acting policy, evaluation, tracking, export."""

    learner: Literal["neural_bandit", "vw_bandit"]
    """Which learner the job trains: its section (``neural_bandit`` or ``vw_bandit``) applies."""
    data: DataSpec
    reward: RewardSpec = RewardSpec()
    neural_bandit: NeuralBanditSpec = NeuralBanditSpec()
    vw_bandit: VwBanditSpec = VwBanditSpec()
    policy: PolicySpec = PolicySpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    tracking: TrackingSpec = TrackingSpec()
    export: ExportSpec = ExportSpec()

    @model_validator(mode="after")
    def _complaint_guard(self) -> TrainingConfig:
        guarded = self.policy.max_complaint_ratio is not None
        if guarded and (self.learner != "neural_bandit" or self.neural_bandit.target != "outcomes"):
            raise ValueError(
                "policy.max_complaint_ratio needs complaint predictions: learner neural_bandit "
                "with neural_bandit.target 'outcomes'"
            )
        return self

    @model_validator(mode="after")
    def _ope_reward_model(self) -> TrainingConfig:
        if not self.evaluation.reward_model:
            return self
        if self.learner != "neural_bandit":
            raise ValueError("evaluation.reward_model applies to learner neural_bandit only")
        if self.evaluation.crossfit_folds == 0:
            raise ValueError(
                "evaluation.reward_model needs evaluation.crossfit_folds >= 2 (with 0, DM and "
                "DR use the policy's own scores and no reward model is trained)"
            )
        try:  # the merged settings validate as a neural_bandit section (unknown keys too)
            self.ope_reward_model()
        except ValidationError as exc:
            problems = "; ".join(
                f"evaluation.reward_model{''.join(f'.{p}' for p in e['loc'])}: {error_message(e)}"
                for e in exc.errors()
            )
            raise ValueError(problems) from None
        return self

    def ope_reward_model(self) -> TrainingConfig:
        """This config with ``evaluation.reward_model`` applied to ``neural_bandit``: what
        the cross-fitted DM/DR reward model is trained with (``self`` when no override)."""
        overrides = self.evaluation.reward_model
        if not overrides:
            return self
        merged = NeuralBanditSpec.model_validate(self.neural_bandit.model_dump() | overrides)
        return self.model_copy(update={"neural_bandit": merged})


def load_training_config(path: str | Path) -> TrainingConfig:
    """Load a training config; errors name the file, the key and the reason."""
    return load_model(path, TrainingConfig)
