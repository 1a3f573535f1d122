"""Tile augmentation: each step against kornia's op on the same parameters, the hue rotation
against its analytic properties, the shared and independent modes, JSON round trips."""

from __future__ import annotations

import json

import kornia
import pytest
import torch

from extract.augment import (
    LUMA_WEIGHTS,
    AugmentationParams,
    AugmentationSettings,
    TileAugmentation,
    hue_matrix,
)

SIZE = 32
TOL = 1e-5  # float32 round-off of two small GEMMs and a 3×3 mix


def _images(batch: int = 3, seed: int = 0, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(batch, 3, SIZE, SIZE, generator=generator)


def _params(**changes) -> AugmentationParams:
    """One draw that does nothing, with ``changes`` (plain JSON values) applied."""
    draw = {
        "size_px": SIZE,
        "crop_box": [0, 0, SIZE, SIZE],
        "hflip": False,
        "rot90": 0,
        "jitter": False,
        "jitter_factors": {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0},
        "jitter_order": ["brightness", "contrast", "saturation", "hue"],
        "grayscale": False,
        "blur": False,
        "blur_sigma": 0.5,
    }
    draw.update(changes)
    return AugmentationParams.from_json([draw])


def _kornia_crop(images: torch.Tensor, box: list[int]) -> torch.Tensor:
    x0, y0, w, h = box
    corners = torch.tensor([[[x0, y0], [x0 + w - 1, y0], [x0 + w - 1, y0 + h - 1], [x0, y0 + h - 1]]], dtype=torch.float32)
    return kornia.geometry.transform.crop_by_indices(
        images, corners.expand(len(images), 4, 2), (SIZE, SIZE), interpolation="bilinear", align_corners=True
    )


AUG = TileAugmentation()


@pytest.mark.parametrize("box", [[0, 0, SIZE, SIZE], [3, 5, 20, 17], [10, 0, 22, 32], [0, 9, 31, 23]])
def test_crop_matches_kornia_random_resized_crop(box: list[int]) -> None:
    images = _images()
    out = AUG.apply(images, _params(crop_box=box))
    assert torch.allclose(out, _kornia_crop(images, box), atol=TOL)


@pytest.mark.parametrize("sigma", [0.1, 0.45, 1.0])
def test_blur_matches_kornia_gaussian_blur(sigma: float) -> None:
    images = _images()
    out = AUG.apply(images, _params(blur=True, blur_sigma=sigma))
    expected = kornia.filters.gaussian_blur2d(images, (7, 7), (sigma, sigma), border_type="reflect")
    assert torch.allclose(out, expected, atol=TOL)
    assert not torch.allclose(out, images, atol=1e-3) or sigma < 0.2


@pytest.mark.parametrize("hflip", [False, True])
@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_flips_and_rotations_are_exact(hflip: bool, turns: int) -> None:
    images = _images()
    expected = torch.rot90(images.flip(-1) if hflip else images, turns, dims=(-2, -1))
    assert torch.equal(AUG.apply(images, _params(hflip=hflip, rot90=turns)), expected)


@pytest.mark.parametrize("hflip", [False, True])
@pytest.mark.parametrize("turns", [0, 1, 3])
def test_crop_flip_rotate_blur_compose_like_the_steps(hflip: bool, turns: int) -> None:
    images, box, sigma = _images(), [4, 2, 21, 26], 0.8
    expected = _kornia_crop(images, box)
    expected = torch.rot90(expected.flip(-1) if hflip else expected, turns, dims=(-2, -1))
    expected = kornia.filters.gaussian_blur2d(expected, (7, 7), (sigma, sigma), border_type="reflect")
    out = AUG.apply(images, _params(crop_box=box, hflip=hflip, rot90=turns, blur=True, blur_sigma=sigma))
    assert torch.allclose(out, expected, atol=TOL)


@pytest.mark.parametrize(
    "step, factor, reference",
    [
        ("brightness", 1.35, kornia.enhance.adjust_brightness_accumulative),
        ("brightness", 0.62, kornia.enhance.adjust_brightness_accumulative),
        ("contrast", 1.38, kornia.enhance.adjust_contrast_with_mean_subtraction),
        ("contrast", 0.6, kornia.enhance.adjust_contrast_with_mean_subtraction),
        ("saturation", 1.4, kornia.enhance.adjust_saturation_with_gray_subtraction),
        ("saturation", 0.7, kornia.enhance.adjust_saturation_with_gray_subtraction),
    ],
)
def test_each_colour_step_matches_kornia(step: str, factor: float, reference) -> None:
    images = _images()  # full range: the clamp is exercised too
    factors = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0, step: factor}
    out = AUG.apply(images, _params(jitter=True, jitter_factors=factors))
    assert torch.allclose(out, reference(images, torch.tensor(factor)), atol=TOL)


def test_grayscale_matches_kornia() -> None:
    images = _images()
    expected = kornia.color.rgb_to_grayscale(images).expand_as(images)
    assert torch.allclose(AUG.apply(images, _params(grayscale=True)), expected, atol=TOL)


def test_hue_rotation_properties() -> None:
    """YIQ hue differs from kornia's HSV hue by design; check what it must satisfy."""
    turns = torch.tensor([0.0, 0.13, -0.2, 1.0])
    matrices = hue_matrix(turns)
    assert torch.allclose(matrices[0], torch.eye(3, dtype=torch.float64), atol=1e-12)  # zero shift
    assert torch.allclose(matrices[3], torch.eye(3, dtype=torch.float64), atol=1e-12)  # full turn
    assert torch.allclose(hue_matrix(torch.tensor([-0.13]))[0] @ matrices[1], torch.eye(3, dtype=torch.float64), atol=1e-12)
    grey = torch.ones(3, dtype=torch.float64)
    assert torch.allclose(matrices @ grey, grey.expand(4, 3), atol=1e-12)  # greys unchanged
    luma = torch.tensor(LUMA_WEIGHTS, dtype=torch.float64)
    assert torch.allclose(luma @ matrices, luma.expand(4, 3), atol=1e-12)  # luma preserved

    # Through the pipeline, on colours that stay in gamut: luma kept, direction of HSV hue.
    images = _images(batch=2, low=0.35, high=0.65)
    shift = 0.04
    factors = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": shift}
    out = AUG.apply(images, _params(jitter=True, jitter_factors=factors))
    assert torch.allclose(kornia.color.rgb_to_grayscale(out), kornia.color.rgb_to_grayscale(images), atol=TOL)
    hue_before = kornia.color.rgb_to_hsv(images)[:, 0]
    hue_after = kornia.color.rgb_to_hsv(out)[:, 0]
    change = torch.remainder(hue_after - hue_before + torch.pi, 2 * torch.pi) - torch.pi
    assert (change > 0).float().mean() > 0.95, "a positive shift must turn HSV hue forwards"
    assert abs(change.median().item() - shift * 2 * torch.pi) < 0.1


def _stepwise_reference(images: torch.Tensor, draw: dict) -> torch.Tensor:
    """Kornia's per-step pipeline order (crop, dihedral, jitter, grayscale, blur)."""
    out = _kornia_crop(images, draw["crop_box"])
    out = torch.rot90(out.flip(-1) if draw["hflip"] else out, draw["rot90"], dims=(-2, -1))
    if draw["jitter"]:
        factors = draw["jitter_factors"]
        for step in draw["jitter_order"]:
            f = torch.tensor(factors[step])
            if step == "brightness":
                out = kornia.enhance.adjust_brightness_accumulative(out, f)
            elif step == "contrast":
                out = kornia.enhance.adjust_contrast_with_mean_subtraction(out, f)
            elif step == "saturation":
                out = kornia.enhance.adjust_saturation_with_gray_subtraction(out, f)
            else:
                out = torch.einsum("ij,bjhw->bihw", hue_matrix(f.reshape(1))[0].float(), out).clamp(0, 1)
    if draw["grayscale"]:
        out = kornia.color.rgb_to_grayscale(out).expand_as(out)
    if draw["blur"]:
        sigma = draw["blur_sigma"]
        out = kornia.filters.gaussian_blur2d(out, (7, 7), (sigma, sigma), border_type="reflect")
    return out


def test_pipeline_equals_stepwise_kornia_order_in_gamut() -> None:
    """Fused (spatial first, one colour affine, one clamp) = per-step order when nothing clips.

    The tolerance covers the blur's reflect border shifting an image's mean by ~1e-4 before
    the contrast step reads it.
    """
    generator = torch.Generator().manual_seed(1)
    images = _images(low=0.4, high=0.6)
    draws = AUG.sample(40, SIZE, generator).to_json()
    for draw in draws:
        out = AUG.apply(images, AugmentationParams.from_json([draw]))
        assert torch.allclose(out, _stepwise_reference(images, draw), atol=1e-3), draw


def test_shared_applies_the_same_augmentation_to_every_tile() -> None:
    generator = torch.Generator().manual_seed(2)
    images = _images(batch=4)
    images[2] = images[0]
    for params in (AUG.sample(1, SIZE, generator) for _ in range(10)):
        out = AUG.apply(images, params)
        assert torch.equal(out[0], out[2])
        alone = torch.cat([AUG.apply(images[i : i + 1], params) for i in range(len(images))])
        assert torch.allclose(out, alone, atol=1e-6)


def test_independent_gives_each_tile_its_own_draw() -> None:
    generator = torch.Generator().manual_seed(3)
    images = _images(batch=6)
    params = AUG.sample(6, SIZE, generator)
    out = AUG.apply(images, params)
    alone = torch.cat([AUG.apply(images[i : i + 1], params.select(i)) for i in range(len(images))])
    assert torch.allclose(out, alone, atol=TOL)
    same = images[:1].expand(6, -1, -1, -1).contiguous()
    views = AUG.independent(same, torch.Generator().manual_seed(4))
    assert not torch.allclose(views[0], views[1], atol=1e-3)  # one tile, different views


def test_same_generator_seed_gives_the_same_draws_and_json_round_trips() -> None:
    first = AUG.sample(5, SIZE, torch.Generator().manual_seed(7))
    second = AUG.sample(5, SIZE, torch.Generator().manual_seed(7))
    assert first.to_json() == second.to_json()
    restored = AugmentationParams.from_json(json.loads(json.dumps(first.to_json())))
    images = _images(batch=5)
    assert torch.equal(AUG.apply(images, restored), AUG.apply(images, first))
    other = AUG.sample(5, SIZE, torch.Generator().manual_seed(8))
    assert other.to_json() != first.to_json()


def test_uint8_input_normalisation_and_bf16() -> None:
    params = AUG.sample(1, SIZE, torch.Generator().manual_seed(5))
    images = (_images() * 255).round().to(torch.uint8)
    as_float = AUG.apply(images.float() / 255, params)
    assert torch.allclose(AUG.apply(images, params), as_float, atol=TOL)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normalised = AUG.apply(images, params, normalize=(mean, std))
    expected = (as_float - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(normalised, expected, atol=1e-4)
    low_precision = AUG.apply(images, params, dtype=torch.bfloat16)
    assert low_precision.dtype == torch.bfloat16
    assert torch.allclose(low_precision.float(), as_float, atol=0.02)


def test_draws_follow_the_settings() -> None:
    n = 4000
    params = AUG.sample(n, 224, torch.Generator().manual_seed(6))
    area = params.crop_box[:, 2] * params.crop_box[:, 3] / 224**2
    assert area.min() > 0.45 and area.max() <= 1.0 and area.mean() > 0.7
    assert (params.crop_box[:, 0] + params.crop_box[:, 2] <= 224).all()
    assert (params.crop_box[:, 1] + params.crop_box[:, 3] <= 224).all()
    for flag, p in ((params.jitter, 0.8), (params.grayscale, 0.2), (params.blur, 0.5), (params.hflip, 0.5)):
        assert abs(flag.double().mean().item() - p) < 0.04
    assert set(params.rot90.tolist()) == {0, 1, 2, 3}
    assert params.blur_sigma.min() >= 0.1 and params.blur_sigma.max() <= 1.0
    assert params.jitter_factors[:, :3].min() >= 0.6 and params.jitter_factors[:, :3].max() <= 1.4
    assert params.jitter_factors[:, 3].abs().max() <= 0.2
    plain = TileAugmentation(AugmentationSettings(flips=False, rot90=False))
    fixed = plain.sample(200, 224, torch.Generator().manual_seed(6))
    assert not fixed.hflip.any() and not fixed.rot90.any()


def test_bad_inputs_are_refused() -> None:
    params = AUG.sample(2, SIZE, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="draws for 3 tiles"):
        AUG.apply(_images(batch=3), params)
    with pytest.raises(ValueError, match="drawn for 32px"):
        AUG.apply(torch.rand(2, 3, 16, 16), params)
    with pytest.raises(ValueError, match="odd"):
        AugmentationSettings(blur_kernel_px=6)


def test_per_tile_operators_can_be_built_on_the_images_device_in_float32():
    # MoCo draws one augmentation per tile: n (S, S) operators, which a GPU builds itself
    from extract.augment import spatial_matrices

    params = TileAugmentation().sample(6, 32, torch.Generator().manual_seed(3))
    left64, right64, transpose64 = spatial_matrices(params, 9)
    left32, right32, transpose32 = spatial_matrices(params, 9, torch.device("cpu"), torch.float32)
    assert left32.dtype == torch.float32 and left64.dtype == torch.float64
    torch.testing.assert_close(left32.double(), left64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(right32.double(), right64, rtol=1e-5, atol=1e-6)
    assert torch.equal(transpose32, transpose64)
