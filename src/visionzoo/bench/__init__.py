"""Measurement: MACs/FLOPs and activations (flops.py)."""
