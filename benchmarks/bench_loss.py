"""NT-Xent forward + backward, ours vs pytorch-metric-learning's NTXentLoss, in one run (the
sparse layer4 + projector step is ``benchmarks/bench_sparse.py``).

    python benchmarks/bench_loss.py                  # 256 pairs (512 views), D = 256
    python benchmarks/bench_loss.py --pairs 64 --repeats 3   # a quick check

Prints median and best wall-clock times in ms (target for the loss: ours < 20 ms at 512 views).
PML builds all pairs explicitly; at 256 pairs it takes seconds and a few GB, so it runs
``--pml-repeats`` times only (0 skips it).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable

import torch


def _time_ms(step: Callable[[], None], repeats: int, warmup: int = 1) -> tuple[float, float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), min(times)


def bench_loss(pairs: int, dim: int, repeats: int, pml_repeats: int, temperature: float) -> None:
    from gigassl.training.loss import nt_xent

    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(pairs, dim, generator=generator, requires_grad=True)
    z2 = torch.randn(pairs, dim, generator=generator, requires_grad=True)

    def ours() -> None:
        z1.grad = z2.grad = None
        nt_xent(z1, z2, temperature).backward()

    median, best = _time_ms(ours, repeats)
    print(f"NT-Xent fwd+bwd, {2 * pairs} views, D={dim}: ours  median {median:9.2f} ms  best {best:9.2f} ms")
    if pml_repeats > 0:
        from pytorch_metric_learning.losses import NTXentLoss

        reference = NTXentLoss(temperature=temperature)
        labels = torch.arange(pairs).repeat(2)

        def pml() -> None:
            z1.grad = z2.grad = None
            reference(torch.cat([z1, z2]), labels).backward()

        pml_median, pml_best = _time_ms(pml, pml_repeats, warmup=0)
        print(f"NT-Xent fwd+bwd, {2 * pairs} views, D={dim}: PML   median {pml_median:9.2f} ms  best {pml_best:9.2f} ms")
        print(f"speed-up (median): {pml_median / median:.0f}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256, help="slides in the loss batch (views = 2 × pairs)")
    parser.add_argument("--dim", type=int, default=256, help="projection size")
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats of our loss")
    parser.add_argument("--pml-repeats", type=int, default=2, help="timed repeats of PML (slow); 0 skips it")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_loss(args.pairs, args.dim, args.repeats, args.pml_repeats, args.temperature)


if __name__ == "__main__":
    main()
