"""Model names the command line understands: torchvision and timm, looked up in registries."""
from __future__ import annotations

import difflib

from torch import nn


class UnknownModel(ValueError):
    """No library knows the model name; the message suggests close names."""


def _torchvision_names() -> list[str]:
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return timm.list_models()


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a randomly initialised model by name: `resnet50`, `timm/resnet50d`, `tv/resnet50`.

    A bare name is looked up in torchvision first, then in timm. Nothing is downloaded.
    """
    library, _, bare = name.rpartition("/")
    if library in ("", "tv", "torchvision") and bare in _torchvision_names():
        import torchvision
        return torchvision.models.get_model(bare, weights=None, **kwargs)
    if library in ("", "timm") and bare in _timm_names():
        import timm
        return timm.create_model(bare, pretrained=False, **kwargs)
    known = _torchvision_names() + _timm_names()
    close = difflib.get_close_matches(bare, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownModel(f"unknown model '{name}': neither torchvision nor timm has it.{hint}")
