"""The CLIP image tower (a ViT) with OpenAI CLIP's exact parameter names, without the clip package.

Parameter names and shapes follow OpenAI CLIP's ``VisionTransformer`` (``model.py``)::

    conv1.weight                                  (width, 3, patch, patch), no bias
    class_embedding                               (width,)
    positional_embedding                          (grid**2 + 1, width)
    ln_pre.{weight,bias}
    transformer.resblocks.N.attn.in_proj_weight   (3*width, width)   nn.MultiheadAttention
    transformer.resblocks.N.attn.in_proj_bias     (3*width,)
    transformer.resblocks.N.attn.out_proj.{weight,bias}
    transformer.resblocks.N.ln_1.{weight,bias}
    transformer.resblocks.N.mlp.c_fc.{weight,bias}    (4*width, width)
    transformer.resblocks.N.mlp.c_proj.{weight,bias}  (width, 4*width)
    transformer.resblocks.N.ln_2.{weight,bias}
    ln_post.{weight,bias}
    proj                                          (width, output_dim)

so an OpenAI CLIP or open_clip ``visual.*`` state dict loads unchanged (the loader
strips the ``visual.`` prefix; timm's names are mapped in :mod:`selfmask.backbones.loading`).
The forward pass is CLIP's: patchify, prepend the class token, add positions,
``ln_pre``, pre-norm residual blocks with QuickGELU MLPs, ``ln_post`` on the class
token, then (optionally) the projection.

Two embeddings (``embedding=``):

* ``"class_token"`` (the default): the ``width``-d class token after ``ln_post``, before
  the projection (768-d for ViT-B/32). This is what the paper's authors use for k-NN,
  probes and the SwAV head (Hugging Face ``CLIPVisionModel(x)[1]``, METHOD.md section 3).
* ``"projected"``: ``ln_post(class token) @ proj``, OpenAI CLIP's ``encode_image``
  (``output_dim``-d, 512 for ViT-B/32), the embedding shared with the text tower.

``proj`` is a parameter either way, so the same checkpoints load. The paper masks q, k, v,
the output projection and both MLP layers (``MaskConfig``
preset ``"vit"``, METHOD.md section 1).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
from torch import nn


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the activation OpenAI CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in at least float32 whatever the input dtype (as OpenAI CLIP for half precision).

    A float64 input stays float64 (OpenAI's cast to float32 would fail against float64 weights).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        return super().forward(x.to(torch.promote_types(dtype, torch.float32))).to(dtype)


class ResidualAttentionBlock(nn.Module):
    """``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``; tokens are batch-first ``(B, L, D)``."""

    def __init__(self, width: int, heads: int, activation: Literal["quick_gelu", "gelu"] = "quick_gelu") -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = LayerNorm(width)
        act: nn.Module = QuickGELU() if activation == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", act), ("c_proj", nn.Linear(width * 4, width))])
        )
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock` named ``resblocks`` (CLIP's name)."""

    def __init__(self, width: int, layers: int, heads: int, activation: Literal["quick_gelu", "gelu"]) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, activation) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


#: The embeddings a :class:`CLIPVisionTransformer` can return; the first is the default.
CLIP_EMBEDDINGS = ("class_token", "projected")
EmbeddingName = Literal["class_token", "projected"]


class CLIPVisionTransformer(nn.Module):
    """OpenAI CLIP's image tower returning the class token (``width``-d) or the projected embedding.

    Args:
        input_resolution: image side in pixels (224 for ViT-B/32).
        patch_size: patch side in pixels (32 for ViT-B/32); must divide ``input_resolution``.
        width: token width (768 for ViT-B/32).
        layers: number of residual attention blocks (12).
        heads: attention heads (12); must divide ``width``.
        output_dim: size of the projected embedding (512).
        activation: ``"quick_gelu"`` (OpenAI CLIP) or ``"gelu"`` (exact GELU, as timm's
            ``vit_base_patch32_clip_224`` computes); the parameter layout is the same.
        embedding: ``"class_token"`` (``(batch, width)``, post-``ln_post`` class token, the
            authors' features) or ``"projected"`` (``(batch, output_dim)``, ``encode_image``).
    """

    def __init__(
        self,
        input_resolution: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        activation: Literal["quick_gelu", "gelu"] = "quick_gelu",
        embedding: EmbeddingName = "class_token",
    ) -> None:
        super().__init__()
        if input_resolution % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide input_resolution {input_resolution}")
        if width % heads:
            raise ValueError(f"heads {heads} does not divide width {width}")
        if activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"activation must be 'quick_gelu' or 'gelu', got {activation!r}")
        if embedding not in CLIP_EMBEDDINGS:
            raise ValueError(f"embedding must be one of {CLIP_EMBEDDINGS}, got {embedding!r}")
        self.input_resolution = input_resolution
        self.patch_size = patch_size
        self.output_dim = output_dim
        self.embedding = embedding
        self.embed_dim = width if embedding == "class_token" else output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        grid = input_resolution // patch_size
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, activation)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the last block, ``(batch, grid**2 + 1, width)``, before ``ln_post``."""
        if x.shape[-2:] != (self.input_resolution, self.input_resolution):
            raise ValueError(
                f"CLIPVisionTransformer expects {self.input_resolution}x{self.input_resolution} images, "
                f"got {tuple(x.shape[-2:])}"
            )
        x = self.conv1(x.to(self.conv1.weight.dtype))  # (B, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid**2, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.transformer(self.ln_pre(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.ln_post(self.forward_tokens(x)[:, 0, :])
        return cls if self.embedding == "class_token" else cls @ self.proj
