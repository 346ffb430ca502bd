"""Partial freezing of the trained model (`training.freeze`).

Each entry of `training.freeze` is an fnmatch pattern over the trained model's parameter names
(`named_parameters()`, the exported key names), e.g. `text_embedding.*` or `blocks.[0-9].*`. A
matching parameter gets requires_grad=False before the engine is built, so DeepSpeed gives it no
fp32 master copy, no optimizer state and no gradient hook: it is neither updated nor part of the
gradient reduce-scatter, and stays in the bf16 it was loaded in. Only parameters freeze: the model
still trains in train mode, so the IDM's BatchNorm layers in a frozen part normalise with batch
statistics and keep updating their running statistics (buffers, saved and exported with the weights).

The words `t5`, `vae` and `idm` name the frozen helper models (umT5, the VAE, the IDM of stage
2), which are always frozen and never trained; they are accepted, for the shipped configs, and
change nothing.
"""
from __future__ import annotations

import fnmatch

from torch import nn

from vidartrain.config import ConfigError

FROZEN_HELPERS = ("t5", "vae", "idm")


def model_patterns(patterns: list[str]) -> list[str]:
    """The entries of `training.freeze` that are parameter-name patterns (not helper names)."""
    return [pattern for pattern in patterns if pattern not in FROZEN_HELPERS]


def freeze_parameters(model: nn.Module, patterns: list[str]) -> list[str]:
    """Set requires_grad=False on every parameter of `model` whose name matches one of `patterns`
    (helper names skipped); returns the frozen names. A pattern that matches no parameter is an
    error (a typo would otherwise train everything)."""
    patterns = model_patterns(patterns)
    names = [name for name, _ in model.named_parameters()]
    unmatched = [pattern for pattern in patterns
                 if not any(fnmatch.fnmatchcase(name, pattern) for name in names)]
    if unmatched:
        raise ConfigError(f"`training.freeze` patterns {unmatched} match no parameter of the "
                          f"{type(model).__name__} (names look like {names[:3]}); patterns are fnmatch-style, "
                          f"e.g. `text_embedding.*` or `blocks.[0-9].*`")
    frozen = [name for name in names if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
    parameters = dict(model.named_parameters())
    for name in frozen:
        parameters[name].requires_grad_(False)
    if frozen and not any(p.requires_grad for p in parameters.values()):  # with LoRA: every adapter
        raise ConfigError(f"`training.freeze` {patterns} freezes every trained parameter of the "
                          f"{type(model).__name__}: nothing would be trained")
    return frozen
