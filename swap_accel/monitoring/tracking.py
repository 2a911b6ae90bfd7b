"""Experiment tracking through Accelerate's trackers: W&B, TensorBoard or none.

Accelerate owns the trackers (`log_with`, `init_trackers`, `accelerator.log`, `get_tracker`); this
module only decides what goes into them: the run config, phase-keyed metric names, the end-of-run
summary with the paper's Table 1 rows and the Figure 1 image. Trackers live on the main process only
(Accelerate's `init_trackers`/`log` are main-process methods), so nothing here communicates.
`backend: none` never imports a tracker library: imports happen inside the functions that need them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import netrc
import os
import platform
from pathlib import Path
from urllib.parse import urlparse

import torch
from accelerate import Accelerator

from ..recipe import Recipe, RecipeError, TrackingConfig
from .report import COLUMNS

# Accelerate's tracker names; TensorBoard's writer may come from torch.utils.tensorboard or tensorboardX.
_MODULES = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX")}
_VERSIONS = ("swap_accel", "torch", "accelerate", "timm", "datasets", "wandb", "tensorboard")


def log_with(cfg: TrackingConfig) -> str | None:
    return None if cfg.backend == "none" else cfg.backend


def check_backend(cfg: TrackingConfig) -> None:
    """Before any process group forms (cli preflight): the chosen tracker library must be installed."""
    modules = _MODULES.get(cfg.backend, ())
    if modules and not any(importlib.util.find_spec(m) for m in modules):
        raise RecipeError(f"tracking.backend={cfg.backend} needs the '{modules[0]}' package; "
                          f"pip install {modules[0]} or set tracking.backend=none")


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _wandb_mode(cfg: TrackingConfig, accelerator: Accelerator) -> str | None:
    """With no credentials the run goes offline by itself and says so once (main process)."""
    if cfg.mode or os.environ.get("WANDB_MODE"):
        return cfg.mode  # an explicit choice (recipe, else WANDB_MODE, which wandb reads itself)
    if _has_wandb_credentials():
        return None
    accelerator.print("W&B: no credentials (WANDB_API_KEY or ~/.netrc), logging offline; "
                      "upload later with `wandb sync RUN_DIR/wandb/offline-run-*`", flush=True)
    return "offline"


def _versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def run_config(recipe: Recipe, accelerator: Accelerator) -> dict:
    """The resolved recipe, package versions, process count and hardware are the run config."""
    hardware = {"device": str(accelerator.device), "platform": platform.platform(), "cpus": os.cpu_count(),
                "threads_per_process": torch.get_num_threads(),
                "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    return {"recipe": recipe.model_dump(mode="json"), "versions": _versions(),
            "num_processes": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value,
            "hardware": hardware}


def _flat(config: dict, prefix: str = "") -> dict:
    """TensorBoard hparams take scalars and strings only: nested keys become dotted, lists strings."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def start(accelerator: Accelerator, recipe: Recipe, run_dir: Path) -> None:
    cfg = recipe.tracking
    if cfg.backend == "none" or not accelerator.is_main_process:
        return
    config = run_config(recipe, accelerator)
    if cfg.backend == "wandb":
        init = {"entity": cfg.entity, "group": cfg.group, "name": cfg.name or recipe.name, "tags": cfg.tags,
                "dir": str(run_dir), "mode": _wandb_mode(cfg, accelerator)}
        accelerator.init_trackers(cfg.project, config=config,
                                  init_kwargs={"wandb": {k: v for k, v in init.items() if v is not None}})
        # Each phase-2 worker's series on its own x-axis (log_series), defined once per run.
        run = accelerator.get_tracker("wandb", unwrap=True)
        workers = recipe.worker_layout(accelerator.num_processes).workers if recipe.phase2_runs else 0
        for k in range(workers):
            run.define_metric(f"worker/{k}/*", step_metric=f"worker/{k}/step")
    else:
        accelerator.init_trackers(cfg.project, config=_flat(config))


def log(accelerator: Accelerator, values: dict, step: int) -> None:
    """`values` keyed `phase1/...`, `worker/<k>/...`, `averaged/...` so dashboards group them."""
    if accelerator.is_main_process and _uses_wandb(accelerator):
        # W&B drops a row whose step is below its current one; series logged on their own axis (log_series)
        # advance that counter, so an explicit step never goes back.
        step = max(step, accelerator.get_tracker("wandb", unwrap=True).step)
    accelerator.log({k: v for k, v in values.items() if v is not None}, step=step)  # None: not evaluated here


def _uses_wandb(accelerator: Accelerator) -> bool:
    return "wandb" in [str(t) for t in accelerator.log_with or []]


def log_series(accelerator: Accelerator, values: dict, prefix: str, x: int) -> None:
    """Rows of one series that arrive out of order with the others (a phase-2 worker's), plotted against
    their own step `x`: W&B gets `<prefix>/step` as the series' x-axis (define_metric), TensorBoard the step."""
    values = {k: v for k, v in values.items() if v is not None}
    if not accelerator.is_main_process:
        return
    if _uses_wandb(accelerator):  # the series' own x-axis, defined by `start`
        accelerator.log({**values, f"{prefix}/step": x})
    else:
        accelerator.log(values, step=x)


def finish(accelerator: Accelerator, recipe: Recipe, results: dict, rows: list[tuple], figure_png: Path) -> None:
    """End of run: summary, the Table 1 rows as a table, Figure 1 as an image."""
    backend = recipe.tracking.backend
    if backend == "none" or not accelerator.is_main_process:
        return
    step = results["critical_path_steps"]
    columns = list(COLUMNS)
    summary = {"test_acc": results["test_acc"], "phase1/seconds": results["phase1"]["seconds"],
               "phase1/test_acc": results["phase1"]["test_acc"], "total_seconds": results["total_seconds"]}
    if results["phase2"]:
        summary.update({"phase2/seconds": results["phase2"]["seconds"], "phase3/seconds": results["phase3"]["seconds"],
                        "before_averaging/mean": results["before_averaging"]["mean"],
                        "before_averaging/std": results["before_averaging"]["std"],
                        "after_averaging/test_acc": results["after_averaging"]["test_acc"],
                        "averaged_curve/seconds": results["averaged_curve"]["seconds"]})
    if backend == "wandb":
        import wandb

        run = accelerator.get_tracker("wandb", unwrap=True)
        run.summary.update(summary)
        run.log({"table1": wandb.Table(columns=columns, data=[list(r) for r in rows]),
                 "figure1": wandb.Image(str(figure_png))}, step=step)
    else:
        import matplotlib.image

        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        for key, value in summary.items():
            writer.add_scalar(f"summary/{key}", value, global_step=step)
        header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
        writer.add_text("table1", header + "".join("| " + " | ".join(r) + " |\n" for r in rows), global_step=step)
        writer.add_image("figure1", matplotlib.image.imread(figure_png)[..., :3], global_step=step, dataformats="HWC")
