"""`swap_accel landscape` (paper section 4): the plane basis and the three models' coordinates, and a
real 2-process landscape of a real run whose grid points are recomputed here independently: the point's weights
from the plane, its BatchNorm statistics from a direct pass (not swap_accel's recalibration), its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import LAUNCH, ROOT, free_port, launch, needs_fashion, tiny_recipe
from typer.testing import CliRunner

from swap_accel.checkpointing.files import load_weights_into
from swap_accel.cli import app
from swap_accel.data.loading import load_data
from swap_accel.data.sampling import bn_order
from swap_accel.models import build_model
from swap_accel.recipe import load_recipe
from swap_accel.tools.geometry import (
    LandscapeError,
    direction_cosine,
    flat_parameters,
    grid_axes,
    plane_through,
    set_parameters_,
)
from swap_accel.tools.landscape import model_path

pytestmark = pytest.mark.slow


def test_plane_basis_is_orthonormal_and_places_the_three_models():
    g = torch.Generator().manual_seed(0)
    t1, t2, t3 = (torch.randn(5000, generator=g, dtype=torch.float64) for _ in range(3))
    plane = plane_through(t1, t2, t3)
    assert float(plane.u @ plane.u) == pytest.approx(1, abs=1e-12) and float(plane.v @ plane.v) == pytest.approx(1)
    assert abs(float(plane.u @ plane.v)) < 1e-12
    coords = [plane.coords(t) for t in (t1, t2, t3)]
    # θ1 at the origin, θ2 on the u axis at its distance, θ3 at (projection on u, distance from the u axis).
    assert coords[0] == (0.0, 0.0)
    assert coords[1][0] == pytest.approx(float((t2 - t1).norm())) and coords[1][1] == pytest.approx(0, abs=1e-10)
    d3 = t3 - t1
    assert coords[2][0] == pytest.approx(float(d3 @ (t2 - t1)) / float((t2 - t1).norm()))
    assert coords[2][1] == pytest.approx((float(d3 @ d3) - coords[2][0] ** 2) ** 0.5)
    for t, (x, y) in zip((t1, t2, t3), coords, strict=True):  # the plane holds all three exactly
        torch.testing.assert_close(plane.at(x, y), t, rtol=0, atol=1e-12)
    xs, ys = grid_axes(coords, 5)
    assert len(xs) == len(ys) == 5 and xs[0] < 0 < coords[1][0] < xs[-1] and ys[0] < 0 < coords[2][1] < ys[-1]
    with pytest.raises(LandscapeError, match="one line"):
        plane_through(t1, t2, t1 + 2.5 * (t2 - t1))
    with pytest.raises(LandscapeError, match="identical"):
        plane_through(t1, t1.clone(), t3)


def test_cosine_on_a_quadratic_with_a_known_answer():
    """f(θ) = ½ θᵀAθ, minimum (the "average") at 0: -g = -Aθ and the direction to the minimum is -θ, so the cosine
    is θᵀAθ / (|θ| |Aθ|): 1 for A = I, 5/sqrt(34) for A = diag(1, 4) at θ = (1, 1). The gradient comes from autograd."""
    for a, expected in ((torch.tensor([1.0, 1.0]), 1.0), (torch.tensor([1.0, 4.0]), 5 / 34 ** 0.5)):
        theta = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
        (0.5 * (a * theta * theta).sum()).backward()
        assert direction_cosine(theta.detach(), torch.zeros(2, dtype=torch.float64), theta.grad) == pytest.approx(
            expected, rel=1e-12)
    # Walking along the valley floor of an elongated quadratic, the gradient turns away from the minimum.
    a = torch.tensor([1.0, 100.0], dtype=torch.float64)
    cosines = [direction_cosine(t, torch.zeros(2, dtype=torch.float64), a * t)
               for t in (torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 0.1], dtype=torch.float64))]
    assert cosines[0] > cosines[1] > 0
    with pytest.raises(LandscapeError):
        direction_cosine(torch.zeros(2), torch.zeros(2), torch.ones(2))


def _direct_errors(module, recipe, train, test, train_order, test_order, bn_samples):
    """BN statistics of a train-mode pass captured with hooks, then errors in eval mode: no swap_accel helper."""
    bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    seen = {id(m): [] for m in bns}
    hooks = [m.register_forward_pre_hook(lambda m, i: seen[id(m)].append(i[0].double())) for m in bns]
    module.train()
    with torch.no_grad():
        for x, _ in train.batches(bn_order(train.num_samples, seed=recipe.seed, samples=bn_samples),
                                  recipe.eval.bn_batch_size, augment=False, generator=None):
            module(x)
    for h in hooks:
        h.remove()
    for m in bns:
        x = torch.cat(seen[id(m)]).transpose(0, 1).reshape(m.num_features, -1)
        m.running_mean.copy_(x.mean(1))
        m.running_var.copy_(x.var(1, correction=1))
    module.eval()
    errors = []
    with torch.no_grad():
        for source, order in ((train, train_order), (test, test_order)):
            wrong = sum(int((module(x).argmax(1) != y).sum()) for x, y in source.batches(
                order, 100, augment=False, generator=None))
            errors.append(wrong / len(order))
    return errors


@needs_fashion
def test_landscape_of_a_real_run_on_two_processes(tmp_path, data_cache):
    recipe_path = tiny_recipe(tmp_path, data_cache)
    run = tmp_path / "run"
    # Periodic worker checkpoints every 4 steps, all kept: the trajectory `swap_accel cosine` follows.
    trained = launch(2, recipe_path, run, "--set", "checkpoint.every_steps=4", "--set", "checkpoint.keep=50")
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = tmp_path / "plane"
    cmd = [*LAUNCH, "--config_file", str(ROOT / "accelerate_config.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "swap_accel", "landscape", str(run), "--grid", "4",
           "--bn-samples", "400", "--train-samples", "300", "--test-samples", "200", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "best test error" in done.stdout and (out / "landscape.png").stat().st_size > 10_000
    result = json.loads((out / "landscape.json").read_text())
    assert result["processes"] == 2 and [m["name"] for m in result["models"]] == ["LB", "W0", "SWAP"]
    assert len(result["x"]) == len(result["y"]) == len(result["test_error"]) == len(result["train_error"]) == 4
    assert all(len(row) == 4 for row in (*result["test_error"], *result["train_error"]))
    flat = [(e, i, j) for j, row in enumerate(result["test_error"]) for i, e in enumerate(row)]
    best = min(flat)
    assert (result["best"]["x"], result["best"]["y"]) == (result["x"][best[1]], result["y"][best[2]])

    # Independently: the plane from the checkpoints, the models' coordinates, and two points recomputed here.
    recipe = load_recipe(run / "recipe.yaml")
    train, test = (load_data(recipe.data, torch.device("cpu"), split=s) for s in ("train", "test"))
    module = build_model("resnet9", in_chans=1, num_classes=10, kwargs={"base_width": 8})
    thetas = []
    for name in ("LB", "W0", "SWAP"):
        load_weights_into(module, model_path(run, name))
        thetas.append(flat_parameters(module))
    plane = plane_through(*thetas)
    for m, theta in zip(result["models"], thetas, strict=True):
        assert (m["x"], m["y"]) == pytest.approx(plane.coords(theta))
    train_order = bn_order(train.num_samples, seed=recipe.seed + 1, samples=300)
    test_order = bn_order(test.num_samples, seed=recipe.seed + 1, samples=200)
    tolerance = 2 / 200  # another thread count may move a sample across the decision boundary
    for i, j in ((0, 3), (2, 1)):  # a corner far from every model, and an inner point
        set_parameters_(module, plane.at(result["x"][i], result["y"][j]))
        tr, te = _direct_errors(module, recipe, train, test, train_order, test_order, 400)
        assert result["train_error"][j][i] == pytest.approx(tr, abs=tolerance)
        assert result["test_error"][j][i] == pytest.approx(te, abs=tolerance)
    # The average's exact coordinates give the average's own error (its phase-3 BN, recomputed over 400 samples).
    set_parameters_(module, thetas[2])
    tr, te = _direct_errors(module, recipe, train, test, train_order, test_order, 400)
    assert result["models"][2]["test_error"] == pytest.approx(te, abs=tolerance)

    # The cosine diagnostic on worker 1's recorded trajectory: start, every periodic checkpoint, end.
    diag = tmp_path / "diag"
    done = subprocess.run([sys.executable, "-m", "swap_accel", "cosine", str(run), "--worker", "1", "--samples", "256",
                           "--out", str(diag)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    curve = json.loads((diag / "cosine_w1.json").read_text())
    steps = [p["step"] for p in curve["points"]]
    worker_steps = json.loads((run / "results.json").read_text())["workers"][1]["steps"]
    assert steps == [0, *range(4, worker_steps, 4), worker_steps] and (diag / "cosine_w1.png").is_file()
    assert all(-1 <= p["cosine"] <= 1 and p["distance_to_swap"] > 0 for p in curve["points"])
    # One point recomputed here: the whole sample in one batch, the loss and weight decay written out by hand.
    load_weights_into(module, run)
    target = flat_parameters(module)
    middle = curve["points"][len(steps) // 2]
    load_weights_into(module, Path(middle["checkpoint"]))
    module.train()
    module.zero_grad()
    x, y = next(iter(train.batches(bn_order(train.num_samples, seed=recipe.seed + 2, samples=256), 256,
                                   augment=False, generator=None)))
    torch.nn.functional.cross_entropy(module(x), y).backward()
    theta = flat_parameters(module)
    grad = torch.cat([p.grad.reshape(-1).double() for p in module.parameters()]) + recipe.optimizer.weight_decay * theta
    expected = float((target - theta) @ -grad) / float((target - theta).norm() * grad.norm())
    assert middle["cosine"] == pytest.approx(expected, abs=1e-4)

    bad = CliRunner().invoke(app, ["landscape", str(run), "--points", "LB,W7,SWAP"])  # refused before any work
    assert bad.exit_code == 2 and "W7" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
