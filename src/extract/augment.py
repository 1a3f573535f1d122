"""Tile augmentations of stage 1, with parameters sampled apart from their application.

The pipeline (docs/design.md §2.1: the original's kornia pipeline plus the dihedral group)::

    RandomResizedCrop  scale (0.5, 1), ratio (3/4, 4/3), back to the input size (bilinear)
    horizontal flip p 0.5, then a rotation by k·90°, k uniform in 0..3 (all 8 symmetries)
    ColorJitter        brightness, contrast, saturation 0.4, hue 0.2, p 0.8, random order
    RandomGrayscale    p 0.2
    Gaussian blur      σ ∈ U(0.1, 1) px, p 0.5, 7-px kernel, reflect border

Two modes, one implementation:

- **shared** (the bank): one draw, ``len(params) == 1``, applied identically to every tile
  of the batch (kornia's ``same_on_batch=True``);
- **independent** (MoCo v2 pre-training): one draw per tile, ``len(params) == B``::

      augmentation = TileAugmentation()
      view = augmentation.independent(images, generator)   # (B, 3, H, W) float in [0, 1]

Parameters are drawn with an explicit CPU ``torch.Generator`` (the same draws on every device)
and round-trip through plain JSON (:meth:`AugmentationParams.to_json` / ``from_json``), which is
how the bank records them.

Why it is fast. Every spatial step is linear and acts on rows and columns separately, so crop +
resize, flips, rotations and blur compose into two (H×H) matrices: ``out = A_h · X · A_wᵀ``
(transposing X for odd rotations), i.e. two GEMMs per batch. The colour steps are affine maps of
each pixel's RGB (contrast adds the image's mean luma, a per-image constant), so they compose
into one 3×3 matrix plus a per-image offset, applied with the encoder's normalisation in one
pass and clamped once. Kornia clamps to [0, 1] after every colour step and applies the colour
steps before the blur; this pipeline clamps once at the end, after the blur. Both give the same
image wherever no intermediate value leaves [0, 1] (the tests check it, and check every step on
its own against kornia's op on the same parameters). The hue step differs on purpose: the
chroma plane (I, Q) of YIQ is rotated by the hue angle instead of shifting HSV hue, which keeps
luma and greys unchanged and is one channel mix instead of an HSV round trip.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import torch

from extract.errors import UserError

# ITU-R BT.601 luma: kornia's rgb_to_grayscale weights and YIQ's Y row.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# NTSC RGB → YIQ. The I and Q rows sum to exactly 0, so greys carry no chroma.
_RGB_TO_YIQ = (LUMA_WEIGHTS, (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
JITTER_STEPS = ("brightness", "contrast", "saturation", "hue")


@dataclass(frozen=True)
class AugmentationSettings:
    """The distribution augmentations are drawn from (defaults: docs/design.md §2.1)."""

    crop_scale: tuple[float, float] = (0.5, 1.0)  # crop area / tile area
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # width / height, log-uniform
    flips: bool = True  # horizontal flip p 0.5 (with rot90: all 8 dihedral symmetries)
    rot90: bool = True  # rotation by k·90°, k uniform in 0..3
    jitter_p: float = 0.8
    brightness: float = 0.4  # factor ∈ U(1 - b, 1 + b)
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.2  # shift ∈ U(-h, h) turns
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.0)  # px at the tile's resolution
    blur_kernel_px: int = 7  # odd; covers ±3σ at σ = 1

    def __post_init__(self) -> None:
        if self.blur_kernel_px < 1 or self.blur_kernel_px % 2 == 0:
            raise UserError(f"blur_kernel_px={self.blur_kernel_px}: must be a positive odd number of pixels")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise UserError(f"crop_scale={self.crop_scale}: need 0 < low <= high <= 1")
        for name in ("jitter_p", "grayscale_p", "blur_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"{name}={getattr(self, name)}: a probability must lie in [0, 1]")

    def to_json(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


@dataclass(frozen=True)
class AugmentationParams:
    """``n`` drawn augmentations (CPU tensors with ``n`` rows).

    ``n == 1`` is a shared draw applied to a whole batch, ``n == B`` one draw per tile.
    """

    size_px: int  # side of the square tiles the crop boxes were drawn for
    crop_box: torch.Tensor  # (n, 4) int64 x0, y0, width, height in px
    hflip: torch.Tensor  # (n,) bool, applied after the crop
    rot90: torch.Tensor  # (n,) int64 counter-clockwise quarter turns (torch.rot90), after the flip
    jitter: torch.Tensor  # (n,) bool, colour jitter applied
    jitter_factors: torch.Tensor  # (n, 4) float64 brightness, contrast, saturation, hue (turns)
    jitter_order: tuple[int, ...]  # permutation of 0..3 into JITTER_STEPS, shared by the n draws
    grayscale: torch.Tensor  # (n,) bool
    blur: torch.Tensor  # (n,) bool
    blur_sigma: torch.Tensor  # (n,) float64 px

    def __len__(self) -> int:
        return int(self.hflip.shape[0])

    def to_json(self) -> list[dict[str, Any]]:
        """One plain-JSON dict per draw."""
        return [
            {
                "size_px": self.size_px,
                "crop_box": self.crop_box[i].tolist(),
                "hflip": bool(self.hflip[i]),
                "rot90": int(self.rot90[i]),
                "jitter": bool(self.jitter[i]),
                "jitter_factors": dict(zip(JITTER_STEPS, self.jitter_factors[i].tolist())),
                "jitter_order": [JITTER_STEPS[j] for j in self.jitter_order],
                "grayscale": bool(self.grayscale[i]),
                "blur": bool(self.blur[i]),
                "blur_sigma": float(self.blur_sigma[i]),
            }
            for i in range(len(self))
        ]

    @classmethod
    def from_json(cls, draws: Sequence[dict[str, Any]]) -> "AugmentationParams":
        """Inverse of :meth:`to_json`; the draws must share ``size_px`` and ``jitter_order``."""
        if not draws:
            raise ValueError("no augmentation draws given")
        orders = {tuple(d["jitter_order"]) for d in draws}
        sizes = {int(d["size_px"]) for d in draws}
        if len(orders) != 1 or len(sizes) != 1:
            raise ValueError(f"draws mix jitter orders {orders} or tile sizes {sizes}; give them one at a time")
        return cls(
            size_px=sizes.pop(),
            crop_box=torch.tensor([d["crop_box"] for d in draws], dtype=torch.int64),
            hflip=torch.tensor([d["hflip"] for d in draws], dtype=torch.bool),
            rot90=torch.tensor([d["rot90"] for d in draws], dtype=torch.int64),
            jitter=torch.tensor([d["jitter"] for d in draws], dtype=torch.bool),
            jitter_factors=torch.tensor(
                [[d["jitter_factors"][step] for step in JITTER_STEPS] for d in draws], dtype=torch.float64
            ),
            jitter_order=tuple(JITTER_STEPS.index(step) for step in orders.pop()),
            grayscale=torch.tensor([d["grayscale"] for d in draws], dtype=torch.bool),
            blur=torch.tensor([d["blur"] for d in draws], dtype=torch.bool),
            blur_sigma=torch.tensor([d["blur_sigma"] for d in draws], dtype=torch.float64),
        )

    def select(self, index: int) -> "AugmentationParams":
        """Draw ``index`` alone (``n == 1``)."""
        values: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            values[f.name] = value[index : index + 1] if isinstance(value, torch.Tensor) else value
        return AugmentationParams(**values)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _bernoulli(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64) < p


class TileAugmentation:
    """The tile augmentation pipeline: :meth:`sample` draws, :meth:`apply` applies."""

    def __init__(self, settings: AugmentationSettings | None = None) -> None:
        self.settings = settings or AugmentationSettings()
        # The bank applies one draw to several batches: build its matrices once.
        self._last_spatial: tuple[AugmentationParams, tuple[torch.Tensor, ...]] | None = None

    def sample(self, n: int, size_px: int, generator: torch.Generator) -> AugmentationParams:
        """Draw ``n`` augmentations for square tiles of side ``size_px`` (a CPU generator)."""
        s = self.settings
        area = _uniform(n, *s.crop_scale, generator) * size_px**2
        ratio = torch.exp(_uniform(n, math.log(s.crop_ratio[0]), math.log(s.crop_ratio[1]), generator))
        # Kornia retries out-of-range boxes; clamping the side to the tile is simpler and
        # only matters for the most elongated full-size crops.
        width = torch.sqrt(area * ratio).round().clamp(1, size_px).long()
        height = torch.sqrt(area / ratio).round().clamp(1, size_px).long()
        x0 = (torch.rand(n, generator=generator, dtype=torch.float64) * (size_px - width + 1)).long()
        y0 = (torch.rand(n, generator=generator, dtype=torch.float64) * (size_px - height + 1)).long()
        hflip = _bernoulli(n, 0.5 if s.flips else 0.0, generator)
        rot90 = torch.randint(0, 4 if s.rot90 else 1, (n,), generator=generator)
        jitter = _bernoulli(n, s.jitter_p, generator)
        factors = torch.stack(
            [
                _uniform(n, 1 - s.brightness, 1 + s.brightness, generator),
                _uniform(n, 1 - s.contrast, 1 + s.contrast, generator),
                _uniform(n, 1 - s.saturation, 1 + s.saturation, generator),
                _uniform(n, -s.hue, s.hue, generator),
            ],
            dim=1,
        )
        order = tuple(torch.randperm(4, generator=generator).tolist())
        grayscale = _bernoulli(n, s.grayscale_p, generator)
        blur = _bernoulli(n, s.blur_p, generator)
        sigma = _uniform(n, *s.blur_sigma, generator)
        return AugmentationParams(
            size_px=size_px,
            crop_box=torch.stack([x0.clamp(max=size_px - width), y0.clamp(max=size_px - height), width, height], 1),
            hflip=hflip,
            rot90=rot90,
            jitter=jitter,
            jitter_factors=factors,
            jitter_order=order,
            grayscale=grayscale,
            blur=blur,
            blur_sigma=sigma,
        )

    def apply(
        self,
        images: torch.Tensor,
        params: AugmentationParams,
        *,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Augment (B, 3, H, W) images → (B, 3, H, W) contiguous, in [0, 1] (or normalised).

        ``images``: uint8 (0–255) or float in [0, 1]. ``len(params) == 1``: the same
        augmentation for all B tiles; ``== B``: one per tile. ``normalize=(mean, std)``
        returns ``(out - mean) / std`` at no extra cost. ``dtype``: working and output dtype
        (default float32, or the images' float dtype); bf16 halves the cost on CPUs with bf16
        units and is what an encoder under bf16 autocast sees anyway.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        batch, _, height, width = images.shape
        if height != params.size_px or width != params.size_px:
            raise ValueError(f"parameters were drawn for {params.size_px}px tiles, images are {height}×{width}")
        if len(params) not in (1, batch):
            raise ValueError(f"{len(params)} augmentation draws for {batch} tiles: give 1 (shared) or {batch}")
        dtype = dtype or (images.dtype if images.is_floating_point() else torch.float32)
        scale = 1.0 if images.is_floating_point() else 1 / 255
        # Planar layout for the products along rows and columns (tiles often arrive NHWC).
        x = images.to(dtype=dtype, memory_format=torch.contiguous_format)
        x, scale = self._apply_spatial(x, params, scale)
        return self._apply_colour(x, params, scale, normalize)

    def _apply_spatial(self, x: torch.Tensor, params: AugmentationParams, scale: float) -> tuple[torch.Tensor, float]:
        """``L · X' · Rᵀ`` (crop, resize, flips, rotation, blur) → images and the scale left to apply."""
        device, dtype = x.device, x.dtype
        if self._last_spatial is None or self._last_spatial[0] is not params:
            # one draw per tile: n operators, built where the images are (float64 on the CPU;
            # float32 on accelerators, where float64 is slow or, on MPS, missing)
            on = device if len(params) > 1 else None
            precision = torch.float64 if on is None or on.type == "cpu" else torch.float32
            self._last_spatial = (params, spatial_matrices(params, self.settings.blur_kernel_px, on, precision))
        left, right, transpose = self._last_spatial[1]
        if len(params) > 1:
            x = torch.where(transpose.to(device)[:, None, None, None], x.transpose(-1, -2), x)
            left = (left * scale).to(device=device, dtype=dtype)[:, None]
            right = right.to(device=device, dtype=dtype)[:, None]
            return torch.matmul(left, torch.matmul(x, right.transpose(-1, -2))), 1.0
        if transpose[0]:
            x = x.transpose(-1, -2)
        identity = torch.eye(params.size_px, dtype=left.dtype)
        if torch.equal(left[0], identity) and torch.equal(right[0], identity):
            return x, scale
        # Only the crop's rows and columns enter the products: slice them out first.
        (row0, row1), (col0, col1) = _support(left[0]), _support(right[0])
        # Folding 1/255 in here is free: relative precision does not depend on it.
        left = (left[0, :, row0:row1] * scale).to(device=device, dtype=dtype)
        right = right[0, :, col0:col1].to(device=device, dtype=dtype)
        return torch.matmul(left, torch.matmul(x[..., row0:row1, col0:col1], right.T)), 1.0

    def _apply_colour(
        self,
        x: torch.Tensor,
        params: AugmentationParams,
        scale: float,
        normalize: tuple[Sequence[float], Sequence[float]] | None,
    ) -> torch.Tensor:
        """``clamp(M · scale·rgb + b)`` with the normalisation folded in: one pass."""
        batch, _, height, width = x.shape
        needs_means = bool((params.jitter & (params.jitter_factors[:, 1] != 1)).any())
        means = x.mean(dim=(-2, -1), dtype=torch.float32).double().cpu() * scale if needs_means else None
        matrix, offset = colour_affine(params, means, batch)
        matrix = matrix * scale
        low, high = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        if normalize is not None:
            mean = torch.tensor(normalize[0], dtype=torch.float64)
            std = torch.tensor(normalize[1], dtype=torch.float64)
            matrix = matrix / std[:, None]
            offset = (offset - mean) / std
            low, high = (low - mean) / std, (high - mean) / std
        elif torch.equal(matrix, torch.eye(3, dtype=torch.float64).expand_as(matrix)) and not offset.any():
            return x.contiguous()
        matrix = matrix.to(device=x.device, dtype=x.dtype).expand(batch, 3, 3)
        offset = offset.to(device=x.device, dtype=x.dtype).expand(batch, 3)
        out = torch.baddbmm(offset[:, :, None], matrix, x.reshape(batch, 3, height * width))
        out = out.view(batch, 3, height, width)
        # Crops, blur, grayscale and normalisation are convex or affine: only jitter can leave
        # the range. Three scalar clamps run about 3× faster than one with tensor bounds.
        if bool(params.jitter.any()):
            for channel in range(3):
                out[:, channel].clamp_(float(low[channel]), float(high[channel]))
        return out

    def shared(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One draw applied to every tile of ``images`` (B, 3, H, W) → float in [0, 1]."""
        return self.apply(images, self.sample(1, images.shape[-1], generator))

    def independent(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One draw per tile of ``images`` (B, 3, H, W) → float in [0, 1] (the MoCo v2 view)."""
        return self.apply(images, self.sample(images.shape[0], images.shape[-1], generator))


# -- the matrices --------------------------------------------------------------------------------


def _support(matrix: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) of the columns of a (S, S) operator that hold a non-zero."""
    used = (matrix != 0).any(dim=0).nonzero().flatten()
    return int(used[0]), int(used[-1]) + 1


def resize_matrices(start: torch.Tensor, length: torch.Tensor, size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n,) crop starts and lengths (px) → (n, size, size) row operators (on their device) that crop
    ``[start, start + length)`` and resize it to ``size`` bilinearly with corners aligned
    (``F.interpolate(..., align_corners=True)``, kornia's RandomResizedCrop in slice mode)."""
    n = len(start)
    step = (length.to(dtype) - 1) / max(size - 1, 1)
    position = start.to(dtype)[:, None] + torch.arange(size, dtype=dtype, device=start.device)[None, :] * step[:, None]
    last = (start + length - 1)[:, None]
    low = position.floor().long().clamp(max=size - 1)
    low = torch.minimum(low, last)
    frac = position - low
    high = torch.minimum(low + 1, last)
    matrix = torch.zeros(n, size, size, dtype=dtype, device=start.device)
    matrix.scatter_add_(2, low[..., None], (1 - frac)[..., None])
    matrix.scatter_add_(2, high[..., None], frac[..., None])
    return matrix


def gaussian_kernel(sigma: torch.Tensor, kernel_px: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n,) σ in px → (n, kernel_px) normalised 1-D Gaussian kernels (on σ's device)."""
    offsets = torch.arange(kernel_px, dtype=dtype, device=sigma.device) - kernel_px // 2
    kernel = torch.exp(-(offsets[None, :] ** 2) / (2 * sigma.to(dtype)[:, None] ** 2))
    return kernel / kernel.sum(dim=1, keepdim=True)


def blur_matrices(sigma: torch.Tensor, size: int, kernel_px: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n,) σ → (n, size, size) operators of a 1-D Gaussian blur, reflect border (on σ's device)."""
    radius = kernel_px // 2
    if radius >= size:
        raise ValueError(f"blur kernel of {kernel_px}px needs tiles larger than {radius}px, got {size}px")
    source = torch.arange(size, device=sigma.device)[:, None] + torch.arange(kernel_px, device=sigma.device)[None, :] - radius
    source = source.abs()
    source = torch.where(source > size - 1, 2 * (size - 1) - source, source)
    kernel = gaussian_kernel(sigma, kernel_px, dtype)
    matrix = torch.zeros(len(sigma), size, size, dtype=dtype, device=sigma.device)
    matrix.scatter_add_(2, source.expand(len(sigma), size, kernel_px), kernel[:, None, :].expand(-1, size, -1))
    return matrix


def _dihedral(hflip: bool, quarter_turns: int) -> tuple[bool, bool, bool]:
    """hflip then ``torch.rot90`` k times, as ``out = flip_rows? · Z · flip_cols?`` with
    ``Z = Y`` or ``Yᵀ``: returns (transpose, flip_rows, flip_cols)."""
    transpose, flip_rows, flip_cols = False, False, hflip
    for _ in range(quarter_turns % 4):
        flip_cols = not flip_cols  # rot90 = flip the columns, then transpose
        transpose, flip_rows, flip_cols = not transpose, flip_cols, flip_rows
    return transpose, flip_rows, flip_cols


def spatial_matrices(
    params: AugmentationParams,
    kernel_px: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The spatial steps as ``out = L · X' · Rᵀ`` with ``X' = Xᵀ`` where ``transpose``.

    Returns L (n, S, S), R (n, S, S) in ``dtype`` on ``device`` (default CPU) and transpose (n,) bool.
    One draw per tile (MoCo) makes n of these, so on a GPU they are built there.
    """
    size = params.size_px
    x0, y0, width, height = params.crop_box.to(device).unbind(dim=1)
    rows, cols = resize_matrices(y0, height, size, dtype), resize_matrices(x0, width, size, dtype)
    dihedral = torch.tensor([_dihedral(f, t) for f, t in zip(params.hflip.tolist(), params.rot90.tolist())], device=device)
    transpose, flip_rows, flip_cols = (dihedral[:, j, None, None] for j in range(3))
    # Zᵀ = (Rows X Colsᵀ)ᵀ = Cols Xᵀ Rowsᵀ: the operators swap sides.
    left, right = torch.where(transpose, cols, rows), torch.where(transpose, rows, cols)
    left = torch.where(flip_rows, left.flip(1), left)
    right = torch.where(flip_cols, right.flip(1), right)
    if bool(params.blur.any()):
        blur = blur_matrices(params.blur_sigma.to(device), size, kernel_px, dtype)
        on = params.blur.to(device)[:, None, None]
        left, right = torch.where(on, blur @ left, left), torch.where(on, blur @ right, right)
    return left, right, dihedral[:, 0].cpu()


def hue_matrix(turns: torch.Tensor) -> torch.Tensor:
    """(n,) hue shifts in turns → (n, 3, 3) float64 RGB mixes rotating YIQ's chroma plane.

    The sign follows HSV: a positive shift moves red towards yellow and green.
    """
    rgb_to_yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
    angle = turns.double() * (2 * math.pi)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(len(turns), 3, 3, dtype=torch.float64)
    rotation[:, 0, 0] = 1.0
    # HSV hue runs clockwise in the (I, Q) plane (red → yellow → green), hence -angle.
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, sin
    rotation[:, 2, 1], rotation[:, 2, 2] = -sin, cos
    return torch.linalg.inv(rgb_to_yiq) @ rotation @ rgb_to_yiq


def colour_affine(params: AugmentationParams, means: torch.Tensor | None, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The colour steps as ``out = M · rgb + b`` per pixel, before the final clamp.

    ``means``: (B, 3) channel means of the images entering the colour steps, needed by the
    contrast step only. Returns M (m, 3, 3) and b (m, 3) float64, m = B when ``means`` is
    given or the draws are per tile, else 1.
    """
    rows = batch if (means is not None or len(params) == batch) else 1

    def per_row(t: torch.Tensor) -> torch.Tensor:
        return t.expand(rows, *t.shape[1:]) if len(t) == 1 else t

    luma = torch.tensor(LUMA_WEIGHTS, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    to_luma = luma.expand(3, 3)  # every channel ← luma
    on, factors = per_row(params.jitter), per_row(params.jitter_factors.double())
    matrix, offset = eye.repeat(rows, 1, 1), torch.zeros(rows, 3, dtype=torch.float64)
    for step in params.jitter_order:
        f = factors[:, step, None, None]
        if step in (0, 1):  # brightness x·f; contrast x·f + mean_luma·(1 - f)
            step_matrix = f * eye
        elif step == 2:  # saturation: x·f + luma(x)·(1 - f)
            step_matrix = f * eye + (1 - f) * to_luma
        else:
            step_matrix = hue_matrix(factors[:, step])
        new_offset = (step_matrix @ offset[:, :, None]).squeeze(-1)
        if step == 1 and means is not None:
            current = (matrix @ means[:, :, None]).squeeze(-1) + offset  # (B, 3) means entering this step
            new_offset = new_offset + (1 - f[:, 0]) * (current @ luma)[:, None]
        matrix = torch.where(on[:, None, None], step_matrix @ matrix, matrix)
        offset = torch.where(on[:, None], new_offset, offset)
    gray = torch.where(per_row(params.grayscale)[:, None, None], to_luma, eye)
    return gray @ matrix, (gray @ offset[:, :, None]).squeeze(-1)
