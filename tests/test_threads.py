"""``--threads``: one option for every command that trains or evaluates, and its default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfmask.cli import main
from selfmask.cli.common import THREADED_COMMANDS, default_threads, usable_cpus
from selfmask.cli.main import build_parser

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.mark.parametrize(
    "env, cpus, expected",
    [({"OMP_NUM_THREADS": "3"}, 8, 3), ({"OMP_NUM_THREADS": "2,1"}, 8, 2), ({}, 5, 5),
     ({"OMP_NUM_THREADS": ""}, 4, 4), ({"OMP_NUM_THREADS": "abc"}, 4, 4), ({"OMP_NUM_THREADS": "0"}, 4, 4)],
)
def test_default_threads_respects_omp_num_threads_then_the_usable_cpus(env, cpus, expected) -> None:
    assert default_threads(env, cpus) == expected


def test_usable_cpus_is_the_affinity_mask() -> None:
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no sched_getaffinity on this platform")
    assert usable_cpus() == len(os.sched_getaffinity(0))


def test_default_follows_a_narrowed_affinity_mask() -> None:
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity on this platform")
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from selfmask.cli.common import default_threads; print(default_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "1"


def test_every_training_or_evaluating_command_has_threads() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in THREADED_COMMANDS:
        assert "--threads" in sub.choices[name]._option_string_actions, name
    for name in ("pack", "inspect"):
        assert "--threads" not in sub.choices[name]._option_string_actions, name


def test_threads_is_set_while_the_command_runs_and_restored(tmp_path, monkeypatch) -> None:
    import selfmask.cli.bench as bench_cli

    before = torch.get_num_threads()
    want = 2 if before == 1 else 1
    seen: list[int] = []
    monkeypatch.setattr(bench_cli, "_run_gpu_suite", lambda args: seen.append(torch.get_num_threads()) or 0)
    assert main(["bench", "--suite", "gpu", "--smoke", "--threads", str(want), "--out", str(tmp_path)]) == 0
    assert seen == [want] and torch.get_num_threads() == before


def test_threads_zero_is_one_clear_line(capsys) -> None:
    assert main(["eval", "--threads", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["selfmask eval: error: --threads must be >= 1, got 0"]


def test_thread_benchmark_times_each_count_and_restores_threads() -> None:
    from selfmask.bench import thread_step_times

    before = torch.get_num_threads()
    out = thread_step_times(batch=2, threads=(1, 2), repeats=1, steps_per_block=1)
    assert torch.get_num_threads() == before
    assert out["step_s_1_threads"] > 0 and out["step_s_2_threads"] > 0 and out["1_over_1"] == 1.0
    assert out["2_over_1"] == pytest.approx(out["step_s_2_threads"] / out["step_s_1_threads"])
    with pytest.raises(ValueError, match="must be >= 1"):
        thread_step_times(threads=(0,))


def test_a_command_run_inside_another_keeps_the_outer_thread_count() -> None:
    import argparse

    from selfmask.cli.common import threads_from_args

    before = torch.get_num_threads()
    want = 2 if default_threads() == 1 else 1
    with threads_from_args(argparse.Namespace(threads=want)):  # e.g. selfmask reproduce --threads N
        with threads_from_args(argparse.Namespace(threads=None)) as inner:  # one of its steps
            assert inner == want and torch.get_num_threads() == want
        with threads_from_args(argparse.Namespace(threads=3)) as explicit:
            assert explicit == 3
        assert torch.get_num_threads() == want
    assert torch.get_num_threads() == before
