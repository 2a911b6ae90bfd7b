"""`swap_accel landscape RUN_DIR`: train and test error on the plane through three models (paper section 4,
Figures 2 and 3).

Section 4 looks at the plane that contains three models θ1, θ2, θ3 of one run: the large-batch model at the end of
phase 1 (LB), the workers (W0, W1, ...) and their average (SWAP). Its basis is orthonormal, u along θ2 - θ1 and v
the part of θ3 - θ1 orthogonal to u (Gram-Schmidt, as Garipov et al. 2018 build the planes the paper follows), so
θ1 sits at (0, 0), θ2 at (|θ2 - θ1|, 0) and θ3 above the u axis. Every grid point θ1 + x u + y v is a model of
its own: its BatchNorm statistics are recomputed for it, exactly as phase 3 recomputes the average's (a plane of
weights with θ1's statistics would show BN mismatch, not the loss surface), then its error is measured on a fixed
sample of training and of test images. The plane holds the parameters only; BN statistics are not weights here.

Grid points are spread over the launched processes (point k on rank k mod P, each on its own with no
communication) and gathered once at the end. Cost is (grid² + 3) x (BN + train + test samples) forward passes:
11 x 11 with 1000 / 2000 / 2000 took 9 min 52 s on 2 cores (measured with a smoke benchmark running beside it),
so the defaults are 9 x 9 with 500 / 1000 / 1000, about a third of that work; --grid 21 with the whole test set
is the paper's resolution, for a GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..algorithm.bn import recalibrate_bn_
from ..algorithm.evaluate import evaluate_local
from ..checkpointing.files import load_weights_into, verify_checkpoint, write_json
from ..checkpointing.resume import ROOT
from ..data.loading import load_data
from ..data.sampling import bn_order
from ..models import build_model
from ..parallel.distributed import gather_objects, make_accelerator
from ..recipe import Recipe, load_recipe
from .geometry import LandscapeError, flat_parameters, grid_axes, plane_through, set_parameters_


def model_path(run_dir: Path, name: str) -> Path:
    """LB: phase 1's end; W<k>: worker k's end of phase 2; SWAP: the averaged model. A directory holding
    model.safetensors (load_weights_into's form), verified against its manifest where it is a checkpoint."""
    if name == "SWAP":
        if not (run_dir / "model.safetensors").is_file():
            raise LandscapeError(f"{run_dir} has no averaged model (model.safetensors); finish the run first")
        return run_dir
    if name == "LB":
        path = run_dir / ROOT / "p1-end"
    elif name[:1] == "W" and name[1:].isdigit():
        path = run_dir / ROOT / f"p2-w{int(name[1:])}-end"
    else:
        raise LandscapeError(f"unknown model {name!r} in --points; use LB, SWAP or W<k> (a worker), e.g. LB,W0,SWAP")
    if not path.is_dir():
        raise LandscapeError(f"{name}: {path} not found; that part of {run_dir} has not finished")
    verify_checkpoint(path)
    return path


def landscape(run_dir: Path, names: list[str], *, grid: int, bn_samples: int, train_samples: int,
              test_samples: int, out: Path) -> dict | None:
    """The grid of errors on every process's share of the points; the main process writes JSON and PNG."""
    recipe: Recipe = load_recipe(run_dir / "recipe.yaml")
    paths = [model_path(run_dir, name) for name in names]
    accelerator = make_accelerator(recipe.mixed_precision, loss_scale=recipe.loss_scale)
    rank, world = accelerator.process_index, accelerator.num_processes
    train_data = load_data(recipe.data, accelerator.device, split="train")
    test_data = load_data(recipe.data, accelerator.device, split="test")
    module = build_model(recipe.model.name, in_chans=train_data.in_chans, num_classes=train_data.num_classes,
                         kwargs=recipe.model.kwargs, image_size=train_data.image_size).to(accelerator.device)
    thetas = []
    for path in paths:
        load_weights_into(module, path)
        thetas.append(flat_parameters(module))
    plane = plane_through(*thetas)
    coords = [plane.coords(t) for t in thetas]
    xs, ys = grid_axes(coords, grid)
    # Fixed seeded samples (another stream than phase 3's BN order, which the BN passes use), the same for every
    # point and process.
    train_order = bn_order(train_data.num_samples, seed=recipe.seed + 1, samples=min(train_samples,
                                                                                      train_data.num_samples))
    test_order = bn_order(test_data.num_samples, seed=recipe.seed + 1, samples=min(test_samples,
                                                                                    test_data.num_samples))

    def errors(theta: torch.Tensor) -> tuple[float, float]:
        set_parameters_(module, theta)
        recalibrate_bn_(module, train_data, accelerator, samples=min(bn_samples, train_data.num_samples),
                        batch_size=recipe.eval.bn_batch_size, seed=recipe.seed, shard=(0, 1))  # this process only
        batch = recipe.eval.batch_size
        return (1 - evaluate_local(module, train_data, batch, accelerator, order=train_order),
                1 - evaluate_local(module, test_data, batch, accelerator, order=test_order))

    # The three models at their exact coordinates first, then the grid, dealt round-robin over the processes.
    jobs = [("model", k) for k in range(3)] + [("grid", (i, j)) for j in range(len(ys)) for i in range(len(xs))]
    accelerator.print(f"landscape: the plane through {', '.join(names)} (distances {coords[1][0]:.3g} and "
                      f"{(coords[2][0] ** 2 + coords[2][1] ** 2) ** 0.5:.3g} from {names[0]}), {len(jobs)} models over "
                      f"{world} process(es), BN recomputed for each", flush=True)
    mine = []
    for kind, key in jobs[rank::world]:
        theta = thetas[key] if kind == "model" else plane.at(xs[key[0]], ys[key[1]])
        mine.append((kind, key, *errors(theta)))
    done = [row for rows in gather_objects(mine, accelerator) for row in rows]
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        accelerator.end_training()
        return None
    train_err = [[0.0] * len(xs) for _ in ys]
    test_err = [[0.0] * len(xs) for _ in ys]
    models = [None] * 3
    for kind, key, tr, te in done:
        if kind == "model":
            models[key] = {"name": names[key], "x": coords[key][0], "y": coords[key][1], "train_error": tr,
                           "test_error": te, "checkpoint": str(paths[key])}
        else:
            train_err[key[1]][key[0]], test_err[key[1]][key[0]] = tr, te
    _, best_i, best_j = min((e, i, j) for j, row in enumerate(test_err) for i, e in enumerate(row))
    result = {
        "run_dir": str(run_dir), "points": names, "models": models, "x": xs, "y": ys,
        # Rows are y, columns x: train_error[j][i] is the model at (x[i], y[j]).
        "train_error": train_err, "test_error": test_err,
        "best": {"x": xs[best_i], "y": ys[best_j], "test_error": test_err[best_j][best_i],
                 "train_error": train_err[best_j][best_i]},
        "samples": {"bn": min(bn_samples, train_data.num_samples), "train": len(train_order),
                    "test": len(test_order)},
        "basis": "u = (θ2 - θ1)/|θ2 - θ1|; v = Gram-Schmidt of θ3 - θ1 against u; parameters only, BN recomputed",
        "processes": world,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "landscape.json", result)
    draw(result).savefig(out / "landscape.png", dpi=110)
    accelerator.end_training()
    return result


def draw(result: dict):
    """Figure 2/3's picture: train and test error contours, the three models and the best grid point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), constrained_layout=True)
    for ax, key in zip(axes, ("train_error", "test_error"), strict=True):
        values = torch.tensor(result[key]) * 100
        filled = ax.contourf(result["x"], result["y"], values, levels=15, cmap="viridis_r")
        fig.colorbar(filled, ax=ax, label=f"{key.replace('_', ' ')} (%)")
        for m in result["models"]:
            ax.plot(m["x"], m["y"], "o", color="white", markeredgecolor="black")
            ax.annotate(f"{m['name']} {100 * m[key]:.1f}%", (m["x"], m["y"]), textcoords="offset points",
                        xytext=(5, 5), color="white", fontsize=9, weight="bold")
        best = result["best"]
        ax.plot(best["x"], best["y"], "*", color="red", markersize=12)
        ax.annotate("BEST", (best["x"], best["y"]), textcoords="offset points", xytext=(5, -12), color="red")
        ax.set_title(f"{key.replace('_', ' ')} on the plane through {', '.join(result['points'])}")
        ax.set_xlabel("u")
        ax.set_ylabel("v")
    return fig

