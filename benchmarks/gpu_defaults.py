"""What `auto` gives a recipe on this device, and that resolving it leaves no CUDA context behind.

A recipe's `mixed_precision: auto` and `model.channels_last: auto` resolve when it loads, in every rank, before the
launcher's rank has chosen its GPU. Asking the device's compute capability must not create a CUDA context: one
made then would sit on GPU 0 in every rank of a multi-GPU launch, each holding a few hundred MiB of GPU 0's memory.
This loads recipes/cifar10.yaml (which sets neither key) in a fresh interpreter, then asks the driver, device by
device, whether a primary context exists (`torch._C._cuda_hasPrimaryContext`), before anything else touches CUDA.
Then it checks the two CUDA defaults that are no recipe keys: `make_sgd` takes the fused SGD for CUDA, and its update
follows torch's default SGD (foreach there) through momentum, Nesterov and weight decay within float rounding (on a
CPU, the dry run, the fused kernel compared is the CPU's); and swap_accel's accelerator turns on cuDNN's algorithm
search on CUDA, and leaves it off on a CPU.

    .venv/bin/python -m benchmarks.gpu_defaults --out DIR/gpu_defaults.json    # on a GPU (benchmarks/on_gpu.sh)
    .venv/bin/python -m benchmarks.gpu_defaults --dry-run                    # CPU: fp32 and NCHW, no device
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.common import gpu_args, gpu_parser, write_gpu_result
from swap_accel.algorithm.loop import make_sgd
from swap_accel.parallel.distributed import make_accelerator
from swap_accel.recipe import OptimizerConfig, load_recipe
from swap_accel.recipe.device_defaults import cuda_capability

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "cifar10.yaml"


def fused_sgd_agrees(device: torch.device, steps: int = 20) -> dict:
    """make_sgd's optimizer for CUDA against torch's default SGD, on the same model and batches on `device`."""

    def train(fused_for_cuda: bool) -> tuple[torch.Tensor, torch.optim.SGD]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(device)
        opt_cfg = OptimizerConfig(momentum=0.9, nesterov=True, weight_decay=5e-4)
        optimizer = (make_sgd(model.parameters(), opt_cfg, 0.05, device=torch.device("cuda")) if fused_for_cuda else
                     torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4))
        generator = torch.Generator(device=device).manual_seed(0)
        for _ in range(steps):
            x = torch.randn(128, 64, device=device, generator=generator)
            y = torch.randint(0, 10, (128,), device=device, generator=generator)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return torch.cat([p.detach().flatten() for p in model.parameters()]), optimizer

    (fused, optimizer), (default, _) = train(True), train(False)
    difference = (fused - default).abs().max().item()
    return {"fused": optimizer.defaults["fused"] is True, "steps": steps, "max_abs_difference": difference,
            "agrees": bool(torch.allclose(fused, default, rtol=1e-5, atol=1e-6))}


def main() -> None:
    args = gpu_args(gpu_parser(__doc__, dry_run_help="CPU: resolves `auto` without a device."), "gpu_defaults")
    recipe = load_recipe(RECIPE)
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    contexts = [bool(torch._C._cuda_hasPrimaryContext(d)) for d in range(devices)]  # before any other CUDA call
    payload = {"recipe": RECIPE.name, "capability": cuda_capability(), "mixed_precision": recipe.mixed_precision,
               "channels_last": recipe.model.channels_last, "contexts_after_resolving": contexts,
               "no_context_created": not any(contexts)}
    payload["fused_sgd"] = fused_sgd_agrees(torch.device("cuda" if devices else "cpu"))  # touches CUDA: after
    accelerator = make_accelerator(recipe.mixed_precision)
    payload["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    accelerator.end_training()
    print(payload)
    write_gpu_result("gpu_defaults", args, payload)
    if any(contexts):
        raise SystemExit(f"resolving `auto` created a CUDA context on devices {contexts}")
    if payload["cudnn_benchmark"] != bool(devices):
        raise SystemExit(f"cudnn.benchmark is {payload['cudnn_benchmark']} with {devices} CUDA devices")
    if not (payload["fused_sgd"]["fused"] and payload["fused_sgd"]["agrees"]):
        raise SystemExit(f"the fused SGD for CUDA is not the default SGD's update: {payload['fused_sgd']}")


if __name__ == "__main__":
    main()
