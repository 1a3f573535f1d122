"""Shared-augmentation bank on one real slide, all figures from one run.

    python benchmarks/bench_bank.py                      # A=50, K=256, 224 px at 0.5 µm/px
    python benchmarks/bench_bank.py --n-augmentations 5  # quick check

Prints: bank extraction in tiles/s (A·K per second); the share of time reading the slide,
augmenting and encoding; augmentation time as % of encoder time (target ≤ 25 %), from the bank
run and from an interleaved same-batch comparison (robust to a machine shared with other
jobs); bytes per slide on disk (target ≤ 4 MB) and alternative storages; kornia's equivalent
pipeline (same_on_batch=True) in tiles/s beside ours.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from extract.augment import TileAugmentation
from extract.bank import build_bank
from extract.config import ExtractConfig
from extract.device import autocast, autocast_dtype
from extract.encoders.tile_encoder import IMAGE_MEAN, IMAGE_STD, TileTrunk, load_resnet18
from extract.features.slide_file import SlideFileWriter
from extract.slides.formats import open_slide
from extract.slides.tiling import tile_grid

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def kornia_pipeline(tile_px: int, blur_kernel_px: int):
    """The original's pipeline (docs/design.md §2.1) with flips and 90° rotations, all same_on_batch."""
    import kornia.augmentation as K

    return K.AugmentationSequential(
        K.RandomResizedCrop((tile_px, tile_px), scale=(0.5, 1.0), same_on_batch=True),
        K.RandomHorizontalFlip(same_on_batch=True),
        K.RandomRotation90(times=(0, 3), same_on_batch=True),
        K.ColorJitter(0.4, 0.4, 0.4, 0.2, p=0.8, same_on_batch=True),
        K.RandomGrayscale(p=0.2, same_on_batch=True),
        K.RandomGaussianBlur((blur_kernel_px, blur_kernel_px), (0.1, 1.0), p=0.5, same_on_batch=True),
    )


def timed(function, repeats: int) -> float:
    """Mean seconds of ``function()`` over ``repeats`` calls."""
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def storage_sizes(result, folder: Path) -> dict[str, int]:
    """Bytes on disk of the bank alone written as features_file does, and alternatives."""
    from extract.encoders.tile_encoder import EncoderInfo

    sizes: dict[str, int] = {}
    path = folder / "bank.h5"
    info = EncoderInfo(name="random", sha256="0" * 64, source="random")
    with SlideFileWriter(path, slide_id="bench", source="bench", settings={}, encoder=info) as writer:
        n_augmentations, n_tiles = result.features.shape[:2]
        writer.create_bank(n_augmentations, n_tiles, result.attrs)
        for a in range(n_augmentations):
            writer.write_augmentation(a, result.features[a], result.coords[a])
    sizes["features_file as written: (A, 256, K) rows by position, gzip4+shuffle, whole file"] = path.stat().st_size
    chunk = (1, *result.features.shape[1:])
    variants = {
        "float16 uncompressed": dict(),
        "float16 gzip4+shuffle": dict(compression="gzip", compression_opts=4, shuffle=True),
        "float16 gzip9+shuffle": dict(compression="gzip", compression_opts=9, shuffle=True),
        "float16 lzf+shuffle": dict(compression="lzf", shuffle=True),
    }
    # A slide with N ≥ K tissue tiles has no repeated rows in a chunk, which compress away
    # here: estimate its size from the distinct rows alone, in (1, K, 256) chunks, scaled to A·K.
    distinct = np.concatenate([np.unique(result.features[a], axis=0) for a in range(len(result.features))])
    n_chunks = len(distinct) // n_tiles
    distinct = distinct[: n_chunks * n_tiles].reshape(n_chunks, n_tiles, -1)
    for name, options in variants.items():
        for label, data in (("", result.features), (" [no repeats, scaled]", distinct)):
            if not len(data):
                continue
            variant = folder / "variant.h5"
            with h5py.File(variant, "w") as handle:
                handle.create_dataset("aug_features", data=data, chunks=chunk, **options)
            sizes[f"aug_features as (A, K, 256), {name}{label}"] = int(variant.stat().st_size * len(result.features) / len(data))
            variant.unlink()
    # The layout features_file uses, (A, 256, K): one channel's values side by side share exponents.
    if len(distinct):
        variant = folder / "variant.h5"
        with h5py.File(variant, "w") as handle:
            data = np.ascontiguousarray(distinct.transpose(0, 2, 1))
            handle.create_dataset(
                "x", data=data, chunks=(1, *data.shape[1:]), compression="gzip", compression_opts=4, shuffle=True
            )
        sizes["aug_features as (A, 256, K), gzip4+shuffle [no repeats, scaled]"] = int(
            variant.stat().st_size * len(result.features) / len(distinct)
        )
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    parser.add_argument("--n-augmentations", type=int, default=50)
    parser.add_argument("--n-tiles", type=int, default=256)
    parser.add_argument("--tile-size-px", type=int, default=224)
    parser.add_argument("--target-mpp", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the same-batch comparisons")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    work_dtype = autocast_dtype(device) or torch.float32

    config = ExtractConfig(
        slides=args.slide.parent,
        out=Path(tempfile.gettempdir()),
        target_mpp=args.target_mpp,
        tile_size_px=args.tile_size_px,
        n_augmentations=args.n_augmentations,
        n_tiles_per_augmentation=args.n_tiles,
        batch_size=args.batch_size,
        device="cpu",
    )
    model, _ = load_resnet18("random")
    trunk = TileTrunk(model).eval().to(memory_format=torch.channels_last)
    augmentation = TileAugmentation()

    with open_slide(args.slide) as reader:
        grid = tile_grid(reader, args.target_mpp, args.tile_size_px, config.tissue_threshold)
        print(
            f"slide {args.slide.name}: {len(grid)} tissue tiles of {args.tile_size_px} px at {args.target_mpp} µm/px; "
            f"bank A={args.n_augmentations} × K={args.n_tiles}, batch {args.batch_size}, {args.threads} threads, "
            f"augmentation in {work_dtype}"
        )
        build_bank(reader, grid, trunk, ExtractConfig(**{**config.__dict__, "n_augmentations": 1}), device)  # warm-up
        started = time.perf_counter()
        result = build_bank(reader, grid, trunk, config, device)
        total = time.perf_counter() - started
        batch_tiles = np.stack(
            [
                reader.read_tile(int(x), int(y), grid.size_level0, args.tile_size_px)
                for x, y in grid.coords[np.resize(np.arange(len(grid)), args.batch_size)]
            ]
        )

    t = result.timings
    n_bank = args.n_augmentations * args.n_tiles
    print("\n== bank extraction ==")
    print(
        f"total {total:.1f} s: {n_bank / total:.1f} bank tiles/s (A·K per second); "
        f"{int(t['n_encoded'])} distinct tile-augmentations encoded ({t['n_encoded'] / total:.1f}/s), "
        f"{int(t['n_reads'])} tile reads, sampled with replacement: {result.attrs['sampled_with_replacement']}"
    )
    for stage in ("read", "augment", "encode"):
        print(f"  {stage:8s} {t[stage]:7.2f} s  {100 * t[stage] / total:5.1f} %")
    print(f"  other    {total - t['read'] - t['augment'] - t['encode']:7.2f} s")
    print(f"augmentation / encoder time in the bank run: {100 * t['augment'] / t['encode']:.1f} % (target ≤ 25 %)")

    print(f"\n== same batch of {args.batch_size} real tiles, interleaved ==")
    tiles = torch.from_numpy(batch_tiles).permute(0, 3, 1, 2)
    generator = torch.Generator().manual_seed(0)
    draws = [augmentation.sample(1, args.tile_size_px, generator) for _ in range(args.repeats * 4)]
    ours_s, encoder_s, ours32_s, kornia_s = [], [], [], []
    pipeline = kornia_pipeline(args.tile_size_px, augmentation.settings.blur_kernel_px)
    as_float = tiles.float() / 255
    with torch.inference_mode():
        images = augmentation.apply(tiles, draws[0], normalize=(IMAGE_MEAN, IMAGE_STD), dtype=work_dtype)
        images = images.contiguous(memory_format=torch.channels_last)
        pipeline(as_float)
        for r in range(args.repeats):
            ours_s.append(
                sum(
                    timed(
                        lambda d=d: augmentation.apply(tiles, d, normalize=(IMAGE_MEAN, IMAGE_STD), dtype=work_dtype).contiguous(
                            memory_format=torch.channels_last
                        ),
                        1,
                    )
                    for d in draws[4 * r : 4 * r + 4]
                )
                / 4
            )
            with autocast(device):
                encoder_s.append(timed(lambda: trunk(images), 1))
            ours32_s.append(sum(timed(lambda d=d: augmentation.apply(as_float, d), 1) for d in draws[4 * r : 4 * r + 4]) / 4)
            kornia_s.append(timed(lambda: pipeline(as_float), 2))
    b = args.batch_size
    ours, encoder, ours32, kornia = (float(np.median(v)) for v in (ours_s, encoder_s, ours32_s, kornia_s))
    print(f"encoder (bf16 autocast, channels_last)   {b / encoder:8.1f} tiles/s")
    print(f"ours, {work_dtype!s:15s} + normalise   {b / ours:8.1f} tiles/s  = {100 * ours / encoder:.1f} % of encoder time")
    print(f"ours, float32                           {b / ours32:8.1f} tiles/s  = {100 * ours32 / encoder:.1f} % of encoder time")
    print(f"kornia same_on_batch, float32           {b / kornia:8.1f} tiles/s  = {100 * kornia / encoder:.1f} % of encoder time")

    print("\n== storage ==")
    with tempfile.TemporaryDirectory() as folder:
        for name, size in storage_sizes(result, Path(folder)).items():
            print(f"  {name:55s} {size / 1e6:6.2f} MB")
    raw = result.features.nbytes + result.coords.nbytes
    print(
        f"  (uncompressed float16 features + int64 coords: {raw / 1e6:.2f} MB; original float32 .npy: "
        f"{n_bank * 256 * 4 / 1e6:.1f} MB; target ≤ 4 MB at A=50, K=256)"
    )
    print(f"\nmeasured on {os.cpu_count()} CPUs with {args.threads} torch threads; other jobs may share the machine")


if __name__ == "__main__":
    main()
