"""Overhead of swap_accel's phase loops against minimal hand-written loops (target ≤ 1.03).

Phase 1: `train_phase1` (sharded order, LR schedule, device-side metrics, collective counter, DDP
comm hook, epoch-end all-reduce) against a bare Accelerate DDP loop doing the same arithmetic on
the same in-memory batches. Phase 2: `train_phase2` against a plain single-process PyTorch loop.
Both sides use the same model, batch, data, processes and threads; rounds alternate.

    .venv/bin/accelerate launch --config_file accelerate_config.yaml -m benchmarks.overhead [--steps 40 --rounds 5]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import alternate, fashion, loop_context, loop_harness, save
from swap_accel.algorithm.loop import make_sgd
from swap_accel.algorithm.phase1 import train_phase1
from swap_accel.algorithm.phase2 import train_phase2
from swap_accel.checkpointing.snapshots import CycleSamples
from swap_accel.data.augment import augment_batch, cutout_
from swap_accel.data.sampling import phase1_shard
from swap_accel.models import build_model
from swap_accel.parallel.counting import CollectiveCounter
from swap_accel.parallel.distributed import make_accelerator
from swap_accel.recipe import LRConfig, OptimizerConfig, Phase1Config, Phase2Config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--worker-batch", type=int, default=128)
    parser.add_argument("--base-width", type=int, default=16)
    args = parser.parse_args()

    accelerator = make_accelerator()
    counter = CollectiveCounter().install()  # as in a real run: every collective goes through the counter
    p, rank = accelerator.num_processes, accelerator.process_index
    opt_cfg = OptimizerConfig()
    # A real checkpointer with the shipped recipe's policy (every 15 minutes): its per-step cost is measured too.
    recipe, ckpt = loop_harness(accelerator)
    n1 = args.steps * args.global_batch

    def model():
        torch.manual_seed(0)
        return build_model("resnet9", in_chans=1, num_classes=10, kwargs={"base_width": args.base_width}).to(
            memory_format=torch.channels_last)

    # --- phase 1 ------------------------------------------------------------------------------
    m = model()
    ours, ours_opt = accelerator.prepare(m, make_sgd(m.parameters(), opt_cfg, 0.1, device=accelerator.device))
    CollectiveCounter.watch_ddp(ours)
    m = model()
    fused = accelerator.device.type == "cuda" or None  # the kernel make_sgd picks for this device, on both sides
    bare, bare_opt = accelerator.prepare(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                                            weight_decay=5e-4, fused=fused))
    cfg1 = Phase1Config(global_batch_size=args.global_batch, max_epochs=1, lr=LRConfig(peak=0.1))
    sub1 = fashion(accelerator.device, train_subset=n1)
    gen = torch.Generator().manual_seed(rank)

    # The loops' real logger (progress + logging points), minus evaluation and trackers.
    ctx1 = loop_context(accelerator, recipe, ckpt, accelerator.unwrap_model(ours), sub1, opt_cfg, phase=1,
                        counter=counter)

    def swap_phase1():
        train_phase1(ctx1, ours, ours_opt, cfg1, tau=None)

    def bare_phase1():
        order = phase1_shard(n1, seed=0, epoch=0, global_batch=args.global_batch, rank=rank, num_processes=p)
        for idx in order.split(args.global_batch // p):
            x = augment_batch(sub1.images[idx], sub1.augment, gen)
            x = cutout_((x.float() - sub1._shift_dev) * sub1._scale_dev, sub1.augment.cutout_size, gen)
            loss = F.cross_entropy(bare(x), sub1.labels[idx])
            accelerator.backward(loss)
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)

    t_ours1, t_bare1 = alternate(swap_phase1, bare_phase1, args.rounds)

    # --- phase 2 (each process alone, as phase-2 workers are) -----------------------------------
    n2 = args.steps * args.worker_batch
    sub2 = fashion(accelerator.device, train_subset=n2)
    worker_model, plain_model = model(), model()
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                fused=fused)
    cfg2 = Phase2Config(per_worker_batch_size=args.worker_batch, epochs=1, lr=LRConfig(peak=0.05))

    # One worker per process, as the quickstart runs them: each rank's monitor knows its worker.
    ctx2 = loop_context(accelerator, recipe, ckpt, worker_model, sub2, opt_cfg, phase=2, counter=counter)

    def swap_phase2():
        # A one-process worker trains its module itself (model is module); one sample, its end.
        train_phase2(ctx2, worker_model, worker_model, cfg2,
                     worker=rank, samples=CycleSamples(cfg2.sampling, ckpt.root.parent, rank))

    def plain_phase2():
        for idx in torch.randperm(n2, generator=gen).split(args.worker_batch):
            x = augment_batch(sub2.images[idx], sub2.augment, gen)
            x = cutout_((x.float() - sub2._shift_dev) * sub2._scale_dev, sub2.augment.cutout_size, gen)
            loss = F.cross_entropy(plain_model(x), sub2.labels[idx])
            loss.backward()
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)

    t_ours2, t_plain2 = alternate(swap_phase2, plain_phase2, args.rounds)
    # The epoch-end logging point gathers the workers' numbers, so a worker waits there for the
    # slowest one; that wait is not per-step cost. Reported apart: total over the rounds / rounds.
    logging_s = ctx2.log.seconds["phase2"] / args.rounds

    if accelerator.is_main_process:
        rows = {
            "phase1": {"swap_accel_s_per_step": t_ours1 / args.steps, "hand_written_s_per_step": t_bare1 / args.steps,
                       "ratio": t_ours1 / t_bare1},
            "phase2": {"swap_accel_s_per_step": t_ours2 / args.steps, "plain_pytorch_s_per_step": t_plain2 / args.steps,
                       "ratio": t_ours2 / t_plain2, "logging_point_s_per_epoch": logging_s,
                       "ratio_without_logging_point": (t_ours2 - logging_s) / t_plain2},
        }
        for phase, row in rows.items():
            print(f"{phase}: swap_accel {1000 * row['swap_accel_s_per_step']:.1f} ms/step vs "
                  f"{1000 * list(row.values())[1]:.1f} ms/step -> ratio {row['ratio']:.3f} (target <= 1.03)"
                  + (f"; without the epoch-end logging point ({row['logging_point_s_per_epoch']:.2f} s, once per "
                     f"epoch) {row['ratio_without_logging_point']:.3f}" if phase == "phase2" else ""))
        path = save("overhead", {"processes": p, "steps": args.steps, "rounds": args.rounds,
                                 "global_batch": args.global_batch, "worker_batch": args.worker_batch,
                                 "base_width": args.base_width, **rows})
        print(f"wrote {path}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
