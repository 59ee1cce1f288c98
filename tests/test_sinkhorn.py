"""Sinkhorn-Knopp: marginals, float64 reference, extreme logits, the distributed path, bad input."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from selfmask.errors import SelfmaskError
from selfmask.objectives import sinkhorn_knopp


def reference_sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """The public SwAV algorithm, exp domain, float64 (fine for cosine-similarity scores)."""
    q = torch.exp(scores.double() / epsilon).t()  # K x B
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def cosine_scores(batch: int, k: int, seed: int = 0, dim: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(batch, dim, generator=g), dim=1)
    c = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    return z @ c.t()


def test_rows_are_assignments_and_columns_share_the_batch() -> None:
    scores = cosine_scores(64, 20, dim=128)  # SwAV's 128-d projections
    q = sinkhorn_knopp(scores)
    assert q.shape == (64, 20)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64), atol=1e-5, rtol=0)
    # columns: B/K up to Sinkhorn's convergence error; a plain per-sample softmax is far from it,
    # 3 iterations get close and more iterations converge
    target = torch.full((20,), 64 / 20)
    err_softmax = (torch.softmax(scores / 0.05, dim=1).sum(dim=0) - target).abs().max().item()
    err3 = (q.sum(dim=0) - target).abs().max().item()
    err50 = (sinkhorn_knopp(scores, iterations=50, dtype=torch.float64).sum(dim=0) - target.double()).abs().max().item()
    assert err_softmax > 1.0
    assert err3 < 0.05 * 64 / 20
    assert err50 < 1e-6
    # the codes are a real transport plan, not uniform
    assert q.max().item() > 2.0 / 20


def test_prototype_marginal_is_exact_before_the_last_sample_step() -> None:
    # Undo the final sample rescaling: with 1 iteration the codes are Q_1 * B where Q_1 has
    # column sums 1/K before its row step. Reconstruct the pre-row-step matrix.
    scores = cosine_scores(32, 10, seed=3).double()
    pre = torch.softmax(scores / 0.05, dim=0) / 10  # prototype step: each column sums to 1/K
    torch.testing.assert_close(pre.sum(dim=0), torch.full((10,), 0.1, dtype=torch.float64))
    expected = pre / pre.sum(dim=1, keepdim=True)  # sample step, then * B: rows sum to 1
    torch.testing.assert_close(sinkhorn_knopp(scores, iterations=1, dtype=torch.float64), expected)


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_equals_float64_reference(iterations: int) -> None:
    scores = cosine_scores(48, 30, seed=iterations)
    ref = reference_sinkhorn(scores, iterations=iterations)
    out64 = sinkhorn_knopp(scores, iterations=iterations, dtype=torch.float64)
    torch.testing.assert_close(out64, ref, atol=1e-12, rtol=1e-10)
    out32 = sinkhorn_knopp(scores, iterations=iterations)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_logits_stay_finite(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    # more samples than prototypes: most samples are no prototype's best match, so every entry
    # of their rows underflows in the exp domain
    scores = torch.randn(64, 10, generator=g) * 1e4
    naive = reference_sinkhorn(scores)
    assert not torch.isfinite(naive).all()  # the failure mode this implementation avoids
    q = sinkhorn_knopp(scores, dtype=dtype)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64, dtype=dtype), atol=1e-5, rtol=0)
    # float32 and float64 agree: the log domain loses no more than rounding at this scale
    torch.testing.assert_close(
        sinkhorn_knopp(scores, dtype=torch.float32).double(), sinkhorn_knopp(scores, dtype=torch.float64), atol=1e-5, rtol=0
    )
    big = torch.full((4, 3), 1e4)
    big[0, 0] = -1e4
    assert torch.isfinite(sinkhorn_knopp(big)).all()


def test_scaling_logits_sharpens_codes_without_gradient() -> None:
    scores = cosine_scores(8, 5).requires_grad_(True)
    q = sinkhorn_knopp(scores)
    assert not q.requires_grad
    soft = sinkhorn_knopp(scores.detach(), epsilon=1.0)
    assert soft.max() < q.max()


class _ThreadWorld:
    """All-reduce between threads: a simulated process group of ``n`` ranks."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.barrier = threading.Barrier(n)
        self.slots: list[torch.Tensor | None] = [None] * n
        self.calls = 0

    def hook(self, rank: int):
        def all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            stacked = torch.stack([s for s in self.slots if s is not None])
            out = stacked.sum(0) if op == "sum" else stacked.amax(0)
            self.barrier.wait()
            if rank == 0:
                self.calls += 1
            return out

        return all_reduce


@pytest.mark.parametrize("sizes", [(8, 8), (5, 11)])
def test_distributed_halves_equal_single_process(sizes: tuple[int, int]) -> None:
    scores = cosine_scores(sum(sizes), 12, seed=7) * 3.0
    single = sinkhorn_knopp(scores)
    parts = scores.split(list(sizes))
    world = _ThreadWorld(2)
    results: list[torch.Tensor | None] = [None, None]
    errors: list[Exception] = []

    def run(rank: int) -> None:
        try:
            results[rank] = sinkhorn_knopp(parts[rank], all_reduce=world.hook(rank))
        except Exception as exc:  # noqa: BLE001  (surfaced below)
            errors.append(exc)
            world.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert world.calls > 0
    torch.testing.assert_close(torch.cat([results[0], results[1]]), single, atol=1e-6, rtol=1e-5)
    # without the hook each half is normalised on its own batch: a different answer
    alone = torch.cat([sinkhorn_knopp(p) for p in parts])
    assert (alone - single).abs().max() > 1e-3


def _gloo_worker(rank: int, world_size: int, init_file: str, scores: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        part = scores.chunk(world_size)[rank]
        q = sinkhorn_knopp(part)  # no hook: torch.distributed is initialised
        torch.save(q, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_real_two_process_gloo_equals_single_process(tmp_path) -> None:
    import torch.multiprocessing as mp

    scores = cosine_scores(12, 9, seed=11) * 2.0
    out = str(tmp_path / "codes")
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), scores, out), nprocs=2, join=True)
    parts = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    torch.testing.assert_close(torch.cat(parts), sinkhorn_knopp(scores), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scores": torch.zeros(5)}, "2-D"),
        ({"scores": torch.zeros(4, 1)}, "at least 2 prototypes"),
        ({"scores": torch.zeros(1, 6)}, "at least 2"),
        ({"scores": torch.zeros(4, 6), "epsilon": 0.0}, "epsilon"),
        ({"scores": torch.zeros(4, 6), "epsilon": math.inf}, "epsilon"),
        ({"scores": torch.zeros(4, 6), "iterations": 0}, "iterations"),
        ({"scores": torch.zeros(4, 6), "dtype": torch.float16}, "dtype"),
    ],
)
def test_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(SelfmaskError, match=match):
        sinkhorn_knopp(**kwargs)


def test_single_sample_in_a_distributed_batch_is_fine() -> None:
    # one sample locally, but the hook says the global batch has 3: no error
    def fake(t: torch.Tensor, op: str) -> torch.Tensor:
        return t * 3 if op == "sum" else t

    q = sinkhorn_knopp(torch.randn(1, 4), all_reduce=fake)
    assert torch.isfinite(q).all()


def test_codes_are_computed_in_the_runs_dtype() -> None:
    """Issue 17: a float64 run gets float64 codes (they were float32 whatever the run)."""
    from selfmask.objectives.swav_loss import assign_codes

    scores = cosine_scores(32, 12, seed=5).double()
    codes = assign_codes([scores, scores.flip(0)], crops_for_assign=(0, 1))
    assert all(c.dtype == torch.float64 for c in codes)
    torch.testing.assert_close(codes[0], reference_sinkhorn(scores, iterations=3), atol=1e-12, rtol=1e-10)
    assert sinkhorn_knopp(scores.float()).dtype == torch.float32
    assert sinkhorn_knopp(scores.to(torch.bfloat16)).dtype == torch.float32
