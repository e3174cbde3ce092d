"""The model tool's extra exports on small random models: ViT / CLIP encoders, GeM and
multi-scale pooling, INT8 quantization. ONNX Runtime against torch, dynamic batch, strict
checkpoint loading, and config.pbtxt files the services can read."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from google.protobuf import text_format  # noqa: E402
from PIL import Image  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from services.common.inference import REPOSITORY_IN_CHECKOUT, load_model_spec  # noqa: E402
from services.embedding.preprocess import StretchPreprocessing  # noqa: E402

if str(REPOSITORY_IN_CHECKOUT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_IN_CHECKOUT))

import onnx_export  # noqa: E402
import pooling  # noqa: E402
import vit  # noqa: E402
from extra_builds import export_vit  # noqa: E402

TINY_TIMM = vit.VitConfig("timm", image_size=32, patch_size=8, width=32, layers=2, heads=4)
TINY_CLIP = vit.VitConfig(
    "clip", image_size=32, patch_size=16, width=32, layers=2, heads=2, output_dim=24, norm="clip"
)
TOLERANCE = 1e-4


def seeded(config: vit.VitConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = vit.create(config).eval()
    # Random LayerNorm affine and biases too, so a mis-wired parameter cannot hide.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize(
    "config",
    [TINY_TIMM, TINY_CLIP, replace(TINY_CLIP, quick_gelu=True)],
    ids=["timm", "clip", "clip-quickgelu"],
)
def test_vit_onnx_matches_torch_at_batch_1_and_3(config: vit.VitConfig) -> None:
    model = seeded(config)
    exported = onnx_export.export_onnx(model, config.image_size)
    diff, dim = onnx_export.compare_with_torch(model, exported, config.image_size, (1, 3))
    assert dim == config.embedding_dim
    assert diff < TOLERANCE


def test_timm_layout_has_timm_parameter_names() -> None:
    names = set(vit.create(TINY_TIMM).state_dict())
    for key in (
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "blocks.1.norm1.weight",
        "blocks.1.attn.qkv.weight",
        "blocks.1.attn.proj.bias",
        "blocks.1.norm2.bias",
        "blocks.1.mlp.fc1.weight",
        "blocks.1.mlp.fc2.bias",
        "norm.weight",
    ):
        assert key in names


def test_clip_layout_has_open_clip_parameter_names() -> None:
    names = set(vit.create(TINY_CLIP).state_dict())
    assert {
        "conv1.weight",
        "class_embedding",
        "positional_embedding",
        "ln_pre.weight",
        "transformer.resblocks.1.ln_1.weight",
        "transformer.resblocks.1.attn.in_proj_weight",
        "transformer.resblocks.1.attn.in_proj_bias",
        "transformer.resblocks.1.attn.out_proj.weight",
        "transformer.resblocks.1.ln_2.bias",
        "transformer.resblocks.1.mlp.c_fc.weight",
        "transformer.resblocks.1.mlp.c_proj.bias",
        "ln_post.weight",
        "proj",
    } <= names
    assert "conv1.bias" not in names


def test_checkpoints_load_strictly(tmp_path: Path) -> None:
    source = seeded(TINY_CLIP)
    # A whole open_clip model: the image tower under visual., the text tower beside it.
    whole = {f"visual.{k}": v for k, v in source.state_dict().items()}
    whole["logit_scale"] = torch.tensor(4.6)
    whole["token_embedding.weight"] = torch.zeros(10, 8)
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": whole}, path)
    target = vit.create(TINY_CLIP)
    dropped = vit.load_checkpoint(target, path, "tiny")
    assert dropped == ["logit_scale", "token_embedding.weight"]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target.eval()(images), source(images))

    # timm: the classifier head is dropped; a renamed key is named in the error.
    timm_state = seeded(TINY_TIMM).state_dict()
    timm_state["head.weight"] = torch.zeros(5, 32)
    timm_state["blocks.0.attn.qkv_renamed.weight"] = timm_state.pop("blocks.0.attn.qkv.weight")
    torch.save(timm_state, path)
    with pytest.raises(onnx_export.ExportError) as error:
        vit.load_checkpoint(vit.create(TINY_TIMM), path, "vit_tiny")
    message = str(error.value)
    assert "missing keys: blocks.0.attn.qkv.weight" in message
    assert "unexpected keys: blocks.0.attn.qkv_renamed.weight" in message

    # The right names with the wrong architecture: shapes are named too.
    torch.save(seeded(TINY_TIMM).state_dict(), path)
    wrong = r"wrong shapes: blocks.0.attn.proj.bias \(32,\) \(expected \(48,\)\)"
    with pytest.raises(onnx_export.ExportError, match=wrong):
        vit.load_checkpoint(vit.create(replace(TINY_TIMM, width=48, heads=4)), path, "other")


def test_vit_model_in_repository_is_readable_by_the_service(tmp_path: Path) -> None:
    export_vit(tmp_path, seeded(TINY_CLIP), "clip_vit_b32", "clip_tiny")
    config = model_config_pb2.ModelConfig()
    text_format.Parse((tmp_path / "clip_tiny" / "config.pbtxt").read_text(), config)
    assert config.name == "clip_tiny"
    assert list(config.output[0].dims) == [24]
    spec = load_model_spec(tmp_path, "clip_tiny")
    assert spec.parameters["loupe.mean"] == "0.48145466,0.4578275,0.40821073"
    preprocess = StretchPreprocessing.from_spec(spec)
    assert (preprocess.input_width, preprocess.input_height) == (32, 32)
    np.testing.assert_allclose(preprocess.std, vit.CLIP_STD, rtol=1e-6)


def tiny_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU6(), torch.nn.Conv2d(8, 16, 3, 2, 1)
    )


@pytest.mark.parametrize(
    "options",
    [
        pooling.PoolingOptions("gem", 3.0),
        pooling.PoolingOptions("avg", scales=pooling.DEFAULT_SCALES),
        pooling.PoolingOptions("gem", 4.0, pooling.DEFAULT_SCALES),
    ],
    ids=lambda o: o.describe(),
)
def test_pooled_embedder_onnx_matches_torch(options: pooling.PoolingOptions) -> None:
    model = pooling.PooledEmbedder(tiny_backbone(), options, 32).eval()
    exported = onnx_export.export_onnx(model, 32)
    diff, dim = onnx_export.compare_with_torch(model, exported, 32, (1, 3))
    assert dim == 16
    assert diff < TOLERANCE


def test_gem_lies_between_average_and_max_and_p1_is_average() -> None:
    features = torch.rand(2, 4, 5, 5)
    average = features.mean(dim=(2, 3))
    assert torch.allclose(pooling.GeM(1.0)(features), average, atol=1e-6)
    gem = pooling.GeM(3.0)(features)
    assert bool((gem >= average - 1e-6).all())
    assert bool((gem <= features.amax(dim=(2, 3)) + 1e-6).all())
    # Negative activations are clamped before the power, never NaN.
    assert not torch.isnan(pooling.GeM(3.0)(features - 0.5)).any()


def test_pooling_names_and_descriptions() -> None:
    assert pooling.PoolingOptions().model_name() == "embedder"
    assert pooling.PoolingOptions("gem", 3.0).model_name() == "embedder_gem3"
    ms = pooling.PoolingOptions("gem", 2.5, pooling.parse_scales("1,1/sqrt2,sqrt2"))
    assert ms.model_name() == "embedder_gem2p5_ms"
    assert ms.describe() == "gem(p=2.5)@1,0.7071,1.414"
    with pytest.raises(ValueError):
        pooling.PoolingOptions("max")


def test_int8_build_of_a_tiny_embedder(tmp_path: Path) -> None:
    import quantize

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = tiny_backbone()

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.features(images).mean(dim=(2, 3))

    model = Tiny().eval()
    config = onnx_export.config_text(
        "tiny",
        comment="a tiny test embedder",
        input_size=32,
        output_dim=16,
        parameters=onnx_export.Preprocessing().parameters(),
    )
    onnx_export.write_model(tmp_path, "tiny", onnx_export.export_onnx(model, 32), config)
    photos = tmp_path / "photos" / "nested"
    photos.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        pixels = rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"{i}.png")
    (photos / "broken.jpg").write_bytes(b"not an image")

    path = quantize.build_int8(tmp_path, tmp_path / "photos", source="tiny", count=10)
    assert path == tmp_path / "tiny_int8" / "1" / "model.onnx"
    spec = load_model_spec(tmp_path, "tiny_int8")
    assert spec.name == "tiny_int8"
    assert spec.parameters["loupe.mean"] == "0.485,0.456,0.406"
    assert "int8 static" in spec.parameters["loupe.quantization"]

    import onnxruntime as ort

    batch = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    fp32 = ort.InferenceSession(str(load_model_spec(tmp_path, "tiny").path)).run(
        None, {"images": batch}
    )[0]
    int8 = ort.InferenceSession(str(path)).run(None, {"images": batch})[0]
    assert int8.shape == (3, 16)
    cosine = (fp32 * int8).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
    assert cosine.min() > 0.95
