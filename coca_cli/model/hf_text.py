"""Hugging Face text tower for ``coca_roberta-ViT-B-32`` (optional: ``pip install 'coca-cli[hf]'``).

Layout matches open_clip's ``HFTextEncoder`` (``text.transformer.*``, ``text.proj``) so its
checkpoints convert unchanged. Only this config needs it; everything else is plain PyTorch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import CLIPTextCfg
from ..errors import CocaError


def _transformers():
    try:
        import transformers
    except ImportError:
        raise CocaError("this model needs a Hugging Face text tower: install the extra with "
                        "pip install 'coca-cli[hf]'") from None
    return transformers


def _hub_call(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except OSError as err:
        raise CocaError(f"cannot load {what} from Hugging Face (offline or not cached): "
                        f"{str(err).splitlines()[0][:160]}") from None


class HFTextEncoder(nn.Module):
    """A Hugging Face encoder, mean-pooled over non-padding tokens, then projected."""

    def __init__(self, cfg: CLIPTextCfg, output_dim: int):
        super().__init__()
        tf = _transformers()
        name = cfg.hf_model_name
        self.config = _hub_call(f"the config of {name}", tf.AutoConfig.from_pretrained, name)
        if cfg.hf_model_pretrained:
            self.transformer = _hub_call(name, tf.AutoModel.from_pretrained, name, add_pooling_layer=False)
        else:
            self.transformer = tf.AutoModel.from_config(self.config, add_pooling_layer=False)
        if cfg.hf_pooler_type != "mean_pooler":
            raise CocaError(f"unsupported hf_pooler_type '{cfg.hf_pooler_type}' (only mean_pooler)")
        width = self.config.hidden_size
        if cfg.hf_proj_type == "linear":
            self.proj = nn.Linear(width, output_dim, bias=False)
        elif cfg.hf_proj_type == "mlp":
            hidden = (width + output_dim) // 2
            self.proj = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(),
                                      nn.Linear(hidden, output_dim, bias=False))
        else:
            raise CocaError(f"unsupported hf_proj_type '{cfg.hf_proj_type}' (linear or mlp)")
        self.output_tokens = cfg.output_tokens

    def set_grad_checkpointing(self, enable: bool = True):
        if enable:
            self.transformer.gradient_checkpointing_enable()
        else:
            self.transformer.gradient_checkpointing_disable()

    def forward(self, text: torch.Tensor):
        keep = (text != self.config.pad_token_id).long()
        hidden = self.transformer(input_ids=text, attention_mask=keep).last_hidden_state
        pooled = (hidden * keep.unsqueeze(-1)).sum(dim=1) / keep.sum(dim=1, keepdim=True)
        pooled = self.proj(pooled)
        return (pooled, hidden) if self.output_tokens else pooled


class HFTokenizer:
    """Wraps a Hugging Face tokenizer to return [N, context_length] id tensors."""

    def __init__(self, name: str, context_length: int, cache_dir: Optional[str] = None):
        tf = _transformers()
        self.tokenizer = _hub_call(f"the tokenizer {name}", tf.AutoTokenizer.from_pretrained, name, cache_dir=cache_dir)
        self.context_length = context_length

    def __call__(self, texts, context_length=None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        texts = [" ".join(t.split()) for t in texts]
        return self.tokenizer(texts, return_tensors="pt", max_length=context_length or self.context_length,
                              padding="max_length", truncation=True).input_ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
