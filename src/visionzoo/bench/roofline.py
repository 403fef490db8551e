"""This machine's roofline: matmul peak per kernel and dtype, and memory bandwidth, measured once per run.

A peak is the best of several square matmuls (large enough to be compute-bound), measured for each kernel a
model can reach on CPU: torch's default (``aten``: MKL's sgemm on x86 builds), oneDNN's inner product with a
prepacked weight (what ``eager_tuned`` and inductor's bf16 path call), onnxruntime's MLAS, and oneDNN in bf16.
Kernels differ by up to 2x on one CPU (issue 11), so a model's FLOP utilisation (MFU: its achieved GFLOP/s,
counted FLOPs per image x images per second, over a peak) is taken against the best kernel of its dtype here:
the speed this machine can reach, whichever library reaches it. The bandwidth is the best of several copies of
a buffer far larger than the caches (read + write bytes).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from visionzoo.bench.schema import DTYPES
from visionzoo.bench.system import own_cpu, system_busy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", n: int | None = None,
                seconds: float = 0.4) -> float:
    """Best GFLOP/s of ``n x n @ n x n`` matmuls over about ``seconds``."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048 if dtype == torch.float32 else 4096)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up: kernel selection, packing buffers
    _sync(device)
    best, t_end = 0.0, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        dt = time.perf_counter() - t0
        best = max(best, 2 * n**3 / dt / 1e9)
        if time.perf_counter() > t_end:
            return best


def _best_gflops(fn, flop: float, seconds: float) -> float:  # noqa: ANN001
    fn()  # warm-up: kernel selection, packing buffers
    best, t_end = 0.0, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        fn()
        best = max(best, flop / (time.perf_counter() - t0) / 1e9)
        if time.perf_counter() > t_end:
            return best


def kernel_peaks(n: int = 2048, seconds: float = 0.4) -> dict[str, float]:
    """Best GFLOP/s of an ``n x n @ n x n`` product through each CPU kernel that is installed: ``aten_fp32``
    (torch's BLAS), ``onednn_fp32`` (prepacked inner product), ``mlas_fp32`` (onnxruntime), ``onednn_bf16``."""
    from visionzoo.runtime.kernels import onednn_available

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    flop = 2 * n**3
    out: dict[str, float] = {}
    with torch.inference_mode():
        out["aten_fp32"] = _best_gflops(lambda: torch.mm(a, b), flop, seconds)
        if onednn_available():
            for name, dt in (("onednn_fp32", torch.float32), ("onednn_bf16", torch.bfloat16)):
                x, w = a.to(dt), torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous().to(dt))
                out[name] = _best_gflops(lambda x=x, w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [],
                                                                                              ""), flop, seconds)
    mlas = _mlas_matmul(b.numpy())
    if mlas is not None:
        an = a.numpy()
        out["mlas_fp32"] = _best_gflops(lambda: mlas(an), flop, seconds)
    return {k: round(v, 1) for k, v in out.items()}


def _mlas_matmul(w):  # noqa: ANN001, ANN202  (numpy array -> a callable x -> x @ w in onnxruntime, or None)
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    n, k = w.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, k])],
                              [numpy_helper.from_array(w, "w")])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})


def best_peak(roof: dict[str, Any], dtype: str) -> tuple[str | None, float | None]:
    """The fastest kernel of ``dtype`` in a roofline dict and its GFLOP/s (the plain matmul peak if none)."""
    kernels = {k: v for k, v in (roof.get("kernels") or {}).items() if k.endswith("_" + dtype) and v}
    if kernels:
        name = max(kernels, key=kernels.get)
        return name, kernels[name]
    return (None, roof.get(f"{dtype}_gflops")) if roof.get(f"{dtype}_gflops") else (None, None)


def memory_bandwidth(device: str | torch.device = "cpu", mbytes: int = 256, seconds: float = 0.4) -> float:
    """Best GB/s of copying a ``mbytes`` MB fp32 buffer (read + write bytes counted)."""
    device = torch.device(device)
    x = torch.ones(mbytes * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    best, t_end = 0.0, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        dt = time.perf_counter() - t0
        best = max(best, 2 * x.numel() * 4 / dt / 1e9)
        if time.perf_counter() > t_end:
            return best


def measure_peaks(device: str | torch.device = "cpu", dtypes: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, Any]:
    """``{"fp32_gflops", "bf16_gflops", "mem_gbs", "threads", "device"}`` for this machine; on CPU also
    ``"kernels"`` (GFLOP/s per kernel, ``kernel_peaks``) and ``"<dtype>_best_kernel"`` / ``"_best_gflops"``."""
    out: dict[str, Any] = dict(device=str(device), threads=torch.get_num_threads())
    t0, busy0, cpu0 = time.perf_counter(), system_busy(), own_cpu()
    for name in dtypes:
        try:
            out[f"{name}_gflops"] = round(matmul_peak(DTYPES[name], device), 1)
        except RuntimeError as e:  # a dtype without a matmul kernel on this device
            out[f"{name}_gflops"] = None
            out[f"{name}_error"] = str(e).splitlines()[0]
    if torch.device(device).type == "cpu":
        try:
            out["kernels"] = kernel_peaks()
        except Exception as e:  # noqa: BLE001  (a kernel that fails leaves the plain peaks)
            out["kernels_error"] = f"{type(e).__name__}: {e}"[:200]
        for dt in dtypes:
            name, peak = best_peak(out, dt)
            out[f"{dt}_best_kernel"], out[f"{dt}_best_gflops"] = name, peak
    out["mem_gbs"] = round(memory_bandwidth(device), 1)
    if busy0 is not None:  # cores other processes used meanwhile: a shared machine lowers the peak too
        out["other_cores"] = round(max(0.0, (system_busy() - busy0 - (own_cpu() - cpu0))
                                       / (time.perf_counter() - t0)), 2)
    fp32 = out.get("fp32_best_gflops") or out.get("fp32_gflops")
    if fp32:
        out["fp32_ridge_flop_per_byte"] = round(fp32 / out["mem_gbs"], 1)
    return out


def utilisation(gflops_per_image: float, samples_per_sec: float, peak_gflops: float) -> float:
    """Model FLOP utilisation: achieved GFLOP/s over the matmul peak."""
    return gflops_per_image * samples_per_sec / peak_gflops
