"""Every bad input a new user is likely to type, and what `visionzoo` must answer.

Each case is a command line, the exit status it must end with, and the words its message must hold: one naming
the problem and one naming the fix. No case may print a traceback, and the message is one line.

    python benchmarks/bad_inputs.py          # runs each case as its own `python -m visionzoo` process
    pytest tests/test_bad_inputs.py          # the same cases, in-process (fast)

Nothing here touches the network: every case runs with VISIONZOO_OFFLINE=1 and an empty cache.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SMALL = ["--limit-train", "32", "--limit-val", "10", "--batch-size", "32", "--no-progress"]


@dataclass(frozen=True)
class Case:
    name: str
    argv: list[str]
    problem: str  # words of the message that name what is wrong
    fix: str  # words of the message that say what to do
    code: int = 2
    env: tuple[tuple[str, str], ...] = ()


class _Evil:
    def __reduce__(self):  # noqa: ANN204
        return (print, ("this checkpoint ran code",))


def prepare(root: str | os.PathLike) -> dict[str, str]:
    """Write the bad files the cases use into ``root``; returns the placeholders for ``Case.argv``."""
    import torch

    import visionzoo

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    good = visionzoo.save(visionzoo.create_model("convnext_test", num_classes=10), root / "good.safetensors")
    data = good.read_bytes()
    (root / "empty.safetensors").write_bytes(b"")
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "garbage.pth").write_bytes(b"not a checkpoint, " * 10)
    (root / "empty.pth").write_bytes(b"")
    torch.save({"state_dict": {}, "x": _Evil()}, root / "evil.pth")
    with open(root / "plain.pkl.pth", "wb") as f:
        pickle.dump({"state_dict": {}}, f)
    visionzoo.save(visionzoo.create_model("swin_test", num_classes=10), root / "swin.safetensors")
    (root / "cats" / "tabby").mkdir(parents=True, exist_ok=True)
    (root / "imagenet" / "val" / "n01440764").mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.new("RGB", (40, 30)).save(root / "imagenet" / "val" / "n01440764" / "ILSVRC2012_val_00000001.JPEG")
    return {"tmp": str(root)}


CASES = [
    Case("unknown model", ["info", "convnext_tinny"], "unknown model 'convnext_tinny'", "did you mean convnext_tiny"),
    Case("unknown data source", ["train", "--model", "convnext_test", "--data", "mnist"], "--data must be one of",
         "folder:PATH"),
    Case("missing data folder", ["train", "--model", "convnext_test", "--data", "folder:{tmp}/nope"],
         "does not exist", "one sub-folder per class"),
    Case("negative learning rate", ["train", "--model", "convnext_test", "--img-size", "32", "--lr", "-1", *SMALL],
         "lr must be > 0", "got -1"),
    Case("malformed --model-arg", ["train", "--model", "convnext_test", "--model-arg", "depth"], "--model-arg",
         "KEY=VALUE"),
    Case("image size the model cannot take", ["train", "--model", "convnext_test", "--img-size", "33", *SMALL],
         "input 33x33 must be at least 32x32 and a multiple of 32", "e.g. to 64x64"),
    Case("position tables without a PEFT method", ["train", "--model", "vit_test", "--peft-positions", *SMALL],
         "--peft-positions adds the position tables", "add --peft lora"),
    Case("position tables on a model without one", ["train", "--model", "resnet_test", "--img-size", "32", "--peft",
                                                    "lora", "--peft-positions", *SMALL],
         "has none (position_tables() is empty)", "drop --peft-positions"),
    Case("missing resume file", ["train", "--model", "convnext_test", "--img-size", "32", "--resume",
                                 "{tmp}/nope/latest.pt", *SMALL], "does not exist", "latest.pt"),
    Case("missing checkpoint", ["eval", "--checkpoint", "{tmp}/nope.pt"], "does not exist", "nope.pt"),
    Case("no checkpoint at all", ["eval"], "--checkpoint PATH", "--pretrained NAME"),
    Case("empty safetensors", ["eval", "--checkpoint", "{tmp}/empty.safetensors", "--model", "convnext_test"],
         "is empty (0 bytes)", "save it again"),
    Case("truncated safetensors", ["eval", "--checkpoint", "{tmp}/truncated.safetensors"], "is truncated",
         "save it again"),
    Case("empty .pth", ["eval", "--checkpoint", "{tmp}/empty.pth", "--model", "convnext_test"], "is empty (0 bytes)",
         "save it again"),
    Case("garbage .pth", ["convert", "{tmp}/garbage.pth", "{tmp}/out.safetensors", "--model", "convnext_test"],
         "not a file torch can read", "the file you meant"),
    Case("pickle that runs code", ["eval", "--checkpoint", "{tmp}/evil.pth", "--model", "convnext_test"],
         "would run code", "re-save just the weights"),
    Case("plain Python pickle", ["eval", "--checkpoint", "{tmp}/plain.pkl.pth", "--model", "convnext_test"],
         "plain Python pickle", "torch.save(model.state_dict(), path)"),
    Case("checkpoint of another model", ["convert", "{tmp}/swin.safetensors", "{tmp}/out.safetensors", "--model",
                                         "convnext_test"], "this checkpoint is swin_test, not convnext_test",
         "load_model"),
    Case("no pretrained weights exist", ["eval", "--pretrained", "crossformer_tiny", "--data",
                                         "folder:{tmp}/imagenet/val"], "no downloadable pretrained weights",
         "checkpoint_path"),
    Case("unknown weights tag", ["eval", "--pretrained", "convnext_tiny.nope", "--data", "folder:{tmp}/imagenet/val"],
         "no weights tagged 'nope'", "fb_in1k"),
    Case("class folders that are not synsets", ["eval", "--pretrained", "convnext_atto", "--data", "folder:{tmp}/cats"],
         "not ImageNet-1k synset ids", "n01440764"),
    Case("ImageNet's parent folder", ["eval", "--pretrained", "convnext_atto", "--data", "folder:{tmp}/imagenet"],
         "not ImageNet-1k synset ids", "did you mean"),
    Case("pretrained without ImageNet", ["eval", "--pretrained", "convnext_atto"], "evaluates on ImageNet-1k",
         "--data folder:PATH/val"),
    Case("offline, weights not cached", ["eval", "--pretrained", "convnext_atto", "--data",
                                         "folder:{tmp}/imagenet/val"], "downloads are off",
         "{tmp}/cache/convnext_atto.d2_in1k/model.safetensors"),
    Case("no model matches", ["weights", "nothing_like_this*"], "no model matches", "visionzoo weights"),
    Case("unknown model in compare", ["compare", "--models", "convnext_test", "nope_model"],
         "unknown model 'nope_model'", "visionzoo list"),
    Case("bad image size for info", ["info", "convnext_tiny", "--img-size", "225"], "input 225x225", "e.g. to 256x256"),
]


def filled(case: Case, values: dict[str, str]) -> tuple[list[str], dict[str, str], Case]:
    """The case's command line and environment with the placeholders of ``prepare`` filled in."""
    env = {"VISIONZOO_OFFLINE": "1", "VISIONZOO_CACHE": "{tmp}/cache", **dict(case.env)}
    fill = lambda t: t.format(**values)  # noqa: E731
    return ([fill(a) for a in case.argv], {k: fill(v) for k, v in env.items()},
            Case(case.name, case.argv, fill(case.problem), fill(case.fix), case.code, case.env))


def check(case: Case, code: int, err: str) -> list[str]:
    """What is wrong with one answer (empty when it is right)."""
    bad = []
    if code != case.code:
        bad.append(f"exit status {code}, expected {case.code}")
    if "Traceback" in err:
        bad.append("a traceback was printed")
    if case.problem not in err:
        bad.append(f"the message does not name the problem ({case.problem!r})")
    if case.fix not in err:
        bad.append(f"the message does not name the fix ({case.fix!r})")
    if err.strip().count("\n"):
        bad.append("the message is more than one line")
    return bad


def main() -> int:
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        values = prepare(tmp)
        for case in CASES:
            argv, env, case = filled(case, values)
            p = subprocess.run([sys.executable, "-m", "visionzoo", *argv], capture_output=True, text=True,
                               env={**os.environ, **env}, cwd=tmp, timeout=300)
            bad = check(case, p.returncode, p.stderr)
            failed += bool(bad)
            print(f"{'FAIL' if bad else 'ok  '} {case.name}: {'; '.join(bad) or p.stderr.strip()}")
    print(f"{len(CASES) - failed} of {len(CASES)} bad inputs answered well")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
