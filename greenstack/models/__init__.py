"""Model builders for the `model` config group (timm and transformers), all offline."""

from greenstack.models.builders import build_causal_lm, build_timm, build_transformers, minilm_path

__all__ = ["build_causal_lm", "build_timm", "build_transformers", "minilm_path"]
