"""A PyTorch neural bandit: a reward model over (context, action) with action embeddings.

``RewardModel(context)`` scores every catalogue action, float ``(B, A)``, in reward units:
``score[b, a] = <f(context_b), e_a + P x_a> + bias_a`` where ``f`` is an MLP over the context
features, ``e_a`` a learned embedding of action ``a`` and ``x_a`` its catalogue features
(channel, offer, timing, risk ...). Trained on a decision log by regression on the logged
action's reward, unweighted (``direct``) or importance-weighted (``ips``: weights
``min(1 / pscore, clip)``, normalised to mean 1, which corrects for what the logging policy
chose more often). Acting: argmax or softmax over the actions the rules allow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from training.logged_data import LoggedBandit


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
    loss: Literal["direct", "ips"] = "direct"
    """``direct``: plain regression; ``ips``: importance-weighted by the logging pscore."""
    ips_clip: float = 50.0
    """Largest importance weight (``ips`` loss)."""
    seed: int = 0
    threads: int = 2
    """Torch intra-op threads."""

    def __post_init__(self) -> None:
        for name in ("hidden", "embedding", "epochs", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be positive, got {self.learning_rate}")
        if self.loss not in ("direct", "ips"):
            raise ValueError(f"`loss` must be 'direct' or 'ips', got {self.loss!r}")
        if not self.ips_clip >= 1:
            raise ValueError(f"`ips_clip` must be at least 1, got {self.ips_clip}")


class RewardModel(nn.Module):
    """Scores every action for a batch of contexts: ``(B, F) -> (B, A)``, reward units."""

    def __init__(
        self, n_context: int, action_features: np.ndarray, hidden: int, embedding: int
    ) -> None:
        super().__init__()
        n_actions, n_action_features = action_features.shape
        self.context_net = nn.Sequential(
            nn.Linear(n_context, hidden), nn.ReLU(), nn.Linear(hidden, embedding)
        )
        self.action_embedding = nn.Embedding(n_actions, embedding)
        nn.init.normal_(self.action_embedding.weight, std=0.01)
        self.action_projection = nn.Linear(n_action_features, embedding, bias=False)
        self.action_bias = nn.Parameter(torch.zeros(n_actions))
        self.register_buffer(
            "action_features", torch.as_tensor(action_features, dtype=torch.float32)
        )
        self.register_buffer("reward_scale", torch.ones(()))

    def action_vectors(self) -> torch.Tensor:
        """Representation of every action, ``(A, E)``."""
        return self.action_embedding.weight + self.action_projection(self.action_features)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """Predicted reward of every action, ``(B, A)``."""
        hidden = self.context_net(context)
        return (hidden @ self.action_vectors().T + self.action_bias) * self.reward_scale

    def logged_scores(self, context: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Predicted reward of the logged actions only, ``(B,)``, in scaled units."""
        hidden = self.context_net(context)
        vectors = self.action_embedding(action) + self.action_projection(
            self.action_features[action]
        )
        return (hidden * vectors).sum(dim=1) + self.action_bias[action]


@dataclass
class TrainingHistory:
    """Per-epoch metrics (namespaced keys, as logged to MLflow)."""

    epochs: list[dict[str, float]]


def train_reward_model(
    log: LoggedBandit,
    action_features: np.ndarray,
    config: NeuralBanditConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
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

    Raises
    ------
    ValueError
        If ``config.loss == "ips"`` and the log has no propensities.
    """
    if config.loss == "ips" and log.pscore is None:
        raise ValueError(
            "the ips loss needs `pscore`; this log has none: use loss 'direct' or log propensities"
        )
    if action_features.shape[0] != log.n_actions:
        raise ValueError(
            f"action_features has {action_features.shape[0]} actions, the log {log.n_actions}"
        )
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    generator = np.random.default_rng(config.seed)
    model = RewardModel(log.context.shape[1], action_features, config.hidden, config.embedding)
    scale = float(np.std(log.reward)) or 1.0
    model.reward_scale.fill_(scale)
    context = torch.from_numpy(np.ascontiguousarray(log.context, np.float32))
    action = torch.from_numpy(log.action)
    target = torch.from_numpy((log.reward / scale).astype(np.float32))
    if config.loss == "ips":
        assert log.pscore is not None
        w = np.minimum(1.0 / log.pscore, config.ips_clip)
        weight = torch.from_numpy((w / w.mean()).astype(np.float32))
    else:
        weight = torch.ones(log.n_rounds)
    optimiser = torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    history = TrainingHistory([])
    n = log.n_rounds
    for epoch in range(config.epochs):
        order = torch.from_numpy(generator.permutation(n))
        total, seen = 0.0, 0
        model.train()
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            pred = model.logged_scores(context[idx], action[idx])
            loss = (weight[idx] * (pred - target[idx]) ** 2).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        metrics = {"losses/train_mse_scaled": total / seen, "charts/epoch": float(epoch)}
        history.epochs.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    model.eval()
    return model, history


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
    masked = np.where(allowed, scores, -np.inf)
    dist = np.zeros(scores.shape)
    dist[np.arange(len(scores)), masked.argmax(axis=1)] = 1.0
    return dist


def softmax_policy(scores: np.ndarray, allowed: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax over the allowed actions, float64 ``(n, A)`` (blocked actions get 0)."""
    if not temperature > 0:
        raise ValueError(f"`temperature` must be positive, got {temperature}")
    masked = np.where(allowed, np.asarray(scores, np.float64) / temperature, -np.inf)
    masked -= masked.max(axis=1, keepdims=True)
    weights = np.exp(masked)
    return weights / weights.sum(axis=1, keepdims=True)


def config_dict(config: NeuralBanditConfig) -> dict[str, object]:
    """The config as a flat dict (for run tracking)."""
    return asdict(config)
