"""Stacked workers (algorithm/stacked.py): K workers stepped at once by one vmapped step equal the same K workers
trained one after another, each with its own batches, BatchNorm statistics and momentum."""

import copy

import pytest
import torch
import torch.nn.functional as F

import swap_accel  # noqa: F401  (registers resnet9)
from swap_accel.algorithm.loop import make_sgd
from swap_accel.algorithm.stacked import StackedWorkers
from swap_accel.models import build_model
from swap_accel.recipe import OptimizerConfig

OPT = OptimizerConfig(momentum=0.9, nesterov=True, weight_decay=5e-4, label_smoothing=0.1)


def _batches(workers: int, steps: int, batch: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(steps, workers, batch, 1, 16, 16, generator=g, dtype=torch.float64),
            torch.randint(0, 10, (steps, workers, batch), generator=g))


@pytest.mark.parametrize("channels_last", [False, True])
def test_stacked_workers_equal_workers_trained_in_turn(channels_last):
    """In float64, where rounding cannot hide a difference in what is computed: 3 workers from different starting
    weights (as after a resume), 4 steps with changing learning rates, then every weight, BN statistic (counts
    included) and momentum buffer of each worker equals its in-turn twin's. Also in channels-last, what `auto`
    gives a CUDA run: the stacked weights are copies in whatever layout, the batches stay NCHW."""
    torch.manual_seed(0)
    module = build_model("resnet9", in_chans=1, num_classes=10, kwargs={"base_width": 4}).double().train()
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    starts = []
    for k in range(3):
        twin = copy.deepcopy(module)
        with torch.no_grad():
            for p in twin.parameters():
                p.add_(0.01 * k * torch.randn_like(p))
        starts.append(twin.state_dict())
    xs, ys = _batches(3, 4)
    rates = [0.05, 0.04, 0.03, 0.02]

    in_turn = []
    for k in range(3):
        worker = copy.deepcopy(module)
        worker.load_state_dict(starts[k])
        sgd = make_sgd(worker.parameters(), OPT, rates[0], device=torch.device("cpu"))
        for step, lr in enumerate(rates):
            for group in sgd.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(worker(xs[step, k]), ys[step, k], label_smoothing=OPT.label_smoothing)
            loss.backward()
            sgd.step()
            sgd.zero_grad(set_to_none=True)
        momentum = {n: sgd.state[p]["momentum_buffer"] for n, p in worker.named_parameters()}
        in_turn.append((worker.state_dict(), momentum))

    stacked = StackedWorkers(module, starts, OPT, rates[0])
    for step, lr in enumerate(rates):
        losses, logits = stacked.step(xs[step], ys[step], lr)
        assert losses.shape == (3,) and logits.shape == (3, 12, 10)
    for k, (state, momentum) in enumerate(in_turn):
        mine = stacked.state_dict(k)
        assert set(mine) == set(state)
        for name, value in state.items():
            torch.testing.assert_close(mine[name], value, rtol=1e-10, atol=1e-12, msg=f"worker {k} {name}")
        for name, value in stacked.momentum(k).items():
            torch.testing.assert_close(value, momentum[name], rtol=1e-10, atol=1e-12)
    last = [n for n, _ in module.named_parameters()][-1]
    assert not torch.equal(stacked.state_dict(0)[last], stacked.state_dict(1)[last])  # K different workers


def test_a_model_that_draws_random_numbers_is_refused_in_one_line():
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10), torch.nn.Dropout(0.5)).train()
    stacked = StackedWorkers(module, [module.state_dict()] * 2, OPT, 0.1)
    xs, ys = _batches(2, 1)
    with pytest.raises(ValueError, match="draws random numbers while training"):
        stacked.step(xs[0].float(), ys[0], 0.1)
