"""Image classifiers by name: ``create_model("mobilenetv2", num_classes=100)``."""

from bitsweep.models.common import channels_last_hazard, to_channels_last
from bitsweep.models.registry import ModelEntry, create_model, list_models

__all__ = ["ModelEntry", "channels_last_hazard", "create_model", "list_models", "to_channels_last"]
