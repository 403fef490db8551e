"""Metrics on a known confusion, the plots, and kornia's mixup/cutmix conventions."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from visionzoo.train.augment import AugConfig, TrainAugment, soft_cross_entropy
from visionzoo.train.metrics import MetricAccumulator, plot_confusion, plot_history


def _logits_for(pred: list[int], second: list[int], k: int) -> torch.Tensor:
    z = torch.zeros(len(pred), k)
    z[torch.arange(len(pred)), torch.tensor(second)] = 1.0
    z[torch.arange(len(pred)), torch.tensor(pred)] = 2.0
    return z


def test_known_confusion(tmp_path):
    # 3 classes; class 0: 3 of 4 right, class 1: 1 of 2 right, class 2: 0 of 2 right
    target = [0, 0, 0, 0, 1, 1, 2, 2]
    pred = [0, 0, 0, 1, 1, 2, 0, 1]
    second = [1, 1, 1, 0, 0, 1, 2, 0]  # top-2 holds the truth for 3 of the 4 misses
    acc = MetricAccumulator(3)
    logits = _logits_for(pred, second, 3)
    acc.update(logits[:5], torch.tensor(target[:5]), 1.0)
    acc.update(logits[5:], torch.tensor(target[5:]), 2.0)
    m = acc.reduce().result(["a", "b", "c"])
    assert m.confusion.tolist() == [[3, 1, 0], [0, 1, 1], [1, 1, 0]]
    assert m.top1 == pytest.approx(100 * 4 / 8) and m.count == 8
    assert m.top5 == 100.0  # 3 classes: top-k is capped at k = 3
    assert m.loss == pytest.approx((5 * 1.0 + 3 * 2.0) / 8)
    assert m.per_class == pytest.approx([75.0, 50.0, 0.0])
    d = m.as_dict()
    assert d["per_class"] == {"a": 75.0, "b": 50.0, "c": 0.0} and d["confusion"][0] == [3, 1, 0]
    png = plot_confusion(m, tmp_path / "c.png")
    assert Image.open(png).size[0] > 100


def test_top5_and_plot_limits(tmp_path):
    acc = MetricAccumulator(25)
    logits = torch.arange(25.0).repeat(4, 1)  # top-5 = classes 20..24
    acc.update(logits, torch.tensor([24, 20, 19, 0]), 0.5)
    m = acc.result()
    assert (m.top1, m.top5) == (25.0, 50.0)
    with pytest.raises(ValueError, match="up to 20 classes"):
        plot_confusion(m, tmp_path / "big.png")
    rows = [dict(epoch=e, train_loss=1 / e, val_loss=1.2 / e, val_top1=50 + e, ema_val_top1=49 + e) for e in (1, 2)]
    assert plot_history({"run": rows}, tmp_path / "h.png").is_file()


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mix_targets_match_the_mixed_pixels(kind):
    """Each image is a constant c = its label, so a mixed image's mean is the soft target's expected label."""
    torch.manual_seed(0)
    cfg = AugConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, smoothing=0.0, **{kind: 1.0})
    aug = TrainAugment(cfg, 8, [0.0], [1.0], num_classes=4)
    y = torch.tensor([0, 1, 2, 3] * 4)
    x = (y.view(-1, 1, 1, 1) * 60).to(torch.uint8).expand(-1, 1, 8, 8).contiguous()
    out, t = aug(x, y)
    assert t.shape == (16, 4) and torch.allclose(t.sum(1), torch.ones(16))
    expected = (t * torch.arange(4.0) * 60 / 255).sum(1)
    assert torch.allclose(out.mean((1, 2, 3)), expected, atol=1e-4)
    assert (t.max(1).values < 1).any()  # something was mixed


def test_smoothing_and_soft_loss():
    aug = TrainAugment(AugConfig(smoothing=0.1, hflip=0.0), 8, [0.5], [0.5], num_classes=10)
    _, t = aug(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([3, 4]))
    assert t[0, 3].item() == pytest.approx(0.91) and t[0, 0].item() == pytest.approx(0.01)
    logits = torch.randn(2, 10)
    hard = torch.nn.functional.one_hot(torch.tensor([3, 4]), 10).float()
    assert soft_cross_entropy(logits, hard) == pytest.approx(soft_cross_entropy(logits, torch.tensor([3, 4])).item())
