"""AdaFisher: Adam-style momentum preconditioned by a diagonal Kronecker-factored Fisher."""

from .optimizer import AdaFisher, AdaFisherW

__all__ = ["AdaFisher", "AdaFisherW", "__version__"]
__version__ = "0.1.0"
