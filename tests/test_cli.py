"""The command line as users meet it: validate, models, and bad input that fails fast and clearly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launching import ROOT, launch, needs_fashion, tiny_recipe
from typer.testing import CliRunner

from swap_accel.cli import app, main
from swap_accel.models import ModelError  # importing the package registers resnet9 for timm's local-dir: loading


def swap_accel(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swap_accel", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


@pytest.mark.slow
def test_validate_prints_resolved_recipe():
    # In this process: the CLI's own start in a fresh interpreter is checked by the bad-input test below.
    result = CliRunner().invoke(app, ["validate", str(ROOT / "recipes" / "fashion_mnist.yaml"), "--num-processes", "8",
                                      "--set", "phase2.epochs=3"])
    assert result.exit_code == 0, result.stderr
    assert "epochs: 3" in result.stdout and "# ok: valid for 8 process(es)" in result.stdout


@pytest.mark.slow
def test_models_lists_resnet9_and_timm_models():
    result = CliRunner().invoke(app, ["models", "resnet"])
    names = result.stdout.split()
    assert result.exit_code == 0 and "resnet9" in names and "resnet50" in names


@pytest.mark.slow
def test_bad_input_is_one_line_without_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    for args, fragment in [
        (["validate", "recipes/fashion_mnist.yaml", "--set", "model.name=resnet500"], "unknown model 'resnet500'"),
        (["validate", "recipes/fashion_mnist.yaml", "--num-processes", "3"], "not divisible by 3 processes"),
        (["validate", "recipes/nope.yaml"], "recipe recipes/nope.yaml not found"),
        (["validate", "recipes/fashion_mnist.yaml", "--set", "data.root=/nonexistent"], "apt-get install"),
        (["train", "recipes/fashion_mnist.yaml", "--set", "phase1.lr.peak=0"], "phase1.lr.peak"),
    ]:
        if args[-1] == "model.name=resnet500":  # a fresh interpreter: nothing printed on import either
            result = swap_accel(*args)
        else:  # the same CLI in this process: a Python start per case would add seconds and test nothing more
            result = CliRunner().invoke(app, args)
            result.returncode = result.exit_code
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], (args, result.stderr)


@pytest.mark.slow
def test_debug_shows_the_traceback(monkeypatch, capsys):
    # The console entry point itself (`python -m swap_accel` runs cli.main), in this process: with --debug the
    # exception leaves it, for Python to print its traceback, instead of the one-line error above.
    monkeypatch.setattr(sys, "argv", ["swap_accel", "validate", str(ROOT / "recipes" / "fashion_mnist.yaml"), "--set",
                                      "model.name=resnet500", "--debug"])
    with pytest.raises(ModelError, match="unknown model 'resnet500'"):
        main()
    assert "error: " not in capsys.readouterr().err


@pytest.mark.slow
@needs_fashion
def test_multiprocess_launch_refuses_bad_recipe_on_every_rank(tmp_path, data_cache):
    recipe = tiny_recipe(tmp_path, data_cache, phase1={"global_batch_size": 255})
    result = launch(2, recipe, tmp_path / "run")
    assert result.returncode != 0
    assert result.stderr.count("not divisible by 2 processes") == 2, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before any work started


@pytest.mark.slow
@needs_fashion
def test_sgd_mode_and_finished_run_protection(tmp_path, data_cache):
    recipe = tiny_recipe(tmp_path, data_cache, mode="sgd", phase1={"max_epochs": 2})
    out = tmp_path / "run"
    result = launch(2, recipe, out)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["mode"] == "sgd" and r["phase2"] is None and r["phase1"]["epochs"] == 2  # tau ignored: full budget
    assert r["critical_path_steps"] == r["phase1"]["steps"] and r["collectives"]["phase2"]["calls"] == 0
    assert "SGD (batch 252)" in result.stdout
    before = (out / "results.json").read_bytes()
    again = CliRunner().invoke(app, ["train", str(recipe), "--out", str(out)])  # refused before any work starts
    assert again.exit_code != 0 and "already holds a finished run" in again.stderr
    assert (out / "results.json").read_bytes() == before


@pytest.mark.slow
@needs_fashion
def test_set_model_name_swaps_any_timm_family_into_the_quickstart_recipe(tmp_path, data_cache):
    """The quickstart's ResNet-9 width does not leak into another model; a ViT is built for the data's
    28x28 images; a model that really cannot take them (ConvNeXt downsamples 32x) is refused for that reason."""
    # In this process (the CLI as a user calls it, without a Python start per model): exit codes and streams as typed.
    def validate(name: str):
        result = CliRunner().invoke(app, ["validate", str(ROOT / "recipes" / "fashion_mnist.yaml"), "--set",
                                          f"model.name={name}"])
        result.returncode = result.exit_code
        return result

    for name in ("resnet18", "mobilenetv3_small_050", "efficientnet_b0", "vit_tiny_patch16_224"):
        result = validate(name)
        assert result.returncode == 0, (name, result.stderr[-2000:], result.exception)
        assert "kwargs: {}" in result.stdout and "belong to resnet9, not passed to" in result.stderr, name
    refused = validate("convnext_atto")
    assert refused.returncode == 2 and "cannot take the data's 1x28x28 images" in refused.stderr
    assert "base_width" not in refused.stderr.splitlines()[-1]  # the real cause, not ResNet-9's option
    # ... and the swapped model trains through all three phases with real processes (tiny subset).
    recipe = tiny_recipe(tmp_path, data_cache, data={"train_subset": 504, "test_subset": 200},
                         phase1={"max_epochs": 1}, phase2={"epochs": 1}, eval={"bn_samples": 500})
    out = tmp_path / "run"
    result = launch(2, recipe, out, "--set", "model.name=resnet18")
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["model"] == "resnet18" and r["recipe"]["model"]["kwargs"] == {} and 0 < r["test_acc"] <= 1


@needs_fashion
def test_train_says_before_starting_that_one_worker_or_workers_in_turn_is_what_it_will_run(
        tmp_path, data_cache, monkeypatch):
    """`accelerate launch -m swap_accel train RECIPE` without a config is one process: phase 3 would 'average' one
    model, said in one line naming the fix; workers in turn are counted. Neither is refused (training starts)."""
    import swap_accel.train

    started = []
    monkeypatch.setattr(swap_accel.train, "train", lambda recipe, run_dir, **k: started.append(recipe))
    recipe = str(tiny_recipe(tmp_path, data_cache))
    for world, sets, fragment in [
        ("1", [], "note: phase 2 has a single worker (1 process, phase2.workers unset), so phase 3 averages one "
                  "model"),
        ("2", ["--set", "phase2.workers=1000000"], "each process trains 500000 workers one after another"),
    ]:
        result = CliRunner().invoke(app, ["train", recipe, "--out", str(tmp_path / "run"), *sets],
                                    env={"WORLD_SIZE": world, "RANK": None})
        assert result.exit_code == 0, (result.stderr, result.exception)
        lines = [line for line in result.stderr.splitlines() if line.startswith("note: phase")]
        assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert len(started) == 2
    quiet = CliRunner().invoke(app, ["train", recipe, "--out", str(tmp_path / "run")],
                               env={"WORLD_SIZE": "2", "RANK": None})
    assert quiet.exit_code == 0 and "note: phase" not in quiet.stderr  # 2 processes, 2 workers: nothing to say


def test_export_into_a_file_is_one_line(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "inside"):
        result = CliRunner().invoke(app, ["export", str(tmp_path), str(out)])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, (result.stderr, result.exception)
        assert lines[0].startswith("error: ") and f"{a_file} is a file, not a folder" in lines[0]
    assert a_file.read_text() == "not a folder"


def test_models_that_match_nothing_say_so():
    result = CliRunner().invoke(app, ["models", "zzz*"])
    assert result.exit_code == 1 and result.stdout == ""
    assert "no timm model name matches 'zzz*'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_export_of_a_streaming_run_states_the_eval_transform_it_was_measured_with(tmp_path):
    """The card's preprocessing is the one the run's test accuracy was measured with: for streamed data timm's eval
    transform (crop 0.875, bilinear, ImageNet mean/std), not crop 1.0 and the model's own interpolation; timm rebuilds
    exactly that transform from the exported folder."""
    import numpy as np
    import timm
    import torch
    from PIL import Image
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config

    from swap_accel.checkpointing.files import save_weights
    from swap_accel.data.loading import load_data
    from swap_accel.models import build_model
    from swap_accel.recipe import Recipe

    root = tmp_path / "images"
    for split, count in (("train", 3), ("test", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(root / split / c / f"{i}.png")
    recipe = Recipe.model_validate({
        "name": "stream", "mode": "sgd", "model": {"name": "resnet9", "kwargs": {"base_width": 8}},
        "data": {"source": "imagefolder", "root": str(root), "in_memory": False, "image_size": 32, "num_workers": 0,
                 "cache_dir": str(tmp_path / "cache")},
        "phase1": {"global_batch_size": 2, "max_epochs": 1, "lr": {"peak": 0.1}}})
    run = tmp_path / "run"
    run.mkdir()
    save_weights(run / "model.safetensors", build_model("resnet9", in_chans=3, num_classes=2,
                                                        kwargs={"base_width": 8}, image_size=(32, 32)))
    (run / "results.json").write_text(json.dumps({
        "name": "stream", "mode": "sgd", "num_processes": 1, "recipe": recipe.model_dump(mode="json"), "test_acc": 0.5,
        "critical_path_steps": 3, "phase1": {"global_batch_size": 2, "seconds": 1.0}}))
    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", str(run), str(out)])
    assert result.exit_code == 0, (result.stderr, result.exception)
    card = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert (card["crop_pct"], card["interpolation"], card["crop_mode"]) == (0.875, "bilinear", "center")
    assert tuple(card["mean"]) == IMAGENET_DEFAULT_MEAN and tuple(card["std"]) == IMAGENET_DEFAULT_STD
    used = load_data(recipe.data, torch.device("cpu"), split="test").eval_loader(1).dataset.transform
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert repr(create_transform(**resolve_data_config(model=model))) == repr(used)
