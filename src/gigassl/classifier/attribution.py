"""Exact per-tile contributions to a fitted classifier's class score (what ``gigassl explain`` maps).

**Giga-SSL + LR.** The class score is affine in the slide embedding ``e = m / ‖m‖``, where ``m``
is the mean over R views of the mean over each view's active layer4 output sites ``h``:

    score = c + u · e = c + Σ_views Σ_sites (u · h_site) / (R · n_sites(view) · ‖m‖)

(``u``, ``c``: the class's direction with the scaler folded in, :func:`class_direction`) — a sum
of per-(view, site) terms, class activation mapping (Zhou et al., CVPR 2016) on sparse maps. Each
output site of the strided 3×3 conv is fed by the input tiles of its window (cells 2o … 2o + 2
on each axis); a site's term is shared equally among those tiles (the later submanifold convs
mix neighbouring sites, as any CAM's last layers do), so every term lands on a tile and the
tiles' contributions plus ``c`` are the score of the embedding made from the same views,
exactly. With T = 5 tiles drawn across a slide, most views' tiles are isolated and their terms
are theirs alone.

The views cover every tile: ``views_per_tile`` passes, each a random permutation of the N tiles
cut into ⌈N / T⌉ views of T (the last view of a pass topped up with tiles of the one before), so
R = ``views_per_tile`` × ⌈N / T⌉ (at least :data:`MIN_VIEWS`: more passes on a small slide) and
each tile is in at least ``views_per_tile`` views. Each view
is still a uniform random T-subset, so the embedding of these views estimates the one
``gigassl embed`` stores; the gap between their scores is reported.

**AverageMIL + LR**: ``score = c + Σ_tiles u · x_tile / N``, exact per tile. **Attention-MIL**:
``score = c + Σ_tiles a_tile · (u · h_tile)`` (attention × the tile's own logit), exact too; the
attention itself is kept beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from extract.features.plain import PlainFeatures
from gigassl.classifier.model_file import SlideClassifier, class_direction
from gigassl.sparse.maps import MAP_MARGIN, collate_views

# Fewest explaining views: the class score of an R-view embedding varies with the views drawn
# (on the demo, R = 50 random views: scores 1.0 … 4.5 for one slide; R = 500: 1.5 … 1.9).
MIN_VIEWS = 512


@dataclass(frozen=True)
class TileAttribution:
    """One slide's explanation of one class score.

    coords (N, 2) int64 level-0 top-left (x, y); contributions (N,) float64 that sum, with
    ``intercept``, to ``score``; n_views (N,) views covering each tile (1 for the MIL baselines);
    ``reference_score``: the class score of the slide's stored-style embedding (Giga-SSL: R
    random views as ``gigassl embed`` draws them; the baselines: the same as ``score``);
    ``probability``: the model's probability of ``class_name`` from that reference input;
    ``score_sd``: Giga-SSL only, the s.d. of the class score over embeddings of R views (the
    noise of ``reference_score``).
    """

    slide_id: str
    method: str
    class_name: str
    coords: np.ndarray
    tile_size_level0: float
    contributions: np.ndarray
    n_views: np.ndarray
    intercept: float
    score: float
    reference_score: float
    probability: float
    n_explaining_views: int = 0
    score_sd: float = 0.0
    attention: np.ndarray | None = None

    @property
    def reproduced_score(self) -> float:
        """intercept + Σ contributions (equals ``score`` up to rounding)."""
        return float(self.intercept + self.contributions.sum())


def covering_views(n_tiles: int, n_tiles_per_view: int, views_per_tile: int, rng: np.random.Generator) -> np.ndarray:
    """(R, t) tile rows, t = min(T, N): passes of ⌈N / t⌉ views, each pass a permutation of all
    tiles, so every tile is in at least ``views_per_tile`` views; more passes on small slides, so
    that R ≥ ``MIN_VIEWS``."""
    t = min(n_tiles_per_view, n_tiles)
    per_pass = -(-n_tiles // t)
    passes = []
    for _ in range(max(views_per_tile, -(-MIN_VIEWS // per_pass))):
        order = rng.permutation(n_tiles)
        full = order[: (n_tiles // t) * t].reshape(-1, t)
        if len(full) < per_pass:  # the remainder, topped up with the last tiles before it (distinct)
            full = np.concatenate([full, order[n_tiles - t :][None]])
        passes.append(full)
    return np.sort(np.concatenate(passes), axis=1)


def _view_cells(coords: np.ndarray, rows: np.ndarray, tile_step_level0: float) -> np.ndarray:
    """(r, t, 2) grid cells (x, y) of each view's tiles, each view starting at 0 (as ``tile_cells``)."""
    cells = np.rint(coords[rows].astype(np.float64) / tile_step_level0).astype(np.int64)
    return cells - cells.min(axis=1, keepdims=True)


def _site_shares(cells: np.ndarray, site_indices: np.ndarray, site_values: np.ndarray) -> np.ndarray:
    """(r, t) per tile-in-view: the sum of its shares of the output sites whose window holds it.

    ``cells`` (r, t, 2) (x, y) from 0; ``site_indices`` (M, 3) (view, y, x) of the strided
    conv's outputs; ``site_values`` (M,) each site's term. Output o's window is map cells 2o …
    2o + 2 (the map starts at ``MAP_MARGIN``): a tile on map cell k feeds o = k // 2, and also
    k // 2 − 1 when k is even.
    """
    r, t = cells.shape[:2]
    x, y = (cells[..., 0] + MAP_MARGIN).ravel(), (cells[..., 1] + MAP_MARGIN).ravel()
    view = np.repeat(np.arange(r), t)
    width = int(max(site_indices[:, 2].max(), x.max() // 2)) + 1
    height = int(max(site_indices[:, 1].max(), y.max() // 2)) + 1
    site_keys = (site_indices[:, 0] * height + site_indices[:, 1]) * width + site_indices[:, 2]
    order = np.argsort(site_keys)
    pair_tile, pair_site = [], []
    for dy in (0, 1):
        for dx in (0, 1):
            valid = ((y % 2 == 0) | (dy == 0)) & ((x % 2 == 0) | (dx == 0))
            keys = (view * height + y // 2 - dy) * width + x // 2 - dx
            found = order[np.searchsorted(site_keys, keys[valid], sorter=order)]
            if not np.array_equal(site_keys[found], keys[valid]):
                raise RuntimeError("a tile's window has no output site: the strided conv's geometry changed")
            pair_tile.append(np.flatnonzero(valid))
            pair_site.append(found)
    tiles, sites = np.concatenate(pair_tile), np.concatenate(pair_site)
    shared = site_values[sites] / np.bincount(sites, minlength=len(site_values))[sites]
    return np.bincount(tiles, weights=shared, minlength=r * t).reshape(r, t)


@torch.no_grad()
def _view_terms(model: Any, slide: PlainFeatures, rows: np.ndarray, u: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """One chunk of r views → ((r, t) each tile's share of u · (its view's mean over sites), (r, W) view means)."""
    cells = _view_cells(slide.coords, rows, slide.tile_step_level0)
    out = model.site_features(collate_views([(slide.features[v], c) for v, c in zip(rows, cells)]))
    h, index = out.features.double(), out.indices.long()
    view = index[:, 0].to(h.device)
    n_sites = torch.bincount(view, minlength=len(rows)).to(h.dtype)
    per_site = (h @ u.to(h.dtype)) / n_sites[view]  # (M,): u · h_site / n_sites(view)
    view_means = torch.zeros(len(rows), h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, view, h / n_sites[view, None])
    shares = _site_shares(cells, index.cpu().numpy(), per_site.cpu().numpy())
    return shares, view_means.cpu().numpy()


def explaining_views(
    n_tiles: int, n_tiles_per_view: int, n_views_per_embedding: int, views_per_tile: int, rng: np.random.Generator
) -> np.ndarray:
    """(G × R, t) tile rows: :func:`covering_views` topped up with uniform random views to a
    multiple of R = ``n_views_per_embedding`` (the R of ``gigassl embed``), shuffled, so that
    consecutive blocks of R views are G embeddings drawn like the stored one."""
    rows = covering_views(n_tiles, n_tiles_per_view, views_per_tile, rng)
    t = rows.shape[1]
    extra = [np.sort(rng.choice(n_tiles, t, replace=False)) for _ in range(-len(rows) % n_views_per_embedding)]
    rows = np.concatenate([rows, np.array(extra, dtype=rows.dtype).reshape(-1, t)])
    return rows[rng.permutation(len(rows))]


def gigassl_contributions(
    model: Any, slide: PlainFeatures, u: np.ndarray, rows: np.ndarray, n_views_per_embedding: int, batch_views: int = 4096
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """((N,) contributions, (N,) views per tile, u · ē, the s.d. of u · e_g) for the views ``rows``
    ((G × R, t), :func:`explaining_views`), ē the mean of the G embeddings e_g of R consecutive
    views each — embeddings like those the model was fitted on (a larger R would shift the score:
    the L2 norm of a mean of more views is smaller)."""
    direction = torch.as_tensor(u, dtype=torch.float64, device=next(model.parameters()).device)
    parts = [_view_terms(model, slide, rows[i : i + batch_views], direction) for i in range(0, len(rows), batch_views)]
    shares, view_means = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    n_groups = len(rows) // n_views_per_embedding
    group_means = view_means.reshape(n_groups, n_views_per_embedding, -1).mean(axis=1)  # (G, W): each m_g
    norms = np.linalg.norm(group_means, axis=1)
    factor = np.repeat(1.0 / (n_groups * n_views_per_embedding * norms), n_views_per_embedding)  # per view
    n_tiles = len(slide.features)
    contributions = np.bincount(rows.ravel(), weights=(shares * factor[:, None]).ravel(), minlength=n_tiles)
    scores = group_means @ u / norms
    spread = float(scores.std(ddof=1)) if n_groups > 1 else 0.0
    return contributions, np.bincount(rows.ravel(), minlength=n_tiles), float(scores.mean()), spread


def linear_direction(classifier: SlideClassifier, class_index: int) -> tuple[np.ndarray, float]:
    """(u, c) of a linear model's class score on its raw input (the scaler folded in)."""
    assert classifier.linear is not None, f"a {classifier.method} model has no linear part"
    weights, offsets = classifier.linear.folded()
    return class_direction(weights, offsets, class_index)


def average_contributions(classifier: SlideClassifier, slide: PlainFeatures, class_index: int) -> tuple[np.ndarray, float]:
    """AverageMIL + LR: ((N,) u · x_tile / N, c); their sum + c is the slide's class score."""
    u, c = linear_direction(classifier, class_index)
    return slide.features.astype(np.float64) @ u / len(slide.features), c


@dataclass(frozen=True)
class AttentionTerms:
    """One attention-MIL pass over a slide: attention (N,), hidden (N, H), the classifier's
    weights (C, H) and offsets (C,), the slide's logits (C,)."""

    attention: np.ndarray
    hidden: np.ndarray
    weights: np.ndarray
    offsets: np.ndarray
    logits: np.ndarray

    def contributions(self, class_index: int) -> tuple[np.ndarray, float]:
        """((N,) a · (u · h), c) of the class score: they sum, with c, to the slide's."""
        u, c = class_direction(self.weights, self.offsets, class_index)
        return self.attention * (self.hidden @ u), c


@torch.no_grad()
def attention_terms(classifier: SlideClassifier, slide: PlainFeatures) -> AttentionTerms:
    """Attention-MIL's forward pass on ``slide``, kept for :meth:`AttentionTerms.contributions`."""
    network = classifier.attention_model()
    features = torch.from_numpy(np.asarray(slide.features, np.float32))[None]
    logits, attention = network(features)
    hidden = network.embed(features)[0]  # (N, hidden): eval mode, no dropout
    head = network.classifier
    return AttentionTerms(
        *(t.double().numpy() for t in (attention[0], hidden, head.weight, head.bias, logits[0])),
    )
