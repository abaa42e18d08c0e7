"""Image classifiers by name: ``create_model("mobilenetv2", num_classes=100)``."""

from bitsweep.models.registry import ModelEntry, create_model, list_models

__all__ = ["ModelEntry", "create_model", "list_models"]
