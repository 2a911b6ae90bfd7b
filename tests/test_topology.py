"""Workers are not processes, with real processes, real gloo collectives and real Fashion-MNIST:
worker groups (P = 4, W = 2; P = 2, W = 1 in test_samples.py), several workers per process in turn (P = 2, W = 4, with a
SIGKILL in the third worker), and `average` over two --from-phase1 runs with different seeds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from launching import (
    ENV,
    ROOT,
    checkpoints,
    free_port,
    kill_when,
    launch,
    needs_fashion,
    run_on_ranks,
    start,
    tensors_equal,
    tiny_recipe,
    train_command,
)
from safetensors.torch import load_file
from typer.testing import CliRunner

from swap_accel.cli import app
from swap_accel.data.sampling import digest, worker_order, worker_shard
from swap_accel.models import build_model
from swap_accel.recipe import RecipeError, load_recipe
from swap_accel.topology import WorkerLayout, layout_error

pytestmark = [needs_fashion, pytest.mark.slow]
N = 2048  # tiny_recipe's training subset
# 4 processes need a global batch divisible by 4 and a micro-batch dividing the per-process batch.
GROUPS4 = {"global_batch_size": 256, "micro_batch_size": 32}


def _param_names() -> list[str]:
    module = build_model("resnet9", in_chans=1, num_classes=10, kwargs={"base_width": 8})
    return [name for name, _ in module.named_parameters()]


def _run(tmp: Path, data_cache: Path, processes: int, workers: int, **sections) -> dict:
    recipe = tiny_recipe(tmp, data_cache, phase2={"workers": workers}, **sections)
    out = tmp / "run"
    result = launch(processes, recipe, out, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"recipe": load_recipe(recipe), "recipe_path": recipe, "out": out,
            "results": json.loads((out / "results.json").read_text()),
            "ranks": [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in range(processes)]}


@pytest.fixture(scope="module")
def groups(tmp_path_factory, data_cache):
    return _run(tmp_path_factory.mktemp("p4w2"), data_cache, 4, 2, phase1=GROUPS4)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, data_cache):
    return _run(tmp_path_factory.mktemp("p2w4"), data_cache, 2, 4, checkpoint={"every_steps": 5})


# ------------------------------------------------------------------------------------------- pure layout


def test_layouts_map_ranks_to_workers():
    groups = WorkerLayout(workers=2, processes=4)
    assert [groups.workers_of(r) for r in range(4)] == [[0], [0], [1], [1]]
    assert [groups.member_of(r) for r in range(4)] == [0, 1, 0, 1] and groups.group_ranks(1) == [2, 3]
    turns = WorkerLayout(workers=8, processes=2)
    assert turns.workers_of(0) == [0, 2, 4, 6] and turns.workers_of(1) == [1, 3, 5, 7]
    assert turns.processes_per_worker == 1 and turns.workers_per_process == 4
    assert WorkerLayout(workers=3, processes=3).workers_of(2) == [2]


@pytest.mark.parametrize("workers", [0, 3, 5, -2])
def test_workers_that_do_not_fit_are_one_line_naming_valid_values(workers):
    message = layout_error(workers, 4)
    assert f"phase2.workers={workers} does not fit 4 processes" in message
    assert "(1, 2, 4:" in message and "(8, 12, 16, ...:" in message and "\n" not in message


def test_recipe_checks_the_layout_before_any_process_group(tmp_path, data_cache):
    recipe = load_recipe(tiny_recipe(tmp_path, data_cache), ["phase2.workers=3"])
    with pytest.raises(RecipeError, match="phase2.workers=3 does not fit 2 processes"):
        recipe.check_processes(2)
    recipe = load_recipe(tiny_recipe(tmp_path, data_cache), ["phase2.workers=1", "phase2.per_worker_batch_size=101"])
    with pytest.raises(RecipeError, match="per_worker_batch_size=101 is not divisible by the 2 processes"):
        recipe.check_processes(2)
    recipe = load_recipe(tiny_recipe(tmp_path, data_cache), ["phase2.workers=4", "tracking.averaged_curve=1"])
    with pytest.raises(RecipeError, match="averaged_curve=1 needs every worker at once"):
        recipe.check_processes(2)
    # ... and the launcher's processes all stop with that line, before training.
    result = launch(2, tiny_recipe(tmp_path, data_cache, phase2={"workers": 3}), tmp_path / "bad")
    assert result.returncode != 0 and "phase2.workers=3 does not fit 2 processes" in result.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("members", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [2048, 2001, 203])
def test_a_groups_shards_cover_the_workers_order_once(members, n):
    order = torch.randperm(n)
    shards = [worker_shard(order, batch_size=100, member=j, members=members) for j in range(members)]
    assert sorted(torch.cat([s for s, _ in shards]).tolist()) == list(range(n))
    steps = {len(sizes) for _, sizes in shards}
    assert len(steps) == 1 and all(min(sizes) > 0 for _, sizes in shards)  # every member takes every step
    if members == 1:
        assert shards[0][0].equal(order) and shards[0][1] == [len(c) for c in order.split(100)]


# --------------------------------------------------------------------------- P = 4, W = 2: worker groups


def test_group_members_end_bitwise_equal_and_groups_differ(groups):
    records = [rank["phase2"] for rank in groups["ranks"]]
    assert [[(r["worker"], r["member"]) for r in rec] for rec in records] == [[(0, 0)], [(0, 1)], [(1, 0)], [(1, 1)]]
    params = [rec[0]["params"] for rec in records]
    assert params[0] == params[1] and params[2] == params[3] and params[0] != params[2]
    # Members share the phase-1 start, so the groups' difference comes from phase 2 alone.
    assert len({rank["phase1"]["params"] for rank in groups["ranks"]}) == 1


def test_groups_reduce_only_inside_themselves(groups):
    r = groups["results"]
    c, steps, epochs = r["collectives"], r["phase2"]["steps_per_worker"], r["phase2"]["epochs"]
    assert c["phase2"]["calls"] == 0  # nothing between the groups
    # Inside a group, per step one gradient all-reduce per DDP bucket (the tiny model fits one); per epoch one sum
    # of the epoch's loss/accuracy and one broadcast of the leader's BN statistics; once, the leader's decision of
    # where the worker starts.
    assert c["phase2_in_group"]["calls"] == steps + 2 * epochs + 1
    assert r["phase2"]["processes_per_worker"] == 2 and r["phase2"]["workers"] == 2


def test_each_group_visits_every_sample_once_per_epoch_in_its_own_order(groups):
    epochs = groups["recipe"].phase2.epochs
    for rank in groups["ranks"]:
        (record,) = rank["phase2"]
        assert record["samples_per_epoch"] == [N] * epochs  # summed over the group's members
        assert record["order_digests"] == [digest(worker_order(N, seed=0, worker=record["worker"], epoch=e))
                                           for e in range(epochs)]
    assert groups["ranks"][0]["phase2"][0]["order_digests"] != groups["ranks"][2]["phase2"][0]["order_digests"]


def test_group_average_is_the_mean_of_the_two_workers(groups):
    out = groups["out"]
    w0, w1 = (load_file(out / "workers" / f"worker{k}.safetensors") for k in range(2))
    assert not (out / "workers" / "worker2.safetensors").exists()
    final = load_file(out / "model.safetensors")
    for name in _param_names():
        # Only the groups' leaders contribute (the other members add zeros): a + b, exactly, in any order.
        assert torch.equal(final[name], (w0[name] + w1[name]) / 2), name
    assert [w["index"] for w in groups["results"]["workers"]] == [0, 1]


# P = 2, W = 1 (one group of two) is `mode: swa`'s layout: tests/test_samples.py runs it, with these checks too.


# ------------------------------------------------------- P = 2, W = 4: two workers per process in turn


def test_four_distinct_workers_each_visit_every_sample_in_their_own_order(sequential):
    records = {x["worker"]: x for rank in sequential["ranks"] for x in rank["phase2"]}
    assert sorted(records) == [0, 1, 2, 3]
    assert [x["worker"] for x in sequential["ranks"][0]["phase2"]] == [0, 2]  # worker k on rank k mod P
    assert len({x["params"] for x in records.values()}) == 4
    epochs = sequential["recipe"].phase2.epochs
    for k, x in records.items():
        assert x["samples_per_epoch"] == [N] * epochs
        assert x["order_digests"] == [digest(worker_order(N, seed=0, worker=k, epoch=e)) for e in range(epochs)]
    r = sequential["results"]
    assert [w["index"] for w in r["workers"]] == [0, 1, 2, 3] and r["collectives"]["phase2"]["calls"] == 0
    # Measured wall clock (two workers in turn) and the parallel-equivalent time (the slowest single worker).
    assert r["phase2"]["seconds"] >= 1.5 * r["phase2"]["slowest_worker_seconds"]
    assert r["training_seconds"]["parallel_equivalent"] < r["training_seconds"]["measured"]
    assert r["critical_path_steps"] == r["phase1"]["steps"] + r["phase2"]["steps_per_worker"]


def test_sequential_average_is_the_mean_of_the_four_saved_workers(sequential):
    out = sequential["out"]
    workers = [load_file(out / "workers" / f"worker{k}.safetensors") for k in range(4)]
    final = load_file(out / "model.safetensors")
    for name in _param_names():
        mean = torch.stack([w[name] for w in workers]).sum(0) / 4
        # Each process sums its two workers, then gloo adds the two sums: float32 rounding only.
        torch.testing.assert_close(final[name], mean, rtol=1e-6, atol=1e-7)
        assert not torch.equal(final[name], workers[0][name])


def test_sigkill_in_the_third_worker_then_rerun_gives_the_uninterrupted_result(sequential, tmp_path, data_cache):
    recipe = tiny_recipe(tmp_path, data_cache, phase2={"workers": 4}, checkpoint={"every_steps": 5})
    out = tmp_path / "run"
    cmd = train_command(recipe, out, "--num_processes", "2", "--main_process_port", str(free_port()))
    # Rank 0 trains worker 0, then worker 2: kill mid-way through worker 2's second epoch (21 steps per epoch).
    kill_when(start(cmd, tmp_path / "killed.log"),
               lambda: any(int(p.name.rsplit("step", 1)[1]) >= 25 for p in checkpoints(out, "p2-w2-step*")))
    assert checkpoints(out, "p2-w0-end") and not checkpoints(out, "p2-w2-end")
    assert not (out / "results.json").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **ENV}, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    resumed = json.loads((out / "results.json").read_text())["resumed_from"]["workers"]
    assert resumed["0"]["end"] and resumed["2"]["step"], resumed
    assert tensors_equal(out / "model.safetensors", sequential["out"] / "model.safetensors") == []
    for k in range(4):
        assert tensors_equal(out / "workers" / f"worker{k}.safetensors",
                              sequential["out"] / "workers" / f"worker{k}.safetensors") == []


# ------------------------------------------- `average` over workers of two --from-phase1 runs (seeds 0, 1)


def test_average_accepts_workers_of_two_runs_that_share_one_phase1(sequential, tmp_path, data_cache):
    """Worker identity is (phase-1 origin, seed, worker index): worker 0 of seed 1 is not worker 0 of seed 0."""
    other = tmp_path / "seed1"
    recipe = tiny_recipe(tmp_path, data_cache, seed=1, phase2={"workers": 2})
    result = launch(2, recipe, other, "--from-phase1", str(sequential["out"]), env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    avg = tmp_path / "avg"
    cmd = [sys.executable, "-m", "swap_accel", "average", str(sequential["out"] / "checkpoints" / "p2-w0-end"),
           str(sequential["out"] / "checkpoints" / "p2-w1-end"), str(other), "--recipe", str(recipe), "--out", str(avg)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **ENV}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((avg / "results.json").read_text())
    assert [(w["index"], w["seed"]) for w in r["workers"]] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    workers = [load_file(run / "workers" / f"worker{k}.safetensors")
               for run in (sequential["out"], other) for k in (0, 1)]
    final = load_file(avg / "model.safetensors")
    for name in _param_names():
        torch.testing.assert_close(final[name], torch.stack([w[name] for w in workers]).sum(0) / 4, rtol=1e-6,
                                   atol=1e-7)
    # One checkpoint given twice (here under two paths) is still refused.
    same = sequential["out"] / "checkpoints" / ".." / "checkpoints" / "p2-w0-end"
    twice = CliRunner().invoke(app, [*cmd[3:5], str(same), "--recipe", str(recipe), "--out", str(tmp_path / "twice")])
    assert twice.exit_code == 2 and "are the same worker checkpoint" in twice.stderr, twice.stderr[-2000:]


@pytest.mark.parametrize(("recipe", "processes", "expected"), [
    ("imagenet", 16, "2 worker(s) of 8 processes each"),  # the paper's section 5.2 layout
    ("cifar10", 8, "8 worker(s), one per process"), ("cifar10", 2, "8 workers, 4 per process trained in turn"),
    ("cifar100", 8, "8 worker(s), one per process"), ("fashion_mnist", 2, "2 worker(s), one per process"),
])
def test_shipped_recipes_lay_out_the_papers_workers(recipe, processes, expected):
    parsed = load_recipe(ROOT / "recipes" / f"{recipe}.yaml")
    parsed.check_processes(processes)
    assert parsed.worker_layout(processes).describe() == expected


SHARD_WEIGHT_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    import torch.distributed as dist
    import torch.nn.functional as F
    from swap_accel.data.sources import InMemorySource
    from swap_accel.parallel.distributed import data_parallel, make_accelerator
    from swap_accel.algorithm.loop import LoopContext
    from swap_accel.algorithm.loop import make_sgd
    from swap_accel.algorithm.phase2 import train_phase2
    from swap_accel.recipe import AugmentConfig, LRConfig, OptimizerConfig, Phase2Config
    from swap_accel.data.sampling import worker_order
    from swap_accel.algorithm.schedules import make_schedule
    from swap_accel.checkpointing.snapshots import CycleSamples
    from swap_accel.topology import Seat

    out = Path(sys.argv[1])
    acc = make_accelerator()
    rank = acc.process_index
    group = dist.new_group([0, 1])
    n = 205  # blocks of 100, 100 and a tail of 5: slices of 3 and 2 on the two members
    g = torch.Generator().manual_seed(0)
    source = InMemorySource(torch.randint(0, 256, (n, 1, 6, 6), dtype=torch.uint8, generator=g),
                            torch.randint(0, 10, (n,), generator=g), mean=[0.5], std=[0.25],
                            class_names=[str(c) for c in range(10)],
                            augment=AugmentConfig(crop_padding=0, flip=False, cutout_size=0), device=acc.device)

    def fresh():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 16), torch.nn.Tanh(),
                                   torch.nn.Linear(16, 10))

    class NoLogging:
        def steps(self, iterable, **where):
            return iterable
        def __call__(self, row):
            pass

    class NoCheckpoints:
        last_good = None
        def begin(self, step, *, by_clock): pass
        def due(self, step): return False
        def calibrate(self, seconds_per_step): pass

    cfg = Phase2Config(per_worker_batch_size=100, epochs=1, lr=LRConfig(peak=2.0))
    opt = OptimizerConfig(momentum=0.0, weight_decay=0.0)
    module = fresh()
    ctx = LoopContext(acc, source, opt, 0, NoLogging(), NoCheckpoints())
    train_phase2(ctx, data_parallel(module, group, acc.device), module, cfg, worker=0, seat=Seat(group, rank, 2),
                 samples=CycleSamples(cfg.sampling, out, 0, leader=rank == 0))

    def by_hand(split_tail):
        # One process, the group's very blocks: the mean loss over every sample of a block (weighted=True), or
        # the mean of the two members' slice means (what an unweighted all-reduce of a 3/2 tail gives).
        ref = fresh()
        sgd = make_sgd(ref.parameters(), opt, cfg.lr.peak, device=acc.device)
        lr_at = make_schedule(cfg.lr, epochs=1, steps_per_epoch=3)
        order = worker_order(n, seed=0, worker=0, epoch=0)
        for step, block in enumerate(order.split([100, 100, 5])):
            x, y = next(source.batches(block, len(block), augment=False, generator=None))
            logits = ref(x)
            if split_tail:
                parts = torch.arange(len(block)).tensor_split(2)
                loss = sum(F.cross_entropy(logits[part], y[part]) for part in parts) / 2
            else:
                loss = F.cross_entropy(logits, y)
            for pg in sgd.param_groups:
                pg["lr"] = lr_at(step)
            loss.backward()
            sgd.step()
            sgd.zero_grad()
        return ref

    def gap(other):
        return max((a - b).abs().max().item() for a, b in zip(module.state_dict().values(),
                                                               other.state_dict().values()))

    (out / f"rank{rank}.json").write_text(json.dumps({"weighted": gap(by_hand(False)),
                                                       "equal_slices": gap(by_hand(True))}))
""")


def test_a_groups_unequal_tail_weighs_every_sample_equally(tmp_path):
    """A worker group's step is the step of one process on the whole block, also on an epoch's partial last block
    (a tail of 5 over 2 members gives slices of 3 and 2): each member's mean loss is scaled by its share before the
    in-group all-reduce averages the gradients. Two real processes train with train_phase2; the same steps by hand
    on one process agree, and the equal-weight average of the slices, which the tail would give unweighted, does
    not (so this test can tell the two apart)."""
    ranks = run_on_ranks(SHARD_WEIGHT_SCRIPT, tmp_path)
    for rank in ranks:
        assert rank["weighted"] < 1e-6, rank
        assert rank["equal_slices"] > 1e-4, rank


def test_worker_blocks_give_every_member_two_samples_of_the_tail():
    from swap_accel.data.sampling import shard_loss_weights, worker_blocks

    assert worker_blocks(205, batch_size=100, members=2) == [100, 100, 5]
    assert worker_blocks(203, batch_size=100, members=2) == [100, 103]  # 3 < 2 x 2: joins the block before
    assert worker_blocks(201, batch_size=100, members=1) == [100, 100, 1]  # one process: plain batching
    assert shard_loss_weights(205, batch_size=100, member=0, members=2) == [1.0, 1.0, 2 * 3 / 5]
    assert shard_loss_weights(205, batch_size=100, member=1, members=2) == [1.0, 1.0, 2 * 2 / 5]


def test_stacked_workers_killed_and_rerun_end_as_the_workers_trained_in_turn(sequential, tmp_path, data_cache):
    """phase2.stack_workers: each process's 2 workers trained at once (one vmapped step, algorithm/stacked.py),
    checkpointing as workers in turn do (p2-w<k>-step*, each worker its own files). SIGKILL mid phase 2, rerun: every
    worker resumes from its checkpoint at the common step and ends where the same workers trained in turn end (float32
    rounding apart: the vmapped convolutions sum in another order; tests/test_stacked.py shows the computation equal
    in float64). Phase 1 is the in-turn run's (--from-phase1), so only phase 2 differs."""
    recipe = tiny_recipe(tmp_path, data_cache, phase2={"workers": 4, "stack_workers": True},
                         checkpoint={"every_steps": 5})
    out = tmp_path / "run"
    cmd = [*train_command(recipe, out, "--num_processes", "2", "--main_process_port", str(free_port())),
           "--from-phase1", str(sequential["out"])]
    kill_when(start(cmd, tmp_path / "killed.log"),
              lambda: any(int(p.name.rsplit("step", 1)[1]) >= 25 for p in checkpoints(out, "p2-w3-step*")))
    assert not (out / "results.json").exists() and not checkpoints(out, "p2-w*-end")
    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **ENV}, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["phase2"]["workers_per_process"] == 2 and r["collectives"]["phase2"]["calls"] == 0
    resumed = {w: s["step"] for w, s in r["resumed_from"]["workers"].items()}
    assert len({step.rsplit("step", 1)[1] for step in resumed.values()}) == 1, resumed  # one step for the stack
    for k in range(4):
        ours, theirs = (load_file(run / "workers" / f"worker{k}.safetensors") for run in (out, sequential["out"]))
        for name in _param_names():
            relative = ((ours[name] - theirs[name]).norm() / theirs[name].norm()).item()
            assert relative < 0.05, (k, name, relative)
    assert abs(r["test_acc"] - sequential["results"]["test_acc"]) < 0.02
