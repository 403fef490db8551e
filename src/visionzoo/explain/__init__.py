"""Explaining models: attention maps through the attention seam."""
from .attention import AttentionMap, AttentionRecorder, record_attention

__all__ = ["AttentionMap", "AttentionRecorder", "record_attention"]
