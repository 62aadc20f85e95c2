"""revify: turn residual networks into reversible networks that train in less memory."""
from .blocks import ResidualBlock, find_blocks
from .checkpoint import Checkpointed
from .files import RevifyFileError, load, save
from .modes import exact_backward
from .plan import Plan
from .reversible import CouplingBlock, ReversibleStage
from .trace import TraceError
from .transform import NoResidualBlocks, RevifiedModel, transform
from .analyze import Analysis, analyze, measure  # noqa: E402  (after transform: it uses it)

__version__ = "0.1.0"

__all__ = ["transform", "save", "load", "RevifyFileError", "analyze", "measure", "Analysis", "exact_backward", "RevifiedModel", "Plan", "ReversibleStage",
           "CouplingBlock", "Checkpointed", "ResidualBlock", "find_blocks", "TraceError",
           "NoResidualBlocks", "__version__"]
