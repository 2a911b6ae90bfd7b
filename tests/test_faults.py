"""Faults across ranks, with real processes and real gloo collectives: decisions no rank may take alone, averaging that
leaves no worker's buffers behind, the explicit collective timeout, an --overwrite that cannot strand a run,
and what is seeded per rank and worker. (The hung-peer test is test_resume's two-machine test; NCCL itself
needs a GPU, which CI does not have.)"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
import torch
from launching import (
    ENV,
    ROOT,
    checkpoints,
    free_port,
    kill_when,
    needs_fashion,
    run_on_ranks,
    start,
    tiny_recipe,
    train_command,
)

from swap_accel.algorithm.phase2 import _member_seed
from swap_accel.checkpointing.resume import restore_loop
from swap_accel.checkpointing.saver import loop_state
from swap_accel.data.sampling import WORKER_RNG

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from swap_accel.parallel.distributed import broadcast_object, flat_state, make_accelerator
    from swap_accel.algorithm.phase3 import average_workers_
    from swap_accel.algorithm.loop import TrainingDiverged, require_finite
    from swap_accel.parallel.distributed import all_true
    from swap_accel.checkpointing.resume import Start

    acc = make_accelerator(timeout_minutes=7)
    rank, out = acc.process_index, {}
    import torch.distributed as dist
    out["pg_timeout_s"] = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")) \\
        .options._timeout.total_seconds()

    # 1. NaN in rank 1's BN statistics only: both ranks stop, neither waits at the checkpoint barrier.
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    if rank == 1:
        net[1].running_var[0] = float("nan")
    ckpt = type("C", (), {"last_good": None})()
    try:
        require_finite(net, "probe", ckpt, agree=lambda finite: all_true(finite, acc))
        out["stopped"] = False
    except TrainingDiverged:
        out["stopped"] = True

    # 2. A non-BN float buffer is averaged with the parameters (an EMA, say), not left as one worker's.
    class WithBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.full((3,), float(rank)))
            self.register_buffer("ema", torch.full((2,), 10.0 * (rank + 1)))
            self.register_buffer("count", torch.tensor(rank))  # integer: left alone
    m = WithBuffer()
    average_workers_(m, flat_state(m), 2, acc)
    out["w"], out["ema"], out["count"] = m.w.tolist(), m.ema.tolist(), int(m.count)

    # 3. Rank 0 decides where the run resumes; a rank whose view lags takes rank 0's decision.
    mine = Start(phase1_step=Path(f"/seen/by/rank{rank}"))
    out["start"] = str(broadcast_object(mine if rank == 0 else None, acc).phase1_step)
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(out))
""")


def test_rank_decisions_buffers_and_timeout_with_two_real_processes(tmp_path):
    results = run_on_ranks(SCRIPT, tmp_path)
    for out in results:
        assert out["stopped"] is True  # both, although only rank 1 holds the NaN
        assert out["w"] == [0.5] * 3 and out["ema"] == [15.0, 15.0]
        assert out["start"] == "/seen/by/rank0"
        assert out["pg_timeout_s"] == 7 * 60  # the recipe's collective_timeout_minutes, not gloo's 30 min default
    assert sorted(out["count"] for out in results) == [0, 1]


def test_python_random_is_seeded_per_worker_and_member_and_resumes(tmp_path):
    """Streaming sources' timm transforms draw from Python's `random`: each worker and each member
    of a group gets its own stream, and a checkpoint carries it."""
    seeds = {(w, m): _member_seed(0, WORKER_RNG, w, member=m) for w in range(3) for m in range(2)}
    assert len(set(seeds.values())) == len(seeds)
    import random

    random.seed(seeds[(1, 0)])
    state = loop_state(torch.zeros(4), torch.Generator())
    expected = [random.random() for _ in range(3)]
    (tmp_path / "manifest.json").write_text(json.dumps({"result": {}, "epoch": 0, "step_in_epoch": 0}))
    torch.save(state, tmp_path / "member0.pt")
    random.seed(12345)
    restore_loop(tmp_path, "member0.pt", object(), torch.Generator(),
                 torch.device("cpu"))
    assert [random.random() for _ in range(3)] == expected


@needs_fashion
def test_an_interrupted_overwrite_resumes_instead_of_stranding(tmp_path, data_cache):
    """`--overwrite` removes every old output first. Killed mid-way, the run directory is an unfinished
    run of the new recipe, which the same command without --overwrite resumes."""
    out = tmp_path / "run"
    (out / "workers").mkdir(parents=True)
    for name in ("results.json", "model.safetensors", "figure1.png", "workers/worker0.safetensors"):
        (out / name).write_text("an old finished run")
    recipe = tiny_recipe(tmp_path, data_cache, checkpoint={"every_steps": 5})
    cmd = train_command(recipe, out, "--num_processes", "2", "--main_process_port", str(free_port()))
    kill_when(start([*cmd, "--overwrite"], tmp_path / "killed.log"), lambda: bool(checkpoints(out, "p1-step*")))
    for name in ("results.json", "model.safetensors", "figure1.png", "workers"):
        assert not (out / name).exists(), name
    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **ENV}, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["resumed_from"]["phase1_step"], r["resumed_from"]


@pytest.mark.parametrize(("recipe", "epochs"), [("cifar100", 10), ("cifar10", 30)])
def test_cifar_phase2_epochs_are_the_papers(recipe, epochs):
    from swap_accel.recipe import load_recipe

    assert load_recipe(ROOT / "recipes" / f"{recipe}.yaml").phase2.epochs == epochs
