"""The model table, generated from the registry (``docs/models.md`` and ``visionzoo list``)."""
from __future__ import annotations

from visionzoo.registry import get_variant, list_families, list_models

COLUMNS = ("model", "kind", "res", "params (M)", "GMACs", "paper params (M)", "paper GMACs", "paper top-1",
           "source")


def _fmt(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}".rstrip("0").rstrip(".")


def model_rows(pattern: str | list[str] = "*", include_test: bool = False) -> list[tuple[str, ...]]:
    """One row per registered model: our exact params (= official), official GMACs, then the paper's numbers."""
    rows = []
    for name in list_models(pattern, include_test=include_test or None):  # the same rule as list_models
        v = get_variant(name)
        p = v.paper
        at = f" @{p.img_size}" if p.img_size and p.img_size != v.input_size else ""
        top1 = _fmt(p.top1) + at if p.top1 is not None else "-"
        gm = _fmt(p.gmacs) + at if p.gmacs is not None else "-"
        rows.append((name, v.kind, str(v.input_size), _fmt(v.params_m, 3), _fmt(v.gmacs), _fmt(p.params_m, 1), gm,
                     top1, p.source or "-"))
    return rows


def models_markdown() -> str:
    """The whole of docs/models.md."""
    out = ["# Model table", "",
           "Generated from the registry by `visionzoo list --markdown > docs/models.md`; do not edit by hand.",
           "`params (M)` is the exact count of the official (or timm) implementation with a 1000-class head, which",
           "ours equals (the test suite checks it); `GMACs` is the official implementation's count at `res` where",
           "known; the `paper` columns are the rounded figures the paper or official README reports, from `source`",
           "(at `res`, unless marked `@size`).",
           "MACs are multiply-accumulates (what most papers call FLOPs). `*_test` variants are tiny models for tests.",
           ""]
    for fam in list_families():
        out += [f"## {fam.name} ({fam.cls.__name__}, {fam.paper}, {fam.kind})", "",
                "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        out += ["| " + " | ".join(r) + " |" for r in model_rows(list(fam.variants))]
        out.append("")
    return "\n".join(out)
