"""Files that hold models: float checkpoints, quantized checkpoints and the bit-packed model file.

``load(path)`` reads any of them; every file stores a :class:`ModelRecord`, so pruned
and user-defined models come back at their own layer shapes.
"""

from bitsweep.artifacts.checkpoint import load_checkpoint, record_of, save_checkpoint
from bitsweep.artifacts.load import Loaded, load
from bitsweep.artifacts.packed import PackedFile, PackedMeta, save_packed
from bitsweep.artifacts.packed_read import load_packed, read_header
from bitsweep.artifacts.quantized import quantized_state, save_quantized
from bitsweep.artifacts.record import ModelRecord, check_finite

__all__ = [
    "Loaded",
    "ModelRecord",
    "PackedFile",
    "PackedMeta",
    "check_finite",
    "load",
    "load_checkpoint",
    "load_packed",
    "quantized_state",
    "read_header",
    "record_of",
    "save_checkpoint",
    "save_packed",
    "save_quantized",
]
