"""Compression: fake-quant simulation, real int8, structured and 2:4 pruning, one pipeline (``visionzoo compress``)."""
from visionzoo.compress.quantize import QuantConfig, parse_scheme, quantize
from visionzoo.compress.quantizers import LogQuantizer, TwinUniformQuantizer, UniformQuantizer, sqnr_db

__all__ = ["LogQuantizer", "QuantConfig", "TwinUniformQuantizer", "UniformQuantizer", "parse_scheme", "quantize",
           "sqnr_db"]
