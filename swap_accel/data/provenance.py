"""What a checkpoint records of the images it was trained on, and the comparisons that keep a held-out image from
ever having been trained on (`--from-phase1`, `average`, `transition` refuse a mismatch)."""

from __future__ import annotations

import hashlib

import torch

from swap_accel.data.loading import _indices, train_split_size
from swap_accel.recipe import DataConfig


def provenance(cfg: DataConfig) -> dict:
    """What a checkpoint records of the images it was trained on (checkpoint manifests, key "data").

    `train_indices` is the sha256 of the training indices exactly as load_data(split="train") selects them (every
    index of the split without subset or hold-out) and of the split's length. Two records with the same source, name,
    split and digest trained on the same images; and since the hold-out is the other end of the same seed-0
    permutation (`_indices`), a recipe whose training digest equals a checkpoint's holds out no image that checkpoint
    trained on. A hub name identifies its data; a Fashion-MNIST or image-folder root is only where the data lies
    (a moved copy is the same data), so it is not recorded.
    """
    total = train_split_size(cfg)
    idx = _indices(total, cfg, "train")
    idx = torch.arange(total) if idx is None else idx
    digest = hashlib.sha256(f"{total}:".encode())
    digest.update(idx.to(torch.int64).numpy().astype("<i8").tobytes())
    return {"source": cfg.source, "name": cfg.name if cfg.source == "hub" else None, "split": cfg.train_split,
            "split_samples": total, "train_subset": cfg.train_subset, "holdout_samples": cfg.holdout_samples,
            "train_samples": len(idx), "train_indices": digest.hexdigest()}


def _show(value: object) -> str:
    return "null" if value is None else str(value)


def describe_provenance(p: dict) -> str:
    """One provenance record as a phrase for an error line."""
    data = p["source"] + (f" {p['name']}" if p.get("name") else "")
    return (f"{data} split {p['split']!r} with train_subset={_show(p['train_subset'])}, holdout_samples="
            f"{_show(p['holdout_samples'])} ({p['train_samples']} of {p['split_samples']} images, indices sha256 "
            f"{p['train_indices'][:12]})")


def provenance_sets(p: dict) -> str:
    """The overrides that give a recipe the subset and hold-out of record `p`."""
    return (f"--set data.train_subset={_show(p['train_subset'])} "
            f"--set data.holdout_samples={_show(p['holdout_samples'])}")


def same_data_set(theirs: dict, ours: dict) -> bool:
    return all(theirs.get(k) == ours.get(k) for k in ("source", "name", "split", "split_samples"))


def same_training_images(theirs: dict, ours: dict) -> bool:
    return same_data_set(theirs, ours) and theirs.get("train_indices") == ours.get("train_indices")


def held_out_trained_on(theirs: dict, ours: dict) -> int:
    """How many of `ours`'s held-out images `theirs` trained on. Both are slices of one seed-0 permutation of the same
    split (`_indices`): training takes its first `train_samples`, the hold-out its last `holdout_samples`."""
    if not ours.get("holdout_samples") or not same_data_set(theirs, ours):
        return 0
    return max(0, theirs["train_samples"] - (ours["split_samples"] - ours["holdout_samples"]))
