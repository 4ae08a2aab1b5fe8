"""MoE layer shapes as data.

A preset names one MoE layer's expert shape: E experts, hidden size H, expert FFN size F, top-k.
The seed presets (mixtral, deepseek, glm5, debug) keep the seed README's names and numbers so its
commands work unchanged; deepseek and glm5 are illustrative shapes, not those models' published
ones. The published shapes (read from the models' config.json files) sit beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


class UnknownPresetError(ValueError):
    """Raised for a preset name that does not exist; the message lists the valid names."""


@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer's expert shape.

    E: number of routed experts; H: hidden size; F: each expert's FFN (intermediate) size;
    top_k: experts per token; shared_experts: always-on experts of the model (informational:
    the timed forward covers the routed experts only).
    """

    name: str
    E: int
    H: int
    F: int
    top_k: int
    shared_experts: int = 0
    note: str = ""

    def __post_init__(self):
        for field in ("E", "H", "F", "top_k"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{self.name}: {field} must be a positive integer, got {value!r}")
        if self.top_k > self.E:
            raise ValueError(f"{self.name}: top_k={self.top_k} is larger than the number of experts E={self.E}")
        if self.shared_experts < 0:
            raise ValueError(f"{self.name}: shared_experts must be >= 0, got {self.shared_experts}")

    # Sizes. Expert weights: w13 [E, 2F, H] and w2 [E, H, F] = 3*H*F values per expert.
    @property
    def params_per_expert(self) -> int:
        return 3 * self.H * self.F

    def weight_bytes(self, bytes_per_value: float = 2.0) -> int:
        """Bytes of all routed experts' weights at `bytes_per_value` (bf16 = 2)."""
        return int(self.E * self.params_per_expert * bytes_per_value)

    def useful_flops(self, T: int) -> int:
        """FLOPs of one forward over T tokens: 2 * T * k * 3 * H * F (padding is not useful work)."""
        return 2 * T * self.top_k * self.params_per_expert

    def with_overrides(self, **kw) -> MoEConfig:
        """A copy with some of E, H, F, top_k replaced (named 'custom' unless a name is given)."""
        kw = {k: v for k, v in kw.items() if v is not None}
        if not kw:
            return self
        kw.setdefault("name", "custom")
        return replace(self, **kw)

    def describe(self) -> str:
        return (f"{self.name}: E={self.E} H={self.H} F={self.F} top_k={self.top_k}"
                f" ({self.weight_bytes() / 1e9:.1f} GB of bf16 expert weights)")


PRESETS: dict[str, MoEConfig] = {
    c.name: c
    for c in [
        # The seed's presets, names and numbers unchanged.
        MoEConfig("mixtral", 8, 4096, 14336, 2, note="Mixtral-8x7B (published shape)"),
        MoEConfig("deepseek", 64, 4096, 11008, 8, note="illustrative shape, not DeepSeek-V3's published one"),
        MoEConfig("glm5", 128, 5120, 13696, 8, note="illustrative shape, not GLM-5's published one"),
        MoEConfig("debug", 4, 512, 1024, 2, note="tiny, runs anywhere (CPU included)"),
        # Published shapes, from each model's config.json.
        MoEConfig("deepseek-v3", 256, 7168, 2048, 8, shared_experts=1, note="DeepSeek-V3 (published shape)"),
        MoEConfig("qwen3-30b-a3b", 128, 2048, 768, 8, note="Qwen3-30B-A3B (published shape)"),
        MoEConfig("glm-4.5", 160, 5120, 1536, 8, shared_experts=1, note="GLM-4.5 (published shape)"),
    ]
}

# Presets `--full` runs, in order (debug is for CPUs and CI).
FULL_SWEEP = ["mixtral", "deepseek", "glm5", "deepseek-v3", "qwen3-30b-a3b", "glm-4.5"]


def get_preset(name: str) -> MoEConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(
            f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)} "
            f"(or give a custom shape with E, H, F and top_k)"
        ) from None


def custom(E: int, H: int, F: int, top_k: int, name: str = "custom") -> MoEConfig:
    """A shape that is not a preset, e.g. custom(E=16, H=1024, F=2816, top_k=2)."""
    return MoEConfig(name, E, H, F, top_k)


def resolve(name: str | None = None, *, E=None, H=None, F=None, top_k=None) -> MoEConfig:
    """A preset by name, optionally with fields overridden; or a fully custom shape when no name is given."""
    if name is None:
        missing = [k for k, v in dict(E=E, H=H, F=F, top_k=top_k).items() if v is None]
        if missing:
            raise ValueError(f"a custom shape needs E, H, F and top_k; missing: {', '.join(missing)}")
        return custom(E, H, F, top_k)
    return get_preset(name).with_overrides(E=E, H=H, F=F, top_k=top_k)
