"""Single-device DeepSeek-V3 model: MLA, DeepSeekMoE, MTP (no collectives here; see nanoseek.parallel)."""

from .cache import LayerCache
from .transformer import Block, MTPLayer, Transformer

__all__ = ["Block", "LayerCache", "MTPLayer", "Transformer"]
