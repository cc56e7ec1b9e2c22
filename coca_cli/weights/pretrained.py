"""Published CoCa weights (LAION) and how to get them: Hugging Face Hub, downloaded once.

``pretrained`` may be a published tag (``laion2b_s13b_b90k``), ``hf-hub:org/repo``, or a
local path (native directory, ``.safetensors``, open_clip ``.pt``/``.bin``).
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Optional, Sequence

from .checkpoint import OPENCLIP_CONFIG, OPENCLIP_SAFE_WEIGHTS, OPENCLIP_WEIGHTS
from ..model.config import suggest
from ..errors import CocaError

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
LOCAL_DIR_PREFIX = "local-dir:"


def brings_weights(model: Optional[str]) -> bool:
    """Whether a model name is weights that carry their config (``hf-hub:``, ``local-dir:``), as
    open_clip reads them."""
    return str(model or "").startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX))


def default_weights(model: Optional[str], pretrained: Optional[str], *,
                    captioning: bool) -> tuple[Optional[str], Optional[str]]:
    """(model, pretrained) a command loads: without ``pretrained``, the published weights for the
    job (the MSCOCO fine-tune captions better; it has lost much of the LAION weights' zero-shot
    and retrieval skill), unless the model name brings its own (``hf-hub:``, ``local-dir:``)."""
    if pretrained is not None or brings_weights(model):
        return model, pretrained
    if captioning:
        return model or DEFAULT_CAPTION_MODEL, DEFAULT_CAPTION_PRETRAINED
    return model or DEFAULT_CONTRASTIVE_MODEL, DEFAULT_CONTRASTIVE_PRETRAINED


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
    cache_dir = cache_dir or os.environ.get("COCA_CACHE_DIR")
    unreachable = _unreachable_hub()
    with _quiet_hub():
        weights = _first_available(repo, (OPENCLIP_SAFE_WEIGHTS, OPENCLIP_WEIGHTS), cache_dir, unreachable)
        _first_available(repo, (OPENCLIP_CONFIG,), cache_dir, unreachable, required=False)  # CoCa repos may lack it
    return weights.parent


def download_config(repo: str, cache_dir: Optional[str] = None) -> Path:
    """Fetch only a hub repository's open_clip config (what a tokenizer needs: weights are GBs);
    one line says why when the repository has none or the hub cannot be reached."""
    cache_dir = cache_dir or os.environ.get("COCA_CACHE_DIR")
    with _quiet_hub():
        return _first_available(repo, (OPENCLIP_CONFIG,), cache_dir, _unreachable_hub())


HUB_CONNECT_TIMEOUT = 5.0  # seconds for the hub to accept a connection: a handshake, even far away


def _unreachable_hub() -> Optional[OSError]:
    """Why the hub cannot be reached from here, or None when it can (or a proxy stands between).

    huggingface_hub retries a failed connection with backoff for ~23 s (longer where packets are
    dropped) before it gives up or falls back to its cache. A host name that does not resolve,
    or a host that refuses or never answers a connection, means the cache is all there is, and
    it is read at once."""
    from urllib.parse import urlparse
    from urllib.request import getproxies

    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname
    if not host or getproxies() or constants.HF_HUB_OFFLINE:  # offline: huggingface_hub reads the cache alone
        return None
    try:
        port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
        socket.getaddrinfo(host, port)
    except socket.gaierror as err:
        return err
    except (OSError, UnicodeError, ValueError):  # anything else: let huggingface_hub find out
        return None
    try:
        socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT).close()
    except OSError as err:  # refused, unreachable network, timed out
        return err
    return None


def _first_available(repo: str, filenames, cache_dir, unreachable: Optional[OSError] = None,
                     required: bool = True) -> Optional[Path]:
    """The first of ``filenames`` the repository has, downloaded (or found in the cache; only
    there when the hub is ``unreachable``).

    Only huggingface_hub's own exceptions are named: its transport library (requests in 0.x,
    httpx later) is not our dependency and changes between versions. A file the hub says it
    lacks (404) moves on to the next candidate; any other failure to fetch means the hub
    cannot be used.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled

    not_cached = None
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=unreachable is not None))
        except LocalEntryNotFoundError as err:  # not in the cache, and the hub was not asked or not reached
            if err.__cause__ is not None and not isinstance(err.__cause__, OfflineModeIsEnabled):
                raise _offline(repo, err.__cause__, filenames) from None
            not_cached = unreachable or err  # offline: another candidate may be cached
        except EntryNotFoundError:
            continue
        except Exception as err:  # noqa: BLE001 - transport errors have no common base across versions
            if getattr(getattr(err, "response", None), "status_code", None) != 404:
                raise _offline(repo, err, filenames) from None
    if not required:
        return None
    if not_cached is not None:
        raise _offline(repo, not_cached, filenames)
    raise CocaError(f"Hugging Face repository {repo} has none of: {', '.join(filenames)}")


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub logs each retry on stderr; our error message is the one line users see."""
    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)


def _offline(repo: str, err: Exception, filenames: Sequence[str]) -> CocaError:
    why = f"no network or hub unreachable ({type(err).__name__})"
    if OPENCLIP_CONFIG in filenames:  # only the config was asked for (a tokenizer)
        return CocaError(f"cannot download {OPENCLIP_CONFIG} from Hugging Face ({repo}): {why}; "
                         "name the model it holds instead")
    return CocaError(
        f"cannot download weights from Hugging Face ({repo}): {why}; download {OPENCLIP_WEIGHTS} from "
        f"https://huggingface.co/{repo} and pass it with --pretrained PATH"
    )


def cached_weights(repo: str, cache_dir: Optional[str] = None) -> Optional[Path]:
    """The repository's weights file when already in the local Hugging Face cache, else None;
    never touches the network (``coca models`` shows what would need a download)."""
    from huggingface_hub import try_to_load_from_cache

    cache_dir = cache_dir or os.environ.get("COCA_CACHE_DIR")
    for filename in (OPENCLIP_SAFE_WEIGHTS, OPENCLIP_WEIGHTS):
        found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        if isinstance(found, str):  # otherwise None, or a marker that the repository lacks the file
            return Path(found)
    return None
