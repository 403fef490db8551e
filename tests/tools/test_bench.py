"""visionzoo bench on tiny *_test variants: schema, consistent throughput, error rows, plots, the CLI."""
from __future__ import annotations

import csv
import json

import pytest

import visionzoo
from visionzoo.bench import BenchConfig, run
from visionzoo.bench.report import COLUMNS, read_json, write_all
from visionzoo.bench.schema import BenchResult
from visionzoo.cli import main

TEST_MODELS = visionzoo.list_models("*_test")[:2]
TINY = dict(batch_sizes=(1, 2), img_size=64, budget=0.03, repeats=2, threads=1)
TIMM_COLUMNS = ("model", "infer_samples_per_sec", "infer_step_time", "infer_batch_size", "infer_img_size",
                "infer_gmacs", "param_count")


@pytest.fixture(scope="module")
def results():
    # in-process: the child process costs an `import torch` per model; test_subprocess_memory covers it
    return run(TEST_MODELS + ["no_such_model", "no_such_*"], BenchConfig(subprocess=False, **TINY))


@pytest.fixture(scope="module")
def written(results, tmp_path_factory):
    return write_all(results, str(tmp_path_factory.mktemp("bench")))


def test_rows_are_positive_and_consistent(results):
    ok = [r for r in results if r.status != "error"]
    assert {(r.model, r.infer_batch_size) for r in ok} == {(m, b) for m in TEST_MODELS for b in (1, 2)}
    for r in ok:
        assert r.infer_samples_per_sec > 0 and r.infer_steps >= 1 and r.infer_time > 0
        assert r.infer_samples_per_sec == pytest.approx(r.infer_batch_size * r.infer_steps / r.infer_time, rel=1e-3)
        assert r.infer_step_time == pytest.approx(1e3 * r.infer_time / r.infer_steps, rel=1e-3)
        assert r.infer_samples_per_sec_min <= r.infer_samples_per_sec <= r.infer_samples_per_sec_max
        assert r.param_count > 0 and r.infer_gmacs > 0 and r.infer_gflops == pytest.approx(2 * r.infer_gmacs, rel=0.01)
        assert r.infer_cpu_util is not None and r.threads == 1 and r.omp_wait_policy
        assert r.kind in ("convnet", "vit", "hybrid")
        if r.infer_batch_size == 1:
            assert 0 < r.infer_latency_p50 <= r.infer_latency_p90 <= r.infer_latency_p99


def test_error_rows_for_unknown_model_and_empty_pattern(results):
    errors = {r.model: r.error for r in results if r.status == "error"}
    assert "unknown model 'no_such_model'" in errors["no_such_model"]
    assert "no registered model matches" in errors["no_such_*"]


def test_bad_image_size_is_an_error_row_and_the_run_goes_on():
    rows = run(TEST_MODELS, BenchConfig(subprocess=False, **{**TINY, "img_size": 33, "batch_sizes": (1,)}))
    assert [r.model for r in rows] == TEST_MODELS
    assert all(r.status == "error" and "33" in r.error for r in rows)


def test_csv_and_json_schema(results, written):
    with open(written["csv"]) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        assert set(TIMM_COLUMNS) <= set(reader.fieldnames)
        csv_rows = list(reader)
    assert len(csv_rows) == len(results)
    with open(written["json"]) as f:
        d = json.load(f)
    assert {"environment", "config", "results", "roofline", "interrupted", "wall_s"} <= set(d)
    env = d["environment"]
    assert {"torch", "device", "cpu", "cpu_flags", "threads", "omp_wait_policy"} <= set(env)
    assert [r["model"] for r in d["results"]] == [r.model for r in results]
    back = read_json(written["json"])
    assert back == list(results) and back.environment == env


def test_plots_are_written(written):
    for key in ("plot_top1", "plot_gmacs"):
        with open(written[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_subprocess_measures_peak_memory_and_sets_the_wait_policy():
    rows = run(TEST_MODELS[:1], BenchConfig(**{**TINY, "batch_sizes": (2,), "repeats": 1}))
    (r,) = rows
    assert r.status != "error", r.error
    assert r.omp_wait_policy == "PASSIVE" and r.infer_samples_per_sec > 0
    assert r.malloc_policy == "keep"  # the child process got the glibc settings
    assert r.infer_peak_mem_mb is not None and r.infer_peak_mem_mb > 0


def test_train_mode_and_compare_timm_reason():
    rows = run(TEST_MODELS[:1], BenchConfig(subprocess=False, mode="both", compare_timm=True,
                                            **{**TINY, "batch_sizes": (2,)}))
    (r,) = rows
    assert r.train_samples_per_sec > 0 and r.infer_samples_per_sec > 0
    assert r.train_samples_per_sec == pytest.approx(r.train_batch_size * r.train_steps / r.train_time, rel=1e-3)
    try:
        import timm  # noqa: F401
    except ImportError:
        assert "timm cannot be imported" in r.timm_note and r.ratio_vs_timm is None


def test_config_is_validated():
    with pytest.raises(ValueError, match="dtype"):
        BenchConfig(dtype="int4").validate()
    with pytest.raises(ValueError, match="batch_sizes"):
        BenchConfig(batch_sizes=(0,)).validate()


def test_from_dict_ignores_unknown_keys():
    assert BenchResult.from_dict(dict(model="x", surprise=1)).model == "x"


def test_cli_bench(tmp_path, capsys):
    rc = main(["bench", TEST_MODELS[0], "--batch-size", "1", "--img-size", "64", "--budget", "0.03",
               "--repeats", "1", "--threads", "1", "--in-process", "--no-plots", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert TEST_MODELS[0] in out and "OMP_WAIT_POLICY" in out
    assert (tmp_path / "bench.csv").exists() and (tmp_path / "bench.json").exists()


def test_fuse_and_channels_last_rows_say_so():
    rows = run(TEST_MODELS[:1], BenchConfig(subprocess=False, fuse=True, channels_last=True,
                                            **{**TINY, "batch_sizes": (2,)}))
    (r,) = rows
    assert r.status != "error", r.error
    assert r.fused and r.channels_last and r.infer_samples_per_sec > 0


def test_compile_failure_is_an_error_row():
    rows = run(TEST_MODELS[:1], BenchConfig(subprocess=False, compile="no-such-mode", **{**TINY, "batch_sizes": (2,)}))
    (r,) = rows
    assert r.status == "error" and "no-such-mode" in r.error


@pytest.mark.slow
def test_deploy_path_compiles_frozen_and_matches_eager():
    rows = run(TEST_MODELS[:1], BenchConfig(subprocess=False, fuse=True, channels_last=True, compile="default",
                                            **{**TINY, "batch_sizes": (2,)}))
    (r,) = rows
    assert r.status != "error", r.error
    assert r.compile == "default" and r.infer_compile_time > 0 and r.infer_samples_per_sec > 0


# --- backends (issue 11) -------------------------------------------------------------------------------------
ONE = dict(subprocess=False, **{**TINY, "batch_sizes": (2,)})


def test_rows_record_the_backend_cpu_and_flags():
    from visionzoo.bench.report import summary_lines
    from visionzoo.runtime.cpu import cpu_info

    res = run(["convnext_test"], BenchConfig(**ONE))  # the default backend: eager_tuned
    (r,) = res
    assert r.status != "error", r.error
    assert r.backend == "eager_tuned" and "Linear on" in r.backend_detail and r.fused
    assert r.backend_rel_diff <= 1e-4 and r.backend_build_s is not None
    assert r.cpu == cpu_info()[0] and r.cpu_flags.split() == cpu_info()[1] and r.dtype == "fp32"
    assert any("every architecture on one backend: eager_tuned" in line for line in summary_lines(res))


def test_eager_backend_is_the_model_as_given():
    (r,) = run(["convnext_test"], BenchConfig(backend="eager", **ONE))
    assert r.status != "error", r.error
    assert r.backend == "eager" and not r.fused and r.backend_detail == ""


def test_backend_auto_records_the_choice_per_row():
    (r,) = run(["convnext_test"], BenchConfig(backend="auto", candidates=("eager", "eager_tuned"), **ONE))
    assert r.status != "error", r.error
    assert r.backend in ("eager", "eager_tuned") and r.infer_samples_per_sec > 0


def test_cli_bench_names_the_backend(tmp_path, capsys):
    rc = main(["bench", "convnext_test", "--backend", "eager", "--batch-size", "1", "--img-size", "64", "--budget",
               "0.03", "--repeats", "1", "--threads", "1", "--in-process", "--no-plots", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "on backend eager: torch eager, the model as given" in out
    assert "every architecture on one backend: eager" in out


def test_bench_takes_every_deploy_backend_and_names_each():
    """The bench's backends are deploy's (plus auto), each with the line that says what it runs; the
    TorchScript one runs a row at two batch sizes (a plan per shape)."""
    from visionzoo.bench.report import BACKEND_NOTES
    from visionzoo.bench.schema import BACKENDS
    from visionzoo.runtime.backends import BACKENDS as DEPLOY

    assert BACKENDS == (*DEPLOY, "auto") and set(BACKEND_NOTES) == set(DEPLOY)
    rows = run(["resnet_test"], BenchConfig(**{**ONE, "batch_sizes": (1, 2)}, backend="torchscript"))
    assert [r.infer_batch_size for r in rows] == [1, 2]
    for r in rows:
        assert r.status != "error", r.error
        assert r.backend == "torchscript" and "oneDNN Graph" in r.backend_detail and r.backend_rel_diff <= 1e-4


def test_int8_rows_run_through_deploy():
    (r,) = run(["convnext_test"], BenchConfig(dtype="int8", **ONE))
    assert r.status != "error", r.error
    assert r.backend == "eager" and r.dtype == "int8" and "int8" in r.backend_detail and r.infer_mfu is None


def test_backend_options_are_checked():
    assert BenchConfig(deploy=True).resolved().backend == "auto"
    assert BenchConfig(compile="default").resolved().backend == "eager"  # --compile measures the model as given
    with pytest.raises(ValueError, match="backend must be one of"):
        BenchConfig(backend="tensorrt").validate()
    with pytest.raises(ValueError, match="compile applies to backend 'eager'"):
        BenchConfig(backend="onnxruntime", compile="default").validate()
    with pytest.raises(ValueError, match="fp16"):
        BenchConfig(backend="inductor", dtype="fp16").validate()
    with pytest.raises(ValueError, match="candidates"):
        BenchConfig(backend="auto", candidates=("tvm",)).validate()


def test_mfu_is_against_the_best_kernel_of_the_dtype():
    from visionzoo.bench.roofline import best_peak
    from visionzoo.bench.runner import _add_mfu
    from visionzoo.bench.schema import BenchResults

    roof = dict(fp32_gflops=100.0, kernels=dict(aten_fp32=100.0, onednn_fp32=200.0, mlas_fp32=150.0,
                                                onednn_bf16=400.0))
    assert best_peak(roof, "fp32") == ("onednn_fp32", 200.0) and best_peak(roof, "bf16") == ("onednn_bf16", 400.0)
    rows = BenchResults([BenchResult("a", dtype="fp32", infer_gflop_per_sec=50.0),
                         BenchResult("b", dtype="bf16", infer_gflop_per_sec=100.0)], roofline=roof)
    _add_mfu(rows)
    assert [r.infer_mfu for r in rows] == [0.25, 0.25]


def test_kernel_peaks_measure_each_installed_kernel():
    from visionzoo.bench.roofline import kernel_peaks

    peaks = kernel_peaks(n=64, seconds=0.01)
    assert peaks["aten_fp32"] > 0 and all(v > 0 for v in peaks.values())
