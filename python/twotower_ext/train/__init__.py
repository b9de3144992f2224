"""Training a small two-tower model on CPU (`python -m twotower_ext.train`): data (the standard library's
sources + a byte-level BPE tokenizer), a differentiable NemotronH implementation that computes the same
function as the inference model, and the two phases of training (context tower as a causal LM, then the
masked-diffusion denoiser with the context tower frozen). Checkpoints are written in NVIDIA's format."""
from .model import TrainModel, context_forward, denoiser_forward, make_config, mamba_train

__all__ = ["TrainModel", "context_forward", "denoiser_forward", "make_config", "mamba_train"]
