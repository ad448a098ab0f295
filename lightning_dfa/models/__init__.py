"""LightningModules used by the recipes: an MLP, HuggingFace causal LMs, ViT classifiers and diffusers UNets."""

from lightning_dfa.models.causal_lm import CausalLM
from lightning_dfa.models.diffusion import Diffusion
from lightning_dfa.models.image_classifier import ImageClassifier
from lightning_dfa.models.mlp import MLPClassifier

__all__ = ["CausalLM", "Diffusion", "ImageClassifier", "MLPClassifier"]
