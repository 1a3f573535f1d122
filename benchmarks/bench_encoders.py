"""Extraction speed with each kind of tile encoder: ResNet18, ResNet50 and an exported ViT.

For each encoder, :func:`bench_extract.measure` gives tiles/s of ``gigassl extract`` (plain
features, per slide after the first), of the encoder alone on tiles in memory, and of tile
reading alone; the table prints the first two and their ratio (target ≥ 0.8: the pipeline
hides reading behind encoding). The exported encoder is a ViT-S/16 (22 M parameters, 384-d,
written here with random weights, exported with torch.export to a .pt2 file and its sidecar),
the shape of the foundation models users export (UNI is a ViT-L/16: ~14× the compute).

    python benchmarks/bench_encoders.py                 # CMU-1-Small-Region, 224 px, best of 2
    python benchmarks/bench_encoders.py --encoders random,vit --repeats 3
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import build_parser, measure
from extract.encoders.exported import export_tile_encoder
from extract.encoders.tile_encoder import IMAGE_MEAN, IMAGE_STD

NAMES = {"random": "ResNet18 (random)", "random:resnet50": "ResNet50 (random)", "vit": "ViT-S/16 exported (.pt2)"}


class Block(nn.Module):
    """A pre-norm transformer block as timm writes it (fused qkv, scaled dot-product attention)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d / heads)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class ViTSmall(nn.Module):
    """A ViT-S/16 (Dosovitskiy et al. 2021): normalised (B, 3, 224, 224) → (B, 384) class token."""

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6, patch_px: int = 16, size_px: int = 224) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch_px, patch_px)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, (size_px // patch_px) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (B, 196, dim)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.norm(self.blocks(tokens))[:, 0]


def main() -> None:
    parser = build_parser()
    parser.add_argument(
        "--encoders", default="random,random:resnet50,vit", help="comma-separated: random, random:resnet50, vit, or paths"
    )
    parser.set_defaults(repeats=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_encoders_") as work:
        for name in args.encoders.split(","):
            source = name
            if name == "vit":
                torch.manual_seed(0)
                source = str(
                    export_tile_encoder(
                        ViTSmall(size_px=args.tile_size_px),
                        Path(work) / "vit_s16.pt2",
                        args.tile_size_px,
                        IMAGE_MEAN,
                        IMAGE_STD,
                        name="vit-s16",
                    )
                )
            args.encoder = source
            rows.append((NAMES.get(name, name), measure(args)))
    n_tiles = int(rows[0][1]["n_tiles"])
    print(
        f"\n{args.slide.name}: {n_tiles} tissue tiles of {args.tile_size_px} px at {args.target_mpp} µm/px, batch {args.batch_size}, "
        f"{args.num_workers} reading workers, {args.threads} threads, best of {args.repeats}"
    )
    print(f"{'encoder':<28} {'end-to-end':>11} {'encoder alone':>14} {'ratio':>6} {'reading alone':>14}")
    for label, rates in rows:
        print(
            f"{label:<28} {rates['end_to_end']:>11.1f} {rates['encoding']:>14.1f} "
            f"{rates['end_to_end'] / rates['encoding']:>6.2f} {rates['reading']:>14.1f}"
        )


if __name__ == "__main__":
    main()
