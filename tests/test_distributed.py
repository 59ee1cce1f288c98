"""Multi-process training (gloo, CPU): two processes train the masks one process trains on the same global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import make_stripes
from selfmask.backbones import backbone_info, build_backbone
from selfmask.errors import SelfmaskError
from selfmask.masking import current_masks, mask_scores
from selfmask.objectives import SwAVConfig
from selfmask.training.config import TrainConfig
from selfmask.training.distributed import (
    DistContext,
    check_world,
    init_distributed,
    local_slice,
    shard_range,
    shutdown,
)
from selfmask.training.run_folder import RunFolder
from selfmask.training.ssl import adapt_swav, gather_features
from selfmask.training.trainer import adapt

INFO = backbone_info("resnet_tiny")
WORLD = 2
# bn="eval": no batch statistics, so two half batches compute exactly what one global batch does
SUPERVISED = TrainConfig(epochs=2, batch_size=16, mask={"bn": "eval"}, augment=False, seed=3)
SWAV = TrainConfig(objective="swav", epochs=2, batch_size=16, mask={"bn": "eval"}, seed=3)
SWAV_RECIPE = SwAVConfig(num_prototypes=8, queue_length=0, freeze_prototypes_iters=1, projection_dim=16)


def _data():
    return make_stripes(32, seed=0, size=16)


def _backbone():
    torch.manual_seed(0)
    return build_backbone("resnet_tiny")


def fixed_crops(x: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Deterministic multi-crop views (no random draws): 2 large views + 2 small ones, per image."""
    v = x.float() / 255.0
    small = F.interpolate(v, size=8, mode="bilinear", align_corners=False)
    return [v, v.flip(3), small, small.flip(2)]


def _train(kind: str, run_dir: str | None = None, prepare: bool = True):
    data = _data()
    run = None
    if run_dir is not None:
        run = RunFolder(run_dir).prepare() if prepare else RunFolder(run_dir)
    if kind == "supervised":
        return adapt(_backbone(), INFO, data, SUPERVISED, progress=False)
    if kind == "swav":
        return adapt_swav(_backbone(), INFO, data, SWAV, SWAV_RECIPE, crops=fixed_crops, progress=False)
    if kind == "bn-train":  # per-process BatchNorm statistics, files from rank 0 only
        cfg = TrainConfig(epochs=1, batch_size=16, seed=3, checkpoint_every=1)
        return adapt(_backbone(), INFO, data, cfg, progress=False, run=run)
    raise ValueError(kind)


def _mean_pixel_features(backbone, dataset, mean, std, device="cpu") -> torch.Tensor:
    return dataset.images.float().mean(dim=(2, 3))


def _worker(rank: int, port: int, kind: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        # every process knows the run folder; rank 0 prepares it and is the only one to write
        run_dir = str(Path(out_dir) / "run") if kind == "bn-train" else None
        result = _train(kind, run_dir, prepare=rank == 0)
        gathered = gather_features(result.backbone, _data().subset(torch.arange(5)), INFO, "cpu", ctx,
                                   _mean_pixel_features)
        torch.save(
            {
                "scores": {k: v.detach().clone() for k, v in mask_scores(result.backbone).items()},
                "masks": current_masks(result.backbone),
                "loss": [row["loss"] for row in result.history],
                "gathered": gathered,
                "rank": ctx.rank,
                "world": ctx.world_size,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        shutdown(ctx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(kind: str, out: Path) -> list[dict]:
    mp.spawn(_worker, args=(_free_port(), kind, str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _assert_same_masks(a: dict, b: dict, atol: float) -> None:
    assert a["masks"].keys() == b["masks"].keys()
    for k in a["masks"]:
        assert torch.equal(a["masks"][k], b["masks"][k]), k
        torch.testing.assert_close(a["scores"][k], b["scores"][k], rtol=1e-5, atol=atol)


@pytest.mark.parametrize("kind", ["supervised", "swav"])
def test_two_processes_equal_one_process(kind, tmp_path) -> None:
    ranks = _run_two(kind, tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == WORLD for r in ranks)
    # DDP averages the score gradients: both processes hold the very same masks and scores
    for k in ranks[0]["scores"]:
        assert torch.equal(ranks[0]["scores"][k], ranks[1]["scores"][k]), k
        assert torch.equal(ranks[0]["masks"][k], ranks[1]["masks"][k]), k
    # ... and they are what one process computes on the same global batches (Sinkhorn over both halves)
    torch.manual_seed(0)
    single = _train(kind)
    ref = {"scores": {k: v.detach() for k, v in mask_scores(single.backbone).items()},
           "masks": current_masks(single.backbone)}
    _assert_same_masks(ranks[0], ref, atol=1e-4)
    assert sum(int((~m).sum()) for m in ref["masks"].values()) > 0  # masks moved: the comparison is not vacuous
    torch.testing.assert_close(torch.tensor(ranks[0]["loss"]), torch.tensor([r["loss"] for r in single.history]),
                               rtol=1e-4, atol=1e-5)
    # k-NN features: each process embeds its shard, every process receives all rows in order
    expected = _mean_pixel_features(None, _data().subset(torch.arange(5)), None, None)
    for r in ranks:
        torch.testing.assert_close(r["gathered"], expected)


def test_per_process_batchnorm_run_writes_once(tmp_path) -> None:
    ranks = _run_two("bn-train", tmp_path)
    for k in ranks[0]["scores"]:
        assert torch.equal(ranks[0]["scores"][k], ranks[1]["scores"][k]), k
    run = tmp_path / "run"
    assert (run / "scores.safetensors").is_file() and (run / "checkpoint.pt").is_file()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == WORLD and len(state["rng_ranks"]) == WORLD
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_world_checks_before_training() -> None:
    two = DistContext(rank=1, world_size=2)
    assert check_world(two, 16, 32) == 8
    assert local_slice(torch.arange(16), two).tolist() == list(range(8, 16))
    assert list(shard_range(5, two)) == [3, 4]
    with pytest.raises(SelfmaskError, match="not divisible by the 3 processes"):
        check_world(DistContext(rank=0, world_size=3), 16, 32)
    with pytest.raises(SelfmaskError, match="5 processes but the training set has only 4 images"):
        check_world(DistContext(rank=0, world_size=5), 5, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_where_there_is_none() -> None:
    with pytest.raises(SelfmaskError, match="CUDA is not available"):
        init_distributed("cuda")
    with pytest.raises(SelfmaskError, match="sync_bn needs a CUDA device"):
        TrainConfig(sync_bn=True)
