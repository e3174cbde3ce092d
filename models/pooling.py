"""Global pooling options for the CNN embedder: average, GeM, and multi-scale (composable).

    avg         mean over the feature map (the default; what `mobilenet_v2.py` does)
    gem         generalised mean (Radenovic et al., 2018): (mean(clamp(x, eps) ** p)) ** (1 / p);
                p = 1 is average pooling, p -> infinity tends to max pooling; p = 3 is the
                literature default
    multiscale  the image is resized inside the graph to each scale (1, 1/sqrt(2), sqrt(2) by
                default), each resized image is run through the backbone and pooled, and the
                pooled vectors are averaged. The model's input stays 224x224, so the services
                need no change.

The output stays what the default model gives: one un-normalised vector per image (the embedding
service L2-normalises every vector it returns). Only the model tool imports this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ("avg", "gem")
DEFAULT_GEM_P = 3.0
GEM_EPS = 1e-6
DEFAULT_SCALES = (1.0, 1 / math.sqrt(2), math.sqrt(2))


@dataclass(frozen=True)
class PoolingOptions:
    pooling: str = "avg"
    gem_p: float = DEFAULT_GEM_P
    scales: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if not self.gem_p > 0:
            raise ValueError(f"GeM p must be positive, got {self.gem_p}")
        if not self.scales or any(not s > 0 for s in self.scales):
            raise ValueError(f"scales must be positive numbers, got {self.scales}")

    @property
    def multiscale(self) -> bool:
        return self.scales != (1.0,)

    @property
    def is_default(self) -> bool:
        return self.pooling == "avg" and not self.multiscale

    def describe(self) -> str:
        """What config.pbtxt's `loupe.pooling` says, e.g. `gem(p=3)` or `avg@1,0.7071,1.414`."""
        text = "avg" if self.pooling == "avg" else f"gem(p={self.gem_p:g})"
        if self.multiscale:
            text += "@" + ",".join(f"{s:.4g}" for s in self.scales)
        return text

    def model_name(self, base: str = "embedder") -> str:
        """A distinct model name per pooling, so that vectors of different models never share
        a cache key (the gateway keys embeddings by model name and version)."""
        if self.is_default:
            return base
        name = base + ("_avg" if self.pooling == "avg" else f"_gem{self.gem_p:g}".replace(".", "p"))
        return name + ("_ms" if self.multiscale else "")


def parse_scales(raw: str) -> tuple[float, ...]:
    """`1,0.7071,1.4142` or `1,1/sqrt2,sqrt2` -> floats."""
    named = {"sqrt2": math.sqrt(2), "1/sqrt2": 1 / math.sqrt(2)}
    scales = []
    for part in raw.split(","):
        part = part.strip()
        try:
            scales.append(named[part] if part in named else float(part))
        except ValueError:
            raise ValueError(f"scale {part!r} is not a number") from None
    return tuple(scales)


class GeM(nn.Module):
    """Generalised-mean pooling over H and W: [N, C, H, W] -> [N, C]. A fixed p (not learned)."""

    def __init__(self, p: float = DEFAULT_GEM_P, eps: float = GEM_EPS) -> None:
        super().__init__()
        self.p = float(p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Clamp first: pow of a negative or zero activation is undefined or kills the gradient.
        pooled = x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3))
        return pooled.pow(1.0 / self.p)


class AvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class PooledEmbedder(nn.Module):
    """`features` (a backbone giving [N, C, h, w]) + pooling over one or several scales.

    The backbone stays under the attribute `features`, so its state-dict keys are unchanged."""

    def __init__(self, features: nn.Module, options: PoolingOptions, input_size: int) -> None:
        super().__init__()
        self.features = features
        self.pool: nn.Module = AvgPool() if options.pooling == "avg" else GeM(options.gem_p)
        # Sizes are fixed at build time: the model's input is a fixed input_size square.
        self.sizes = [max(1, round(input_size * s)) for s in options.scales]
        self.input_size = input_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for size in self.sizes:
            scaled = images
            if size != self.input_size:
                scaled = F.interpolate(
                    images, size=(size, size), mode="bilinear", align_corners=False
                )
            pooled = self.pool(self.features(scaled))
            total = pooled if total is None else total + pooled
        assert total is not None
        return total / len(self.sizes)
