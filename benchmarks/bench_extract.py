"""Plain-feature extraction speed on one slide, measured in one run.

Prints tiles/s of (1) `gigassl extract` on the slide (plain features only): the job runs on a
folder holding the slide under ``--copies`` names, and the rate is that of the copies after the
first, i.e. the slide's own time (thumbnail, tissue mask, grid, reading, encoding, HDF5 writing)
at the rate a cohort runs at; the first slide, which also starts the reading workers, and the
whole command with the encoder's set-up are printed below the table; (2) tile reading alone
through a tile stream of its own; (3) the encoder alone on tiles already in memory; and the ratio
end-to-end / min(read, encode) (target ≥ 0.8: the pipeline hides the faster stage). In each
round every measure is the mean of ``copies − 1`` passes; the best round of each is kept.

    python benchmarks/bench_extract.py                       # CMU-1-Small-Region, 224 px at 0.5 µm/px
    python benchmarks/bench_extract.py --num-workers 0 --threads 2 --repeats 3
    python benchmarks/bench_extract.py --encoder random:resnet50   # or a checkpoint, or PATH.pt2

``benchmarks/bench_encoders.py`` runs it for ResNet18, ResNet50 and an exported ViT.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from extract.config import ExtractConfig
from extract.device import resolve_device
from extract.encoders.kinds import load_encoder
from extract.encoders.tile_encoder import encode_batches
from extract.run import run_extraction
from extract.slides.formats import open_slide
from extract.slides.tiling import tile_grid
from extract.tile_loader import TileStream

DEFAULT_SLIDE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "CMU-1-Small-Region.svs"


def best_rate(n_tiles: int, seconds: list[float]) -> float:
    return n_tiles / min(seconds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    parser.add_argument("--encoder", default="random", help="random, random:resnet50, a checkpoint or PATH.pt2")
    parser.add_argument("--target-mpp", type=float, default=0.5)
    parser.add_argument("--tile-size-px", type=int, default=224)
    parser.add_argument("--tissue-threshold", type=float, default=0.5)
    # Small batches let the workers read the next batch while the CPU encodes this one; a slide
    # of ~50 tiles in one batch of 64 would serialise reading and encoding.
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=ExtractConfig.num_workers)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the encoding process")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--copies", type=int, default=4, help="names the slide is linked under (≥ 2)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the three measures (best of each kept)")
    return parser


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Tiles/s of the three measures (keys ``end_to_end``, ``reading``, ``encoding``, ``first_slide``,
    ``command``) and ``n_tiles``, for ``args.encoder``."""
    copies = max(2, args.copies)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        slides = work / "slides"
        slides.mkdir()
        for copy in range(copies):
            (slides / f"{args.slide.stem}-{copy}{args.slide.suffix}").symlink_to(args.slide.resolve())
        config = ExtractConfig(
            slides=slides,
            out=work / "out",
            encoder=str(args.encoder),
            target_mpp=args.target_mpp,
            tile_size_px=args.tile_size_px,
            tissue_threshold=args.tissue_threshold,
            bank=False,
            qc=False,
            overwrite=True,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=args.device,
        )
        with open_slide(args.slide) as reader:
            grid = tile_grid(reader, args.target_mpp, args.tile_size_px, args.tissue_threshold)
        n_tiles = len(grid)

        def read_passes(passes: int) -> list[torch.Tensor]:
            """The slide read ``passes`` times through one tile stream (its workers start and
            stop inside, so nothing reads ahead while the encoder is timed alone)."""
            stream = TileStream(
                [args.slide] * passes, lambda _: grid, args.batch_size, args.num_workers, pin_memory=device.type == "cuda"
            )
            try:
                for _ in range(passes):
                    tiles = list(stream.tiles(args.slide, grid))
            finally:
                stream.close()
            return tiles

        trunk = load_encoder(args.encoder).trunk.to(device).eval().to(memory_format=torch.channels_last)
        # Warm-up (oneDNN kernels, page cache), then the three measures taken in turn, so that
        # a change of load on a shared machine hits all of them alike; the best of each is kept.
        run_extraction(config)
        tiles = read_passes(1)
        list(encode_batches(tiles[:1], trunk, device))
        end_to_end, first_slide, per_slide, reading, encoding = [], [], [], [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            summary = run_extraction(config)
            end_to_end.append(time.perf_counter() - started)
            assert len(summary.done) == copies
            first_slide.append(summary.done[0].seconds)
            per_slide.append(sum(o.seconds for o in summary.done[1:]) / len(summary.done[1:]))

            # Each measure of a round is the mean over as many passes as the job had slides
            # after the first, so that the three are averaged alike.
            passes = len(summary.done) - 1
            started = time.perf_counter()
            tiles = read_passes(passes)
            reading.append((time.perf_counter() - started) / passes)

            started = time.perf_counter()
            for _ in range(passes):
                for _features in encode_batches(tiles, trunk, device):
                    pass
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            encoding.append((time.perf_counter() - started) / passes)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    return {
        "n_tiles": n_tiles,
        "end_to_end": best_rate(n_tiles, per_slide),
        "reading": best_rate(n_tiles, reading),
        "encoding": best_rate(n_tiles, encoding),
        "first_slide": best_rate(n_tiles, first_slide),
        "command": best_rate(n_tiles * copies, end_to_end),
    }


def main() -> None:
    args = build_parser().parse_args()
    device = resolve_device(args.device)
    measured = measure(args)
    n_tiles = int(measured["n_tiles"])
    rates = {
        "end-to-end per slide (plain features)": measured["end_to_end"],
        f"tile reading alone ({args.num_workers} workers)": measured["reading"],
        f"encoder alone ({device}, {args.threads} threads)": measured["encoding"],
    }
    slower = min(list(rates.values())[1:])
    print(
        f"\n{args.slide.name}: {n_tiles} tissue tiles of {args.tile_size_px} px at {args.target_mpp} µm/px, "
        f"batch {args.batch_size}, best of {args.repeats}, encoder {args.encoder}"
    )
    print(f"{'measure':<44} {'tiles/s':>9}")
    for name, rate in rates.items():
        print(f"{name:<44} {rate:>9.1f}")
    print(
        f"{'end-to-end / min(read, encode)':<44} {rates['end-to-end per slide (plain features)'] / slower:>9.2f}  (target ≥ 0.80)"
    )
    print(f"{'(first slide, starts the reading workers)':<44} {measured['first_slide']:>9.1f}")
    print(f"{'(whole command incl. encoder set-up)':<44} {measured['command']:>9.1f}")


if __name__ == "__main__":
    main()
