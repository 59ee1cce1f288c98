"""Quick start: learn a task with masks alone on a frozen, randomly initialised ResNet.

Run:  python examples/quickstart.py
A 2-class problem (horizontal vs vertical stripes under noise) is learned by the
masks over a frozen backbone plus a linear head; then the masks are merged into a
plain model.
"""

import torch
from torch import nn

from selfmask import MaskConfig, mask_model, mask_scores, mask_summary, merge_masks
from selfmask.backbones import build_backbone


def stripes(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 2, (n,), generator=g)
    phase = torch.rand(n, 1, 1, generator=g) * 6.28
    grid = torch.arange(32).float()
    rows = torch.sin(grid.view(1, 32, 1) * 0.8 + phase).expand(n, 32, 32)
    cols = torch.sin(grid.view(1, 1, 32) * 0.8 + phase).expand(n, 32, 32)
    img = torch.where(y.view(n, 1, 1) == 0, rows, cols)
    x = img.unsqueeze(1).expand(n, 3, 32, 32) + 0.8 * torch.randn(n, 3, 32, 32, generator=g)
    return x, y


def main() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    backbone = mask_model(build_backbone("resnet_tiny"), MaskConfig.preset("resnet"))
    head = nn.Linear(128, 2)
    opt = torch.optim.SGD(
        [{"params": list(mask_scores(backbone).values()), "lr": 50.0}, {"params": head.parameters(), "lr": 0.05}],
        momentum=0.9,
    )
    for step in range(60):
        x, y = stripes(64, g)
        loss = nn.functional.cross_entropy(head(backbone(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    backbone.eval()
    x, y = stripes(512, g)
    with torch.no_grad():
        acc = (head(backbone(x)).argmax(1) == y).float().mean().item()
    print(f"test accuracy with learned masks: {acc:.3f} (chance 0.5)")
    print(mask_summary(backbone))
    merged = merge_masks(backbone)
    with torch.no_grad():
        acc_merged = (head(merged(x)).argmax(1) == y).float().mean().item()
    print(f"after merge_masks (plain model): {acc_merged:.3f}")


if __name__ == "__main__":
    main()
