"""ViR specifics: the parallel, recurrent and chunkwise forms of retention give the same output; retention is
causal with the class token last; bad modes raise."""
from __future__ import annotations

import pytest
import torch

import visionzoo
from visionzoo.models.vir import retention_chunkwise, retention_parallel, retention_recurrent

torch.set_num_threads(1)


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return visionzoo.create_model("vir_test", num_classes=5, **kwargs).eval()


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 17, 64])
def test_three_forms_of_retention_agree(chunk_size):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g) for _ in range(3))
    log_decay = torch.log(1 - 2.0 ** (-5 - torch.arange(3.0)))
    ref = retention_parallel(q, k, v, log_decay)
    torch.testing.assert_close(retention_recurrent(q, k, v, log_decay), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(retention_chunkwise(q, k, v, log_decay, chunk_size), ref, atol=1e-5, rtol=1e-5)


def test_model_output_is_the_same_in_every_mode():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model.set_mode("recurrent")
        rec = model(x)
        model.set_mode("chunkwise", 4)
        chunk = model(x)
    torch.testing.assert_close(rec, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunk, ref, atol=1e-5, rtol=1e-5)
    built = _model(mode="chunkwise", chunk_size=3)
    assert all(m.mode == "chunkwise" and m.chunk_size == 3 for m in built.modules() if hasattr(m, "chunk_size"))


def test_retention_is_causal_and_the_class_token_sees_every_patch():
    model = _model()
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[..., 48:, 48:] += 1.0  # only the last patch changes
    with torch.no_grad():
        a, b = model.forward_features(x), model.forward_features(y)
    assert a.shape == (1, 17, 32)
    torch.testing.assert_close(a[:, 1:16], b[:, 1:16])  # earlier patches cannot see the last one
    assert not torch.allclose(a[:, 0], b[:, 0])  # the class token (last in the sequence) does


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="mode must be one of"):
        visionzoo.create_model("vir_test", mode="fast")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        _model().set_mode("chunkwise", 0)
