"""Compression: fake-quant simulation, real int8, structured and 2:4 pruning, one pipeline (``visionzoo compress``).

    qm = visionzoo.compress.quantize(model, "w4a4-adalog", visionzoo.compress.calibration_batches("digits", model))
    pruned = visionzoo.compress.prune(model, 0.5); visionzoo.compress.save(pruned, "pruned.safetensors")
    m8 = visionzoo.compress.int8(model, "ort-dynamic")
    report = visionzoo.compress.compress("deit_small_patch16_224", prune=0.5, quant=["w8a8"], out_dir="out")
"""
from visionzoo.compress.data import calibration_batches, labelled_images
from visionzoo.compress.int8 import int8
from visionzoo.compress.mixed import allocate_bits, layer_sensitivity, mixed_precision
from visionzoo.compress.pipeline import compress, save, strip_quant
from visionzoo.compress.prune import find_groups, prune, semi_structured_2_4, sparsity
from visionzoo.compress.quantize import QuantConfig, parse_scheme, quantize
from visionzoo.compress.quantizers import LogQuantizer, TwinUniformQuantizer, UniformQuantizer, sqnr_db
from visionzoo.compress.report import CompressReport, layer_sqnr
from visionzoo.compress.structure import apply_structure, structure_record

__all__ = ["CompressReport", "LogQuantizer", "QuantConfig", "TwinUniformQuantizer", "UniformQuantizer",
           "allocate_bits", "apply_structure", "calibration_batches", "compress", "find_groups", "int8",
           "labelled_images", "layer_sensitivity", "layer_sqnr", "mixed_precision", "parse_scheme", "prune", "quantize",
           "save", "semi_structured_2_4", "sparsity", "sqnr_db", "strip_quant", "structure_record"]
