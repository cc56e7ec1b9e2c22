"""Published CoCa weights (LAION) and how to get them: Hugging Face Hub, downloaded once.

``pretrained`` may be a published tag (``laion2b_s13b_b90k``), ``hf-hub:org/repo``, or a
local path (native directory, ``.safetensors``, open_clip ``.pt``/``.bin``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .checkpoint import OPENCLIP_CONFIG, OPENCLIP_SAFE_WEIGHTS, OPENCLIP_WEIGHTS
from .config import suggest
from .errors import CocaError

HF_HUB_PREFIX = "hf-hub:"

# model config -> tag -> Hugging Face repository holding open_clip's weights file
PRETRAINED = {
    "coca_ViT-B-32": {
        "laion2b_s13b_b90k": "laion/CoCa-ViT-B-32-laion2B-s13B-b90k",
        "mscoco_finetuned_laion2b_s13b_b90k": "laion/mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k",
    },
    "coca_ViT-L-14": {
        "laion2b_s13b_b90k": "laion/CoCa-ViT-L-14-laion2B-s13B-b90k",
        "mscoco_finetuned_laion2b_s13b_b90k": "laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k",
    },
}

DEFAULT_CAPTION_MODEL = "coca_ViT-L-14"
DEFAULT_CAPTION_PRETRAINED = "mscoco_finetuned_laion2b_s13b_b90k"
DEFAULT_CONTRASTIVE_MODEL = "coca_ViT-L-14"
DEFAULT_CONTRASTIVE_PRETRAINED = "laion2b_s13b_b90k"  # the MSCOCO fine-tunes lost their contrastive skill


def list_pretrained() -> list[tuple[str, str]]:
    """(model, tag) pairs of the published weights, as ``open_clip.list_pretrained`` gives them."""
    return [(model, tag) for model, tags in PRETRAINED.items() for tag in tags]


def normalize_tag(tag: str) -> str:
    """open_clip accepts ``mscoco_finetuned_laion2B-s13B-b90k`` for ``..._laion2b_s13b_b90k``."""
    return tag.lower().replace("-", "_")


def is_published(model: Optional[str], pretrained: str) -> bool:
    return normalize_tag(pretrained) in PRETRAINED.get(str(model), {})


def hub_repo(model: Optional[str], pretrained: str) -> Optional[str]:
    """The Hugging Face repository for a tag or ``hf-hub:`` name, None for local paths."""
    if pretrained.startswith(HF_HUB_PREFIX):
        return pretrained[len(HF_HUB_PREFIX):].strip("/")
    return PRETRAINED.get(str(model), {}).get(normalize_tag(pretrained))


def resolve(model: Optional[str], pretrained: str, cache_dir: Optional[str] = None) -> Path:
    """A local path for ``pretrained``, downloading published weights on first use."""
    repo = hub_repo(model, pretrained)
    if repo is not None:
        return download(repo, cache_dir=cache_dir)
    path = Path(pretrained).expanduser()
    if path.exists():
        return path
    tags = PRETRAINED.get(str(model), {})
    hint = suggest(pretrained, tags) if tags else ""
    where = f" for {model}" if model else ""
    known = f"; published weights{where}: {', '.join(tags)}" if tags else ""
    raise CocaError(f"pretrained weights '{pretrained}' not found: no such file or published tag{where}{hint}{known}")


def download(repo: str, cache_dir: Optional[str] = None) -> Path:
    """Fetch a hub repository's weights (and config, if any) into the Hugging Face cache.

    Returns the local folder. Offline, or when the hub is unreachable, raises a one-line
    error telling how to pass a local file instead.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    import requests

    cache_dir = cache_dir or os.environ.get("COCA_CACHE_DIR")
    network_errors = (LocalEntryNotFoundError, requests.exceptions.RequestException, OSError)
    weights = None
    for filename in (OPENCLIP_SAFE_WEIGHTS, OPENCLIP_WEIGHTS):
        try:
            weights = Path(hf_hub_download(repo, filename, cache_dir=cache_dir))
            break
        except EntryNotFoundError:
            continue
        except HfHubHTTPError as err:
            if getattr(err.response, "status_code", None) == 404:
                continue
            raise _offline(repo, err) from None
        except network_errors as err:
            raise _offline(repo, err) from None
    if weights is None:
        raise CocaError(f"Hugging Face repository {repo} has no {OPENCLIP_SAFE_WEIGHTS} or {OPENCLIP_WEIGHTS}")
    try:  # the config is optional: published CoCa repos may not carry one
        hf_hub_download(repo, OPENCLIP_CONFIG, cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - a missing optional file must not fail the download
        pass
    return weights.parent


def _offline(repo: str, err: Exception) -> CocaError:
    return CocaError(
        f"cannot download weights from Hugging Face ({repo}): no network or hub unreachable "
        f"({type(err).__name__}); download {OPENCLIP_WEIGHTS} from https://huggingface.co/{repo} "
        f"and pass it with --pretrained PATH"
    )
