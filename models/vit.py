"""Vision Transformer image encoders in plain torch, for export to ONNX by the model tool.

Two layouts, so that a user's own checkpoint loads with a strict key check:

- `TimmViT`: the parameter names of timm's `vit_base_patch16_224` family (`cls_token`,
  `pos_embed`, `patch_embed.proj`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`,
  `norm`; the classifier `head` is accepted and dropped). Output: the class token after the
  final norm (timm's pre-logits features), `width`-d.
- `ClipVisualEncoder`: the names of open_clip's `ViT-B-32` / `ViT-B-16` image tower (`visual.*`
  in a whole-model state dict: `conv1`, `class_embedding`, `positional_embedding`, `ln_pre`,
  `transformer.resblocks.N.{ln_1,attn.in_proj_weight,attn.in_proj_bias,attn.out_proj,ln_2,
  mlp.c_fc,mlp.c_proj}`, `ln_post`, `proj`). Output: the projected class token (512-d for
  B/32 and B/16), the vector CLIP compares with text.

Both are written from the papers' definitions (Dosovitskiy et al. 2021; Radford et al. 2021);
only the model tool imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from onnx_export import IMAGENET_MEAN, IMAGENET_STD, ExportError, Preprocessing
from torch import nn

INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALISATIONS = {
    "inception": (INCEPTION_MEAN, INCEPTION_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "clip": (CLIP_MEAN, CLIP_STD),
}


@dataclass(frozen=True)
class VitConfig:
    family: str  # "timm" or "clip"
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    output_dim: int = 512  # CLIP's projection; timm's output is `width`
    quick_gelu: bool = False  # CLIP: OpenAI's original weights were trained with QuickGELU
    norm: str = "inception"  # default pixel normalisation, a key of NORMALISATIONS

    @property
    def grid(self) -> int:
        if self.image_size % self.patch_size:
            raise ExportError(f"image size {self.image_size} not a multiple of {self.patch_size}")
        return self.image_size // self.patch_size

    @property
    def embedding_dim(self) -> int:
        return self.width if self.family == "timm" else self.output_dim


ARCHS: dict[str, VitConfig] = {
    # timm: augreg weights (the default `vit_base_patch16_224` tags) use mean = std = 0.5.
    "vit_s16": VitConfig("timm", width=384, heads=6),
    "vit_b16": VitConfig("timm"),
    "vit_l16": VitConfig("timm", width=1024, layers=24, heads=16),
    # open_clip: ViT-B-32 and ViT-B-16 project to 512, ViT-L-14 to 768.
    "clip_vit_b32": VitConfig("clip", patch_size=32, norm="clip"),
    "clip_vit_b16": VitConfig("clip", patch_size=16, norm="clip"),
    "clip_vit_l14": VitConfig(
        "clip", patch_size=14, width=1024, layers=24, heads=16, output_dim=768, norm="clip"
    ),
}


def preprocessing(config: VitConfig, norm: str | None = None) -> Preprocessing:
    mean, std = NORMALISATIONS[norm or config.norm]
    return Preprocessing(mean=mean, std=std)


# --- timm layout ------------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[N, heads, L, d] each -> [N, heads, L, d]: softmax(q k^T / sqrt(d)) v, written out so
    that the ONNX graph is plain MatMul/Softmax on every opset and runtime."""
    weights = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)
    return weights @ v


class TimmAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ExportError(f"width {width} not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, length, width = x.shape
        qkv = self.qkv(x).reshape(-1, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v).transpose(1, 2).reshape(-1, length, width)
        return self.proj(out)


class TimmMlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TimmBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = TimmAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = TimmMlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch_size, patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class TimmViT(nn.Module):
    """Images [N, 3, S, S] -> class-token features [N, width] (timm's pre-logits)."""

    def __init__(self, config: VitConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.patch_embed = PatchEmbed(config.patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, config.grid**2 + 1, width) * 0.02)
        self.blocks = nn.ModuleList(
            TimmBlock(width, config.heads, config.mlp_ratio) for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(images)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


# --- open_clip layout -------------------------------------------------------------------------


class ClipAttention(nn.Module):
    """Self-attention with one packed input projection, as torch's MultiheadAttention stores it
    (`in_proj_weight`, `in_proj_bias`, `out_proj`)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ExportError(f"width {width} not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.randn(3 * width, width) * width**-0.5)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.reshape(-1, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v).transpose(1, 2).reshape(-1, length, width)
        return self.out_proj(out)


class ClipMlp(nn.Module):
    def __init__(self, width: int, hidden: int, quick_gelu: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)
        self.quick_gelu = quick_gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h)
        return self.c_proj(h)


class ClipBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = ClipAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = ClipMlp(width, int(width * mlp_ratio), quick_gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ClipTransformer(nn.Module):
    def __init__(self, config: VitConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            ClipBlock(config.width, config.heads, config.mlp_ratio, config.quick_gelu)
            for _ in range(config.layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class ClipVisualEncoder(nn.Module):
    """Images [N, 3, S, S] -> projected class token [N, output_dim] (CLIP's image embedding)."""

    def __init__(self, config: VitConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, config.patch_size, config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * scale)
        self.positional_embedding = nn.Parameter(torch.randn(config.grid**2 + 1, width) * scale)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = ClipTransformer(config)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, config.output_dim) * scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.conv1(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.reshape(1, 1, -1).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


def create(config: VitConfig) -> nn.Module:
    return TimmViT(config) if config.family == "timm" else ClipVisualEncoder(config)


# --- checkpoints ------------------------------------------------------------------------------


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A state dict saved by torch.save (bare, or under "state_dict" / "model", keys possibly
    prefixed "module."), or a .safetensors file when the safetensors package is installed."""
    if not path.is_file():
        raise ExportError(f"--vit-checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ExportError(
                f"{path}: reading .safetensors needs `pip install safetensors`; or save the "
                "state dict with torch.save"
            ) from None
        loaded: object = load_file(str(path))
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ExportError(f"{path}: not a torch state dict ({error})") from None
    if isinstance(loaded, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(loaded.get(wrapper), dict):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise ExportError(f"{path}: expected a state dict (parameter name -> tensor)")
    state = {str(k): v for k, v in loaded.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def select_image_tower(
    state: dict[str, torch.Tensor], family: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The keys the image encoder uses, and those dropped on purpose: a timm classifier `head`;
    everything outside `visual.` in a whole open_clip model (text tower, logit_scale)."""
    if family == "clip" and any(k.startswith("visual.") for k in state):
        kept = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        return kept, sorted(k for k in state if not k.startswith("visual."))
    if family == "timm":
        dropped = sorted(k for k in state if k.split(".")[0] == "head")
        return {k: v for k, v in state.items() if k not in dropped}, dropped
    return dict(state), []


def load_strictly(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Every parameter present with its shape, nothing unknown; the error lists what is wrong."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

    problems = []
    if missing:
        problems.append(f"missing keys: {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listed(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {listed(wrong_shape)}")
    if problems:
        raise ExportError(f"checkpoint does not match {what}: " + "; ".join(problems))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def load_checkpoint(model: nn.Module, path: Path, arch: str) -> list[str]:
    """Load `path` into `model` strictly; returns the keys dropped on purpose."""
    config: VitConfig = model.config  # type: ignore[assignment]
    state, dropped = select_image_tower(read_checkpoint(path), config.family)
    load_strictly(model, state, f"--vit-arch {arch}")
    return dropped
