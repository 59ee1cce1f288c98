"""Backbones with torchvision / OpenAI CLIP parameter layouts, built without those libraries."""

from selfmask.backbones import zoo as _zoo  # noqa: F401  (registers the backbones)
from selfmask.backbones.loading import create_backbone, load_state_dict_file
from selfmask.backbones.registry import (
    BackboneInfo,
    backbone_info,
    build_backbone,
    list_backbones,
    register_backbone,
)
from selfmask.backbones.resnet import BasicBlock, Bottleneck, ResNet

__all__ = [
    "BackboneInfo",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "backbone_info",
    "build_backbone",
    "create_backbone",
    "list_backbones",
    "load_state_dict_file",
    "register_backbone",
]
