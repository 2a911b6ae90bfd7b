"""Never lose a run, with real processes: SIGKILL a 2-process run in phase 1 and in phase 2, rerun
the same command, and get bit for bit the weights of an uninterrupted run; two "machines" on loopback, one
of which dies in phase 2 while the survivor finishes; `average` on the survivors and on a whole run.

Every run here takes two samples per worker (two 1-epoch LR cycles, a model at the end of each), so the
phase-2 kill lands in the middle of a worker's second cycle, after its first sample: the resumed worker rebuilds its
running sum from disk. Phase 3 and `average` then average W x S = 4 models.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launching import (
    ENV,
    ROOT,
    checkpoints,
    free_port,
    hang,
    kill,
    kill_when,
    launch,
    needs_fashion,
    rank_process,
    start,
    tensors_equal,
    tiny_recipe,
    train_command,
)
from safetensors.torch import load_file
from typer.testing import CliRunner

from swap_accel.checkpointing.files import verify_checkpoint
from swap_accel.cli import app

pytestmark = [needs_fashion, pytest.mark.slow]
# Two samples per worker, one at the end of each of two 1-epoch cycles (21 steps each).
SAMPLED = {"phase2": {"epochs": 2, "samples_per_worker": 2, "lr": {"peak": 0.05, "cycles": 2}}}


def all_committed_checkpoints_verify(out: Path) -> None:
    for path in checkpoints(out, "p*"):
        verify_checkpoint(path)  # a kill mid-write leaves only a hidden staging directory


STALL_SECONDS = 8


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """An uninterrupted run, with only the end-of-phase checkpoints (default every_minutes=15). Rank 1 is stopped
    (SIGSTOP) for STALL_SECONDS after its worker's first sample, so rank 0 reaches phase 3 first and waits: a
    straggler, as on any shared machine. Stopping changes no number the run computes."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "run"
    proc = start(train_command(tiny_recipe(tmp, data_cache, **SAMPLED), out, "--num_processes", "2",
                               "--main_process_port", str(free_port())), tmp / "reference.log")
    deadline = time.monotonic() + 240
    while not checkpoints(out, "p2-w1-sample0"):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp / "reference.log").read_text()[-3000:]
        time.sleep(0.02)
    rank1 = rank_process(proc, 1)
    rank1.suspend()
    time.sleep(STALL_SECONDS)
    rank1.resume()
    assert proc.wait(timeout=300) == 0, (tmp / "reference.log").read_text()[-3000:]
    return out


def test_phase3_time_starts_when_every_process_has_arrived(reference):
    """A straggler's extra time is phase 2's (the slowest process's), reported once: phase 3's own clock starts
    after the processes meet, and the main process's wait for the straggler is reported apart."""
    r = json.loads((reference / "results.json").read_text())
    p3 = r["phase3"]
    assert p3["wait_seconds"] > STALL_SECONDS / 2 > p3["seconds"], p3
    times = r["training_seconds"]
    assert times["measured"] == pytest.approx(r["phase1"]["seconds"] + r["phase2"]["seconds"] + p3["seconds"])
    assert times["parallel_equivalent"] == pytest.approx(
        r["phase1"]["seconds"] + r["phase2"]["slowest_worker_seconds"] + p3["seconds"])
    assert set(times["definitions"]) == {"measured", "parallel_equivalent"}


@pytest.mark.parametrize("phase", [1, 2])
def test_sigkill_and_rerun_gives_the_uninterrupted_weights(reference, tmp_path, data_cache, phase):
    # Phase 2 also takes Figure 1's averaged-model curve every epoch: a collective over every process, which the
    # rerun's workers, resumed at different epochs, must all reach equally often (else one waits out the timeout).
    curve = {"tracking": {"averaged_curve": 1}, "collective_timeout_minutes": 2} if phase == 2 else {}
    recipe = tiny_recipe(tmp_path, data_cache, checkpoint={"every_steps": 7, "keep": 4}, **SAMPLED, **curve)
    out = tmp_path / "run"
    cmd = train_command(recipe, out, "--num_processes", "2", "--main_process_port", str(free_port()))
    # Phase 1 has 8 steps per epoch: its checkpoint at step 14 is mid-epoch, so the partial epoch sums must survive
    # for the τ decision. Phase 2 has 21 steps per epoch, one LR cycle each: step 28 is mid-way through
    # both workers' second cycle, after their first sample.
    def reached(pattern: str, step: int) -> bool:
        return any(int(p.name.rsplit("step", 1)[1]) >= step for p in checkpoints(out, pattern))

    ready = (lambda: reached("p1-step*", 10)) if phase == 1 else (
        lambda: reached("p2-w0-step*", 28) and reached("p2-w1-step*", 28))
    kill_when(start(cmd, tmp_path / "killed.log"), ready)
    assert not (out / "results.json").exists()
    all_committed_checkpoints_verify(out)
    if phase == 2:
        assert checkpoints(out, "p1-end")  # so the rerun does not repeat phase 1
        assert checkpoints(out, "p2-w0-sample0") and checkpoints(out, "p2-w1-sample0")
        assert not checkpoints(out, "p2-w*-end")
        # Worker 1 as if killed between writing its first sample and its next checkpoint: it resumes at step 21, the
        # last step of its first cycle (a checkpoint at an epoch's very end), and must keep the sample on disk as it
        # is. Worker 0 resumes in mid-cycle from step 28 and rebuilds its running sum from that sample.
        for later in checkpoints(out, "p2-w1-step*"):
            if int(later.name.rsplit("step", 1)[1]) > 21:
                shutil.rmtree(later)
        assert checkpoints(out, "p2-w1-step*")[-1].name == "p2-w1-step00000021"

    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **ENV}, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    resumed = json.loads((out / "results.json").read_text())["resumed_from"]
    assert resumed["phase1_step" if phase == 1 else "phase1_end"], resumed
    if phase == 2:
        starts = [json.loads((out / "ranks" / f"rank{r}.json").read_text())["resumed_from"]["workers"][str(r)]["step"]
                  for r in range(2)]
        assert 28 <= int(starts[0].rsplit("step", 1)[1]) < 42 and starts[1].endswith("p2-w1-step00000021"), starts
        # Worker 0 resumes in epoch 2, worker 1 ends epoch 1 first: no epoch both train in this launch takes a
        # scratch average, and the curve is phase 3's own point.
        points = json.loads((out / "results.json").read_text())["averaged_curve"]["points"]
        assert [p.get("source") for p in points] == ["phase3"], points
    assert tensors_equal(out / "model.safetensors", reference / "model.safetensors") == []
    for k in range(2):
        assert tensors_equal(out / "workers" / f"worker{k}.safetensors",
                              reference / "workers" / f"worker{k}.safetensors") == []
    mine, ref = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    assert mine["phase1"]["steps"] == ref["phase1"]["steps"] and mine["test_acc"] == ref["test_acc"]
    # The per-worker monitoring curves survive the resume too (replayed rows keep the accuracy they were logged with).
    def curves(results):
        return [(w["worker"], w["step"], w["train_loss"], w["train_acc"], w["test_acc"])
                for w in results["phase2"]["workers_history"]]
    assert curves(mine) == curves(ref)


def test_phase3_averages_every_workers_cycle_end_samples_with_equal_weight(reference):
    """Each worker's samples are its models at the ends of its two LR cycles (steps 21 and 42), and the
    averaged model is the plain mean of the W x S = 4 saved samples, computed here independently in float64."""
    root = reference / "checkpoints"
    names = [f"p2-w{k}-{s}" for k in range(2) for s in ("sample0", "end")]
    assert [json.loads((root / n / "manifest.json").read_text())["step"] for n in names] == [21, 42, 21, 42]
    samples = [load_file(root / n / "model.safetensors") for n in names]
    final = load_file(reference / "model.safetensors")
    for name, value in final.items():
        if value.dtype.is_floating_point and "running" not in name:  # BN statistics are recomputed by phase 3
            mean = torch.stack([s[name].double() for s in samples]).mean(0)
            torch.testing.assert_close(value.double(), mean, rtol=1e-6, atol=1e-7)
    # Every sample counts: the mean of the workers' last models alone is another model.
    ends_only = {n: (samples[1][n].double() + samples[3][n].double()) / 2 for n in final}
    assert any((final[n].double() - ends_only[n]).abs().max() > 1e-4 for n in final
               if final[n].dtype.is_floating_point and "running" not in n)
    r = json.loads((reference / "results.json").read_text())
    assert r["phase3"]["averaged_models"] == 4
    assert r["phase3"]["selection"]["models"] == ["w0s0", "w0s1", "w1s0", "w1s1"]
    # Both cycles decay to the same last-step LR (the history logs each epoch's last step; restarts: test_samples).
    assert [row["lr"] for row in r["phase2"]["history"]] == pytest.approx([0.05 / 42, 0.05 / 42])


def test_average_of_a_whole_run_equals_its_phase3(reference, tmp_path):
    result = subprocess.run([sys.executable, "-m", "swap_accel", "average", str(reference), "--recipe",
                             str(reference / "recipe.yaml"), "--out", str(tmp_path / "avg")],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, **ENV}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    averaged = load_file(tmp_path / "avg" / "model.safetensors")
    trained = load_file(reference / "model.safetensors")
    for name, value in trained.items():
        if "running" in name:  # BN statistics: one process's float64 sums vs two shards, float32 storage
            torch.testing.assert_close(averaged[name], value, rtol=1e-5, atol=1e-6)
        else:  # (a + b) / 2 is exactly phase 3's all-reduce sum and division
            assert torch.equal(averaged[name], value), name
    r = json.loads((tmp_path / "avg" / "results.json").read_text())
    assert [w["index"] for w in r["workers"]] == [0, 1] and r["phase3"]["seconds"] > 0
    for key in ("phase1", "phase2", "before_averaging", "after_averaging", "critical_path_steps", "collectives"):
        assert key in r
    # The same outputs as training: `report` reads them and redraws Figure 1.
    report = CliRunner().invoke(app, ["report", str(tmp_path / "avg")])
    assert report.exit_code == 0 and "SWAP (after averaging)" in report.stdout, report.stderr[-3000:]


def test_two_machines_on_loopback_survive_a_hung_worker(reference, tmp_path, data_cache):
    """Two launchers, one process each (--num_machines 2), as on two nodes. Machine 1 hangs in phase 2 (SIGSTOP:
    alive and silent, what a NCCL collective would wait on until its watchdog fires). The survivor makes no
    collective in phase 2, finishes and checkpoints its worker, then waits for phase 3 on the run
    directory, finds machine 1's heartbeat stale and stops with one line, before any collective could hang."""
    recipe, out = tiny_recipe(tmp_path, data_cache, checkpoint={"every_steps": 5}, **SAMPLED), tmp_path / "run"
    beat = {"SWAP_ACCEL_HEARTBEAT_SECONDS": "0.5"}  # stale after 12 beats: 6 s

    def machines(port: int) -> list[list[str]]:
        return [train_command(recipe, out, "--num_machines", "2", "--machine_rank", str(m), "--num_processes", "2",
                              "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)) for m in (0, 1)]

    first = machines(free_port())
    survivor = start(first[0], tmp_path / "machine0.log", beat)
    victim = start(first[1], tmp_path / "machine1.log", beat)
    deadline = time.monotonic() + 240
    while not checkpoints(out, "p2-w1-step*"):
        assert victim.poll() is None and time.monotonic() < deadline, "kill point not reached"
        time.sleep(0.02)
    hang(victim)
    try:
        assert survivor.wait(timeout=240) != 0  # the rank exits 2; its launcher reports that as 1
    finally:
        kill(victim)
    log = (tmp_path / "machine0.log").read_text()
    assert "waiting for ranks [1] to finish phase 2" in log, log[-3000:]
    assert ("error: phase 3 averages every worker but ranks [1] stopped before reaching it (no heartbeat for 6 s); "
            "workers [0] of 2 finished phase 2") in log, log[-3000:]
    assert f'File "{ROOT / "swap_accel"}' not in log  # one line from the rank (the launcher adds its own report)
    all_committed_checkpoints_verify(out)

    # The survivor's finished checkpoint is enough for `average` (phase 3 on any set of workers).
    avg = subprocess.run([sys.executable, "-m", "swap_accel", "average", str(out), "--recipe", str(recipe),
                          "--out", str(tmp_path / "survivors")], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **ENV}, timeout=300)
    assert avg.returncode == 0, avg.stderr[-3000:]
    assert [w["index"] for w in json.loads((tmp_path / "survivors" / "results.json").read_text())["workers"]] == [0]
    report = CliRunner().invoke(app, ["report", str(tmp_path / "survivors")])
    assert report.exit_code == 0, report.stderr[-3000:]

    # Rerunning both launchers resumes worker 1 from its checkpoint: the full SWAP result, bit for bit.
    again = [start(cmd, tmp_path / f"rerun{m}.log") for m, cmd in enumerate(machines(free_port()))]
    assert [p.wait(timeout=300) for p in again] == [0, 0], (tmp_path / "rerun0.log").read_text()[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["num_processes"] == 2 and [w["index"] for w in r["workers"]] == [0, 1]
    assert r["critical_path_steps"] == r["phase1"]["steps"] + r["phase2"]["steps_per_worker"]
    assert r["collectives"]["phase2"]["calls"] == 0 and r["resumed_from"]["workers"]["0"]["end"]
    assert tensors_equal(out / "model.safetensors", reference / "model.safetensors") == []


def test_from_phase1_reuses_another_runs_phase1(reference, tmp_path, data_cache):
    """Phase 2 is a pure function of the phase-1 weights, the seed and the worker: starting it from the
    reference's phase 1 reproduces the reference without training phase 1 again."""
    out = tmp_path / "run"
    result = launch(2, tiny_recipe(tmp_path, data_cache, **SAMPLED), out, "--from-phase1", str(reference), env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    r, ref = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    assert r["collectives"]["phase1"]["calls"] == 0 and r["phase1"]["steps"] == ref["phase1"]["steps"]
    assert r["resumed_from"]["phase1_end"] == str(reference / "checkpoints" / "p1-end")
    assert tensors_equal(out / "model.safetensors", reference / "model.safetensors") == []


def test_a_resumed_worker_continues_from_the_sample_it_committed(reference, tmp_path, data_cache):
    """A worker resumed from a checkpoint before a sample it had already committed reaches that sample again. The
    committed copy is what `average` and the greedy soup read, so the resumed run continues from it, not from its
    recomputation (equal on CPU, not on a GPU). Here the committed copy is made to differ (every weight + 0.01, a
    valid checkpoint): the rerun's sum and the rest of the worker's phase 2 must follow the file. One worker on one
    process, phase 1 taken from the reference run."""
    from swap_accel.checkpointing.files import commit_checkpoint, load_weights

    recipe = tiny_recipe(tmp_path, data_cache, checkpoint={"every_steps": 21}, **SAMPLED)
    out, args = tmp_path / "run", ("--from-phase1", str(reference), "--set", "tracking.eval_every=0")
    first = launch(1, recipe, out, *args, env=ENV)
    assert first.returncode == 0, first.stderr[-3000:]
    root = out / "checkpoints"
    before = load_file(out / "workers" / "worker0.safetensors")
    # As if killed after writing the worker's first sample, before its next checkpoint: it resumes at step 21.
    for stale in [*root.glob("p2-w*-end"), *root.glob("p2-w*-step00000042"), out / "results.json"]:
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    sample = root / "p2-w0-sample0"
    manifest = json.loads((sample / "manifest.json").read_text())
    staging = tmp_path / "staging"
    staging.mkdir()
    from safetensors.torch import save_file

    weights = load_weights(sample / "model.safetensors")
    shifted = {n: t + 0.01 if t.is_floating_point() else t for n, t in weights.items()}
    save_file(shifted, str(staging / "model.safetensors"))
    commit_checkpoint(staging, sample, ["model.safetensors"],
                      {k: v for k, v in manifest.items() if k not in ("format", "files")})

    rerun = launch(1, recipe, out, *args, env=ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = load_file(out / "workers" / "worker0.safetensors")
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the worker went on from the file
    resumed = json.loads((out / "results.json").read_text())["resumed_from"]["workers"]["0"]["step"]
    assert resumed.endswith("p2-w0-step00000021"), resumed
    # Phase 3 averaged the files on disk: the perturbed sample and the end the worker reached from it.
    names = ["p2-w0-sample0", "p2-w0-end"]
    samples = [load_file(root / n / "model.safetensors") for n in names]
    final = load_file(out / "model.safetensors")
    for name, value in final.items():
        if value.dtype.is_floating_point and "running" not in name:
            mean = torch.stack([s[name].double() for s in samples]).mean(0)
            torch.testing.assert_close(value.double(), mean, rtol=1e-6, atol=1e-7)
