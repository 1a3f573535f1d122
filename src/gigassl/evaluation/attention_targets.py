"""Attention-MIL for survival (Cox partial-likelihood loss) and continuous targets (MSE).

The network is :class:`gigassl.evaluation.mil.GatedAttentionMIL` with one output: a risk score (``loss="cox"``)
or the standardised target (``loss="mse"``). Optimiser, widths, dropout and tile sampling follow
the classification baseline :class:`gigassl.evaluation.mil.AttentionMIL`'s defaults (read from it, so they
move together). Survival: the Breslow negative partial log-likelihood over the bags of a batch
(DeepSurv, Katzman et al. 2018; the risk set of a batch stands for the cohort's, so batches are
larger than for classification and a batch without an event is skipped). The stop rule is the
baseline's validation share: by default 0, so the fixed ``max_epochs`` run; with a share > 0,
early stopping on the loss of an inner split (stratified on the event, or on target terciles),
best weights kept (:class:`gigassl.evaluation.mil_training.EarlyStopping`). Inputs are not standardised here
(the classification baseline standardises them since its sweep; not swept for these losses).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from gigassl.evaluation.mil import (
    AttentionMIL,
    GatedAttentionMIL,
    inner_validation_split,
    pad_bags,
    predict_logits,
    subsample_tiles,
)
from gigassl.evaluation.mil_training import EarlyStopping

logger = logging.getLogger(__name__)
TARGET_LOSSES = ("cox", "mse")


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Breslow negative partial log-likelihood per event of (B,) risks, times and events (bool)."""
    order = torch.argsort(time)
    risk, time, event = risk[order], time[order], event[order]
    first = torch.searchsorted(time, time, right=False)  # each row's risk set starts at its first tie
    log_risk_set = torch.logcumsumexp(risk.flip(0), 0).flip(0)[first]
    return -((risk - log_risk_set) * event).sum() / event.sum().clamp(min=1)


def strata_of(target: np.ndarray, event: np.ndarray | None) -> np.ndarray:
    """Integer strata of an inner split: the event (survival), or target terciles (regression)."""
    if event is not None:
        return np.asarray(event, bool).astype(np.int64)
    edges = np.quantile(target, [1 / 3, 2 / 3])
    return np.searchsorted(edges, target, side="right").astype(np.int64)


class AttentionTargetMIL:
    """Gated attention-MIL with a Cox (``loss="cox"``) or squared-error (``"mse"``) head.

    ``fit(bags, target, event=None)``: ``target`` (S,) survival times or continuous values,
    ``event`` (S,) bool for Cox. ``predict(bags)`` → (S,) risk scores or predicted values.
    """

    def __init__(
        self,
        loss: str = "cox",
        max_epochs: int = 50,
        patience: int = 10,
        batch_size: int = 32,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        if loss not in TARGET_LOSSES:
            raise ValueError(f"loss {loss!r}: choose one of {TARGET_LOSSES}")
        self.loss, self.max_epochs, self.patience, self.batch_size, self.seed, self.device = (
            loss,
            max_epochs,
            patience,
            batch_size,
            seed,
            device,
        )
        self.base = AttentionMIL()  # the classification baseline's widths, dropout, optimiser, tile sampling

    def _loss(self, output: torch.Tensor, target: torch.Tensor, event: torch.Tensor | None) -> torch.Tensor:
        if self.loss == "cox":
            assert event is not None, "a Cox loss needs the events"
            return cox_loss(output, target, event)
        return torch.mean((output - target) ** 2)

    def fit(self, bags: Sequence[np.ndarray], target: np.ndarray, event: np.ndarray | None = None) -> "AttentionTargetMIL":
        target = np.asarray(target, np.float64)
        if self.loss == "mse":
            self.offset_, self.spread_ = float(target.mean()), float(target.std() or 1.0)
            target = (target - self.offset_) / self.spread_
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model_ = self._train(bags, target, event).eval()
        return self

    def _tensors(
        self, rows: np.ndarray, target: np.ndarray, event: np.ndarray | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = torch.device(self.device)
        t = torch.as_tensor(target[rows], dtype=torch.float32, device=device)
        return t, None if event is None else torch.as_tensor(np.asarray(event, bool)[rows], device=device)

    def _train(self, bags: Sequence[np.ndarray], target: np.ndarray, event: np.ndarray | None) -> GatedAttentionMIL:
        base, device = self.base, torch.device(self.device)
        rng, generator = np.random.default_rng(self.seed), torch.Generator().manual_seed(self.seed)
        model = GatedAttentionMIL(1, bags[0].shape[1], base.hidden_dim, base.attention_dim, base.dropout).to(device)
        optimiser = torch.optim.Adam(model.parameters(), lr=base.lr, weight_decay=base.weight_decay)
        train, val = inner_validation_split(strata_of(target, event), base.validation_fraction, self.seed)
        if event is not None and len(val) and not np.asarray(event, bool)[val].any():
            train, val = np.arange(len(bags)), np.array([], dtype=np.int64)  # a validation part without events scores nothing
        stopping = EarlyStopping(self.patience)
        for epoch in range(self.max_epochs):
            model.train()
            order = train[torch.randperm(len(train), generator=generator).numpy()]
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                t, e = self._tensors(batch, target, event)
                if e is not None and not bool(e.any()):
                    continue
                sampled = [subsample_tiles(bags[i], base.max_tiles, rng) for i in batch]
                output = model(*pad_bags(sampled, device))[0][:, 0]
                loss = self._loss(output, t, e)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            if not len(val):
                continue
            with torch.no_grad():
                val_loss = float(self._loss(self._outputs(model, [bags[i] for i in val]), *self._tensors(val, target, event)))
            if stopping.update(epoch, val_loss, model):
                break
        if stopping.best_state is not None:
            model.load_state_dict(stopping.best_state)
        return model

    def _outputs(self, model: GatedAttentionMIL, bags: Sequence[np.ndarray]) -> torch.Tensor:
        """(S,) outputs with every tile of every bag, in eval mode."""
        return predict_logits(model, bags, torch.device(self.device))[:, 0]

    def predict(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        """(S,) risk scores (Cox) or predicted values (MSE) with every tile of every bag."""
        values = self._outputs(self.model_, bags).double().cpu().numpy()
        return values * self.spread_ + self.offset_ if self.loss == "mse" else values
