"""The bench table and plots: width, the contended marker and footnote, label placement, recipe marks."""
from __future__ import annotations

import pytest
from rich.console import Console

from visionzoo.bench import plots
from visionzoo.bench.report import CONTENDED, MAX_WIDTH, table
from visionzoo.bench.schema import BenchResult, BenchResults

LONG = ("deit_small_distilled_patch16_224", "swin_large_patch4_window12_384", "uniformer_small_plus")


def _row(name: str, bs: int, **kw) -> BenchResult:
    base = dict(model=name, kind="vit", param_count=196.53, infer_gmacs=103.9, infer_img_size=384, infer_batch_size=bs,
                infer_samples_per_sec=1234.5, infer_samples_per_sec_min=1200.1, infer_samples_per_sec_max=1300.2,
                infer_step_time=12345.6, infer_peak_mem_mb=123456, infer_cpu_util=15.95, contended_runs=1,
                device="cpu", dtype="fp32", threads=2, omp_wait_policy="passive")
    if bs == 1:
        base.update(infer_latency_p50=800.12, infer_latency_p90=900.12, infer_latency_p99=999.99)
    return BenchResult(**{**base, **kw})


def _render(t) -> str:
    con = Console(width=300, record=True)
    con.print(t)
    return con.export_text()


@pytest.mark.parametrize("extra", [{}, dict(infer_mfu=0.55, infer_compile_time=40.1, train_samples_per_sec=10.0,
                                            train_peak_mem_mb=3000.0, timm_infer_samples_per_sec=100.0,
                                            ratio_vs_timm=1.2)])
def test_table_fits_120_columns_with_a_marker_and_one_footnote(extra):
    rows = [_row(n, bs, status="contended" if bs == 32 else "ok", **extra) for n in LONG for bs in (1, 32)]
    rows.append(BenchResult(model="no_such_model", status="error", error="unknown model"))
    text = _render(table(BenchResults(rows)))
    assert max(len(line.rstrip()) for line in text.splitlines()) <= MAX_WIDTH, text
    body = [line for line in text.splitlines() if any(n in line for n in LONG)]
    assert len(body) == 6 and sum(f"{CONTENDED} " in line or line.rstrip().endswith(CONTENDED) for line in body) >= 3
    assert "CONTENDED" not in text and text.count("contended: other processes took the cores") == 1
    assert "error" in text


def test_table_without_contention_has_no_footnote():
    text = _render(table(BenchResults([_row("convnext_tiny", 1, infer_img_size=224)])))
    assert "contended" not in text and "(224 px)" in text


def test_labels_do_not_collide_and_stay_inside():
    _, fig, ax = plots._figure("t")
    xs, ys = [20.0, 20.05, 19.9, 35.0], [82.5, 82.52, 82.45, 79.0]
    names = ["deepmad_29m", "crossformer_small", "cswin_tiny", "vit_base_patch32_224"]
    ax.scatter(xs, ys)
    plots._pad_limits(ax, xs, ys)
    texts = plots.place_labels(ax, xs, ys, names)
    from matplotlib.text import Text

    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, r) for t in texts]  # the text alone (an annotation's box holds its arrow)
    inside = ax.get_window_extent(r)
    for i, a in enumerate(boxes):
        assert inside.x0 <= a.x0 and a.x1 <= inside.x1 and inside.y0 <= a.y0 and a.y1 <= inside.y1, names[i]
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (texts[i].get_text(), [t.get_text() for t in texts])
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.fixture
def captured(monkeypatch):
    seen = []

    def keep(plt, fig, ax, ylabel, path):
        seen.append(ax)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    yield seen
    import matplotlib.pyplot as plt

    plt.close("all")


def _lineup(status="ok"):
    pts = (("convnext_tiny", "convnet", 82.1, 23.2), ("resnet50", "convnet", 76.156, 25.8),
           ("vit_base_patch32_224", "vit", 83.59, 30.5), ("deit_small_patch16_224", "vit", 79.9, 27.6))
    return [BenchResult(model=n, kind=k, top1=t, infer_gmacs=4.4, infer_batch_size=16, infer_samples_per_sec=s,
                        status=status, device="cpu", dtype="fp32", threads=2, omp_wait_policy="passive")
            for n, k, t, s in pts]


def test_all_contended_plot_says_so(captured, tmp_path):
    plots.plot_gmacs_vs_throughput(_lineup("contended"), str(tmp_path / "g.png"))
    assert plots.ALL_CONTENDED in captured[0].get_title()
    plots.plot_gmacs_vs_throughput(_lineup("ok"), str(tmp_path / "g.png"))
    assert plots.ALL_CONTENDED not in captured[1].get_title()


def test_top1_from_another_recipe_is_marked_and_off_the_front(captured, tmp_path):
    assert plots.top1_recipe("vit_base_patch32_224") == "384 px, in21k pre-training"
    assert plots.top1_recipe("convnext_tiny") is None
    plots.plot_top1_vs_throughput(_lineup(), str(tmp_path / "t.png"))
    ax = captured[0]
    front = [line for line in ax.get_lines() if line.get_linestyle() == "--"][0]
    assert 30.5 not in list(front.get_xdata())  # vit_base_patch32_224 would dominate the front at 83.59
    assert list(front.get_xdata()) == [23.2, 27.6]
    labels = [t.get_text() for t in ax.texts]
    assert "vit_base_patch32_224 \u2020" in labels and "convnext_tiny" in labels
    assert any("another size or with extra data" in t.get_text() for t in ax.get_legend().get_texts())
