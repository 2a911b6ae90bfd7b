"""Models: the DAWNBench ResNet-9 registered in timm's registry, and `build_model` for any timm name.

The paper (section 5.1) trains "a fast-to-train custom ResNet 9" from the cifar10-fast DAWNBench
submission. Registering it with timm's `@register_model` means `timm.create_model('resnet9')`
works after `import swap_accel`, and recipes name it exactly like any other timm model.
"""

from __future__ import annotations

import difflib

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from torch import nn


class ModelError(ValueError):
    """A model problem, phrased as one line with the fix."""


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """cifar10-fast ResNet-9: prep 64, layer1 128 + residual, layer2 256, layer3 512 + residual,
    global max-pool, linear, output scaled by 0.125. `base_width` scales every width (64 → 16 gives
    16/32/64/128) so CPU recipes can train a narrow one."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, base_width: int = 64, scale: float = 0.125):
        super().__init__()
        w = [base_width, 2 * base_width, 4 * base_width, 8 * base_width]
        # in_chans as an attribute, as timm's models keep it: timm's export (save_for_hf) reads the channels from it.
        self.num_classes, self.in_chans, self.num_features, self.scale = num_classes, in_chans, w[3], scale
        self.prep = _conv_bn(in_chans, w[0])
        self.layer1 = nn.Sequential(_conv_bn(w[0], w[1]), nn.MaxPool2d(2), _Residual(w[1]))
        self.layer2 = nn.Sequential(_conv_bn(w[1], w[2]), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(_conv_bn(w[2], w[3]), nn.MaxPool2d(2), _Residual(w[3]))
        # Adaptive rather than MaxPool2d(4) so 28×28 (Fashion-MNIST) and larger inputs work too.
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(w[3], num_classes, bias=False) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(self.prep(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x).flatten(1)
        return x if pre_logits else self.fc(x) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes, bias=False) if num_classes else nn.Identity()


default_cfgs = generate_default_cfgs(
    {"resnet9": {"url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (1, 1), "classifier": "fc"}}
)


@register_model
def resnet9(pretrained: bool = False, **kwargs) -> ResNet9:
    # Weights exist only where a pretrained_cfg names a source: a `swap_accel export` folder loaded with
    # timm.create_model('local-dir:DIR' or 'hf-hub:ID', pretrained=True).
    cfg = kwargs.get("pretrained_cfg") or {}
    cfg = cfg if isinstance(cfg, dict) else cfg.to_dict() if hasattr(cfg, "to_dict") else {"tag": cfg}
    source = {**cfg, **(kwargs.get("pretrained_cfg_overlay") or {})}  # timm's way to name a local weights file
    if pretrained and not any(source.get(k) for k in ("source", "file", "url", "hf_hub_id", "state_dict")):
        raise ModelError("resnet9 has no pretrained weights of its own; load a `swap_accel export` folder with "
                         "timm.create_model('local-dir:DIR', pretrained=True), or set pretrained false")
    return build_model_with_cfg(ResNet9, "resnet9", pretrained=pretrained, **kwargs)


def check_model_name(name: str) -> None:
    """Fail early, before any process group, with the closest registered names."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "run `swap_accel models PATTERN` to list names"
    raise ModelError(f"unknown model '{name}'; {hint}")


def check_compile_backend(compile_: bool | str) -> None:
    """model.compile names a torch.compile backend torch knows, or is true/false; fail before any process group."""
    if not isinstance(compile_, str):
        return
    from torch._dynamo import list_backends

    if compile_ not in list_backends(exclude_tags=()):
        raise ModelError(f"model.compile={compile_!r} is not a torch.compile backend; use true (torch's default, "
                         f"inductor) or one of {', '.join(list_backends())}, aot_eager (torch._dynamo.list_backends)")


def compile_in_place(module: nn.Module, compile_: bool | str) -> None:
    """nn.Module.compile, in place, so state_dict keys and checkpoints stay those of the plain model: DDP, phase 2,
    BN recalibration and evaluation all run the compiled forward. A string picks the backend (true: inductor)."""
    if compile_:
        module.compile(**({"backend": compile_} if isinstance(compile_, str) else {}))


def build_model(name: str, *, in_chans: int, num_classes: int, kwargs: dict | None = None,
                image_size: tuple[int, int] | None = None) -> nn.Module:
    """`image_size` (the data's H, W): a model whose timm config fixes its input size (ViT-style `img_size`) is built
    for the data's size instead of its default, unless model.kwargs sets img_size itself."""
    check_model_name(name)
    kwargs = dict(kwargs or {})
    cfg = get_pretrained_cfg(name)
    if image_size and cfg is not None and cfg.fixed_input_size and "img_size" not in kwargs \
            and tuple(cfg.input_size[1:]) != tuple(image_size):
        kwargs["img_size"] = tuple(image_size)
    try:
        return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ModelError(f"model '{name}' rejected model.kwargs {kwargs}: {e}; fix model.kwargs in the recipe") \
            from None


def check_model_input(name: str, kwargs: dict, *, in_chans: int, num_classes: int, image_size: tuple[int, int]) -> None:
    """One forward on the meta device (no memory, no compute): a model that cannot take the data's images
    fails before any process group starts instead of at its first step."""
    try:
        with torch.device("meta"):
            build_model(name, in_chans=in_chans, num_classes=num_classes, kwargs=kwargs, image_size=image_size).eval()(
                torch.empty(2, in_chans, *image_size))
    except ModelError:
        raise
    except Exception as e:  # timm raises AssertionError, RuntimeError or ValueError for a wrong input size
        size = "x".join(map(str, (in_chans, *image_size)))
        raise ModelError(f"model '{name}' cannot take the data's {size} images ({str(e).splitlines()[0][:150]}); "
                         "choose a model for this image size, or resize with data.image_size and "
                         "data.in_memory: false") from None
