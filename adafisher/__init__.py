"""AdaFisher: Adam-style momentum preconditioned by a diagonal Kronecker-factored Fisher."""

from .ops import native_available
from .optimizer import AdaFisher, AdaFisherW

__all__ = ["AdaFisher", "AdaFisherW", "__version__", "native_available"]
__version__ = "0.1.0"
