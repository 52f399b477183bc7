"""nanoseek: train and serve DeepSeek-V3-style models end to end, CPU first."""

from .config import PRESETS, ModelConfig, get_preset
from .errors import NanoseekError

__version__ = "0.1.0"
__all__ = ["PRESETS", "ModelConfig", "NanoseekError", "get_preset"]
