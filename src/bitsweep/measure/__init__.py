"""Measured compression: size accounting per layer, activation memory, the compression summary."""
