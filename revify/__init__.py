"""revify: turn residual networks into reversible networks that train in less memory.

The names here are the ones users call; everything else is imported from its module
(`from revify.runtime.reversible import ReversibleStage`,
`from revify.memory.analyze import measure`, `from revify.pipeline import build`: `revify.analyze`
and `revify.transform` name the functions).
"""
__version__ = "0.1.0"  # first: modules imported below read it

from revify.files import RevifyFileError, load, save
from revify.models import UnknownModel
from revify.runtime.modes import exact_backward, plain_autograd
from revify.plan.plan import Plan
from revify.graph.trace import TraceError
from revify.pipeline import NoResidualBlocks, RevifiedModel, transform
from revify.memory.analyze import analyze  # noqa: E402  (after transform: it uses it)


__all__ = ["transform", "analyze", "save", "load", "plain_autograd", "exact_backward",
           "RevifiedModel", "Plan", "RevifyFileError", "TraceError", "NoResidualBlocks",
           "UnknownModel", "__version__"]
