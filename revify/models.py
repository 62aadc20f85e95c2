"""Model names the command line understands, looked up in registries, never in if-chains.

A model spec is a torchvision name (`resnet50`), a timm name (`resnet50d`), either with its
library spelled out (`tv/resnet50`, `timm/resnet50`: both libraries have that one), or
`package.module:factory` for a user's own code. Every model built here remembers where it came
from (`model.revify_source`), so a saved revify file can name it and `revify.load` can rebuild it.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import json
from pathlib import Path
from typing import Callable

from torch import nn


class UnknownModel(ValueError):
    """No library knows the model name; the message suggests close names."""


def _torchvision_names() -> list[str]:
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _torchvision_create(name: str, **kwargs) -> nn.Module:
    import torchvision
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return timm.list_models()


def _timm_create(name: str, **kwargs) -> nn.Module:
    import timm
    return timm.create_model(name, pretrained=False, **kwargs)


# library -> (names it has, constructor); a bare name is looked up in this order.
LIBRARIES: dict[str, tuple[Callable[[], list[str]], Callable[..., nn.Module]]] = {
    "torchvision": (_torchvision_names, _torchvision_create),
    "timm": (_timm_names, _timm_create),
}
ALIASES = {"tv": "torchvision"}

# Every model scripts/coverage.py ran through revify.transform, with what came of it.
COVERAGE_FILE = Path(__file__).parent / "coverage.json"


def _factory(spec: str, kwargs: dict) -> nn.Module:
    """`package.module:factory`: import the module and call the factory (the user's own code)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownModel(f"cannot import '{module_name}' for model '{spec}': {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UnknownModel(f"'{module_name}' has no callable '{attr}' (model '{spec}')")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UnknownModel(f"'{spec}' returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _lookup(name: str) -> tuple[str, str]:
    """(library, bare name) for a model spec, or UnknownModel with close names."""
    library, _, bare = name.rpartition("/")
    library = ALIASES.get(library, library)
    if library and library not in LIBRARIES:
        raise UnknownModel(f"unknown library '{library}' in '{name}': use one of "
                           f"{', '.join(LIBRARIES)} (or package.module:factory)")
    for lib, (names, _) in LIBRARIES.items():
        if library in ("", lib) and bare in names():
            return lib, bare
    known = list(dict.fromkeys(n for names, _ in LIBRARIES.values() for n in names()))
    close = difflib.get_close_matches(bare, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownModel(f"unknown model '{name}': neither torchvision nor timm has it.{hint}")


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a randomly initialised model by spec; nothing is downloaded.

    kwargs go to the constructor (for example num_classes=10).
    """
    if ":" in name:
        library, bare = "factory", name
        model = _factory(name, kwargs)
    else:
        library, bare = _lookup(name)
        model = LIBRARIES[library][1](bare, **kwargs)
    model.revify_source = {"library": library, "name": bare, "kwargs": dict(kwargs)}
    return model


def rebuild(source: dict) -> nn.Module:
    """The source model a revify file names, built by its library only (no user code runs)."""
    library = source.get("library")
    if library not in LIBRARIES:
        raise UnknownModel(f"revify cannot rebuild '{source.get('name')}' by name (it comes from "
                           f"{library or 'user'} code): pass the model, "
                           f"revify.load(path, model=...)")
    return create_model(f"{library}/{source['name']}", **source.get("kwargs", {}))


def list_convertible(pattern: str = "*", everything: bool = False) -> list[dict]:
    """The models the coverage run converted (with `everything`, also those it did not), as
    {"model", "lib", "rev" (reversible blocks / all), "ok", "note"}, matching `pattern`."""
    rows = json.loads(COVERAGE_FILE.read_text())
    return [r for r in rows
            if fnmatch.fnmatch(r["model"], pattern) and (everything or r["ok"] == "yes")]

