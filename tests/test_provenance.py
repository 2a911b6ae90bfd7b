"""A held-out image is never one a model trained on: every checkpoint another run reuses records the data it was
trained on (source, split, train_subset, holdout_samples, a digest of the training indices), and `--from-phase1`,
`average` and `transition` refuse a checkpoint of other data, or one that records none, in one line. `average` takes a
dead worker's samples from the worker's own phase-2 settings, not from the `--recipe` given.

One real 2-process run is shared by every check: it trains on every image of a 1536-image Fashion-MNIST split (the
reported case: a phase 1 without hold-out). All checks but one stop in the command line, before any process group.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from launching import FASHION, ROOT, launch, needs_fashion, tiny_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner

import swap_accel.tools.average
import swap_accel.tools.transition
import swap_accel.train
from swap_accel.checkpointing.files import commit_checkpoint
from swap_accel.cli import app
from swap_accel.data.fashion_mnist import FASHION_MNIST_FILES
from swap_accel.recipe import device_defaults, load_recipe
from swap_accel.tools.transition import plan

pytestmark = [needs_fashion, pytest.mark.slow]
TRAIN, TEST, HELD = 1536, 500, 300


def _small_fashion(root: Path) -> Path:
    """The first TRAIN training and TEST test images of the installed Fashion-MNIST as IDX files: a whole split
    small enough to train on every image of."""
    root.mkdir(parents=True)
    for pair, n in zip(FASHION_MNIST_FILES.values(), (TRAIN, TEST), strict=True):
        for name in pair:
            raw = gzip.decompress((FASHION / name).read_bytes())
            ndim = raw[3]  # IDX: the 4th magic byte is the number of dimensions, each a big-endian int32 after it
            header, item = 4 + 4 * ndim, 1
            for i in range(1, ndim):
                item *= int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big")
            (root / name).write_bytes(gzip.compress(raw[:4] + n.to_bytes(4, "big") + raw[8:header]
                                                    + raw[header : header + n * item]))
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_cache):
    """A finished SWAP run on every image of the small split: 2 workers x 2 samples, and a periodic checkpoint of
    each worker in its second epoch (after its first sample), as a worker that died there would leave."""
    tmp = tmp_path_factory.mktemp("provenance")
    recipe = tiny_recipe(tmp, data_cache, data={"root": str(_small_fashion(tmp / "fashion")), "train_subset": None,
                                                "test_subset": None},
                         phase1={"max_epochs": 2},
                         phase2={"epochs": 2, "samples_per_worker": 2, "lr": {"peak": 0.05, "cycles": 2}},
                         checkpoint={"every_steps": 20, "every_minutes": None})
    out = tmp / "run"
    done = launch(2, recipe, out, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return SimpleNamespace(tmp=tmp, recipe=recipe, out=out, ckpts=out / "checkpoints")


def _invoke(argv: list[str], monkeypatch) -> tuple[int, list[str], list]:
    """The real command line in this process, with every way past the preflight replaced by a recorder."""
    started = []
    monkeypatch.setattr(swap_accel.train, "train", lambda *a, **k: started.append(("train", a)))
    monkeypatch.setattr(swap_accel.tools.average, "average", lambda *a, **k: started.append(("average", a)))
    monkeypatch.setattr(swap_accel.tools.transition, "subprocess",
                        SimpleNamespace(run=lambda cmd, **k: started.append(("launch", cmd))))
    result = CliRunner().invoke(app, [str(a) for a in argv], env={"WORLD_SIZE": "1"})
    assert "Traceback" not in result.output + result.stderr, result.stderr
    return result.exit_code, [line for line in result.stderr.splitlines() if line.strip()], started


def _refused(argv: list[str], monkeypatch, *fragments: str) -> str:
    code, lines, started = _invoke(argv, monkeypatch)
    assert code == 2 and not started, (argv, lines, started)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _without_provenance(source: Path, target: Path, record: str = "data") -> Path:
    """A copy of checkpoint `source` as a swap_accel that did not record `record` would have written it."""
    staging = target.with_name(f".{target.name}.tmp")
    staging.mkdir(parents=True)
    shutil.copy(source / "model.safetensors", staging / "model.safetensors")
    manifest = json.loads((source / "manifest.json").read_text())
    info = {k: v for k, v in manifest.items() if k not in ("format", "files", record)}
    commit_checkpoint(staging, target, ["model.safetensors"], info)
    return target


def test_from_phase1_refuses_a_phase1_that_trained_on_the_held_out_images(run, monkeypatch):
    """The reported case: phase 1 trained on every image; a hold-out carved from them would be scored by phase 3."""
    line = _refused(["train", run.recipe, "--out", run.tmp / "x", "--from-phase1", run.out, "--set",
                     f"data.holdout_samples={HELD}", "--set", "phase3.selection=greedy"], monkeypatch,
                    f"--from-phase1 {run.ckpts / 'p1-end'} was trained on fashion_mnist",
                    "holdout_samples=null", f"holdout_samples={HELD}", f"{TRAIN} of {TRAIN} images",
                    f"{TRAIN - HELD} of {TRAIN} images",
                    f"{HELD} of this recipe's {HELD} held-out images are ones phase 1 trained on",
                    f"--set data.holdout_samples={HELD}")
    assert not (run.tmp / "x").exists(), line
    # Other training images with no hold-out at all are refused too: phase 2 would train on another set.
    _refused(["train", run.recipe, "--out", run.tmp / "x", "--from-phase1", run.ckpts / "p1-end", "--set",
              "data.train_subset=1000"], monkeypatch, "phase 2 would train on other images than phase 1",
             "train_subset=1000")
    # The same data as the phase 1 passes the preflight.
    code, lines, started = _invoke(["train", run.recipe, "--out", run.tmp / "y", "--from-phase1", run.out],
                                   monkeypatch)
    assert code == 0 and [s[0] for s in started] == ["train"], lines


def test_every_reusable_checkpoint_records_its_data(run):
    """p1-end, the samples, the workers' ends and their periodic checkpoints all name the same training images."""
    names = ["p1-end", "p2-w0-sample0", "p2-w1-sample0", "p2-w0-end", "p2-w1-end"]
    steps = sorted(p.name for p in run.ckpts.glob("p2-w*-step*"))
    assert steps, sorted(p.name for p in run.ckpts.iterdir())
    records = [json.loads((run.ckpts / n / "manifest.json").read_text()).get("data") for n in names + steps]
    assert records[0] and all(r == records[0] for r in records), records
    assert {k: records[0][k] for k in ("source", "split", "train_subset", "holdout_samples", "train_samples")} == \
        {"source": "fashion_mnist", "split": "train", "train_subset": None, "holdout_samples": None,
         "train_samples": TRAIN}
    assert len(records[0]["train_indices"]) == 64  # sha256


def test_a_checkpoint_without_provenance_is_refused(run, monkeypatch):
    old = run.tmp / "old"
    p1 = _without_provenance(run.ckpts / "p1-end", old / "p1-end")
    _refused(["train", run.recipe, "--out", run.tmp / "x", "--from-phase1", p1], monkeypatch,
             f"--from-phase1 {p1} records no data provenance", "train phase 1 again")
    worker = _without_provenance(run.ckpts / "p2-w0-end", old / "p2-w0-end")
    _refused(["average", worker, "--recipe", run.out / "recipe.yaml", "--out", run.tmp / "avg"], monkeypatch,
             f"{worker} records no data provenance")
    # transition: a search whose phase-1 run finished under a version that recorded none stops before launching a
    # candidate from it.
    search = run.tmp / "search"
    common, first = plan(run.recipe, [], [0.4, 0.6], HELD, None)
    main = search / "tau0.6"
    main.mkdir(parents=True)
    (main / "results.json").write_text(json.dumps({"recipe": load_recipe(run.recipe, first).model_dump(mode="json"),
                                                   "num_processes": 2, "phase1": {"train_acc": 0.6}}))
    tau = _without_provenance(run.ckpts / "p1-end", main / "checkpoints" / "p1-tau0.4")
    _refused(["transition", run.recipe, "--candidates", "0.4,0.6", "--holdout-samples", HELD, "--out", search,
              "--num-processes", 2], monkeypatch, f"{tau} records no data provenance")


def test_average_refuses_workers_of_other_data_even_moved_out_of_their_run(run, monkeypatch):
    """A moved worker has no recipe.yaml beside it: its manifest alone says what it trained on."""
    moved = run.tmp / "moved" / "elsewhere" / "p2-w1-end"  # no recipe.yaml two levels up either
    shutil.copytree(run.ckpts / "p2-w1-end", moved)
    held = ["--set", f"data.holdout_samples={HELD}", "--selection", "greedy"]
    for given in (moved, run.out):
        _refused(["average", given, "--recipe", run.recipe, "--out", run.tmp / "avg", *held], monkeypatch,
                 "was trained on fashion_mnist", f"holdout_samples={HELD}", "holdout_samples=null",
                 f"{HELD} of this recipe's {HELD} held-out images are ones this worker trained on",
                 "pass the workers' own recipe")
    code, lines, started = _invoke(["average", moved, run.out / "checkpoints" / "p2-w0-end", "--recipe", run.recipe,
                                    "--out", run.tmp / "avg"], monkeypatch)
    assert code == 0 and [s[0] for s in started] == ["average"], lines


def test_average_refuses_a_recipe_whose_auto_precision_is_not_the_workers(run, monkeypatch):
    """The workers trained in fp32 (`auto` on a CPU). Averaged on a bf16-capable GPU with the same recipe, `auto`
    resolves to bf16 there and phase 3 would recompute BN in it: refused, naming the set that matches the workers.
    Their own recipe.yaml holds the precision they trained in and passes, and so does an explicit --set."""
    for name in ["p1-end", "p2-w0-end", *(p.name for p in run.ckpts.glob("p2-w0-step*"))]:
        assert json.loads((run.ckpts / name / "manifest.json").read_text())["mixed_precision"] == "no", name
    monkeypatch.setattr(device_defaults, "cuda_capability", lambda: (9, 0))
    out = ["--out", run.tmp / "avg"]
    _refused(["average", run.out, "--recipe", run.recipe, *out], monkeypatch,
             f"{run.ckpts / 'p2-w0-end'} was trained with mixed_precision 'no'", "averages with 'bf16'",
             "--set mixed_precision=no", "their run's recipe.yaml")
    _refused(["average", run.out, "--recipe", run.recipe, "--set", "mixed_precision=auto", *out], monkeypatch,
             "was trained with mixed_precision 'no'")  # auto is not a choice
    for chosen in (["--recipe", run.out / "recipe.yaml"], ["--recipe", run.recipe, "--set", "mixed_precision=bf16"]):
        code, lines, started = _invoke(["average", run.out, *chosen, *out], monkeypatch)
        assert code == 0 and [s[0] for s in started] == ["average"], (chosen, lines)
        assert started[0][1][0].mixed_precision == ("no" if len(chosen) == 2 else "bf16"), chosen
    # A worker written before manifests recorded its precision: its run's recipe.yaml says it, while it lies in its
    # run; moved out of it, nothing does, and it is not checked.
    old = run.tmp / "old-precision"
    worker = _without_provenance(run.ckpts / "p2-w0-end", old / "checkpoints" / "p2-w0-end", "mixed_precision")
    shutil.copy(run.out / "recipe.yaml", old / "recipe.yaml")
    _refused(["average", worker, "--recipe", run.recipe, *out], monkeypatch,
             f"{worker} was trained with mixed_precision 'no'")
    moved = _without_provenance(worker, old / "moved" / "p2-w0-end", "mixed_precision")
    code, lines, started = _invoke(["average", moved, "--recipe", run.recipe, *out], monkeypatch)
    assert code == 0 and [s[0] for s in started] == ["average"], lines


def test_average_takes_a_dead_workers_samples_from_its_own_run(run, tmp_path):
    """Worker 0's periodic checkpoint in its second cycle, averaged with a recipe of one sample per worker: its run
    took 2 (phase2.samples_per_worker=2, lr.cycles=2), so its first sample and the checkpoint are averaged."""
    step = max(run.ckpts.glob("p2-w0-step*"))
    assert json.loads((step / "manifest.json").read_text())["epoch"] == 1
    done = subprocess.run([sys.executable, "-m", "swap_accel", "average", str(step), "--recipe", str(run.recipe),
                           "--set", "phase2.samples_per_worker=1", "--set", "phase2.lr.cycles=1",
                           "--out", str(tmp_path / "avg")], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp_path / "avg" / "results.json").read_text())
    assert r["phase3"]["averaged_models"] == 2 and r["phase3"]["selection"]["models"] == ["w0s0", "w0s1"]
    first, last = (load_file(p / "model.safetensors") for p in (run.ckpts / "p2-w0-sample0", step))
    averaged = load_file(tmp_path / "avg" / "model.safetensors")
    for name, value in averaged.items():
        if value.is_floating_point() and "running" not in name:  # BN statistics are recomputed
            torch.testing.assert_close(value, (first[name] + last[name]) / 2, rtol=0, atol=1e-7)

