"""Prompt templates for zero-shot classification, and the small text-file reader they share.

A template is a format string in which ``{}`` (or ``{c}``, CLIP_benchmark's spelling) stands for
the class name. ``default`` is CLIP's single prompt; ``imagenet`` is the 80-prompt ensemble from
OpenAI's CLIP notebook (Prompt_Engineering_for_ImageNet.ipynb), the same prompts, in the same
order, as open_clip's ``OPENAI_IMAGENET_TEMPLATES`` (stored there as lambdas).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import CocaError, reading

DEFAULT_TEMPLATE = "a photo of a {}."

OPENAI_IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

TEMPLATE_SETS = {"default": (DEFAULT_TEMPLATE,), "imagenet": OPENAI_IMAGENET_TEMPLATES}


def fill(template: str, classname: str) -> str:
    """The prompt for one class; both ``{}`` and ``{c}`` placeholders are accepted."""
    return template.format(classname, c=classname)


def load_templates(spec: Optional[str] = None) -> tuple[str, ...]:
    """A named set (``default``, ``imagenet``) or a UTF-8 file with one template a line."""
    spec = spec or "default"
    if spec in TEMPLATE_SETS:
        return TEMPLATE_SETS[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise CocaError(f"unknown templates '{spec}': use default, imagenet or a file with one template a line")
    templates = tuple(read_lines(path, "templates file"))
    for template in templates:
        _check_template(template, path)
    return templates


def _check_template(template: str, source: Path) -> None:
    """A template without a placeholder would give every class the same prompt."""
    try:
        differs = fill(template, "x") != fill(template, "y")
    except (IndexError, KeyError, ValueError):
        differs = False
    if not differs:
        raise CocaError(f"template '{template}' in {source} needs one {{}} where the class name goes")


def read_lines(path: Path, what: str) -> list[str]:
    """Stripped non-blank lines of a UTF-8 text file (labels, templates, captions)."""
    with reading(path, what):
        text = Path(path).expanduser().read_text(encoding="utf-8-sig")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise CocaError(f"{what} {path} is empty")
    return lines
