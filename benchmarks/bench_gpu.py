"""GPU figures in one run (what ``scripts/gpu_check.sh`` prints after the ``cuda`` tests).

- extraction tiles/s on copies of CMU-1-Small-Region.svs: plain features alone, bank alone
  (A = 50, K = 256), random ResNet18, bf16 autocast, pinned memory;
- NT-Xent forward + backward at 512 views (256 pairs, 256-d), median ms;
- embedding slides/s at R = 50 views of T = 5 tiles (synthetic feature files, reading included).

Training slides/s at batch 256, T = 5 comes from ``benchmarks/bench_train.py --device cuda``.

    python benchmarks/bench_gpu.py --slides ../shared/data/slides [--copies 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _median_ms(step, repeats: int = 20) -> float:
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return float(np.median(times))


def bench_extraction(slides: Path, copies: int, workers: int) -> dict[str, float]:
    from extract.config import ExtractConfig
    from extract.run import run_extraction

    rates = {}
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp) / "slides"
        folder.mkdir()
        for i in range(copies):
            (folder / f"copy{i:02d}.svs").symlink_to((slides / "CMU-1-Small-Region.svs").resolve())
        for name, plain, bank in (("plain", True, False), ("bank", False, True)):
            config = ExtractConfig(
                slides=folder,
                out=Path(temp) / name,
                encoder="random",
                device="cuda",
                plain=plain,
                bank=bank,
                num_workers=workers,
                qc=False,
            )
            summary = run_extraction(config)
            rates[name] = summary.tiles_per_second
    return rates


def bench_loss() -> float:
    from gigassl.training.loss import nt_xent

    z = torch.randn(512, 256, device="cuda", requires_grad=True)

    def step() -> None:
        z.grad = None
        nt_xent(z[:256], z[256:], temperature=0.05).backward()

    return _median_ms(step)


def bench_embed(n_slides: int = 256) -> float:
    from gigassl.embed import embed_slides
    from gigassl.model import GigaSSLModel
    from gigassl.synthetic.cohort import write_synthetic_cohort

    with tempfile.TemporaryDirectory() as temp:
        paths = write_synthetic_cohort(Path(temp), n_slides=n_slides, n_tiles=400, n_augmentations=1, bank_size=4)
        model = GigaSSLModel(None, device="cuda").eval()
        embed_slides(model, paths[:8], 50, 5, 0, 64)
        torch.cuda.synchronize()
        start = time.perf_counter()
        embed_slides(model, paths, 50, 5, 0, 64)
        torch.cuda.synchronize()
        return n_slides / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--slides", type=Path, default=Path("../shared/data/slides"), help="folder holding CMU-1-Small-Region.svs"
    )
    parser.add_argument("--copies", type=int, default=16, help="copies of the slide extracted per measure")
    parser.add_argument("--workers", type=int, default=8, help="tile-reading workers")
    args = parser.parse_args()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    extraction = bench_extraction(args.slides, args.copies, args.workers)
    print(f"extraction, plain features: {extraction['plain']:.0f} tiles/s; bank (A=50, K=256): {extraction['bank']:.0f} tiles/s")
    print(f"NT-Xent fwd+bwd, 512 views × 256-d: {bench_loss():.2f} ms (median)")
    print(f"embedding, R=50 views of T=5 tiles: {bench_embed():.0f} slides/s")


if __name__ == "__main__":
    main()
