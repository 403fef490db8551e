"""Export any registered model: ``visionzoo.export.onnx(model, path)`` and ``visionzoo.export.pt2(model, path)``.

Both trace through ``torch.export`` (static or dynamic batch), write the file, check it against eager
(onnxruntime for ONNX) and time both. ``matrix`` runs every trace/export path on a set of models
(``docs/export.md``).
"""
from visionzoo.export.onnx import onnx
from visionzoo.export.pt2 import pt2
from visionzoo.export.verify import ExportReport

__all__ = ["ExportReport", "onnx", "pt2"]
