"""The baselines Giga-SSL is compared with, all on the same tile features.

- :class:`AverageMIL`: the mean of a slide's plain tile features, standard-scaled, then the
  same logistic regression as the slide embeddings get.
- :class:`AttentionMIL`: gated attention-MIL (Ilse, Tomczak & Welling, ICML 2018), trained from
  scratch on frozen tile features (how: :mod:`gigassl.evaluation.mil_training`).
- :class:`TopKFineTuner`: attention-MIL on frozen features picks each slide's ``k`` most-attended
  tiles; those tiles are re-read from the slide file and the tile trunk is fine-tuned end to end
  with the MIL head (encoder lr 1e-5). Test slides use the same selection rule, so only the
  ``k`` tiles per slide ever go through the trunk.

A *bag* is one slide's (N, 256) float32 tile features. Labels are integers 0 … C-1 (the
evaluation encodes string labels). Every estimator follows scikit-learn's conventions:
``__init__`` stores parameters, ``fit`` returns ``self``, ``predict_proba`` gives (S, C).
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedShuffleSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from extract.encoders.tile_encoder import TILE_FEATURE_DIM, prepare_batch
from gigassl.evaluation.mil_training import EarlyStopping, Standardiser, fit_standardisation, fold_standardisation, make_scheduler

logger = logging.getLogger(__name__)

# The original Giga-SSL evaluation: LogisticRegression(C=10, class_weight="balanced", max_iter=1000).
DEFAULT_C = 10.0
C_GRID = tuple(float(c) for c in np.logspace(-2, 3, 6))


def make_logistic_regression(
    c: float = DEFAULT_C,
    *,
    standardize: bool = False,
    tune_c: bool = False,
    n_inner_folds: int = 3,
    seed: int = 0,
) -> BaseEstimator:
    """The downstream linear classifier (an sklearn estimator).

    lbfgs with ``class_weight="balanced"``, ``max_iter=1000`` and scikit-learn's default
    tolerance; with ``tune_c`` C is chosen from :data:`C_GRID` by ``n_inner_folds``-fold
    cross-validated ROC-AUC.
    """
    if tune_c:
        scoring = "roc_auc_ovr"  # equals binary ROC-AUC for two classes
        # Newer scikit-learn warns unless these are explicit; older versions lack them.
        modern = {"l1_ratios": (0.0,), "use_legacy_attributes": False}
        accepted = inspect.signature(LogisticRegressionCV).parameters
        classifier = LogisticRegressionCV(
            Cs=list(C_GRID),
            cv=n_inner_folds,
            scoring=scoring,
            class_weight="balanced",
            max_iter=1000,
            random_state=seed,
            **{k: v for k, v in modern.items() if k in accepted},
        )
    else:
        classifier = LogisticRegression(C=c, class_weight="balanced", max_iter=1000)
    return make_pipeline(StandardScaler(), classifier) if standardize else classifier


def inner_folds(y_train: np.ndarray) -> int:
    """Folds of ``tune_c``'s inner cross-validation: 2 or 3, no more than the smallest class has."""
    counts = np.bincount(y_train)
    return int(max(2, min(3, counts[counts > 0].min())))


def mean_features(bags: Iterable[np.ndarray]) -> np.ndarray:
    """(S, D) mean tile feature of each bag (N_i, D); bags may be a generator, read one at a time."""
    return np.stack([np.asarray(bag, dtype=np.float32).mean(axis=0) for bag in bags]).astype(np.float32)


class AverageMIL(ClassifierMixin, BaseEstimator):
    """Mean of plain tile features → StandardScaler → logistic regression (C, balanced)."""

    def __init__(self, c: float = DEFAULT_C, tune_c: bool = False) -> None:
        self.c = c
        self.tune_c = tune_c

    def fit(self, bags: Sequence[np.ndarray], y: np.ndarray) -> "AverageMIL":
        self.pipeline_ = make_logistic_regression(self.c, standardize=True, tune_c=self.tune_c)
        self.pipeline_.fit(mean_features(bags), np.asarray(y))
        self.classes_ = self.pipeline_.classes_
        return self

    def predict_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        return self.pipeline_.predict_proba(mean_features(bags))

    def predict(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        return self.classes_[self.predict_proba(bags).argmax(axis=1)]


class GatedAttentionMIL(nn.Module):
    """Gated attention pooling (Ilse et al. 2018, eq. 9) over a bag, then a linear classifier.

    h = ReLU(W x); a = softmax_n(wᵀ (tanh(V h) ⊙ sigmoid(U h))); z = Σ_n a_n h_n; logits = C z.
    ``forward(features (B, N, D), mask (B, N) bool) -> (logits (B, n_classes), attention (B, N))``;
    padded positions (mask False) get zero attention.
    """

    def __init__(
        self,
        n_classes: int,
        in_dim: int = TILE_FEATURE_DIM,
        hidden_dim: int = 128,
        attention_dim: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden_dim, attention_dim)
        self.attention_u = nn.Linear(hidden_dim, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(features)  # (B, N, hidden)
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        scores = self.attention_w(gate).squeeze(-1)  # (B, N)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=1)
        pooled = torch.einsum("bn,bnh->bh", attention, h)
        return self.classifier(pooled), attention


def pad_bags(bags: Sequence[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack bags of different sizes: (B, N_max, D) float32 features and a (B, N_max) bool mask."""
    n_max = max(len(bag) for bag in bags)
    dim = bags[0].shape[1]
    features = np.zeros((len(bags), n_max, dim), dtype=np.float32)
    mask = np.zeros((len(bags), n_max), dtype=bool)
    for row, bag in enumerate(bags):
        features[row, : len(bag)] = bag
        mask[row, : len(bag)] = True
    return torch.from_numpy(features).to(device), torch.from_numpy(mask).to(device)


def _balanced_class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def inner_validation_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, validation) indices; no validation when a class has fewer than 2 bags."""
    counts = np.bincount(y)
    n_val = int(round(fraction * len(y)))
    if counts[counts > 0].min() < 2 or n_val < len(counts[counts > 0]) or len(y) - n_val < len(counts[counts > 0]):
        return np.arange(len(y)), np.array([], dtype=np.int64)
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
    train, val = next(splitter.split(np.zeros(len(y)), y))
    return train, val


class AttentionMIL(ClassifierMixin, BaseEstimator):
    """Gated attention-MIL trained from scratch on frozen tile features.

    Defaults: the sweep of ``benchmarks/baseline_sweep.py`` on BACH (docs/evaluation.md).

    Adam (``lr``, ``weight_decay``, schedule ``lr_schedule``) on balanced cross-entropy,
    ``batch_size`` bags per step, at most ``max_tiles`` random tiles per bag per step while
    training (all tiles when predicting). With ``standardize`` the inputs are standard-scaled
    by the training bags' tile statistics, folded into the first layer after training (see
    :mod:`gigassl.evaluation.mil_training`). With ``validation_fraction`` > 0 training stops after
    ``patience`` epochs without a better loss on that stratified share of the training bags (not
    before ``min_epochs``) and keeps the best weights; with 0, or when a class has fewer than 2
    bags, it runs ``max_epochs`` epochs. ``y`` must hold integers 0 … C-1.
    """

    def __init__(
        self,
        hidden_dim: int = 128,
        attention_dim: int = 128,
        dropout: float = 0.25,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 50,
        patience: int = 20,
        batch_size: int = 8,
        max_tiles: int = 512,
        validation_fraction: float = 0.0,
        seed: int = 0,
        device: str = "cpu",
        standardize: bool = True,
        lr_schedule: str = "constant",
        min_epochs: int = 0,
    ) -> None:
        self.hidden_dim = hidden_dim
        self.attention_dim = attention_dim
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.max_tiles = max_tiles
        self.validation_fraction = validation_fraction
        self.seed = seed
        self.device = device
        self.standardize = standardize
        self.lr_schedule = lr_schedule
        self.min_epochs = min_epochs

    def fit(self, bags: Sequence[np.ndarray], y: np.ndarray) -> "AttentionMIL":
        y = np.asarray(y, dtype=np.int64)
        device = torch.device(self.device)
        self.classes_ = np.unique(y)
        n_classes = int(y.max()) + 1
        # fitted on the training bags only: the bags given here
        self.feature_mean_: np.ndarray | None = None
        self.feature_scale_: np.ndarray | None = None
        if self.standardize:
            self.feature_mean_, self.feature_scale_ = fit_standardisation(bags)
        # Initialisation and dropout draw from torch's global generator: fork it so a seed
        # reproduces the fit without disturbing the caller's random state.
        cuda_devices = (
            [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        )
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(self.seed)
            self.model_ = self._train(bags, y, n_classes, device).eval()
        if self.feature_mean_ is not None and self.feature_scale_ is not None:
            first_layer = self.model_.embed[0]
            assert isinstance(first_layer, nn.Linear), "GatedAttentionMIL.embed starts with its Linear layer"
            fold_standardisation(first_layer, self.feature_mean_, self.feature_scale_)
        self.n_classes_ = n_classes
        return self

    def _train(self, bags: Sequence[np.ndarray], y: np.ndarray, n_classes: int, device: torch.device) -> GatedAttentionMIL:
        torch_generator = torch.Generator().manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        model = GatedAttentionMIL(n_classes, bags[0].shape[1], self.hidden_dim, self.attention_dim, self.dropout)
        model.to(device)
        standardise = Standardiser(self.feature_mean_, self.feature_scale_, device)
        optimiser = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        loss_fn = nn.CrossEntropyLoss(weight=_balanced_class_weights(y, n_classes).to(device))
        train, val = inner_validation_split(y, self.validation_fraction, self.seed)
        if len(val) == 0 and self.validation_fraction > 0:
            logger.debug("attention-MIL: too few bags for an inner validation split; training %d epochs", self.max_epochs)
        steps_per_epoch = -(-len(train) // self.batch_size)
        scheduler = make_scheduler(optimiser, self.lr_schedule, self.lr, self.max_epochs * steps_per_epoch)
        stopping = EarlyStopping(self.patience, self.min_epochs)
        for epoch in range(self.max_epochs):
            model.train()
            order = train[torch.randperm(len(train), generator=torch_generator).numpy()]
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                features, mask = pad_bags([subsample_tiles(bags[i], self.max_tiles, rng) for i in batch], device)
                logits, _ = model(standardise(features), mask)
                loss = loss_fn(logits, torch.as_tensor(y[batch], device=device))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                if scheduler is not None:
                    scheduler.step()
            if len(val) == 0:
                continue
            val_logits = predict_logits(model, [bags[i] for i in val], device, standardise)
            if stopping.update(epoch, float(loss_fn(val_logits, torch.as_tensor(y[val], device=device))), model):
                logger.debug("attention-MIL: early stop at epoch %d (validation loss %.4f)", epoch, stopping.best_loss)
                break
        if stopping.best_state is not None:
            model.load_state_dict(stopping.best_state)
        return model

    def predict_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        logits = predict_logits(self.model_, bags, torch.device(self.device))
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def predict(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        return self.predict_proba(bags).argmax(axis=1)

    def attention(self, bag: np.ndarray) -> np.ndarray:
        """(N,) attention weights of one bag's tiles (they sum to 1)."""
        features, mask = pad_bags([bag], torch.device(self.device))
        with torch.no_grad():
            _, attention = self.model_(features, mask)
        return attention[0].cpu().numpy()


def subsample_tiles(bag: np.ndarray, max_tiles: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``max_tiles`` rows of ``bag`` (N, D), drawn without replacement; the bag itself when it is small."""
    if len(bag) <= max_tiles:
        return bag
    return bag[rng.choice(len(bag), size=max_tiles, replace=False)]


@torch.no_grad()
def predict_logits(
    model: GatedAttentionMIL,
    bags: Sequence[np.ndarray],
    device: torch.device,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """(S, C) logits with every tile of every bag, in eval mode (``transform``: applied to the
    padded features first, e.g. the standardisation while training)."""
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(bags), batch_size):
        features, mask = pad_bags(list(bags[start : start + batch_size]), device)
        outputs.append(model(transform(features) if transform is not None else features, mask)[0])
    model.train(was_training)
    return torch.cat(outputs)


# ---------------------------------------------------------------------------------------------
# Top-k fine-tuning


@dataclass(frozen=True)
class SlideTiles:
    """Where one slide's tiles are re-read from: the slide file and its tile grid.

    ``coords`` (N, 2) are the level-0 top-left corners of the rows of the slide's plain
    features; a tile spans ``size_level0`` level-0 pixels and is resized to ``out_px``.
    ``level0_mpp`` is the level-0 µm/px used at extraction (passed as an override, so slides
    without metadata read the same way).
    """

    slide_path: Path
    coords: np.ndarray
    size_level0: float
    out_px: int
    level0_mpp: float | None = None

    def read(self, rows: np.ndarray) -> np.ndarray:
        """(k, out_px, out_px, 3) uint8 RGB tiles of the given feature rows."""
        from extract.slides.formats import open_slide

        with open_slide(self.slide_path, self.level0_mpp) as reader:
            return np.stack([reader.read_tile(int(x), int(y), self.size_level0, self.out_px) for x, y in self.coords[rows]])


def tiles_to_tensor(tiles: np.ndarray, device: torch.device) -> torch.Tensor:
    """(k, H, W, 3) uint8 RGB → (k, 3, H, W) float32 normalised as the tile encoder expects."""
    return prepare_batch(torch.from_numpy(np.ascontiguousarray(tiles)), device)


class TopKFineTuner(ClassifierMixin, BaseEstimator):
    """Top-k fine-tuning of the tile trunk with an attention-MIL head.

    ``fit(bags, y, tiles)``: 1) attention-MIL (``mil``) on the frozen features ``bags``;
    2) each slide's ``k`` most-attended rows; 3) ``epochs`` passes over the training slides,
    one slide (its ``k`` re-read tiles through ``trunk_factory()``'s trunk, then the MIL head,
    initialised from step 1) per step, Adam with ``encoder_lr`` for the trunk and ``head_lr``
    for the head. The trunk's batch norms stay in eval mode (``k`` tiles of one slide are too
    few and too alike for batch statistics). ``predict_proba(bags, tiles)`` selects test tiles
    with the frozen-feature attention of step 1.
    """

    def __init__(
        self,
        trunk_factory: Callable[[], nn.Module],
        k: int = 64,
        epochs: int = 2,
        encoder_lr: float = 1e-5,
        head_lr: float = 1e-4,
        mil: AttentionMIL | None = None,
        seed: int = 0,
        device: str = "cpu",
        max_steps: int | None = None,
    ) -> None:
        self.trunk_factory = trunk_factory
        self.k = k
        self.epochs = epochs
        self.encoder_lr = encoder_lr
        self.head_lr = head_lr
        self.mil = mil
        self.seed = seed
        self.device = device
        self.max_steps = max_steps

    def top_rows(self, bag: np.ndarray) -> np.ndarray:
        """Indices of the bag's ``k`` most-attended tiles under the frozen-feature MIL."""
        attention = self.selector_.attention(bag)
        k = min(self.k, len(bag))
        return np.sort(np.argpartition(-attention, k - 1)[:k])

    def fit(self, bags: Sequence[np.ndarray], y: np.ndarray, tiles: Sequence[SlideTiles]) -> "TopKFineTuner":
        y = np.asarray(y, dtype=np.int64)
        device = torch.device(self.device)
        base = self.mil if self.mil is not None else AttentionMIL(seed=self.seed, device=self.device)
        self.selector_ = copy.deepcopy(base).fit(bags, y)
        self.classes_ = self.selector_.classes_
        self.trunk_ = self.trunk_factory().to(device)
        self.head_ = copy.deepcopy(self.selector_.model_).to(device)
        optimiser = torch.optim.Adam(
            [
                {"params": self.trunk_.parameters(), "lr": self.encoder_lr},
                {"params": self.head_.parameters(), "lr": self.head_lr},
            ]
        )
        loss_fn = nn.CrossEntropyLoss(weight=_balanced_class_weights(y, self.selector_.n_classes_).to(device))
        rows = [self.top_rows(bag) for bag in bags]
        generator = torch.Generator().manual_seed(self.seed)
        steps = 0
        self.trunk_.eval()  # batch norms frozen; gradients still flow
        self.head_.train()
        for _ in range(self.epochs):
            for i in torch.randperm(len(bags), generator=generator).tolist():
                if self.max_steps is not None and steps >= self.max_steps:
                    break
                logits = self._slide_logits(tiles[i], rows[i], device)
                loss = loss_fn(logits, torch.as_tensor(y[i : i + 1], device=device))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                steps += 1
        self.n_steps_ = steps
        self.head_.eval()
        return self

    def _slide_logits(self, slide: SlideTiles, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        images = tiles_to_tensor(slide.read(rows), device)
        features = self.trunk_(images).unsqueeze(0)  # (1, k, 256)
        return self.head_(features)[0]

    def predict_proba(self, bags: Sequence[np.ndarray], tiles: Sequence[SlideTiles]) -> np.ndarray:
        device = torch.device(self.device)
        outputs = []
        with torch.no_grad():
            for bag, slide in zip(bags, tiles):
                outputs.append(torch.softmax(self._slide_logits(slide, self.top_rows(bag), device).float(), dim=1))
        return torch.cat(outputs).cpu().numpy()

    def predict(self, bags: Sequence[np.ndarray], tiles: Sequence[SlideTiles]) -> np.ndarray:
        return self.predict_proba(bags, tiles).argmax(axis=1)
