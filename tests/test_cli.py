"""The command line as users meet it: validate, models, and bad input that fails fast and clearly."""

from __future__ import annotations

import json
import subprocess
import sys

from launching import ROOT, launch, needs_fashion, tiny_recipe


def swap_accel(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swap_accel", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_validate_prints_resolved_recipe():
    result = swap_accel("validate", "recipes/fashion_mnist.yaml", "--num-processes", "8", "--set", "phase2.epochs=3")
    assert result.returncode == 0, result.stderr
    assert "epochs: 3" in result.stdout and "# ok: valid for 8 process(es)" in result.stdout


def test_models_lists_resnet9_and_timm_models():
    result = swap_accel("models", "resnet")
    names = result.stdout.split()
    assert result.returncode == 0 and "resnet9" in names and "resnet50" in names


def test_bad_input_is_one_line_without_traceback(tmp_path):
    for args, fragment in [
        (["validate", "recipes/fashion_mnist.yaml", "--set", "model.name=resnet500"], "unknown model 'resnet500'"),
        (["validate", "recipes/fashion_mnist.yaml", "--num-processes", "3"], "not divisible by 3 processes"),
        (["validate", "recipes/nope.yaml"], "recipe recipes/nope.yaml not found"),
        (["validate", "recipes/fashion_mnist.yaml", "--set", "data.root=/nonexistent"], "apt-get install"),
        (["train", "recipes/fashion_mnist.yaml", "--set", "phase1.lr.peak=0"], "phase1.lr.peak"),
    ]:
        result = swap_accel(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], (args, result.stderr)


def test_debug_shows_the_traceback():
    result = swap_accel("validate", "recipes/fashion_mnist.yaml", "--set", "model.name=resnet500", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


@needs_fashion
def test_multiprocess_launch_refuses_bad_recipe_on_every_rank(tmp_path, data_cache):
    recipe = tiny_recipe(tmp_path, data_cache, phase1={"global_batch_size": 255})
    result = launch(2, recipe, tmp_path / "run")
    assert result.returncode != 0
    assert result.stderr.count("not divisible by 2 processes") == 2, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before any work started


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
    again = launch(2, recipe, out)
    assert again.returncode != 0 and "already holds a finished run" in again.stderr
    assert (out / "results.json").read_bytes() == before


@needs_fashion
def test_set_model_name_swaps_any_timm_family_into_the_quickstart_recipe(tmp_path, data_cache):
    """Issue 13: the quickstart's ResNet-9 width does not leak into another model; a ViT is built for the data's
    28x28 images; a model that really cannot take them (ConvNeXt downsamples 32x) is refused for that reason."""
    for name in ("resnet18", "mobilenetv3_small_050", "efficientnet_b0", "vit_tiny_patch16_224"):
        result = swap_accel("validate", "recipes/fashion_mnist.yaml", "--set", f"model.name={name}")
        assert result.returncode == 0, (name, result.stderr[-2000:])
        assert "kwargs: {}" in result.stdout and "belong to resnet9, not passed to" in result.stderr, name
    refused = swap_accel("validate", "recipes/fashion_mnist.yaml", "--set", "model.name=convnext_atto")
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
