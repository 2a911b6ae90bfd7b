"""Bad input ends early and clearly: one line naming the problem and the fix, exit code 2, no
traceback, nothing written, no finished output touched, and all of it before any process group forms.

The table runs the real command line in this process (typer's runner), so 25+ cases cost seconds; training
itself is replaced by a tripwire that fails the test if any case gets that far. Checkpoints are safe to
load: a crafted pickle with a payload is refused without running it.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from launching import launch, needs_fashion, tiny_recipe
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import swap_accel.train
from swap_accel.checkpointing.files import CheckpointError, commit_checkpoint, load_state, save_weights
from swap_accel.checkpointing.resume import newest_good
from swap_accel.cli import app
from swap_accel.models import build_model
from swap_accel.recipe import dump_recipe, load_recipe

pytestmark = needs_fashion


def _image_folder(root: Path, classes: list[str], train_images: int) -> Path:
    for split, count in (("train", train_images), ("test", 2)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _phase1_checkpoint(path: Path, **model) -> Path:
    """A real phase-1 checkpoint of the tiny recipe's model (or of the model the manifest claims)."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.mkdir(parents=True)
    save_weights(staging / "model.safetensors", build_model("resnet9", in_chans=1, num_classes=10,
                                                            kwargs={"base_width": 8}))
    claimed = model or {"name": "resnet9", "kwargs": {"base_width": 8}}
    commit_checkpoint(staging, path, ["model.safetensors"], {"kind": "phase1-end", "num_processes": 2,
                                                             "model": claimed, "step": 24, "result": {"steps": 24}})
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("bad")
    base = tiny_recipe(tmp, data_cache)
    resolved = load_recipe(base)
    unknown = tmp / "unknown.yaml"
    unknown.write_text(yaml.safe_dump({**yaml.safe_load(base.read_text()), "phase1": {
        **yaml.safe_load(base.read_text())["phase1"], "bogus": 1}}))
    finished = tmp / "finished"
    finished.mkdir()
    (finished / "results.json").write_text('{"test_acc": 0.9}\n')
    other_recipe = tmp / "other_recipe"
    other_recipe.mkdir()
    (other_recipe / "recipe.yaml").write_text(dump_recipe(resolved.model_copy(update={"seed": 7})))
    other_world = tmp / "other_world"
    (other_world / "checkpoints" / "p1-step00000005").mkdir(parents=True)
    (other_world / "recipe.yaml").write_text(dump_recipe(resolved))
    (other_world / "checkpoints" / "p1-step00000005" / "manifest.json").write_text('{"num_processes": 2}')
    unfinished = tmp / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    ckpts = tmp / "ckpts"
    other_model = _phase1_checkpoint(ckpts / "other_model", name="resnet9", kwargs={"base_width": 16})
    truncated = _phase1_checkpoint(ckpts / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    flipped = _phase1_checkpoint(ckpts / "flipped")
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (flipped / "model.safetensors").write_bytes(bytes(data))
    a_file = tmp / "a_file"
    a_file.write_text("not a directory")
    one_class = _image_folder(tmp / "one_class", ["shirt"], 3)
    empty = _image_folder(tmp / "empty", ["a", "b"], 0)

    b = str(base)
    train = ["train", b, "--out"]
    return tmp, finished, [
        # (argv, environment, fragment of the one-line error)
        (["train", str(unknown), "--out", "x"], {}, "phase1.bogus: unknown key"),
        (train + ["x", "--set", "phase1.max_epochs=ten"], {}, "phase1.max_epochs"),
        (train + ["x", "--set", "phase1.global_batch_size=0"], {}, "phase1.global_batch_size"),
        (train + ["x", "--set", "phase2.per_worker_batch_size=-4"], {}, "phase2.per_worker_batch_size"),
        (train + ["x"], {"WORLD_SIZE": "5"}, "not divisible by 5 processes"),
        (train + ["x", "--set", "phase1.stop_train_accuracy=1.5"], {}, "phase1.stop_train_accuracy"),
        (train + ["x", "--set", "phase1.stop_train_accuracy=0"], {}, "phase1.stop_train_accuracy"),
        (train + ["x", "--set", "phase2.lr.peak=0"], {}, "phase2.lr.peak"),
        (train + ["x", "--set", "phase1.lr.peak=-0.1"], {}, "phase1.lr.peak"),
        (train + ["x", "--set", "phase2.epochs=0"], {}, "phase2.epochs"),
        (train + ["x", "--set", "phase1.max_epochs=-1"], {}, "phase1.max_epochs"),
        (train + ["x", "--set", "model.name=resnet500"], {}, "unknown model 'resnet500'"),
        (train + ["x", "--set", "data.root=/nonexistent"], {}, "not found in /nonexistent"),
        (train + ["x", "--set", "data.source=imagefolder", "--set", f"data.root={empty}"], {}, "no split 'train'"),
        (train + ["x", "--set", "data.source=imagefolder", "--set", f"data.root={one_class}"], {}, "2 classes"),
        (train + ["x", "--set", "model.name=convnext_atto"], {}, "cannot take the data's 1x28x28 images"),
        (train + ["x", "--from-phase1", str(other_model)], {}, "checkpoint of another model"),
        (train + ["x", "--from-phase1", str(truncated)], {}, "truncated checkpoint"),
        (train + ["x", "--from-phase1", str(flipped)], {}, "fails its sha256 checksum"),
        (train + ["x", "--from-phase1", str(unfinished)], {}, "its phase 1 has not finished"),
        (train + ["x", "--from-phase1", str(tmp / "nowhere")], {}, "no such run directory or checkpoint"),
        (train + [str(a_file / "run")], {}, "is not writable"),
        (train + [str(finished)], {}, "already holds a finished run; pass --overwrite"),
        (train + [str(other_recipe)], {}, "unfinished run of another recipe (seed: 7 -> 0)"),
        (train + [str(other_world)], {}, "checkpointed by 2 processes but this launch has 1"),
        (train + ["x", "--set", "tracking.backend=wandb", "--set", "tracking.mode=online"], {"WANDB_ENTITY": ""},
         "tracking.entity"),
        (train + ["x", "--set", "phase1.bogus=1"], {}, "no such recipe key 'phase1.bogus'"),
        (["average", str(truncated.parent / "flipped"), "--recipe", b, "--out", "x"], {}, "checksum"),
        (["average", str(unfinished), "--recipe", b, "--out", "x"], {}, "no worker finished phase 2"),
        (["average", str(other_model), "--recipe", b, "--out", "x"], {}, "not a phase-2 worker's"),
        # Non-finite numbers, run names that leave runs/, and sizes larger than the images or the data set.
        (train + ["x", "--set", "phase2.lr.peak=.inf"], {}, "phase2.lr.peak: must be a finite number"),
        (train + ["x", "--set", "optimizer.weight_decay=nan"], {}, "optimizer.weight_decay: must be a finite number"),
        (train + ["x", "--set", "phase1.lr.warmup_epochs=inf"], {}, "phase1.lr.warmup_epochs: must be a finite"),
        (["train", b, "--set", "name=../../escape"], {}, "name '../../escape' is not a plain name"),
        (["train", b, "--set", "name=/etc"], {}, "would put the run directory outside runs/"),
        (train + ["x", "--set", "data.augment.cutout_size=40"], {}, "cutout_size=40 is not smaller than the 28x28"),
        (train + ["x", "--set", "data.augment.crop_padding=28"], {}, "crop_padding=28 is not smaller than the 28x28"),
        (train + ["x", "--set", "phase2.per_worker_batch_size=5000"], {},
         "phase2.per_worker_batch_size=5000 exceeds the 2048 training samples"),
        (train + ["x", "--set", "eval.bn_samples=4000"], {}, "eval.bn_samples=4000 exceeds the 2048 training samples"),
        (train + ["x", "--set", "phase1.global_batch_size=4200", "--set", "phase1.micro_batch_size=null"], {},
         "phase1.global_batch_size=4200 exceeds the 2048 training samples"),
        (train + ["x", "--set", "data.train_subset=70000"], {}, "data.train_subset=70000 exceeds the 60000 samples"),
    ]


@pytest.mark.slow
def test_bad_inputs_fail_fast_with_one_line(cases, monkeypatch):
    tmp, finished, table = cases
    assert len(table) >= 20
    monkeypatch.chdir(tmp)
    monkeypatch.setattr(swap_accel.train, "train", lambda *a, **k: pytest.fail(f"training started for {a}"))
    before = (finished / "results.json").read_bytes()
    for argv, env, fragment in table:
        result = CliRunner().invoke(app, argv, env=env)
        # (HF datasets' own progress bars, when it builds an image-folder cache, are not ours)
        lines = [line for line in result.stderr.splitlines() if line.strip() and "examples/s]" not in line]
        assert result.exit_code == 2 and len(lines) == 1, (argv, result.stderr, result.exception)
        assert lines[0].startswith("error: ") and fragment in lines[0], (argv, lines[0])
        assert "Traceback" not in result.output + result.stderr
        assert not (tmp / "x").exists(), argv  # nothing written for a refused run
    assert (finished / "results.json").read_bytes() == before


def test_a_crafted_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    state = tmp_path / "state.pt"
    state.write_bytes(pickle.dumps({"optimizer": Payload()}, protocol=2))
    with pytest.raises(CheckpointError, match="refusing to load") as refused:
        load_state(state)
    assert not marker.exists()
    # The message names what was refused and never passes on torch's advice to load with weights_only=False.
    assert "it refers to getattr, which could run code" in str(refused.value)
    assert "weights_only" not in str(refused.value)
    # The same loader still reads a legitimate state file (tensors and plain containers).
    torch.save({"totals": torch.zeros(4), "history": [{"epoch": 1}]}, state)
    assert load_state(state)["history"] == [{"epoch": 1}]


def test_damaged_newest_checkpoint_falls_back_to_the_previous_good_one(tmp_path):
    good = _phase1_checkpoint(tmp_path / "p1-step00000005")
    newest = _phase1_checkpoint(tmp_path / "p1-step00000010")
    (newest / "model.safetensors").write_bytes(b"torn")
    warnings = []
    assert newest_good([newest, good], warnings.append) == good
    assert "p1-step00000010" in warnings[0] and "truncated checkpoint" in warnings[0]


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data_cache):
    recipe = tiny_recipe(tmp_path, data_cache, phase1={"lr": {"peak": 1e4, "warmup_epochs": 1}},
                         checkpoint={"every_steps": 1}, data={"train_subset": 1008})
    out = tmp_path / "run"
    result = launch(2, recipe, out)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors and ("NaN/Inf" in errors[0] or "loss became nan" in errors[0]), result.stderr[-3000:]
    assert "step" in errors[0]
    assert "the last good checkpoint is kept" in errors[0] and not (out / "results.json").exists()
    kept = sorted((out / "checkpoints").glob("p1-step*"))
    assert kept and all(json.loads((k / "manifest.json").read_text())["step"] == int(k.name.removeprefix("p1-step"))
                        for k in kept)
    params = {name for name, _ in build_model("resnet9", in_chans=1, num_classes=10,
                                              kwargs={"base_width": 8}).named_parameters()}
    for k in kept:  # every kept checkpoint holds finite weights (BN running statistics may overflow first)
        assert all(torch.isfinite(t).all() for n, t in load_file(k / "model.safetensors").items() if n in params)


def test_an_explicit_out_keeps_any_name_and_the_default_stays_in_runs(tmp_path, data_cache):
    from swap_accel.tools.preflight import run_dir_for

    recipe = load_recipe(tiny_recipe(tmp_path, data_cache), ["name=../elsewhere"])
    assert run_dir_for(recipe, tmp_path / "mine") == tmp_path / "mine"  # --out anywhere is the user's choice
    assert run_dir_for(load_recipe(tiny_recipe(tmp_path, data_cache), ["name=v1.2_run-a"]), None) == \
        Path("runs") / "v1.2_run-a"


def test_model_sha256_identifies_the_tensors_not_the_file(tmp_path):
    """Two files of bitwise-equal tensors whose safetensors headers differ report one model_sha256; the
    file checksum stays under its own name, for integrity."""
    from swap_accel.checkpointing.files import weights_identity

    module = build_model("resnet9", in_chans=1, num_classes=10, kwargs={"base_width": 8})
    save_weights(tmp_path / "a.safetensors", module, {"name": "a", "test_acc": "0.5"})
    save_weights(tmp_path / "b.safetensors", module, {"test_acc": "0.5", "name": "b", "extra": "1"})
    a, b = (weights_identity(tmp_path / f"{x}.safetensors") for x in "ab")
    assert a["model_sha256"] == b["model_sha256"] and a["model_file_sha256"] != b["model_file_sha256"]
    with torch.no_grad():
        next(module.parameters()).view(-1)[0] += 1e-6  # one value, one ulp-scale change: another model
    save_weights(tmp_path / "c.safetensors", module, {"name": "a", "test_acc": "0.5"})
    assert weights_identity(tmp_path / "c.safetensors")["model_sha256"] != a["model_sha256"]
