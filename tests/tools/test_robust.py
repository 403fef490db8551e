"""Robustness probes (deterministic with a seed), the corruptions, the synthetic localisation set, and the
``visionzoo explain`` / ``visionzoo robust`` / ``visionzoo compare --robust`` command lines."""
from __future__ import annotations

import json

import pytest
import torch

import visionzoo
from visionzoo.cli import main
from visionzoo.errors import ArgumentError
from visionzoo.explain import CORRUPTIONS, corrupt, robustness
from visionzoo.explain.robust import write_report
from visionzoo.train.synthetic import PATTERNS, localization_set


def _data(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 64, generator=g), torch.randint(4, (n,), generator=g)


QUICK = dict(eps=(4 / 255,), pgd_steps=1, patch_steps=1, shifts=(1, 4), corruptions=("gaussian_noise", "jpeg"))


def test_probes_are_deterministic_with_a_seed(tiny_model):
    model = tiny_model("convnext_test")
    model.reset_classifier(4)
    x, y = _data(4)
    a = robustness(model, x, y, seed=3, **QUICK)
    b = robustness(model, x, y, seed=3, **QUICK)
    assert repr(a.tables) == repr(b.tables) and set(a.tables) == {"shift", "patch", "corrupt", "pgd"}  # NaN-safe
    assert len(a.tables["corrupt"]) == 2 * 5 and len(a.tables["shift"]) == 2
    c = robustness(model, x, y, ("corrupt",), seed=4, **QUICK)
    noise = [r["top1"] for r in c.tables["corrupt"] if r["corruption"] == "gaussian_noise"]
    assert len(noise) == 5 and set(c.tables) == {"corrupt"}


def test_attacks_do_what_they_say(tiny_model):
    model = tiny_model("vit_test")
    model.reset_classifier(4)
    x, _ = _data(8)
    with torch.no_grad():
        y = model((x - 0.5) / 0.5).argmax(1)  # labels = the predictions: clean accuracy 100%
    model.data_config["mean"], model.data_config["std"] = (0.5,) * 3, (0.5,) * 3
    r = robustness(model, x, y, ("pgd", "patch"), seed=0, eps=(0.0, 16 / 255), pgd_steps=5, patch_steps=10)
    assert r.clean_top1 == 100.0
    zero, big = r.tables["pgd"]
    assert zero["pgd_top1"] == 100.0 and zero["fgsm_top1"] == 100.0  # eps 0 changes nothing
    assert big["pgd_top1"] <= big["fgsm_top1"] + 25 and big["pgd_top1"] < 100.0
    noise, adv = r.tables["patch"]
    assert adv["fooling_rate"] >= noise["fooling_rate"]


def test_corruptions():
    x, _ = _data(2)
    g = torch.Generator().manual_seed(0)
    for name in CORRUPTIONS:
        out = [corrupt(x, name, s, g) for s in range(1, 6)]
        for o in out:
            assert o.shape == x.shape and o.min() >= 0 and o.max() <= 1
        err = [(o - x).abs().mean().item() for o in out]
        assert err[-1] > err[0] > 0, (name, err)  # severity 5 is further from the image than severity 1
    assert torch.equal(corrupt(x, "jpeg", 3), corrupt(x, "jpeg", 3))
    with pytest.raises(ArgumentError, match="severity"):
        corrupt(x, "jpeg", 6)
    with pytest.raises(ArgumentError, match="must be one of"):
        corrupt(x, "fog", 1)


def test_bad_probe_arguments(tiny_model):
    model = tiny_model("convnext_test")
    x, y = _data(2)
    with pytest.raises(ArgumentError, match="probes"):
        robustness(model, x, y, ("shift", "rotate"))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        robustness(model, x * 3 - 1, y, ("shift",))


def test_report_files(tiny_model, tmp_path):
    model = tiny_model("convnext_test")
    model.reset_classifier(4)
    x, y = _data(4)
    r = robustness(model, x, y, ("shift", "corrupt"), seed=0, shifts=(2,), corruptions=("contrast",))
    files = write_report(r, tmp_path)
    assert (tmp_path / "robust.png").stat().st_size > 5000
    assert "| shift_px |" in (tmp_path / "robust.md").read_text() and "shift" in files


def test_localization_set():
    a = localization_set(8, seed=1)
    b = localization_set(8, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes)
    assert a.images.shape == (8, 3, 64, 64) and a.images.dtype == torch.uint8 and a.classes == PATTERNS
    w, h = a.boxes[:, 2] - a.boxes[:, 0], a.boxes[:, 3] - a.boxes[:, 1]
    assert (w >= 0.3 * 64 - 2).all() and (w <= 0.5 * 64 + 2).all() and (h > 0).all()
    assert (a.boxes[:, :2] >= 0).all() and (a.boxes[:, 2:] <= 64).all()
    inside = a.masks()
    # the object is saturated, the background mostly grey: colour spread is higher inside the box
    spread = a.images.float().amax(1) - a.images.float().amin(1)
    assert ((spread * inside).sum((1, 2)) / inside.sum((1, 2)) > (spread * ~inside).sum((1, 2)) /
            (~inside).sum((1, 2))).all()
    with pytest.raises(ValueError, match="img_size"):
        localization_set(2, img_size=8)


# --- command line ------------------------------------------------------------------------------------------------
@pytest.fixture
def image_file(tmp_path):
    from PIL import Image

    img = localization_set(1, seed=0).images[0].permute(1, 2, 0).numpy()
    path = tmp_path / "img.png"
    Image.fromarray(img).save(path)
    return path


def test_cli_explain_errors(image_file, tmp_path, capsys):
    assert main(["explain", "convnext_test", "--image", str(tmp_path / "nope.png"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--image" in err and "does not exist" in err
    assert main(["explain", "convnext_test", "--image", str(image_file), "--target", "1000", "--out",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "target class 1000 is out of range" in err and "0..999" in err
    assert main(["explain", "convnext_test", "--image", str(image_file), "--method", "rollout", "--out",
                 str(tmp_path)]) == 2
    assert "does not apply" in capsys.readouterr().err


def test_cli_explain_one_method(image_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["explain", "convnext_test", "--image", str(image_file), "--target", "3", "--out", str(out)]) == 0
    record = json.loads((out / "explain.json").read_text())
    assert record["methods"]["gradcam"]["target"] == 3 and (out / "gradcam.png").stat().st_size > 5000
    assert "random weights" in capsys.readouterr().out


@pytest.mark.slow  # several methods, head importance, deletion/insertion and five PNGs
def test_cli_explain_writes_pictures(image_file, tmp_path, capsys):
    torch.manual_seed(0)
    model = visionzoo.create_model("vit_test", num_classes=4)
    visionzoo.save(model, tmp_path / "vit.safetensors")
    out = tmp_path / "out"
    assert main(["explain", str(tmp_path / "vit.safetensors"), "--image", str(image_file), "--method", "gradcam",
                 "rollout", "attention", "--heads", "--faithfulness", "--steps", "4", "--threads", "1", "--out",
                 str(out)]) == 0
    record = json.loads((out / "explain.json").read_text())
    assert set(record["methods"]) == {"gradcam", "rollout", "attention"}
    assert 0 <= record["methods"]["gradcam"]["deletion_auc"] <= 1 and "random_baseline" in record
    for png in ("gradcam.png", "rollout.png", "attention.png", "methods.png", "heads.png"):
        assert (out / png).stat().st_size > 5000, png
    assert "most important heads" in capsys.readouterr().out


def test_cli_robust(tmp_path, capsys):
    torch.manual_seed(0)
    visionzoo.save(visionzoo.create_model("convnext_test", num_classes=4), tmp_path / "m.safetensors")
    args = ["robust", str(tmp_path / "m.safetensors"), "--data", "shapes", "--limit-train", "4", "--limit-val", "6",
            "--limit", "6", "--probes", "shift", "--threads", "1", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    assert "### shift" in capsys.readouterr().out and (tmp_path / "r" / "robust.png").is_file()
    assert main([*args[:-6], "--probes", "shift,spin"]) == 2
    assert "--probes takes" in capsys.readouterr().err
    assert main(["robust", "convnext_test", "--data", "shapes", "--limit-train", "4", "--limit-val", "4"]) == 2
    assert "1000 classes" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_robust(tmp_path):
    from visionzoo.train.compare import compare
    from visionzoo.train.data import load_data
    from visionzoo.train.loop import TrainConfig

    splits = load_data("shapes", limit_train=32, limit_val=16)
    rows = compare(["convnext_test", "vit_test"], splits, TrainConfig(epochs=1, batch_size=16, progress=False),
                   tmp_path, img_size=64, patch_size=8, budget=0.2, log=None, robust=True, robust_images=16,
                   robust_probes=("shift", "pgd"))
    assert all(r.robust and "shift_consistency" in r.robust for r in rows)
    assert "robustness" in (tmp_path / "compare.md").read_text() and (tmp_path / "robust.png").is_file()
