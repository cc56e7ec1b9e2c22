"""Zero-shot classification: class names × prompt templates → classifier weights → probabilities.

The classifier is built exactly as open_clip's ``build_zero_shot_classifier``: every prompt of a
class is embedded and normalised, the prompts of each class are averaged and the mean normalised
again. Probabilities are ``softmax(logit_scale.exp() * image_features @ weights)`` with the
model's own learned temperature. open_clip's examples and zero-shot evaluation hard-code 100
instead: the ceiling open_clip's training clamps the scale to, where trained CLIP/CoCa weights
sit, so both agree on published weights, and ours stays right for any other checkpoint. The
temperature does not change rankings, so accuracies are the same either way.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import CocaError
from ..data.inputs import collect_images
from ..data.tokenizer import clean_text
from .embeddings import embed_texts, logit_scale
from .templates import DEFAULT_TEMPLATE, fill


def check_classnames(names: Sequence[str]) -> list[str]:
    """Class names must exist and be unique: a duplicate would split its probability in two.

    Names the tokenizer reads as the same text are duplicates too: differing only in case,
    spacing or unicode form (``Dog``/``DOG``, a composed or decomposed ``é``).
    """
    names = list(names)
    if not names:
        raise CocaError("the label list is empty")
    spellings: dict[str, list[str]] = {}
    for name in names:
        spellings.setdefault(clean_text(name).casefold(), []).append(name)
    for same in spellings.values():
        if len(same) > 1:
            forms = list(dict.fromkeys(same))
            clash = f" ({_quoted(forms)} differ only in case, spacing or unicode form)" if len(forms) > 1 else ""
            raise CocaError(f"duplicate label '{same[0]}'{clash}: labels must be unique")
    return names


def _quoted(names: list[str]) -> str:
    """'a', 'b' and 'c'; names that print alike (another unicode form) are spelled out as escapes."""
    looks = [unicodedata.normalize("NFC", name) for name in names]
    shown = [ascii(name) if looks.count(look) > 1 else f"'{name}'" for name, look in zip(names, looks)]
    return ", ".join(shown[:-1]) + " and " + shown[-1]


def build_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[str] = (DEFAULT_TEMPLATE,),
                     batch_size: int = 256) -> torch.Tensor:
    """[embed_dim, classes] weights, laid out as open_clip's, so logits are ``features @ weights``.

    Build it once and reuse it for every image: it costs classes × templates text encodings.
    """
    classnames = check_classnames(classnames)
    if not templates:
        raise CocaError("no prompt templates")
    prompts = [fill(template, name) for name in classnames for template in templates]
    per_prompt = embed_texts(model, tokenizer, prompts, batch_size)
    per_class = per_prompt.reshape(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).T


def classify(model, image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """[images, classes] probabilities, scaled by the model's learned ``logit_scale.exp()``."""
    return (logit_scale(model) * image_features @ classifier).softmax(dim=-1)


def top_labels(probs: torch.Tensor, labels: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """Per image, the ``k`` most probable (label, probability) pairs, most probable first."""
    top = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[(labels[i], p) for i, p in zip(idx.tolist(), val.tolist())] for val, idx in zip(top.values, top.indices)]


@dataclass
class Classification:
    """One image's most probable labels, as JSON (one object) or as table rows (one per label)."""

    image: str
    labels: list[tuple[str, float]]  # (label, probability), most probable first

    COLUMNS = ("image", "rank", "label", "probability")

    def to_json(self) -> dict:
        return {"image": self.image, "predictions": [{"label": label, "probability": p} for label, p in self.labels]}

    def rows(self) -> list[tuple]:
        return [(self.image, rank, label, p) for rank, (label, p) in enumerate(self.labels, start=1)]


def zeroshot_accuracy(logits: torch.Tensor, targets: torch.Tensor,
                      ks: Sequence[int] = (1, 5)) -> dict[str, Optional[float]]:
    """Top-k accuracy under CLIP_benchmark's names (``top1_zeroshot_accuracy``, ...).

    An image counts when its class is among the k highest scores. With fewer than k classes
    top-k is not defined and is None (rather than a meaningless 100%).
    """
    metrics: dict[str, Optional[float]] = {}
    for k in ks:
        if k > logits.shape[1]:
            metrics[f"top{k}_zeroshot_accuracy"] = None
            continue
        best = logits.topk(k, dim=1).indices
        metrics[f"top{k}_zeroshot_accuracy"] = (best == targets[:, None]).any(dim=1).double().mean().item()
    return metrics


@dataclass
class ImageFolder:
    """A classification set laid out as torchvision's ImageFolder: ``ROOT/<class>/**/<image>``."""

    root: Path
    classnames: list[str]
    paths: list[Path]
    targets: list[int]

    def targets_of(self, paths: Sequence[Path]) -> torch.Tensor:
        """The class indices of ``paths`` (e.g. those that loaded), in their order."""
        target = dict(zip(self.paths, self.targets))
        return torch.tensor([target[p] for p in paths], dtype=torch.long)


def read_image_folder(root: Path) -> ImageFolder:
    """Classes are the subfolders in sorted order, named after them with underscores read as spaces.

    Hidden folders and images lying directly in ROOT belong to no class and are left out.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CocaError(f"no such folder: {root}")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise CocaError(f"no class folders in {root} (expected one subfolder of images per class)")
    index = {name: i for i, name in enumerate(folders)}
    paths, targets = [], []
    for path in collect_images([str(root)]):
        parts = path.relative_to(root).parts
        if len(parts) > 1 and parts[0] in index:
            paths.append(path)
            targets.append(index[parts[0]])
    if not paths:
        raise CocaError(f"no images found in the class folders of {root}")
    classnames = check_classnames([name.replace("_", " ") for name in folders])
    return ImageFolder(root, classnames, paths, targets)
