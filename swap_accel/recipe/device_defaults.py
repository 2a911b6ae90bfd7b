"""What `auto` in a recipe means on this machine: the settings a fast CUDA run wants, and a CPU run left as it was.

`mixed_precision: auto` is bf16 on a CUDA device that computes in it natively (compute capability 8.0 and up: A100,
H100, RTX 30xx and later) and fp32 ("no") elsewhere: on a V100 or T4 bf16 is emulated and slow, and fp16 needs loss
scaling that changes the numbers, so it stays an explicit choice. `model.channels_last: auto` is true on CUDA, where
cuDNN's tensor-core convolutions want NHWC, and false on a CPU. On a CPU both resolve to exactly the old defaults,
so a CPU run, its checkpoints and its stored results are unchanged.

`auto` is resolved when the recipe is validated (a default too: `Recipe` builds its ModelConfig per recipe, by a
factory, rather than sharing one built at import), so every `Recipe` holds a concrete value and recipe.yaml,
results.json and the resume check record what actually ran: resuming a bf16 GPU run on a CPU is refused as a
different recipe instead of silently continuing in fp32.
"""

from __future__ import annotations

import functools
import os

AUTO = "auto"
BF16_NATIVE_CAPABILITY = (8, 0)


@functools.cache
def cuda_capability() -> tuple[int, int] | None:
    """Compute capability of the CUDA device this process trains on, or None without CUDA.

    Asked before the launcher's rank has picked its device, so it names the device by LOCAL_RANK (what Accelerate
    will pick) and only reads its properties (torch initialises its CUDA state lazily for that, then calls
    `cudaGetDeviceProperties`). None of that should need a CUDA context, which would stay on GPU 0 in every rank;
    benchmarks/gpu_defaults.py (on_gpu.sh's first step) checks on a real device that none is created."""
    import torch  # here, not at the top: validating a recipe needs no torch until an `auto` is resolved

    if not torch.cuda.is_available():
        return None
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    return torch.cuda.get_device_capability(index)


def device_settings(recipe: dict, unset=None) -> dict:
    """The keys whose default is `auto`, as a recipe mapping (raw YAML, or a dumped recipe) gives them; `unset` for
    one it leaves out. The one list of them: the load-time note and the resume refusal both read it."""
    return {"mixed_precision": recipe.get("mixed_precision", unset),
            "model.channels_last": (recipe.get("model") or {}).get("channels_last", unset)}


def resolve_mixed_precision(value: str) -> str:
    if value != AUTO:
        return value
    capability = cuda_capability()
    return "bf16" if capability is not None and capability >= BF16_NATIVE_CAPABILITY else "no"


def resolve_channels_last(value: bool | str) -> bool:
    return cuda_capability() is not None if value == AUTO else value
