"""The revify file: a revified model's recipe and weights, safe to load from anyone.

One `torch.save` of a dict holding only strings, numbers, lists and tensors, so
`torch.load(path, weights_only=True)` reads it without running code:

    format, format_version      "revify", 1
    revify_version, torch_version
    source      {"library": "torchvision" | "timm" | "factory" | "user", "name", "kwargs"}
    transform   the plan's settings (revify.plan.plan.Options fields; leaf modules as module names)
    inputs      [{"shape", "dtype"}] the example inputs the plan was made at
    state_dict  the revified model's parameters and buffers

`load` rebuilds the source model by its library and name (or takes `model=` for user code),
runs the same transform, and loads the weights strictly: a model that comes out different
(another revify version planned other widths) is an error, never a silently wrong model.
Writes go to a temporary file in the same folder, renamed into place when complete.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

FORMAT, FORMAT_VERSION = "revify", 1


class RevifyFileError(ValueError):
    """The file is missing, corrupt, of another format or version, or does not fit the model."""


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; move it into place only if the block succeeds."""
    path = Path(path)
    check_writable(path)
    # hidden, and ending in the real suffix (matplotlib picks the image format by it)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}",
                               dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path: str | os.PathLike) -> None:
    """Refuse an output path before any work is done on it."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise RevifyFileError(f"{path} is a folder; give a file name")
    if not folder.is_dir():
        raise RevifyFileError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise RevifyFileError(f"cannot write {path}: folder {folder} is not writable")


def _plain(value, where: str):
    """`value` if it is plain data that weights_only loading accepts, else a clear error."""
    if value is None:
        return value
    for kind in (bool, int, float, str):  # subclasses (torch's TorchVersion) become the base type
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise RevifyFileError(f"cannot save {where}={value!r}: only numbers, strings, lists and dicts "
                          f"can be stored safely")


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a revified model (from revify.transform or revify.load) to `path`, atomically."""
    from revify import __version__
    recipe = getattr(model, "revify_recipe", None)
    if recipe is None:
        raise RevifyFileError(f"revify.save expects a model from revify.transform or revify.load, "
                              f"got a {type(model).__name__}")
    if None in recipe["inputs"]:
        raise RevifyFileError("the model was transformed with non-tensor example inputs, which a "
                              "file cannot record")
    payload = _plain(recipe, "recipe") | {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "revify_version": __version__, "torch_version": str(torch.__version__),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_torch_file(path: str | os.PathLike, what: str = "file") -> object:
    """torch.load with weights_only=True, every failure turned into one sentence."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise RevifyFileError(f"{path} is a folder, not a {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):  # a class or function the file wants to import
            raise RevifyFileError(f"{path} holds pickled Python objects, which revify does not "
                                  f"load (loading them could run code)") from exc
        raise RevifyFileError(f"{path} is not a PyTorch {what} (it cannot be unpickled)") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise RevifyFileError(
            f"{path} is not a readable PyTorch {what} (corrupt or truncated: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc


def read(path: str | os.PathLike) -> dict:
    """The validated contents of a revify file (recipe and state dict)."""
    payload = read_torch_file(path, "revify file")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise RevifyFileError(f"{path} is not a revify file (a PyTorch file without the revify "
                              f"header; a plain state dict goes in with `revify convert MODEL "
                              f"--weights {path}`)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RevifyFileError(f"{path} has revify format version {version} (written by revify "
                              f"{payload.get('revify_version')}); this revify reads up to version "
                              f"{FORMAT_VERSION}: upgrade revify")
    missing = {"source", "transform", "inputs", "state_dict"} - payload.keys()
    if missing:
        raise RevifyFileError(f"{path} is a damaged revify file "
                              f"(missing {', '.join(sorted(missing))})")
    if not isinstance(payload["transform"], dict):
        raise RevifyFileError(f"{path} is a damaged revify file (its transform settings are "
                              f"not a dict)")
    payload["transform"] = _renamed(payload["transform"])
    return payload


# Settings older files hold under other names: old name -> (new name, {old value: new value}).
RENAMED = {"checkpoint": ("non_invertible", {"non_invertible": "recompute", "none": "store"}),
           "store": ("schedule", {"auto": "budget", "none": "recompute_all"})}


# Settings older files lack: name -> the value that builds what they were written from.
ADDED = {"couple": "each"}


def _renamed(settings: dict) -> dict:
    """A recipe's settings under today's Options names (files written before the renames and
    additions)."""
    out = ADDED | settings
    for old, (new, values) in RENAMED.items():
        if old in out:
            value = out.pop(old)
            out[new] = values.get(value, value)
    return out


def source_of(payload: dict, model: nn.Module | None = None) -> nn.Module:
    """The untransformed source model of a file: `model` if given, else rebuilt by name."""
    from revify.models import rebuild
    return model if model is not None else rebuild(payload["source"])


def transform_recipe(source: nn.Module, payload: dict) -> nn.Module:
    """Build the revified model of `source` as the recipe says."""
    from dataclasses import fields

    from revify.plan.plan import Options
    from revify.pipeline import build_with
    unknown = set(payload["transform"]) - {f.name for f in fields(Options)} - {"leaf_modules"}
    if unknown:
        raise RevifyFileError(f"the file's recipe has settings this revify does not know "
                              f"({', '.join(sorted(unknown))}; written by revify "
                              f"{payload.get('revify_version')}): upgrade revify")
    example = tuple(torch.empty(i["shape"], dtype=getattr(torch, i["dtype"]))
                    for i in payload["inputs"])
    return build_with(source, example, payload["transform"])


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the revified model saved at `path`.

    model: the source model (untransformed, any weights) when the file comes from user code that
        revify cannot rebuild by name; `revify.load(path, model=MyNet())`.
    """
    payload = read(path)
    return build(payload, source_of(payload, model), str(path))


def build(payload: dict, source: nn.Module, name: str) -> nn.Module:
    """The revified model of a file's contents (`read`), with its weights, from `source`."""
    rev = transform_recipe(source, payload)
    load_weights(rev, payload["state_dict"], name, f"the model revify builds from it "
                 f"(written by revify {payload.get('revify_version')})")
    return rev


def load_weights(model: nn.Module, state_dict: dict, source: str, target: str) -> None:
    """load_state_dict(strict) with a one-sentence account of any mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                 for what, v in (("missing", missing), ("unexpected", unexpected),
                                 ("of another shape", wrong)) if v]
        raise RevifyFileError(f"the weights in {source} do not match {target}: {'; '.join(parts)}")
    model.load_state_dict(state_dict)


CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module")  # where trainers nest it


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A source model's state dict from a local file: a plain state dict, or a training
    checkpoint holding one under a usual key; DDP's `module.` prefix is dropped."""
    payload = read_torch_file(path, "weights file")
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        raise RevifyFileError(f"{path} is a revify file, not the source model's weights: load it "
                              f"with revify.load")
    for key in CHECKPOINT_KEYS:
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    if not (isinstance(payload, dict) and payload
            and all(isinstance(v, torch.Tensor) for v in payload.values())):
        raise RevifyFileError(f"{path} holds no state dict (a dict of tensors, possibly under "
                              f"{', '.join(CHECKPOINT_KEYS)})")
    if all(k.startswith("module.") for k in payload):
        payload = {k.removeprefix("module."): v for k, v in payload.items()}
    return payload


def read_calibration(path: str | os.PathLike, input_size) -> torch.Tensor:
    """Unlabelled inputs for revify.distill from a local file: a tensor (N, *input_size), or
    an (inputs, labels) pair as `torch.save((x, y), path)` writes it (the labels are unused)."""
    payload = read_torch_file(path, "calibration file")
    if isinstance(payload, (tuple, list)) and payload:
        payload = payload[0]
    if not isinstance(payload, torch.Tensor) or not payload.is_floating_point():
        raise RevifyFileError(f"{path} holds no input tensor (a floating-point tensor of shape "
                              f"N x {' x '.join(map(str, input_size))}, or an (inputs, labels) "
                              f"pair)")
    if tuple(payload.shape[1:]) != tuple(input_size) or len(payload) == 0:
        raise RevifyFileError(f"{path} holds inputs of shape {tuple(payload.shape)}; the model "
                              f"takes N x {' x '.join(map(str, input_size))} (--input-size), N > 0")
    return payload
