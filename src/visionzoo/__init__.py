"""visionzoo: ConvNet, vision-Transformer and hybrid backbones under one API, measured side by side."""
from visionzoo import explain, export  # noqa: F401  (visionzoo.explain.record_attention, visionzoo.export.onnx)
from visionzoo.bench.flops import profile
from visionzoo.deploy import deploy
from visionzoo.registry import create_model, get_variant, list_families, list_models, model_info
from visionzoo.weights import load_checkpoint, load_model, save

__version__ = "0.1.0"
__all__ = ["create_model", "deploy", "explain", "export", "get_variant", "list_families", "list_models",
           "load_checkpoint", "load_model", "model_info", "profile", "save"]
