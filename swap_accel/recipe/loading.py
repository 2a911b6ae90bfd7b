"""Reading a recipe: YAML, typed `--set a.b=c` overrides, validation, and one-line errors naming the fix."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from . import device_defaults
from .schema import Recipe
from .sections import RecipeError


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
        parent = _fields_at(first["loc"][:-1])
        close = difflib.get_close_matches(str(first["loc"][-1]), parent, n=1)
        fix = f"did you mean '{'.'.join(map(str, first['loc'][:-1] + (close[0],)))}'?" if close else ""
        fix = fix or f"valid keys here: {', '.join(sorted(parent))}"
        return f"{source}: {loc}: {msg}; {fix}"
    if first["type"] == "missing":
        return f"{source}: {loc}: required key is missing; add it to the recipe"
    if first["type"] == "finite_number":
        msg = "must be a finite number"
    if first["type"] == "value_error" and not loc:  # a check across sections: its message names keys and fix
        return f"{source}: {msg}"
    return f"{source}: {loc}: {msg} (got {first.get('input')!r}); fix the value in the recipe or --set"


def _fields_at(loc: tuple) -> list[str]:
    model: Any = Recipe
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        model = field.annotation
        args = getattr(model, "__args__", ())
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), model)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `a.b=c` override; the value is parsed as YAML so numbers and booleans stay typed."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set phase1.max_epochs=10")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node, model = raw, Recipe
    for i, part in enumerate(parts):
        fields = list(model.model_fields) if model is not None else []
        if model is not None and part not in fields:
            close = difflib.get_close_matches(part, fields, n=1)
            hint = (f"did you mean '{'.'.join(parts[:i] + [close[0]])}'?" if close
                    else f"valid keys: {', '.join(fields)}")
            raise RecipeError(f"--set {key}: no such recipe key '{'.'.join(parts[: i + 1])}'; {hint}")
        if i == len(parts) - 1:
            node[part] = yaml.safe_load(value)
            return
        sub = model.model_fields[part].annotation if model is not None else None
        args = getattr(sub, "__args__", ())
        sub = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), sub)
        model = sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]


def _drop_foreign_kwargs(raw: dict, written: dict, overrides: list[str]) -> str | None:
    """model.kwargs belong to the recipe's model (the quickstart's `base_width` is ResNet-9's): `--set model.name=X`
    without `--set model.kwargs...` builds X with its own defaults instead of passing them on."""
    keys = [a.split("=", 1)[0].strip() for a in overrides]
    name = (raw.get("model") or {}).get("name")
    if "model.name" in keys and name != written.get("name", "resnet9") and written.get("kwargs") \
            and not any(k.startswith("model.kwargs") for k in keys):
        raw["model"]["kwargs"] = {}
        return (f"note: model.kwargs {written['kwargs']} belong to {written.get('name', 'resnet9')}, not passed to "
                f"{name} (set them with --set model.kwargs=...)")
    return None


def load_recipe(path: str | os.PathLike, overrides: list[str] = (), notes: list[str] | None = None) -> Recipe:
    """`notes` collects what the overrides changed beyond themselves (the CLI prints them once the recipe passed)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found; pass a YAML file such as recipes/fashion_mnist.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: the recipe must be a mapping of sections (model:, data:, phase1: ...)")
    raw.setdefault("name", path.stem)
    written = dict(raw.get("model") or {})
    for assignment in overrides:
        apply_override(raw, assignment)
    note = _drop_foreign_kwargs(raw, written, overrides)
    if note and notes is not None:
        notes.append(note)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(_format_error(e, str(path))) from None
    if notes is not None:
        notes.extend(_resolved_autos(raw, recipe))
    return recipe


def _resolved_autos(raw: dict, recipe: Recipe) -> list[str]:
    """What `auto` became, said where it differs from the CPU's fp32 NCHW (on a GPU): a user who set nothing sees
    that the run trains in bf16 and channels-last before it starts."""
    capability = device_defaults.cuda_capability()
    if capability is None:
        return []
    auto = device_defaults.AUTO
    written = device_defaults.device_settings(raw, unset=auto)
    value = device_defaults.device_settings(recipe.model_dump(mode="json"))
    chosen = [f"{key} auto -> {str(value[key]).lower()}" for key in written if written[key] == auto]
    return [f"note: {', '.join(chosen)} (CUDA compute capability {capability[0]}.{capability[1]}; set them to "
            "override)"] if chosen else []


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
