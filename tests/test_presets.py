import pytest

from moe_tut.presets import FULL_SWEEP, PRESETS, MoEConfig, UnknownPresetError, custom, get_preset, resolve

# The seed README's numbers, unchanged, and the published shapes (DESIGN.md).
EXPECTED = {
    "mixtral": (8, 4096, 14336, 2),
    "deepseek": (64, 4096, 11008, 8),
    "glm5": (128, 5120, 13696, 8),
    "debug": (4, 512, 1024, 2),
    "deepseek-v3": (256, 7168, 2048, 8),
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "glm-4.5": (160, 5120, 1536, 8),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_preset_numbers(name):
    cfg = get_preset(name)
    assert (cfg.E, cfg.H, cfg.F, cfg.top_k) == EXPECTED[name]


def test_exactly_the_seven_presets():
    assert set(PRESETS) == set(EXPECTED)
    assert set(FULL_SWEEP) <= set(PRESETS)


@pytest.mark.parametrize("name,gb", [("mixtral", 2.8), ("deepseek", 17.3), ("glm5", 53.9), ("deepseek-v3", 22.5)])
def test_weight_memory_matches_design(name, gb):
    assert get_preset(name).weight_bytes() / 1e9 == pytest.approx(gb, abs=0.05)


def test_useful_flops():
    cfg = get_preset("deepseek-v3")
    assert cfg.useful_flops(8192) == 2 * 8192 * 8 * 3 * 7168 * 2048  # ~5.8 TFLOP (BENCHMARKING.md)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(UnknownPresetError) as exc:
        get_preset("mixtrall")
    for name in PRESETS:
        assert name in str(exc.value)


def test_custom_and_overrides():
    c = custom(E=16, H=1024, F=2816, top_k=2)
    assert (c.name, c.E, c.top_k) == ("custom", 16, 2)
    o = resolve("mixtral", top_k=1)
    assert (o.name, o.E, o.top_k) == ("custom", 8, 1)
    assert resolve("mixtral") is get_preset("mixtral")
    assert resolve(E=4, H=8, F=8, top_k=1).E == 4
    with pytest.raises(ValueError, match="missing: F"):
        resolve(E=4, H=8, top_k=1)


@pytest.mark.parametrize("kw,msg", [
    (dict(E=0, H=8, F=8, top_k=1), "E must be a positive integer"),
    (dict(E=4, H=-8, F=8, top_k=1), "H must be a positive integer"),
    (dict(E=4, H=8, F=8, top_k=5), "top_k=5 is larger than the number of experts E=4"),
    (dict(E=4, H=8.0, F=8, top_k=1), "H must be a positive integer"),
])
def test_bad_shapes_are_rejected(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MoEConfig("bad", **kw)
