"""Pretrained weights: the table, download and cache, hash and size checks, offline errors, the HF cache.

Files are served by a local HTTP server on 127.0.0.1; nothing leaves the machine.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import stat
import sys
import threading
import types

import pytest
import torch

import visionzoo
from visionzoo import pretrained
from visionzoo.errors import DownloadError, NoWeightsError
from visionzoo.pretrained import WeightSpec

NAME = "convnext_test"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture
def server():
    """``routes[path] = dict(body=bytes, headers={...}, status=200, cut=None, redirect=None)``; ``hits`` counts."""
    routes: dict[str, dict] = {}
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):  # keep pytest output quiet
            pass

        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            r = routes.get(self.path.split("?")[0])
            if r is None:
                self.send_error(404, "Not Found")
                return
            if r.get("redirect"):
                self.send_response(302)
                self.send_header("Location", r["redirect"])
                for k, v in r.get("headers", {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = r["body"]
            self.send_response(r.get("status", 200))
            self.send_header("Content-Length", str(len(body)))
            for k, v in r.get("headers", {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[: r["cut"]] if r.get("cut") is not None else body)
            if r.get("cut") is not None:
                self.wfile.flush()
                self.close_connection = True

    srv = _Server(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    t.start()
    srv.routes, srv.hits, srv.url = routes, hits, f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A fresh cache, the HF cache under tmp_path, downloads on, urllib (no huggingface_hub), no extra specs."""
    monkeypatch.setenv("VISIONZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    for k in ("VISIONZOO_OFFLINE", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(pretrained, "_have_hf_hub", lambda: False)
    monkeypatch.setattr(pretrained, "_EXTRA", {})
    return tmp_path


@pytest.fixture
def weights_file(tmp_path):
    """A convnext_test model with 1000 classes, its safetensors bytes and their sha256."""
    torch.manual_seed(3)
    model = visionzoo.create_model(NAME).eval()
    path = visionzoo.save(model, tmp_path / "src.safetensors")
    data = path.read_bytes()
    return model, data, hashlib.sha256(data).hexdigest()


def _spec(url: str, **kw) -> WeightSpec:
    return WeightSpec(NAME, "unit", file="model.safetensors", url=url, license="mit", top1=50.0, **kw)


def _no_partials(root):
    return [p.name for p in root.rglob("*") if p.is_file() and (".part" in p.name or p.name.startswith("."))]


def test_download_cache_hit_and_load(env, server, weights_file):
    model, data, digest = weights_file
    server.routes["/w.safetensors"] = dict(body=data)
    pretrained.register(_spec(server.url + "/w.safetensors", sha256=digest))
    m = visionzoo.create_model(NAME, pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(m(x), model(x))
    path = env / "cache" / f"{NAME}.unit" / "model.safetensors"
    assert path.is_file() and path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()
    assert server.hits == ["/w.safetensors"]
    visionzoo.create_model(NAME, pretrained="unit")  # a cache hit: no second request
    assert pretrained.download(f"{NAME}.unit") == path and server.hits == ["/w.safetensors"]
    assert _no_partials(env / "cache") == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_hash_mismatch_is_refused_and_the_file_removed(env, server, weights_file):
    _, data, _ = weights_file
    server.routes["/w"] = dict(body=data)
    pretrained.register(_spec(server.url + "/w", sha256="0" * 64))
    with pytest.raises(DownloadError, match="sha256 .* expected 0000.*removed"):
        pretrained.download(NAME)
    assert not (env / "cache" / f"{NAME}.unit" / "model.safetensors").exists()
    assert _no_partials(env / "cache") == []


def test_server_reported_hash_and_size_are_checked(env, server, weights_file):
    """The Hub reports a file's sha256 and size on the redirect (X-Linked-Etag, X-Linked-Size)."""
    _, data, digest = weights_file
    server.routes["/good"] = dict(redirect=server.url + "/blob", headers={"X-Linked-Etag": f'"{digest}"',
                                                                          "X-Linked-Size": str(len(data))})
    server.routes["/bad"] = dict(redirect=server.url + "/blob", headers={"X-Linked-Etag": f'"{"1" * 64}"'})
    server.routes["/blob"] = dict(body=data)
    pretrained.register(_spec(server.url + "/bad"))
    with pytest.raises(DownloadError, match="sha256"):
        pretrained.download(NAME)
    pretrained.register(_spec(server.url + "/good"))
    assert pretrained.download(NAME).read_bytes() == data


def test_interrupted_download_is_never_used(env, server, weights_file):
    _, data, _ = weights_file
    server.routes["/w"] = dict(body=data, cut=len(data) // 3)
    pretrained.register(_spec(server.url + "/w"))
    with pytest.raises(DownloadError, match="cut off|stopped after") as e:
        visionzoo.create_model(NAME, pretrained=True)
    assert "nothing was kept" in str(e.value)
    assert not (env / "cache" / f"{NAME}.unit" / "model.safetensors").exists()
    assert _no_partials(env / "cache") == []
    server.routes["/w"] = dict(body=data)  # the connection works again: a clean download
    assert pretrained.download(NAME).read_bytes() == data


@pytest.mark.parametrize("var", ["VISIONZOO_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_error_names_url_and_cache_path(env, server, weights_file, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    pretrained.register(_spec(server.url + "/w"))
    with pytest.raises(DownloadError) as e:
        visionzoo.create_model(NAME, pretrained=True)
    msg = str(e.value)
    assert server.url + "/w" in msg and str(env / "cache" / f"{NAME}.unit" / "model.safetensors") in msg
    assert var in msg and server.hits == []
    # a file put there by hand is used, still offline
    _, data, _ = weights_file
    dest = env / "cache" / f"{NAME}.unit" / "model.safetensors"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(data)
    visionzoo.create_model(NAME, pretrained=True)


def test_no_network_error_names_url_and_cache_path(env, server):
    server.shutdown()
    server.server_close()  # nothing listens on that port any more
    pretrained.register(_spec(server.url + "/w"))
    with pytest.raises(DownloadError, match=re.escape(server.url + "/w")) as e:
        pretrained.download(NAME)
    assert str(env / "cache" / f"{NAME}.unit" / "model.safetensors") in str(e.value)


def test_http_error_is_named(env, server):
    pretrained.register(_spec(server.url + "/missing"))
    with pytest.raises(DownloadError, match="HTTP 404"):
        pretrained.download(NAME)


def test_hf_hub_url_and_hf_cache_layout(env, server, weights_file, monkeypatch):
    """A file in the Hugging Face cache (as timm leaves it) is used without a download; otherwise the
    resolve URL under HF_ENDPOINT is fetched."""
    _, data, _ = weights_file
    spec = WeightSpec(NAME, "hub", file="model.safetensors", hf_hub="timm/convnext_test.unit")
    pretrained.register(spec)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    assert spec.download_url == f"{server.url}/timm/convnext_test.unit/resolve/main/model.safetensors"
    repo = env / "hf" / "models--timm--convnext_test.unit"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model.safetensors").write_bytes(data)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert pretrained.download(NAME) == repo / "snapshots" / "abc123" / "model.safetensors"
    visionzoo.create_model(NAME, pretrained=True)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    (repo / "snapshots" / "abc123" / "model.safetensors").unlink()
    server.routes["/timm/convnext_test.unit/resolve/main/model.safetensors"] = dict(body=data)
    assert pretrained.download(NAME) == env / "cache" / f"{NAME}.hub" / "model.safetensors"


def test_huggingface_hub_is_used_when_installed(env, weights_file, monkeypatch):
    _, data, digest = weights_file
    calls = []

    def hf_hub_download(repo_id, filename, local_dir=None, **kw):
        calls.append((repo_id, filename))
        path = os.path.join(local_dir, filename)
        with open(path, "wb") as f:
            f.write(data)
        return path

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    monkeypatch.setattr(pretrained, "_have_hf_hub", lambda: True)
    pretrained.register(WeightSpec(NAME, "hub", file="model.safetensors", hf_hub="timm/x", sha256=digest))
    path = pretrained.download(NAME)
    assert calls == [("timm/x", "model.safetensors")] and path.read_bytes() == data
    assert path == env / "cache" / f"{NAME}.hub" / "model.safetensors" and _no_partials(env / "cache") == []


def test_variant_without_weights_says_why_and_what_to_do(env):
    with pytest.raises(NoWeightsError, match="crossformer_tiny has no downloadable.*Google Drive.*checkpoint_path"):
        visionzoo.create_model("crossformer_tiny", pretrained=True)


def test_unknown_tag_lists_the_tags(env):
    with pytest.raises(NoWeightsError, match="no weights tagged 'nope'; it has fb_in1k, .*=True loads fb_in1k"):
        pretrained.get_weights("convnext_tiny", "nope")
    assert pretrained.get_weights("convnext_tiny.in12k_ft_in1k").tag == "in12k_ft_in1k"
    assert pretrained.get_weights("convnext_tiny").tag == "fb_in1k"


def test_pretrained_with_another_head_keeps_the_body(env, server, weights_file):
    model, data, _ = weights_file
    server.routes["/w"] = dict(body=data)
    pretrained.register(_spec(server.url + "/w"))
    with pytest.warns(UserWarning, match="1000 classes, the model 10"):
        m = visionzoo.create_model(NAME, pretrained=True, num_classes=10)
    assert torch.equal(m.state_dict()["stem.0.weight"], model.state_dict()["stem.0.weight"])
    with pytest.raises(ValueError, match="not both"):
        visionzoo.create_model(NAME, pretrained=True, checkpoint_path="x.pth")


def test_data_config_follows_the_weights():
    with torch.device("meta"):
        m = visionzoo.create_model("resnet50.a1_in1k") if _builds("resnet50") else None
        v = visionzoo.create_model("vit_base_patch16_224.augreg2_in21k_ft_in1k")
    assert v.data_config["mean"] == (0.5, 0.5, 0.5) and v.data_config["crop_pct"] == 0.9
    if m is not None:
        assert m.data_config["crop_pct"] == 0.95 and m.data_config["interpolation"] == "bicubic"


def _builds(name):
    try:
        with torch.device("meta"):
            visionzoo.create_model(name)
    except Exception:  # noqa: BLE001  (families mid-conversion in some branches)
        return False
    return True


def test_nothing_downloads_by_default(env, monkeypatch):
    def no(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(pretrained, "_download_url", no)
    with torch.device("meta"):
        visionzoo.create_model("convnext_tiny")


# --- the table --------------------------------------------------------------------------------------------
TABLE = json.loads(pretrained.TABLE.read_text())["variants"]


def test_every_variant_has_weights_or_a_reason():
    for name in visionzoo.list_models():
        rec = TABLE.get(name)
        assert rec is not None, f"{name} is missing from {pretrained.TABLE.name}"
        assert rec["weights"] or rec.get("none"), name
        assert rec["paper_top1_pretrain"]


def test_table_entries_are_complete_and_hashes_not_guessed():
    for name, rec in TABLE.items():
        tags = [w["tag"] for w in rec["weights"]]
        assert len(tags) == len(set(tags)), name
        for w in rec["weights"]:
            where = w.get("hf_hub") or w.get("url")
            assert where and w["file"] and w["license"] and w["top1"] and w["top1_source"], (name, w["tag"])
            assert bool(w.get("hf_hub")) != bool(w.get("url")), (name, w["tag"])
            assert w["sha256"] is None or re.fullmatch(r"[0-9a-f]{64}", w["sha256"])
            if w.get("url"):
                assert re.match(r"https?://", w["url"]), w["url"]
            if w.get("hf_hub", "").startswith("timm/"):
                assert w["hf_hub"] == f"timm/{name}.{w['tag']}" and w["file"] == "model.safetensors"
            spec = pretrained.get_weights(name, w["tag"])
            assert spec.data_config()["input_size"][-1] == w["input_size"]


def test_defaults_are_the_weights_behind_the_papers_number():
    for name in ("convnext_tiny", "resnet50", "swin_base_patch4_window7_224", "vit_base_patch16_224"):
        spec = pretrained.get_weights(name)
        paper = visionzoo.get_variant(name).paper.top1
        assert abs(spec.top1 - paper) < 0.7, (name, spec.tag, spec.top1, paper)


# --- ImageNet evaluation: synset folders -> the 1000-class index --------------------------------------------
SYNSETS = ("n01440764", "n01443537", "n15075141")  # class 0, 1 and 999


def _imagenet_val(root, per_class=2):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for s in SYNSETS:
        (root / s).mkdir(parents=True)
        for i in range(per_class):
            a = torch.randint(0, 255, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(a).save(root / s / f"ILSVRC2012_val_{s}_{i}.JPEG", format="JPEG")
    return root


def test_synset_folders_map_to_the_imagenet_index(tmp_path):
    from visionzoo.train.imagenet import imagenet_synsets, load_imagenet_folder

    syn = imagenet_synsets()
    assert len(syn) == 1000 and syn[0] == "n01440764" and syn[999] == "n15075141" and list(syn) == sorted(syn)
    ds = load_imagenet_folder(_imagenet_val(tmp_path / "val"))
    assert ds.targets == [0, 0, 1, 1, 999, 999] and len(ds.classes) == 1000
    (tmp_path / "bad" / "cats").mkdir(parents=True)
    with pytest.raises(ValueError, match="not ImageNet-1k synset ids.*cats.*n01440764"):
        load_imagenet_folder(tmp_path / "bad")


def test_eval_pretrained_on_an_imagenet_folder(env, tmp_path, capsys, monkeypatch):
    """Weights that always answer class 999 score exactly the n15075141 images: the mapping is the global index."""
    from visionzoo.cli import main

    torch.manual_seed(0)
    m = visionzoo.create_model(NAME)
    with torch.no_grad():
        m.head.fc.weight.zero_()
        m.head.fc.bias.zero_()
        m.head.fc.bias[999] = 10.0
    dest = env / "cache" / f"{NAME}.unit" / "model.safetensors"
    visionzoo.save(m, dest)
    pretrained.register(_spec("http://127.0.0.1:9/never", top1_img_size=64, top1_crop_pct=1.0, input_size=64))
    monkeypatch.setenv("VISIONZOO_OFFLINE", "1")
    val = _imagenet_val(tmp_path / "imagenet" / "val")
    out = tmp_path / "ev"
    assert main(["eval", "--pretrained", f"{NAME}.unit", "--data", f"folder:{val}", "--out", str(out)]) == 0
    res = json.loads((out / "metrics.json").read_text())
    assert res["count"] == 6 and res["top1"] == pytest.approx(100 * 2 / 6)
    text = capsys.readouterr().out
    assert "measured here: top-1 33.33%" in text and "reported for these weights: top-1 50.00%" in text
    assert main(["eval", "--pretrained", NAME, "--data", f"folder:{val.parent}"]) == 2  # the parent: a hint
    assert "did you mean" in capsys.readouterr().err
    assert main(["eval", "--pretrained", NAME]) == 2  # digits is not ImageNet
    assert "--data folder:PATH/val" in capsys.readouterr().err
