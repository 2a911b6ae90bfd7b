"""What `auto` gives a recipe on this device, and that resolving it leaves no CUDA context behind.

A recipe's `mixed_precision: auto` and `model.channels_last: auto` resolve when it loads, in every rank, before the
launcher's rank has chosen its GPU. Asking the device's compute capability must not create a CUDA context: one
made then would sit on GPU 0 in every rank of a multi-GPU launch, each holding a few hundred MiB of GPU 0's memory.
This loads recipes/cifar10.yaml (which sets neither key) in a fresh interpreter, then asks the driver, device by
device, whether a primary context exists (`torch._C._cuda_hasPrimaryContext`), before anything else touches CUDA.

    .venv/bin/python -m benchmarks.gpu_defaults --out DIR/gpu_defaults.json    # on a GPU (benchmarks/on_gpu.sh)
    .venv/bin/python -m benchmarks.gpu_defaults --dry-run                    # CPU: fp32 and NCHW, no device
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.common import gpu_args, gpu_parser, write_gpu_result
from swap_accel.recipe import load_recipe
from swap_accel.recipe.device_defaults import cuda_capability

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "cifar10.yaml"


def main() -> None:
    args = gpu_args(gpu_parser(__doc__, dry_run_help="CPU: resolves `auto` without a device."), "gpu_defaults")
    recipe = load_recipe(RECIPE)
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    contexts = [bool(torch._C._cuda_hasPrimaryContext(d)) for d in range(devices)]  # before any other CUDA call
    payload = {"recipe": RECIPE.name, "capability": cuda_capability(), "mixed_precision": recipe.mixed_precision,
               "channels_last": recipe.model.channels_last, "contexts_after_resolving": contexts,
               "no_context_created": not any(contexts)}
    print(payload)
    write_gpu_result("gpu_defaults", args, payload)
    if any(contexts):
        raise SystemExit(f"resolving `auto` created a CUDA context on devices {contexts}")


if __name__ == "__main__":
    main()
