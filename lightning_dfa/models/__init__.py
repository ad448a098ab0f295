"""LightningModules used by the recipes (imported on first use: HF and diffusers load slowly)."""

from lightning_dfa._lazy import lazy_getattr

_EXPORTS = {
    "MLPClassifier": "lightning_dfa.models.mlp",
    "CausalLM": "lightning_dfa.models.causal_lm",
    "ImageClassifier": "lightning_dfa.models.image_classifier",
    "Diffusion": "lightning_dfa.models.diffusion",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
