"""The registered backbones."""

from __future__ import annotations

from torch import nn

from selfmask.backbones.registry import IMAGENET_MEAN, IMAGENET_STD, BackboneInfo, register_backbone
from selfmask.backbones.resnet import BasicBlock, Bottleneck, ResNet

# Embedded-benchmark images are rendered on a neutral background; 0.5/0.25 is close to their statistics.
EMBEDDED_MEAN = (0.5, 0.5, 0.5)
EMBEDDED_STD = (0.25, 0.25, 0.25)


@register_backbone(BackboneInfo("resnet18", 512, 224, IMAGENET_MEAN, IMAGENET_STD, "resnet", "torchvision ResNet-18"))
def resnet18() -> nn.Module:
    return ResNet(BasicBlock, (2, 2, 2, 2))


@register_backbone(
    BackboneInfo("resnet50", 2048, 224, IMAGENET_MEAN, IMAGENET_STD, "resnet", "torchvision ResNet-50 (SwAV, DINO)")
)
def resnet50() -> nn.Module:
    return ResNet(Bottleneck, (3, 4, 6, 3))


@register_backbone(
    BackboneInfo("resnet_tiny", 128, 32, EMBEDDED_MEAN, EMBEDDED_STD, "resnet", "CPU ResNet, 1 block/stage, widths 16-128")
)
def resnet_tiny() -> nn.Module:
    return ResNet(BasicBlock, (1, 1, 1, 1), widths=(16, 32, 64, 128), small_input=True)


@register_backbone(
    BackboneInfo("resnet_small", 256, 32, EMBEDDED_MEAN, EMBEDDED_STD, "resnet", "CPU ResNet, 2 blocks/stage, widths 32-256")
)
def resnet_small() -> nn.Module:
    return ResNet(BasicBlock, (2, 2, 2, 2), widths=(32, 64, 128, 256), small_input=True)
