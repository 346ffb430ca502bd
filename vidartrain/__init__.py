"""vidartrain: DeepSpeed fine-tuning of the Vidar / Vidarc video diffusion models."""
__version__ = "0.1.0"
