"""The settings of a training run and the cheap checks made before any process starts."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..data.datasets import DataConfig
from ..errors import CocaError
from ..model import generation
from .checkpoints import find_checkpoint

PRECISIONS = ("auto", "amp", "amp_bf16", "bf16", "fp32")
REPORTERS = ("tensorboard", "wandb")

# Where each float setting must lie. All must be finite and within float32, the weights' precision,
# where --lr 1e39 is already inf: an inf or NaN setting only ever trains a model of NaNs.
_RANGES = {"> 0": lambda v: 0 < v <= generation.FLOAT32_MAX, ">= 0": lambda v: 0 <= v <= generation.FLOAT32_MAX,
           "in [0, 1)": lambda v: 0 <= v < 1}
FLOAT_RANGES = {"lr": "> 0", "eps": "> 0", "grad_clip_norm": "> 0", "wd": ">= 0", "beta1": "in [0, 1)",
                "beta2": "in [0, 1)", "coca_caption_loss_weight": ">= 0", "coca_contrastive_loss_weight": ">= 0"}


@dataclass
class TrainConfig:
    """Everything a run depends on; the CLI options map one to one onto these fields."""

    data: str
    output: Optional[str] = None
    model: Optional[str] = "coca_ViT-B-32"
    pretrained: Optional[str] = None
    val_data: Optional[str] = None
    dataset_type: str = "auto"
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: Optional[str] = None
    train_num_samples: Optional[int] = None
    val_num_samples: Optional[int] = None
    dataset_resampled: bool = False
    shuffle_buffer: int = 1000
    workers: Optional[int] = None  # None: distributed.default_workers()
    batch_size: int = 64
    epochs: int = 32
    lr: float = 5e-4
    wd: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: int = 10000
    grad_clip_norm: Optional[float] = None
    precision: str = "auto"
    grad_checkpointing: bool = False
    compile: bool = False
    gpu_decode: bool = False  # decode training JPEGs on the GPU (CUDA only; else a warning, CPU decoding)
    accum_freq: int = 1
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    coca_caption_loss_weight: float = 2.0
    coca_contrastive_loss_weight: float = 1.0
    local_loss: bool = False
    gather_with_grad: bool = False
    seed: int = 0
    device: str = "auto"
    save_every_n_steps: int = 0
    keep: int = 3
    resume: Optional[str] = None
    log_every_n_steps: int = 10
    report_to: str = ""
    wandb_project: str = "coca"
    skip_nonfinite: bool = False

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise CocaError(f"unknown precision '{self.precision}' (choose from {', '.join(PRECISIONS)})")
        for name in ("batch_size", "epochs", "accum_freq", "keep", "log_every_n_steps"):
            if getattr(self, name) < 1:
                raise CocaError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("warmup", "save_every_n_steps", "workers", "lock_image_unlocked_groups",
                     "lock_text_unlocked_layers"):
            if (getattr(self, name) or 0) < 0:
                raise CocaError(f"--{name.replace('_', '-')} must not be negative")
        for name, bound in FLOAT_RANGES.items():
            value = getattr(self, name)
            if value is not None and not _RANGES[bound](value):
                raise CocaError(f"--{name.replace('_', '-')} must be a finite number {bound}, not {value}")
        if self.coca_caption_loss_weight == 0 and self.coca_contrastive_loss_weight == 0:
            raise CocaError("both loss weights are 0: nothing to train")
        unknown = set(reporters(self.report_to)) - set(REPORTERS)
        if unknown:
            raise CocaError(f"unknown --report-to '{', '.join(sorted(unknown))}' (choose from {', '.join(REPORTERS)})")

    def data_config(self) -> DataConfig:
        return DataConfig(self.data, self.dataset_type, self.csv_img_key, self.csv_caption_key, self.csv_separator,
                          self.train_num_samples, self.dataset_resampled, self.workers, self.batch_size, self.seed,
                          self.shuffle_buffer)


def preflight(cfg: TrainConfig) -> None:
    """Checks of the settings, model, weights and data before any process is started, each failing
    in one line here rather than in every process; weights to download are fetched here, once."""
    from ..data.datasets import dataset_kind
    from ..data.shards import resolve_shards, shard_sizes
    from ..data.tables import read_table
    from ..weights.factory import prefetch

    cfg.check()
    check_reporters(cfg.report_to)
    prefetch(cfg.model, cfg.pretrained)
    if cfg.compile:  # the processes use CUDA when there is one (distributed.resolve_device)
        check_compile("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    for spec in filter(None, (cfg.data, cfg.val_data)):
        if dataset_kind(spec, cfg.dataset_type) == "csv":
            read_table(spec, cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_separator)
        else:
            shards = resolve_shards(spec)
            if spec == cfg.data and not (cfg.train_num_samples or shard_sizes(shards)):
                raise CocaError("the number of training samples is unknown: pass --train-num-samples "
                                "(or put a sizes.json beside the shards)")
    if cfg.resume and cfg.resume != "latest":
        find_checkpoint(cfg.resume, cfg.output or ".")


def reporters(report_to: str) -> list[str]:
    return [r.strip() for r in (report_to or "").split(",") if r.strip() and r.strip() != "none"]


def check_reporters(report_to: str) -> None:
    """Fail before training starts when a requested reporter is not installed."""
    for name in reporters(report_to):
        try:
            if name == "tensorboard":
                import torch.utils.tensorboard  # noqa: F401 - needs the tensorboard package
            else:
                import wandb  # noqa: F401
        except ImportError:
            raise CocaError(f"--report-to {name} needs the {name} package: pip install {name}") from None


def check_compile(device_type: str) -> None:
    """--compile fails here, in one line, rather than mid-run when Inductor first needs its compiler."""
    try:
        generation.check_compile(device_type)
    except ValueError as err:
        raise CocaError(f"--{err}") from None


def default_output(model: Optional[str]) -> str:
    stem = Path(model).stem if model else "coca"
    return str(Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}")
