"""bitsweep: train small image classifiers, quantize them to any bit width, measure the gain."""

from bitsweep.errors import BitsweepError

__version__ = "0.1.0"
__all__ = ["BitsweepError", "__version__"]
