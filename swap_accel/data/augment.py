"""Batched on-device augmentation for in-memory image data (paper section 5.1, as in cifar10-fast).

The paper's CIFAR runs augment with random crop (zero padding), horizontal flip and cutout. Doing that
per sample through PIL and DataLoader workers would dominate a small-CNN step on CPU, so here the
whole batch is augmented with a handful of tensor ops on the device that holds it: crop and flip are
one gather with per-sample offsets, cutout is one masked fill. All randomness comes from the caller's
generator (on the images' device), so a fixed seed reproduces the batch exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from swap_accel.recipe import AugmentConfig


def augment_batch(images_u8: Tensor, cfg: AugmentConfig, generator: torch.Generator | None) -> Tensor:
    """Random crop with zero padding `cfg.crop_padding` (0 = off) and horizontal flip (`cfg.flip`).

    uint8 [B,C,H,W] in, uint8 [B,C,H,W] out; returns the input itself when both are off. Crop offsets
    are drawn before flip decisions, so the draws (and results) for a given generator state are fixed.
    """
    if images_u8.dim() != 4:
        raise ValueError(f"augment_batch expects a [B,C,H,W] batch, got shape {tuple(images_u8.shape)}")
    pad = cfg.crop_padding
    if pad == 0 and not cfg.flip:
        return images_u8
    b, c, h, w = images_u8.shape
    device = images_u8.device
    src = F.pad(images_u8, (pad, pad, pad, pad)) if pad else images_u8
    rows = torch.arange(h, device=device).expand(b, h)
    cols = torch.arange(w, device=device).expand(b, w)
    if pad:
        rows = rows + torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=device)
        cols = cols + torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=device)
    if cfg.flip:
        # Flipping the crop window = reading its columns right to left: fold it into the same gather.
        flip = torch.rand((b, 1), generator=generator, device=device) < 0.5
        cols = torch.where(flip, cols.flip(1), cols)
    # One gather over each flattened padded image; the per-sample index is shared by all channels via
    # expand (no copy). Measured ~2x faster on CPU than a 4-D fancy index or separate row/column gathers.
    height, width = src.shape[2:]
    index = (rows[:, :, None] * width + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return src.reshape(b, c, height * width).gather(2, index).reshape(b, c, h, w)

def cutout_(images: Tensor, size: int, generator: torch.Generator | None) -> Tensor:
    """Zero one size×size square per image, in place, on the normalized float batch [B,C,H,W].

    Zero is the data set mean after normalization (DeVries & Taylor 2017, used by cifar10-fast). The
    centre is uniform over the whole image and the square is clipped at the borders, so squares near
    an edge are partial. size 0 is a no-op.
    """
    if size == 0:
        return images
    b, _, h, w = images.shape
    device = images.device
    cy = torch.randint(0, h, (b, 1), generator=generator, device=device)
    cx = torch.randint(0, w, (b, 1), generator=generator, device=device)
    y0, x0 = cy - size // 2, cx - size // 2
    ys = torch.arange(h, device=device)
    xs = torch.arange(w, device=device)
    in_y = (ys >= y0) & (ys < y0 + size)  # [B,H]
    in_x = (xs >= x0) & (xs < x0 + size)  # [B,W]
    return images.masked_fill_((in_y[:, :, None] & in_x[:, None, :])[:, None], 0.0)
