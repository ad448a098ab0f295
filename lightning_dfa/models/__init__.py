"""LightningModules used by the recipes (imported on first use: HF and diffusers load slowly)."""

from importlib import import_module

_EXPORTS = {
    "MLPClassifier": "lightning_dfa.models.mlp",
    "CausalLM": "lightning_dfa.models.causal_lm",
    "ImageClassifier": "lightning_dfa.models.image_classifier",
    "Diffusion": "lightning_dfa.models.diffusion",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_dfa.models' has no attribute {name!r}")
