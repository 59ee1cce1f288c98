"""Model cascade: router, fusion, build, save/load, conditional inference, bad input (METHOD.md section 4)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from selfmask.backbones import backbone_info, create_backbone
from selfmask.cascade import (
    Cascade,
    CascadeConfig,
    FusionPCA,
    Router,
    build_cascade,
    concat_parts,
    evaluate_cascade,
    fit_router,
    time_inference,
)
from selfmask.data.embedded import load_embedded
from selfmask.data.multicrop import MultiCrop
from selfmask.errors import SelfmaskError
from selfmask.objectives import SwAVConfig
from selfmask.training.config import TrainConfig
from selfmask.training.run_folder import RunFolder
from selfmask.training.ssl import adapt_swav

BACKBONE = "resnet_tiny"


def _blobs(n_per: int, centres: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, dim, generator=gen) * 4
    return torch.cat([means[c] + torch.randn(n_per, dim, generator=gen) for c in range(centres)]).float()


@pytest.mark.parametrize("method", ["gmm", "kmeans"])
def test_router_finds_separated_groups_and_routes_as_fitted(method: str) -> None:
    x = _blobs(40, 3)
    router, groups = fit_router(x, 3, method, dim=5, min_group_size=4, seed=0)
    assert router.num_groups == 3 and groups.shape == (120,)
    for c in range(3):  # each true blob lands in one group
        assert len(torch.unique(groups[c * 40 : (c + 1) * 40])) == 1
    again = Router.from_tensors(method, {k: v.clone() for k, v in router.tensors.items()})
    assert torch.equal(again.route(x), groups)


def test_router_matches_sklearn_gaussian_mixture_predictions() -> None:
    from sklearn.mixture import GaussianMixture

    x = _blobs(30, 4, seed=3)
    router, groups = fit_router(x, 4, "gmm", dim=6, min_group_size=2, seed=1)
    z = router.project(x).numpy()
    gm = GaussianMixture(4, covariance_type="full", random_state=1, reg_covar=1e-4).fit(z)
    assert (torch.from_numpy(gm.predict(z)) == groups).all()


def test_router_merges_groups_left_too_small_and_says_so() -> None:
    x = torch.cat([_blobs(50, 2, seed=1), _blobs(3, 1, seed=7) + 40])  # a 3-image outlier cluster
    router, groups = fit_router(x, 3, "kmeans", dim=4, min_group_size=10, seed=0)
    assert router.num_groups == 2
    assert torch.bincount(groups).min() >= 10
    assert any("dissolved" in n for n in router.notes)


def test_router_refuses_more_groups_than_images() -> None:
    with pytest.raises(SelfmaskError, match="5 groups asked for, but only 4"):
        fit_router(torch.randn(4, 8), 5)


def test_conditional_concat_zeroes_other_experts_and_fusion_pca_is_deterministic() -> None:
    root = torch.randn(6, 4)
    routes = torch.tensor([0, 1, 1, 0, 1, 1])
    experts = [torch.randn(2, 4), torch.randn(4, 4)]
    cat = concat_parts(root, experts, routes)
    assert cat.shape == (6, 12)
    assert (cat[routes == 0, 8:] == 0).all() and (cat[routes == 1, 4:8] == 0).all()
    assert torch.allclose(cat[routes == 1, 8:].norm(dim=1), torch.ones(4, dtype=torch.float64))
    a, b = FusionPCA.fit(cat, 3), FusionPCA.fit(cat.clone(), 3)
    assert torch.equal(a(cat), b(cat)) and a(cat).shape == (6, 3)


def test_config_validation() -> None:
    with pytest.raises(SelfmaskError, match="router"):
        CascadeConfig(router="dbscan")
    with pytest.raises(SelfmaskError, match="min_group_size"):
        CascadeConfig(min_group_size=1)
    with pytest.raises(SelfmaskError, match="num_experts"):
        CascadeConfig(num_experts=0)


# ---------------------------------------------------------------------- end to end on the tiny benchmark
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    root = tmp_path_factory.mktemp("cascade")
    bench = load_embedded(seed=0, cache_dir=root / "data", size="tiny")
    train, test = bench.downstream_train.subset(torch.arange(96)), bench.downstream_test
    info = backbone_info(BACKBONE)
    torch.manual_seed(0)
    backbone = create_backbone(BACKBONE)
    cfg = TrainConfig(method="mask", objective="swav", epochs=1, batch_size=24, lr=50.0, seed=0, mask={"bn": "eval"})
    swav = SwAVConfig(num_prototypes=16, queue_length=0, freeze_prototypes_iters=0)
    crops = MultiCrop.for_input_size(info.input_size, seed=0, mean=info.mean, std=info.std, n_small=2)
    run = RunFolder(root / "dispatcher").prepare()
    adapt_swav(backbone, info, train, cfg, swav, crops=crops, run=run, progress=False)
    ccfg = CascadeConfig(num_experts=3, router="kmeans", router_dim=8, min_group_size=8, fusion_dim=32, seed=0)
    cascade, report = build_cascade(run.path, train, root / "cascade", ccfg)
    return {"root": root, "train": train, "test": test, "cascade": cascade, "report": report, "dispatcher": run.path}


def test_build_trains_one_expert_per_group_with_the_dispatchers_step_budget(built) -> None:
    report = built["report"]
    assert report["dispatcher_steps"] == 96 // 24
    assert sum(report["group_sizes"]) == len(built["train"])
    assert len(report["experts"]) == built["cascade"].num_experts == len(report["group_sizes"])
    for row in report["experts"]:
        # epochs are whole: the step count is the dispatcher's rounded to a whole number of group epochs
        per_epoch = row["train_images"] // row["batch_size"]
        assert abs(row["steps"] - report["dispatcher_steps"]) <= per_epoch / 2 + 1e-9 or row["epochs"] == 1
    folder = built["root"] / "cascade"
    manifest = json.loads((folder / "cascade.json").read_text())
    assert manifest["format"] == "selfmask.cascade" and len(manifest["experts"]) == built["cascade"].num_experts
    assert (folder / "root.mask").is_file() and (folder / "router.safetensors").is_file()


def test_experts_start_from_the_dispatcher_and_differ_after_training(built) -> None:
    from selfmask.storage import load_mask

    folder = built["root"] / "cascade"
    torch.manual_seed(0)
    base = create_backbone(BACKBONE)  # the dispatcher's base: masks may be coded given its weights
    root = load_mask(folder / "root.mask", base=base)
    ex = load_mask(folder / "expert-0.mask", base=base)
    assert set(root.masks) == set(ex.masks)
    changed = sum(int((root.masks[k] != ex.masks[k]).sum()) for k in root.masks)
    assert changed > 0  # lr 50 flips scores within a few steps
    run_cfg = json.loads((folder / "runs" / "expert-0" / "config.json").read_text())
    assert run_cfg["train"]["init_from"] == str(built["dispatcher"]) and run_cfg["train"]["objective"] == "swav"


def test_experts_train_with_the_dispatchers_own_objective_dino(tmp_path) -> None:
    from selfmask.objectives.dino import DINOConfig
    from selfmask.training.ssl import adapt_ssl

    torch.set_num_threads(min(2, torch.get_num_threads()))
    bench = load_embedded(seed=0, cache_dir=tmp_path / "data", size="tiny")
    train = bench.downstream_train.subset(torch.arange(48))
    info = backbone_info(BACKBONE)
    torch.manual_seed(0)
    backbone = create_backbone(BACKBONE)
    cfg = TrainConfig(method="mask", objective="dino", epochs=1, batch_size=24, lr=50.0, seed=0, mask={"bn": "eval"})
    dino = DINOConfig(out_dim=16, hidden_dim=16, bottleneck_dim=8, freeze_last_layer_iters=1, head_batchnorm=True)
    crops = MultiCrop.for_input_size(info.input_size, seed=0, mean=info.mean, std=info.std, n_small=2)
    run = RunFolder(tmp_path / "dispatcher").prepare()
    adapt_ssl(backbone, info, train, cfg, dino, crops=crops, run=run, progress=False)
    ccfg = CascadeConfig(num_experts=2, router="kmeans", router_dim=8, min_group_size=8, fusion_dim=16, seed=0)
    cascade, _report = build_cascade(run.path, train, tmp_path / "cascade", ccfg)
    for g in range(cascade.num_experts):
        expert = json.loads((tmp_path / "cascade" / "runs" / f"expert-{g}" / "config.json").read_text())
        assert expert["train"]["objective"] == "dino" and expert["dino"]["out_dim"] == 16


def test_root_through_the_bank_equals_the_dispatcher_run_model(built) -> None:
    from selfmask.storage import load_run

    cascade, test = built["cascade"], built["test"]
    model = load_run(built["dispatcher"]).model.eval()
    info = cascade.info
    from selfmask.data.base import normalize_batch

    with torch.no_grad():
        expected = model(normalize_batch(test.images[:16], info.mean, info.std))
    assert torch.equal(cascade.embed_single(test.images[:16]), expected)


def test_saved_cascade_reloads_with_identical_embeddings(built) -> None:
    cascade, test = built["cascade"], built["test"]
    loaded = Cascade.load(built["root"] / "cascade", BACKBONE)
    for mode in ("conditional", "unconditional"):
        a = cascade.embed(test.images, mode)
        b = loaded.embed(test.images, mode)
        assert a.shape == (len(test), 32) and torch.equal(a, b)
    assert loaded.router.notes == cascade.router.notes


def test_conditional_runs_root_plus_present_experts_on_their_images_only(built) -> None:
    cascade, test = built["cascade"], built["test"]
    images = test.images[:40]
    _root, experts, routes = cascade.embed_parts(images, "conditional")
    stats = cascade.last_stats
    present = torch.unique(routes).tolist()
    assert stats.forward_passes == 1 + len(present)
    assert stats.images_per_pass["root"] == 40
    for g in range(cascade.num_experts):
        n = int((routes == g).sum())
        assert (experts[g] is None) == (n == 0)
        if n:
            assert stats.images_per_pass[f"expert-{g}"] == n
    one = images[routes == present[0]][:3]  # images all routed to one expert: 2 passes
    cascade.embed(one, "conditional")
    assert cascade.last_stats.forward_passes == 2
    cascade.embed(images, "unconditional")
    assert cascade.last_stats.forward_passes == 1 + cascade.num_experts
    # batching does not change the result
    assert torch.allclose(cascade.embed(images, "conditional", batch_size=7), cascade.embed(images, "conditional"),
                          atol=1e-5)


def test_evaluation_storage_and_timing_report_every_variant(built) -> None:
    cascade = built["cascade"]
    rows = evaluate_cascade(cascade, built["train"], built["test"], knn_k=20, linear_probe=False)
    assert set(rows) == {"pretrained", "single_smn", "conditional", "unconditional"}
    assert all(0.0 <= r["knn_accuracy"] <= 1.0 and r["knn"]["k"] == 20 for r in rows.values())
    bits = cascade.storage_bits()
    assert bits["masks"] == 1 + cascade.num_experts
    assert bits["raw_mask_bits"] == bits["masks"] * bits["masked_weights_per_mask"]
    assert 0 < bits["coded_mask_bits"] and bits["fusion_bits"]["conditional"] > 0
    t = time_inference(cascade, built["test"].images[:16], repeats=1)
    assert t["single_smn"]["forward_passes"] == 1
    assert t["unconditional"]["forward_passes"] == 1 + cascade.num_experts


def test_missing_or_mismatched_mask_file_is_a_clear_error(built, tmp_path) -> None:
    src = built["root"] / "cascade"
    broken = tmp_path / "c"
    shutil.copytree(src, broken, ignore=shutil.ignore_patterns("runs"))
    (broken / "expert-1.mask").unlink()
    with pytest.raises(SelfmaskError, match="expert 1 mask file 'expert-1.mask' is missing"):
        Cascade.load(broken, BACKBONE)
    shutil.copy(src / "expert-0.mask", broken / "expert-1.mask")  # a valid mask file, but not this expert's
    with pytest.raises(SelfmaskError, match="does not match the manifest"):
        Cascade.load(broken, BACKBONE)
    other = tmp_path / "d"
    shutil.copytree(src, other, ignore=shutil.ignore_patterns("runs"))
    torch.manual_seed(123)
    with pytest.raises(SelfmaskError, match="fingerprint"):
        Cascade.load(other, create_backbone(BACKBONE))  # different base weights
    with pytest.raises(SelfmaskError, match="not a cascade folder"):
        Cascade.load(tmp_path, BACKBONE)


def test_build_refuses_more_experts_than_images(built, tmp_path) -> None:
    few = built["train"].subset(torch.arange(4))
    with pytest.raises(SelfmaskError, match="5 experts asked for"):
        build_cascade(built["dispatcher"], few, tmp_path / "x", CascadeConfig(num_experts=5))


def test_cli_reports_a_folder_that_is_not_a_run(tmp_path, capsys) -> None:
    from selfmask.cli.main import main

    assert main(["cascade", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_cli_builds_evaluates_and_records_a_cascade(built, tmp_path, capsys) -> None:
    from selfmask.cli.main import main

    out = tmp_path / "c"
    argv = ["cascade", str(built["dispatcher"]), "--out", str(out), "--data", "embedded-tiny", "--cache-dir",
            str(built["root"] / "data"), "--experts", "2", "--router", "kmeans", "--router-dim", "8",
            "--min-group-size", "8", "--fusion-dim", "16", "--no-probe", "--no-progress", "--time-images", "8"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["data"] == "embedded-tiny" and results["build"]["group_sizes"]
    assert set(results["evaluation"]) >= {"single_smn", "unconditional"}
    for name, row in results["evaluation"].items():
        assert f"{name}: k-NN {row['knn_accuracy']:.4f}" in printed
