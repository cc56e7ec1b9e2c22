"""coca: CoCa (Contrastive Captioners) without open_clip.

The public API mirrors open_clip's CoCa API, so that code written for it runs after
``import coca_cli as open_clip``: ``create_model_and_transforms``, ``create_model_from_pretrained``,
``get_tokenizer``, ``decode``, ``CoCa`` and its config dataclasses, ``CoCaLoss``. Names are
imported on first use, so ``coca --help`` does not pay for importing torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CLIPTextCfg": "model.config", "CLIPVisionCfg": "model.config", "CoCaConfig": "model.config",
    "MultimodalCfg": "model.config", "get_model_config": "model.config", "list_models": "model.config",
    "CoCa": "model.coca",
    "Tokenizer": "data.tokenizer", "decode": "data.tokenizer", "tokenize": "data.tokenizer",
    "create_model": "weights.factory", "create_model_and_transforms": "weights.factory",
    "create_model_from_pretrained": "weights.factory", "get_tokenizer": "weights.factory",
    "list_pretrained": "weights.pretrained",
    "ClipLoss": "train.loss", "CoCaLoss": "train.loss",
    "CocaError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
