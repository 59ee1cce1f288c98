"""Backbones with torchvision / OpenAI CLIP / efficientnet-lite-pytorch layouts, built without those libraries."""

from selfmask.backbones import zoo as _zoo  # noqa: F401  (registers the backbones)
from selfmask.backbones.efficientnet import EfficientNetLite, imagenet_classifier
from selfmask.backbones.loading import (
    LoadReport,
    backbone_fingerprint,
    create_backbone,
    load_backbone_weights,
    load_state_dict_file,
    read_checkpoint,
    timm_vit_to_openai_clip,
)
from selfmask.backbones.registry import (
    BackboneInfo,
    backbone_info,
    build_backbone,
    describe_backbone,
    list_backbones,
    register_backbone,
)
from selfmask.backbones.resnet import BasicBlock, Bottleneck, ResNet
from selfmask.backbones.vit import CLIPVisionTransformer, QuickGELU

__all__ = [
    "BackboneInfo",
    "BasicBlock",
    "Bottleneck",
    "CLIPVisionTransformer",
    "EfficientNetLite",
    "LoadReport",
    "QuickGELU",
    "ResNet",
    "backbone_fingerprint",
    "backbone_info",
    "build_backbone",
    "create_backbone",
    "describe_backbone",
    "imagenet_classifier",
    "list_backbones",
    "load_backbone_weights",
    "load_state_dict_file",
    "read_checkpoint",
    "register_backbone",
    "timm_vit_to_openai_clip",
]
