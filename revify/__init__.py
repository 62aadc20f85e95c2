"""revify: turn residual networks into reversible networks that train in less memory.

The names here are the ones users call; everything else is imported from its module
(`from revify.reversible import ReversibleStage`, `from revify.analyze import measure`,
`from revify.transform import build`: `revify.analyze` and `revify.transform` name the functions).
"""
from .files import RevifyFileError, load, save
from .models import UnknownModel
from .modes import exact_backward, plain_autograd
from .plan import Plan
from .trace import TraceError
from .transform import NoResidualBlocks, RevifiedModel, transform
from .analyze import analyze  # noqa: E402  (after transform: it uses it)

__version__ = "0.1.0"

__all__ = ["transform", "analyze", "save", "load", "plain_autograd", "exact_backward",
           "RevifiedModel", "Plan", "RevifyFileError", "TraceError", "NoResidualBlocks",
           "UnknownModel", "__version__"]
