"""Run outputs and checkpoints written atomically: weights as safetensors, JSON and text files.

Atomic means temporary file in the same directory, fsync, rename: a crash leaves either the old
file or the new one, never a torn one. safetensors holds tensors only, so loading it never runs
code (unlike a pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors needs contiguous, non-aliased tensors; channels-last weights are not contiguous.
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_weights(path: Path, module: torch.nn.Module, metadata: dict[str, str] | None = None) -> None:
    tensors = state_tensors(module)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def tensors_sha256(path: Path) -> str:
    """Identifies the weights, not the file: safetensors writes its JSON header in no fixed order, so
    two files of bitwise-equal tensors can differ in sha256. Names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(load_weights(path).items()):
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())  # any dtype, 0-d included
    return h.hexdigest()


def weights_identity(path: Path) -> dict[str, str]:
    """results.json's claim about a weights file: what the tensors are, and the file's own checksum (integrity)."""
    return {"model_sha256": tensors_sha256(path), "model_file_sha256": sha256_file(path)}


# ----------------------------------------------------------------------------------- checkpoints
#
# A checkpoint is a directory: weights as safetensors, optimizer/RNG/loop state as `*.pt` files that are
# only ever read with `torch.load(weights_only=True)`, and `manifest.json` with each file's size and
# sha256. It is assembled in a hidden staging directory and renamed into place, so a crash leaves no
# half-written checkpoint under a real name; a later truncation or bit flip fails the checksum.

MANIFEST = "manifest.json"
FORMAT = "swap_accel-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint or run-directory problem, phrased as one line naming the problem and the fix."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_state(path: Path, state: dict) -> None:
    """Tensors, numbers, strings, lists and dicts only: what `weights_only=True` can read back."""
    _atomic_write(path, lambda f: torch.save(state, f))


def commit_checkpoint(staging: Path, final: Path, files: list[str], info: dict) -> None:
    """Checksum `files` of `staging`, write the manifest, rename the directory to `final`."""
    for stray in set(p.name for p in staging.iterdir()) - set(files):
        (staging / stray).unlink()  # temporary files of a write that crashed in an earlier attempt
    entries = {name: {"bytes": (staging / name).stat().st_size, "sha256": sha256_file(staging / name)}
               for name in files}
    write_json(staging / MANIFEST, {"format": FORMAT, **info, "files": entries})
    _fsync_dir(staging)
    if final.exists():  # only a damaged one: a good checkpoint of the same step is never rewritten
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(final.parent)


def verify_checkpoint(path: Path) -> dict:
    """The manifest of a complete, undamaged checkpoint; CheckpointError saying what is wrong otherwise."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory (no such directory)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: missing or unreadable {MANIFEST} ({type(e).__name__}): torn checkpoint") \
            from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "files" not in manifest:
        raise CheckpointError(f"{path}: {MANIFEST} is not a {FORMAT} manifest")
    for name, entry in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing: torn checkpoint")
        if file.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{path}: {name} has {file.stat().st_size} bytes, the manifest says "
                                  f"{entry['bytes']}: truncated checkpoint")
        if sha256_file(file) != entry["sha256"]:
            raise CheckpointError(f"{path}: {name} fails its sha256 checksum: damaged checkpoint")
    return manifest


def load_state(path: Path):
    """Read a `*.pt` state file without ever unpickling code (a crafted pickle is refused, not run)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own message goes on to suggest weights_only=False, i.e. running the file's code:
        # only the object it refused is passed on.
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"it refers to {found.group(1)}" if found else "it is not a plain tensor/number file"
        raise CheckpointError(f"{path}: refusing to load: {what}, which could run code; use checkpoints "
                              "written by swap_accel") from None


def load_weights_into(module: torch.nn.Module, path: Path) -> None:
    """Load a checkpoint's model.safetensors into `module`, refusing weights of another architecture."""
    tensors = load_weights(path / "model.safetensors")
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    shapes = [k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape]
    if missing or unexpected or shapes:
        problem = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                   else f"shape of {shapes[0]} is {tuple(tensors[shapes[0]].shape)}, not {tuple(own[shapes[0]].shape)}")
        raise CheckpointError(f"{path} holds weights of another model ({problem}); use a checkpoint of the "
                              "recipe's model, or fix model.name/model.kwargs")
    module.load_state_dict(tensors)
