"""Files that hold models: float checkpoints, quantized checkpoints and the bit-packed model file."""
