import pytest
import torch

from moe_tut.presets import custom, get_preset
from moe_tut.weights import ExpertWeights


def test_random_weights_shapes_scale_and_bytes():
    cfg = get_preset("debug")
    w = ExpertWeights.random(cfg, seed=0)
    assert w.w13.shape == (4, 2048, 512) and w.w2.shape == (4, 512, 1024)
    assert w.dtype == torch.bfloat16
    assert w.nbytes == cfg.weight_bytes() == 4 * 3 * 512 * 1024 * 2
    assert w.bytes_for(2) == w.nbytes // 2
    # realistic scale, not zeros: std ~ 1/sqrt(fan_in)
    assert w.w13.float().std().item() == pytest.approx(512 ** -0.5, rel=0.05)
    assert w.w2.float().std().item() == pytest.approx(1024 ** -0.5, rel=0.05)
    assert torch.equal(ExpertWeights.random(cfg, seed=0).w2, w.w2)


@pytest.mark.parametrize("w13,w2,err,msg", [
    (torch.zeros(2, 8, 4), torch.zeros(2, 4, 5), ValueError, r"w2 must be \[E, H, F\]"),
    (torch.zeros(2, 7, 4), torch.zeros(2, 4, 3), ValueError, "2F"),
    (torch.zeros(8, 4), torch.zeros(2, 4, 4), ValueError, "w13 must be"),
    (torch.zeros(2, 8, 4), torch.zeros(2, 4, 4, dtype=torch.bfloat16), TypeError, "w13 is torch.float32"),
])
def test_bad_weights(w13, w2, err, msg):
    with pytest.raises(err, match=msg):
        ExpertWeights(w13, w2)


def test_check_matches():
    w = ExpertWeights.random(custom(2, 16, 8, 1))
    w.check_matches(custom(2, 16, 8, 1))
    with pytest.raises(ValueError, match="config"):
        w.check_matches(custom(3, 16, 8, 1))
