"""`swap_accel cosine RUN_DIR`: along one worker's phase 2, the cosine between its descent direction and the
direction to the averaged model (paper section 4.2, Figure 4).

    cos_i = <θ_swap - θ_i, -g_i> / (|θ_swap - θ_i| |g_i|)

The paper shows it falling as phase 2 goes on: early, descending also moves a worker toward the average; later
the gradient points elsewhere (mostly across the basin's floor), which is when averaging beats further descent.
θ_i are the worker's saved states: phase 1's end (its step 0), every periodic checkpoint p2-w<k>-step* still
kept, and its end. A run keeps `checkpoint.keep` periodic checkpoints (2 by default), so record a trajectory with
e.g. `--set checkpoint.every_steps=S --set checkpoint.keep=K`, S about a tenth of a worker's steps and K >= 10:
the curve then has K + 2 points (3 is the least that shows a trend; start and end alone give 2).

g_i is the gradient of the objective the worker's SGD descends, the mean cross-entropy (with the recipe's label
smoothing) plus weight decay (torch's SGD adds weight_decay * θ to every parameter's gradient), over a fixed
sample of un-augmented training images with BatchNorm in training mode, as in the worker's own steps. θ is the
parameters only. One process: a handful of gradients, each one pass over `--samples` images.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpointing.files import load_weights_into, verify_checkpoint, write_json
from ..checkpointing.resume import ROOT, step_dirs
from ..data.loading import load_data
from ..data.sampling import bn_order
from ..data.sources import DataSource
from ..models import build_model
from ..recipe import Recipe, load_recipe
from .geometry import LandscapeError, direction_cosine, flat_parameters


def trajectory(run_dir: Path, worker: int) -> list[tuple[int, Path]]:
    """(worker step, checkpoint dir) from phase 1's end to the worker's end, oldest first."""
    root = run_dir / ROOT
    end = root / f"p2-w{worker}-end"
    if not end.is_dir():
        raise LandscapeError(f"worker {worker} of {run_dir} has not finished phase 2 ({end} not found); pick a "
                             f"finished worker with --worker")
    if not (root / "p1-end").is_dir():
        raise LandscapeError(f"{root / 'p1-end'} not found: the worker's starting point is missing")
    verify_checkpoint(root / "p1-end")
    periodic = [(int(verify_checkpoint(p)["step"]), p) for p in reversed(step_dirs(root, f"p2-w{worker}-step"))]
    return [(0, root / "p1-end"), *periodic, (int(verify_checkpoint(end)["step"]), end)]


def objective_gradient(module: torch.nn.Module, source: DataSource, order: torch.Tensor,
                       recipe: Recipe) -> torch.Tensor:
    """∇ of the mean training loss over `order` (sum of per-batch sums / n, so batch size does not matter) plus
    weight decay: the direction the worker's SGD steps against, before momentum."""
    module.train()
    module.zero_grad(set_to_none=True)
    for x, y in source.batches(order, 256, augment=False, generator=None):
        loss = F.cross_entropy(module(x), y, reduction="sum", label_smoothing=recipe.optimizer.label_smoothing)
        (loss / len(order)).backward()
    grad = torch.cat([p.grad.reshape(-1).double() for p in module.parameters()])
    return grad + recipe.optimizer.weight_decay * flat_parameters(module)


def cosine_curve(run_dir: Path, worker: int, samples: int, out: Path) -> dict:
    recipe = load_recipe(run_dir / "recipe.yaml")
    points = trajectory(run_dir, worker)
    if not (run_dir / "model.safetensors").is_file():
        raise LandscapeError(f"{run_dir} has no averaged model (model.safetensors); finish the run first")
    device = torch.device("cpu")
    train = load_data(recipe.data, device, split="train")
    module = build_model(recipe.model.name, in_chans=train.in_chans, num_classes=train.num_classes,
                         kwargs=recipe.model.kwargs, image_size=train.image_size)
    load_weights_into(module, run_dir)
    target = flat_parameters(module)
    order = bn_order(train.num_samples, seed=recipe.seed + 2, samples=min(samples, train.num_samples))
    rows = []
    for step, path in points:
        load_weights_into(module, path)
        theta = flat_parameters(module)
        grad = objective_gradient(module, train, order, recipe)
        rows.append({"step": step, "checkpoint": str(path), "cosine": direction_cosine(theta, target, grad),
                     "distance_to_swap": float((target - theta).norm()), "gradient_norm": float(grad.norm())})
    result = {"run_dir": str(run_dir), "worker": worker, "samples": len(order), "points": rows,
              "definition": "cos(theta_swap - theta_i, -g_i); g = mean cross-entropy gradient + weight_decay * theta"}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"cosine_w{worker}.json", result)
    draw(result).savefig(out / f"cosine_w{worker}.png", dpi=110)
    return result


def draw(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in result["points"]]
    fig, ax = plt.subplots(figsize=(6, 3.6), constrained_layout=True)
    ax.plot(steps, [p["cosine"] for p in result["points"]], "o-")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel(f"worker {result['worker']} phase-2 step")
    ax.set_ylabel("cos(θ_swap − θ_i, −g_i)")
    ax.set_title("Descent direction vs direction to the SWAP average (paper Fig. 4)")
    distance = ax.twinx()
    distance.plot(steps, [p["distance_to_swap"] for p in result["points"]], "s--", color="tab:orange", alpha=0.6)
    distance.set_ylabel("|θ_swap − θ_i|", color="tab:orange")
    return fig
