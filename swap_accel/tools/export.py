"""`swap_accel export RUN_DIR DIR [--push REPO_ID]`: the averaged model as timm users share models.

timm's own hub helper (`save_for_hf`) writes `config.json` (architecture, num_classes, the constructor
arguments, the preprocessing the run was evaluated with, label names) and `model.safetensors`, the folder layout
that `timm.create_model('local-dir:DIR', pretrained=True)` and `hf-hub:` loading read. A model card README
adds the run's Table-1 rows, its recipe and Figure 1. `--push` uploads the folder with huggingface_hub.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from timm.data import DEFAULT_CROP_PCT
from timm.models import save_for_hf

from ..checkpointing.files import CheckpointError, load_weights, tensors_sha256
from ..data.loading import load_data
from ..data.sources import DataSource
from ..models import build_model
from ..monitoring.report import COLUMNS, table_rows
from ..recipe import Recipe


def export(run_dir: Path, out: Path, push: str | None = None) -> Path:
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise CheckpointError(f"{results_path} not found; pass a finished run directory (it holds results.json)")
    results = json.loads(results_path.read_text())
    weights = run_dir / "model.safetensors"
    # The weights are the ones results.json vouches for (its model_sha256 identifies the tensors).
    if results.get("model_sha256") and (not weights.is_file() or tensors_sha256(weights) != results["model_sha256"]):
        raise CheckpointError(f"{weights} is missing or not the model results.json describes; export the run "
                              "directory as its training left it")
    recipe = Recipe.model_validate(results["recipe"])
    data = load_data(recipe.data, torch.device("cpu"), split="test")
    module = build_model(recipe.model.name, in_chans=data.in_chans, num_classes=data.num_classes,
                         kwargs=recipe.model.kwargs, image_size=data.image_size)
    module.load_state_dict(load_weights(weights))
    save_for_hf(module, str(out), model_config={"label_names": list(data.class_names)},
                model_args={"in_chans": data.in_chans, **recipe.model.kwargs}, safe_serialization=True,
                data_config=eval_data_config(data))
    if (run_dir / "figure1.png").is_file():
        shutil.copy(run_dir / "figure1.png", out / "figure1.png")
    (out / "README.md").write_text(_model_card(results, recipe, out))
    if push:
        _push(out, push)
    return out


def eval_data_config(data: DataSource) -> dict:
    """The preprocessing the run's test accuracy was measured with, as timm's pretrained_cfg keys.

    Read off the source's own evaluation data set, not restated: what the card promises is then what was measured,
    whatever data.py builds. In-memory sources evaluate at the native size, only normalised with the training set's
    statistics (crop_pct 1.0). Streaming ones evaluate through timm's eval transform (resize the shorter side,
    center-crop, normalise), whose crop_pct, interpolation, mean and std are written as they were used, so that
    timm.data.create_transform(**resolve_data_config(model=...)) on the exported model rebuilds that transform.
    """
    base = {"input_size": (data.in_chans, *data.image_size), "crop_mode": "center"}
    transform = getattr(data.eval_loader(1).dataset, "transform", None)
    if transform is None:
        return {**base, "crop_pct": 1.0, "mean": tuple(data.mean), "std": tuple(data.std)}
    steps = {type(t).__name__: t for t in getattr(transform, "transforms", ())}
    resize, crop, normalize = (steps.get(k) for k in ("Resize", "CenterCrop", "Normalize"))
    scale = getattr(resize, "size", None)
    scale = scale[0] if isinstance(scale, (list, tuple)) and len(scale) == 1 else scale
    if not (isinstance(scale, int) and crop is not None and normalize is not None and len(set(crop.size)) == 1):
        raise CheckpointError(f"the evaluation transform ({transform}) is not timm's resize, center-crop, normalise; "
                              "the model card cannot state its preprocessing: export from a run whose data timm's "
                              "eval transform prepares")
    size = crop.size[0]
    # timm rebuilds the resize as floor(size / crop_pct). Several crop_pct give the one used; say timm's default
    # (0.875) when it is one of them (e.g. 32 px: resize 36 = floor(32 / 0.875), though 32 / 36 = 0.889).
    crop_pct = DEFAULT_CROP_PCT if math.floor(size / DEFAULT_CROP_PCT) == scale else size / scale
    if math.floor(size / crop_pct) != scale:
        crop_pct = math.nextafter(crop_pct, 0.0)
    # Normalize holds float32 tensors: the shortest decimals of those float32 values (0.485, not 0.48500001...).
    as_written = lambda t: tuple(float(str(v)) for v in np.asarray(t, dtype=np.float32))  # noqa: E731
    return {**base, "crop_pct": crop_pct, "interpolation": resize.interpolation.value,
            "mean": as_written(normalize.mean), "std": as_written(normalize.std)}


def _model_card(results: dict, recipe: Recipe, out: Path) -> str:
    rows = "\n".join("| " + " | ".join(row) + " |" for row in table_rows(results))
    figure = "\n![Figure 1](figure1.png)\n" if (out / "figure1.png").exists() else ""
    registry = "import swap_accel  # registers resnet9 in timm's registry\n" if recipe.model.name == "resnet9" else ""
    method, method_long = (("SWA", "Stochastic Weight Averaging (Izmailov et al. 2018) of one data-parallel model")
                           if results.get("mode") == "swa" else
                           ("SWAP", "Stochastic Weight Averaging in Parallel (Gupta et al., ICLR 2020)"))
    workers, models = len(results.get("workers", [])), (results.get("phase3") or {}).get("averaged_models")
    averaged = f"{workers} phase-2 worker(s)" + (f", {models} models (cyclic samples)" if models and models != workers
                                                 else "")
    return f"""---
library_name: timm
tags: [image-classification, timm, swap, weight-averaging]
---
# {results.get("name", "swap")}: {recipe.model.name} trained with {method}

{method_long} with swap_accel {results.get("version", "")}:
{results.get("num_processes")} processes, {averaged} averaged, BatchNorm statistics recomputed.
Test accuracy {100 * results["test_acc"]:.2f} %.

```python
{registry}import timm
model = timm.create_model("local-dir:{out.name}", pretrained=True)  # or "hf-hub:<repo id>" once pushed
```

| {" | ".join(COLUMNS)} |
|{"---|" * len(COLUMNS)}
{rows}
{figure}
## Recipe

```yaml
{yaml.safe_dump(results["recipe"], sort_keys=False)}```
"""


def _push(folder: Path, repo_id: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder))
    except Exception as e:  # offline, no token, no rights: the exported folder stays, and can be pushed later
        raise CheckpointError(f"--push {repo_id} failed ({str(e).splitlines()[0][:150]}); the folder {folder} is "
                              "complete: log in (`hf auth login`) and push it with --push again") from None
