"""`selfmask backbones`: every registered backbone with its sizes, preset, parameters and checkpoint layouts."""

from __future__ import annotations

import json

from selfmask.backbones import list_backbones
from selfmask.cli import main


def test_backbones_lists_every_backbone(capsys) -> None:
    assert main(["backbones", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(list_backbones())
    clip = rows["vit_b_32_clip"]
    assert (clip["input_size"], clip["embed_dim"], clip["embedding"], clip["mask_preset"]) == (224, 768, "class_token", "vit")
    assert clip["embeddings"] == {"class_token": 768, "projected": 512}
    assert clip["parameters"] == 87_849_216 and clip["masked_tensors"] == 144  # q, k, v counted apart
    r50 = rows["resnet50"]
    assert (r50["embed_dim"], r50["parameters"], r50["embeddings"]) == (2048, 23_508_032, {"pooled": 2048})
    assert all(r["checkpoint_layouts"] for r in rows.values())
    assert any("timm" in layout for layout in clip["checkpoint_layouts"])
    assert main(["backbones"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in rows) and "class_token 768 (default), projected 512" in text
