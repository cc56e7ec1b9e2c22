"""coca: CoCa (Contrastive Captioners) without open_clip.

The public API mirrors open_clip's CoCa API: ``create_model_and_transforms``,
``get_tokenizer``, ``decode``, ``CoCa`` and its config dataclasses. Names are imported on
first use, so ``coca --help`` does not pay for importing torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CLIPTextCfg": "config", "CLIPVisionCfg": "config", "CoCaConfig": "config", "MultimodalCfg": "config",
    "get_model_config": "config", "list_models": "config",
    "CocaError": "errors",
    "create_model": "factory", "create_model_and_transforms": "factory", "get_tokenizer": "factory",
    "CoCa": "model",
    "ClipLoss": "loss", "CoCaLoss": "loss",
    "list_pretrained": "pretrained",
    "Tokenizer": "tokenizer", "decode": "tokenizer", "tokenize": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
