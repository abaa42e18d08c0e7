"""Measured compression: bit packing, size accounting, the packed model file, the integer reference."""
