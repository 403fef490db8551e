"""Pretrained weights: where each variant's weights live, the download cache, and what happens offline.

The table is ``visionzoo/data/pretrained.json``: per variant, the weights files that exist (the first is what
``pretrained=True`` loads) with their source (a Hugging Face Hub repo and file, or the official repository's
direct URL), licence, pre-training data and the top-1 they give; or ``none`` with the reason (only Google Drive
or Baidu links exist). Nothing is downloaded unless asked for.

A file is looked for, in order, in this library's cache (``$VISIONZOO_CACHE``, default ``~/.cache/visionzoo``, at
``<variant>.<tag>/<file>``), then in the Hugging Face cache (files timm or ``huggingface_hub`` already fetched),
and only then downloaded: with ``huggingface_hub`` when it is installed and the file is on the Hub, else with
urllib. A download goes to a temporary file next to its final path and is renamed into place only after its
size and sha256 are checked, so an interrupted or corrupt download is never used. ``VISIONZOO_OFFLINE=1`` or
``HF_HUB_OFFLINE=1`` turn downloads off; the error then names the URL and the exact path to put the file at.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import json
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from visionzoo.errors import DownloadError, NoWeightsError

__all__ = ["WeightSpec", "cache_dir", "cache_path", "download", "find_cached", "get_weights", "hf_cache_file",
           "is_offline", "list_pretrained", "no_weights_reason", "paper_top1_pretrain", "register", "split_name",
           "weight_specs"]

TABLE = Path(__file__).parent / "data" / "pretrained.json"
HF_ENDPOINT = "https://huggingface.co"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class WeightSpec:
    """One weights file of one variant, as the table records it.

    ``hf_hub``/``file``: a Hugging Face Hub repo and the file in it; ``url``: a direct download (``file`` is then
    the name it is cached under). ``sha256``: only where a public source states it, else ``None`` (the download
    is then checked against the size and, from the Hub, the sha256 the server reports). ``top1``: ImageNet-1k
    top-1 these weights give, measured at ``top1_img_size`` and ``top1_crop_pct``, from ``top1_source``.
    ``pretrain``: the data seen before ImageNet-1k fine-tuning (``in1k`` when none). ``state_key``: the entry of a
    training checkpoint that holds the weights to load (e.g. ``model_ema``).
    """

    variant: str
    tag: str
    file: str
    hf_hub: str | None = None
    url: str | None = None
    sha256: str | None = None
    size_mb: float | None = None
    license: str | None = None
    pretrain: str = "in1k"
    top1: float | None = None
    top5: float | None = None
    top1_img_size: int | None = None
    top1_crop_pct: float | None = None
    top1_source: str = ""
    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    state_key: str | None = None
    notes: str = ""

    @property
    def name(self) -> str:
        """``variant.tag``, the name timm uses for the same weights."""
        return f"{self.variant}.{self.tag}"

    @property
    def source(self) -> str:
        return "hf-hub" if self.hf_hub else "url"

    @property
    def download_url(self) -> str:
        if self.hf_hub:
            endpoint = os.environ.get("HF_ENDPOINT", HF_ENDPOINT).rstrip("/")
            return f"{endpoint}/{self.hf_hub}/resolve/main/{self.file}"
        return str(self.url)

    def data_config(self, in_chans: int = 3) -> dict[str, Any]:
        """The preprocessing these weights were trained with (mean/std default to the variant's)."""
        from visionzoo.registry import get_variant

        v = get_variant(self.variant)
        return dict(input_size=(in_chans, self.input_size, self.input_size), mean=tuple(self.mean or v.mean),
                    std=tuple(self.std or v.std), crop_pct=self.crop_pct, interpolation=self.interpolation)


_EXTRA: dict[str, list[WeightSpec]] = {}


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    return json.loads(TABLE.read_text())["variants"]


def _spec(variant: str, d: dict[str, Any]) -> WeightSpec:
    known = {f.name for f in fields(WeightSpec)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
    return WeightSpec(variant=variant, **kw)


def register(spec: WeightSpec, default: bool = True) -> None:
    """Add a weights file for ``spec.variant`` (your own mirror, a fine-tuned model); ``default`` puts it first."""
    from visionzoo.registry import get_variant

    get_variant(spec.variant)
    own = [s for s in _EXTRA.get(spec.variant, []) if s.tag != spec.tag]
    _EXTRA[spec.variant] = [spec, *own] if default else [*own, spec]


def weight_specs(name: str) -> list[WeightSpec]:
    """Every weights file recorded for the variant ``name`` (the default first); ``[]`` when there is none."""
    from visionzoo.registry import get_variant

    get_variant(name)
    rec = _table().get(name, {})
    table = [_spec(name, d) for d in rec.get("weights", [])]
    extra = _EXTRA.get(name, [])
    tags = {s.tag for s in extra}
    return [*extra, *(s for s in table if s.tag not in tags)]


def no_weights_reason(name: str) -> str | None:
    """Why ``name`` has no downloadable weights (``None`` when it has some)."""
    if weight_specs(name):
        return None
    rec = _table().get(name, {})
    return rec.get("none") or "no pretrained weights are recorded for it"


def paper_top1_pretrain(name: str) -> str:
    """The pre-training data behind the paper's top-1 that the registry records (``in1k``: none)."""
    return _table().get(name, {}).get("paper_top1_pretrain", "in1k")


def list_pretrained(pattern: str | list[str] = "*", all_tags: bool = False) -> list[WeightSpec]:
    """The weights of every variant matching ``pattern``: the default of each, or every tag with ``all_tags``."""
    from visionzoo.registry import list_models

    out = []
    for name in list_models(pattern, include_test=True):
        specs = weight_specs(name)
        out += specs if all_tags else specs[:1]
    return out


def split_name(name: str) -> tuple[str, str | None]:
    """``"convnext_tiny.fb_in1k"`` -> ``("convnext_tiny", "fb_in1k")``; a name without a tag -> ``(name, None)``."""
    base, dot, tag = name.partition(".")
    return (base, tag) if dot and tag else (name, None)


def get_weights(name: str, tag: str | bool | None = True) -> WeightSpec:
    """The ``WeightSpec`` for ``name`` (``"variant"`` or ``"variant.tag"``) and ``tag`` (``True``: the default).

    Raises ``NoWeightsError`` saying why when there are none, and listing the tags when ``tag`` is not one.
    """
    base, name_tag = split_name(name)
    if isinstance(tag, str) and name_tag and tag != name_tag:
        raise NoWeightsError(f"{name}: the name says tag {name_tag!r} but pretrained={tag!r}; give one of them")
    tag = tag if isinstance(tag, str) else name_tag
    specs = weight_specs(base)
    if not specs:
        raise NoWeightsError(f"{base} has no downloadable pretrained weights: {no_weights_reason(base)}. Download "
                             f"them by hand and pass checkpoint_path=PATH (`visionzoo weights` lists the variants "
                             f"that have some)")
    if tag is None:
        return specs[0]
    for s in specs:
        if s.tag == tag:
            return s
    raise NoWeightsError(f"{base} has no weights tagged {tag!r}; it has {', '.join(s.tag for s in specs)} "
                         f"(pretrained=True loads {specs[0].tag})")


# --- cache --------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$VISIONZOO_CACHE``, or ``~/.cache/visionzoo``."""
    return Path(os.environ.get("VISIONZOO_CACHE") or Path.home() / ".cache" / "visionzoo").expanduser()


def cache_path(spec: WeightSpec) -> Path:
    """Where ``spec``'s file is (or will be) in this library's cache: ``<cache>/<variant>.<tag>/<file>``."""
    return cache_dir() / spec.name / spec.file


def _hf_cache_root() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hf_cache_file(repo: str, file: str) -> Path | None:
    """``file`` of ``repo`` in the Hugging Face cache layout (``models--org--name/snapshots/<rev>/<file>``)."""
    root = _hf_cache_root() / ("models--" + repo.replace("/", "--"))
    ref = root / "refs" / "main"
    if ref.is_file():
        p = root / "snapshots" / ref.read_text().strip() / file
        if p.is_file():
            return p
    snaps = [s / file for s in (root / "snapshots").glob("*") if (s / file).is_file()]
    return max(snaps, key=lambda p: p.stat().st_mtime) if snaps else None


def find_cached(spec: WeightSpec) -> Path | None:
    """The file for ``spec`` if it is already on this machine (our cache first, then the Hugging Face cache)."""
    p = cache_path(spec)
    if p.is_file():
        return p
    return hf_cache_file(spec.hf_hub, spec.file) if spec.hf_hub else None


def is_offline() -> bool:
    """Downloads are off: ``VISIONZOO_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1 (or true/yes/on)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("VISIONZOO_OFFLINE", "HF_HUB_OFFLINE"))


def _umask_mode() -> int:
    """The mode a new file gets under this process's umask (0o666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _verified_sha256(path: Path) -> str:
    """The file's sha256, from its marker when the file has not changed since the marker was written."""
    st = path.stat()
    with contextlib.suppress(OSError, ValueError):
        digest, size, mtime = _marker(path).read_text().split()
        if int(size) == st.st_size and int(mtime) == st.st_mtime_ns and _SHA256.match(digest):
            return digest
    digest = sha256_file(path)
    with contextlib.suppress(OSError):
        _marker(path).write_text(f"{digest} {st.st_size} {st.st_mtime_ns}\n")
    return digest


def _check_cached(spec: WeightSpec, path: Path, sha256: str | None) -> Path:
    want = (sha256 or spec.sha256 or "").lower()
    if want:
        got = _verified_sha256(path)
        if got != want:
            raise DownloadError(f"{spec.name}: the cached file {path} has sha256 {got}, expected {want}; delete it "
                                f"and run again to download a fresh copy (or fetch it by hand from "
                                f"{spec.download_url})")
    return path


def _where(spec: WeightSpec) -> str:
    return f"put the file from {spec.download_url} at {cache_path(spec)}"


# --- download -----------------------------------------------------------------------------------------------
def download(name: str, tag: str | bool | None = True, *, sha256: str | None = None, force: bool = False,
             progress: bool = True) -> Path:
    """The local path of ``name``'s weights (``"variant"`` or ``"variant.tag"``), downloaded if not cached.

    Args:
        tag: which weights (``True``: the variant's default, the first in ``visionzoo weights NAME --tags``).
        sha256: a hash to check the file against, for weights whose table entry records none.
        force: download again even when a cached copy exists.
    """
    spec = name if isinstance(name, WeightSpec) else get_weights(name, tag)
    if not force:
        hit = find_cached(spec)
        if hit is not None:
            return _check_cached(spec, hit, sha256)
    dest = cache_path(spec)
    if is_offline():
        var = "VISIONZOO_OFFLINE" if os.environ.get("VISIONZOO_OFFLINE", "").lower() in _TRUE else "HF_HUB_OFFLINE"
        raise DownloadError(f"{spec.name} is not in the cache and downloads are off ({var} is set): {_where(spec)}, "
                            f"or unset {var}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if spec.hf_hub and _have_hf_hub():
        return _download_hf(spec, dest, sha256, progress)
    return _download_url(spec, spec.download_url, dest, sha256, progress)


def _have_hf_hub() -> bool:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True


class _KeepRedirectHeaders(urllib.request.HTTPRedirectHandler):
    """Remember the headers of redirect responses: the Hub reports a file's sha256 and size before redirecting."""

    def __init__(self) -> None:
        self.headers: list[Any] = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201
        self.headers.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _header(all_headers: list[Any], key: str) -> str | None:
    for h in all_headers:
        v = h.get(key)
        if v:
            return v.strip().strip('"').removeprefix("W/").strip('"')
    return None


def _finish(spec: WeightSpec, tmp: str, dest: Path, digest: str, want: str | None, source: str) -> Path:
    """Check the hash of a complete download in ``tmp`` and move it into place (or remove it and raise)."""
    if want and digest != want.lower():
        os.remove(tmp)
        raise DownloadError(f"{spec.name}: the file downloaded from {source} has sha256 {digest}, expected {want}; "
                            f"it was removed. Run again; if it happens again the file changed upstream: "
                            f"{_where(spec)} yourself after checking it")
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, dest)
    with contextlib.suppress(OSError):
        st = dest.stat()
        _marker(dest).write_text(f"{digest} {st.st_size} {st.st_mtime_ns}\n")
    return dest


def _download_url(spec: WeightSpec, url: str, dest: Path, sha256: str | None, progress: bool) -> Path:
    redirects = _KeepRedirectHeaders()
    opener = urllib.request.build_opener(redirects)
    from visionzoo import __version__

    req = urllib.request.Request(url, headers={"User-Agent": f"visionzoo/{__version__}"})
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    n, size = 0, None
    try:
        try:
            with os.fdopen(fd, "wb") as f, opener.open(req, timeout=60) as r:
                headers = [*redirects.headers, r.headers]
                size = _header(headers, "X-Linked-Size") or r.headers.get("Content-Length")
                size = int(size) if size and size.isdigit() else None
                server_sha = (_header(headers, "X-Linked-Etag") or "").lower()
                h = hashlib.sha256()
                bar = _Progress(spec.name, size) if progress else None
                while block := r.read(1 << 20):
                    f.write(block)
                    h.update(block)
                    n += len(block)
                    if bar:
                        bar.update(n)
                if bar:
                    bar.close()
        except urllib.error.HTTPError as e:
            raise DownloadError(f"{spec.name}: {url} answered HTTP {e.code} {e.reason}; {_where(spec)} "
                                f"if you can get it another way") from None
        except http.client.IncompleteRead as e:
            of = f" of {size}" if size else ""
            raise DownloadError(f"{spec.name}: the download from {url} was cut off after {n + len(e.partial)}{of} "
                                f"bytes; nothing was kept. Run again, or {_where(spec)}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise DownloadError(f"{spec.name}: could not download {url} ({reason}). Without a network, "
                                f"{_where(spec)}") from None
        if size is not None and n != size:
            raise DownloadError(f"{spec.name}: the download from {url} stopped after {n} of {size} bytes; nothing "
                                f"was kept. Run again, or {_where(spec)}")
        want = sha256 or spec.sha256 or (server_sha if _SHA256.match(server_sha) else None)
        return _finish(spec, tmp, dest, h.hexdigest(), want, url)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _download_hf(spec: WeightSpec, dest: Path, sha256: str | None, progress: bool) -> Path:
    """``huggingface_hub.hf_hub_download`` into a temporary folder next to ``dest``, then checked and renamed."""
    import huggingface_hub

    tmpdir = tempfile.mkdtemp(prefix=f".{spec.name}.", dir=dest.parent)
    try:
        try:
            got = huggingface_hub.hf_hub_download(spec.hf_hub, spec.file, local_dir=tmpdir)
        except Exception as e:  # noqa: BLE001  (the hub raises its own classes for network, auth and 404)
            raise DownloadError(f"{spec.name}: could not download {spec.file} from the Hugging Face Hub repo "
                                f"{spec.hf_hub} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                                f"Without a network, {_where(spec)}") from None
        tmp = os.path.join(tmpdir, ".download")
        os.replace(got, tmp)
        dest.parent.mkdir(parents=True, exist_ok=True)
        return _finish(spec, tmp, dest, sha256_file(tmp), sha256 or spec.sha256, f"the Hub repo {spec.hf_hub}")
    finally:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)


class _Progress:
    """A one-line byte counter on stderr (only when stderr is a terminal)."""

    def __init__(self, name: str, total: int | None) -> None:
        self.name, self.total, self.on = name, total, sys.stderr.isatty()
        self.last = -1

    def update(self, n: int) -> None:
        if not self.on:
            return
        mb = n >> 20
        if mb != self.last:
            self.last = mb
            tot = f" / {self.total >> 20}" if self.total else ""
            print(f"\rdownloading {self.name}: {mb}{tot} MB", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.on:
            print(file=sys.stderr)

