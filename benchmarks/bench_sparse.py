"""The two sparse backends side by side, in one run, on this machine.

1. The training step's model work: sparse layer4 + projector + NT-Xent, forward + backward, at
   ``--slides`` slides × 2 views × T tiles (default 256 × 2 × 5), maps of an ~80×80-tile slide
   with the slide-level augmentation. Backends are timed in turns (round-robin over repeats), so
   a load change on the machine hits them alike; the ratio torch / spconv is the figure (≤ 1.0
   means the torch backend is no slower).
2. ``embed`` throughput (slides/s) at R = 50 views of T = 5 plain tiles, through
   :func:`gigassl.embed.embed_slides` on synthetic feature files (reading included).

Rows: ``torch`` (fp32), ``torch+bf16`` (CPU autocast, bf16 products, fp32 sums), ``spconv``
(Native algorithm, fp32; where spconv imports).

    python benchmarks/bench_sparse.py [--slides 256] [--repeats 10] [--embed-slides 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _variants() -> list[tuple[str, str, bool]]:
    from gigassl.sparse.conv import spconv_available

    rows = [("torch", "torch", False), ("torch+bf16", "torch", True)]
    if spconv_available():
        rows.append(("spconv", "spconv", False))
    return rows


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


# (embedding switches autocast itself: ``embed_slides(mixed_precision=…)``, bf16 on this CPU when it has bf16 units)


def bench_step(slides: int, tiles: int, repeats: int, seed: int = 0) -> dict[str, float]:
    """Median ms of one model step per variant."""
    from gigassl.model import GigaSSLModel
    from gigassl.sparse.maps import augment_cells, collate_views
    from gigassl.training.loss import nt_xent

    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(3):
        views = [
            (rng.standard_normal((tiles, 256)).astype(np.float32), augment_cells(rng.integers(0, 80, size=(tiles, 2)), rng))
            for _ in range(2 * slides)
        ]
        batches.append(collate_views(views))
    models = {}
    for name, backend, _ in _variants():
        torch.manual_seed(seed)
        models[name] = GigaSSLModel(None, sparse_backend=backend).train()
    times: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(repeats + 1):  # the first round warms up
        for name, _, bf16 in _variants():
            model, batch = models[name], batches[repeat % len(batches)]
            start = time.perf_counter()
            model.zero_grad(set_to_none=True)
            with _autocast(bf16):
                z = model(batch).float()
            nt_xent(z[:slides], z[slides:]).backward()
            if repeat:
                times[name].append(1e3 * (time.perf_counter() - start))
    return {name: float(np.median(values)) for name, values in times.items()}


def bench_embed(n_slides: int, n_views: int, tiles: int, batch_size: int, repeats: int) -> dict[str, float]:
    """Slides/s of embed_slides per variant (best of ``repeats`` passes over the files)."""
    from gigassl.embed import embed_slides
    from gigassl.model import GigaSSLModel
    from gigassl.synthetic.cohort import write_synthetic_cohort

    with tempfile.TemporaryDirectory() as folder:
        paths = write_synthetic_cohort(Path(folder), n_slides=n_slides, n_tiles=200, n_augmentations=1, bank_size=4)
        models = {}
        for name, backend, _ in _variants():
            torch.manual_seed(0)
            models[name] = GigaSSLModel(None, sparse_backend=backend).eval()
        best = {name: float("inf") for name in models}
        for repeat in range(repeats + 1):  # in turns, like the step; the first round warms up
            for name, _, bf16 in _variants():
                start = time.perf_counter()
                embed_slides(models[name], paths if repeat else paths[:4], n_views, tiles, 0, batch_size, mixed_precision=bf16)
                if repeat:
                    best[name] = min(best[name], time.perf_counter() - start)
    return {name: n_slides / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=256, help="slides per training batch (two views each)")
    parser.add_argument("--tiles", type=int, default=5, help="T: tiles per view")
    parser.add_argument("--repeats", type=int, default=10, help="timed training steps per backend")
    parser.add_argument("--embed-slides", type=int, default=64, help="synthetic slides embedded per pass")
    parser.add_argument("--views", type=int, default=50, help="R: views per slide embedding")
    parser.add_argument("--embed-batch", type=int, default=64, help="slides per embed batch")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}")
    step = bench_step(args.slides, args.tiles, args.repeats)
    embed = bench_embed(args.embed_slides, args.views, args.tiles, args.embed_batch, repeats=3)
    print(f"{'variant':<12}{'step ms':>10}{'slides/s':>10}{'embed slides/s':>16}")
    for name in step:
        print(f"{name:<12}{step[name]:>10.1f}{args.slides / step[name] * 1e3:>10.0f}{embed[name]:>16.1f}")
    if "spconv" in step:
        print(
            f"ratio torch / spconv, training step: {step['torch'] / step['spconv']:.2f} (fp32), "
            f"{step['torch+bf16'] / step['spconv']:.2f} (bf16); embed speed-up: "
            f"{embed['torch'] / embed['spconv']:.2f}× (fp32), {embed['torch+bf16'] / embed['spconv']:.2f}× (bf16)"
        )


if __name__ == "__main__":
    main()
