"""Input pipeline cost against the training step (target: data time ≤ 3% of step time).

The in-memory source indexes uint8 images on the device, crops, flips, normalizes and cuts out a
whole batch in a few tensor ops. Measured alone and against a forward/backward/SGD step of the
model that recipe trains, at the Fashion-MNIST shape (real data) and the CIFAR shape (3x32x32;
the cost of these ops does not depend on pixel values, so random uint8 images stand in).

    .venv/bin/python benchmarks/data.py        # threads as one of 2 processes on 2 cores: 1
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import swap_accel  # noqa: F401
from benchmarks.common import alternate, fashion, save
from swap_accel.data.sources import InMemorySource
from swap_accel.models import build_model
from swap_accel.recipe import AugmentConfig


def cases():
    cpu = torch.device("cpu")
    yield "fashion_mnist", fashion(cpu), {"base_width": 16}, 128
    images = torch.randint(0, 256, (50000, 3, 32, 32), dtype=torch.uint8)
    cifar = InMemorySource(images, torch.randint(0, 10, (50000,)), mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26],
                           class_names=[str(i) for i in range(10)], augment=AugmentConfig(), device=cpu)
    yield "cifar_shape_resnet9_w16", cifar, {"base_width": 16}, 512
    yield "cifar_shape_resnet9_w64", cifar, {"base_width": 64}, 512


def measure(source, kwargs: dict, batch: int, batches: int, rounds: int) -> dict:
    model = build_model("resnet9", in_chans=source.in_chans, num_classes=10, kwargs=kwargs).to(
        memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(source.num_samples, generator=gen)[: batches * batch]
    fixed = [(x.clone(), y.clone()) for x, y in source.batches(order, batch, augment=True, generator=gen)]

    def load():
        for _ in source.batches(order, batch, augment=True, generator=gen):
            pass

    def step():
        for x, y in fixed:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    t_data, t_step = alternate(load, step, rounds)
    return {"batch": batch, "data_ms_per_batch": 1000 * t_data / batches, "step_ms_per_batch": 1000 * t_step / batches,
            "data_over_step": t_data / t_step}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    for name, source, kwargs, batch in cases():
        r = rows[name] = measure(source, kwargs, batch, args.batches, args.rounds)
        print(f"{name:26} batch {batch:4d}: data {r['data_ms_per_batch']:7.2f} ms, "
              f"step {r['step_ms_per_batch']:8.1f} ms -> data/step {100 * r['data_over_step']:.2f}% (target <= 3%)",
              flush=True)
    print(f"wrote {save('data', {'threads': args.threads, 'cases': rows})}")


if __name__ == "__main__":
    main()
