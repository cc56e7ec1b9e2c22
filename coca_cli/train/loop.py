"""Training and fine-tuning CoCa: optimizer, schedule, the step, checkpoints, validation, export.

One process or many (``torch.distributed``, launched by ``coca train --gpus N``, torchrun or
SLURM). The run folder ``--output DIR`` holds::

    DIR/train_config.json       the settings of the run
    DIR/metrics.jsonl           one JSON object per logged step and per validation
    DIR/checkpoints/step_*.pt   model (and its config), optimizer, scaler, schedule, step, RNG and
                                data position; also usable as --pretrained
    DIR/final/                  model.safetensors + config.json, what every --pretrained accepts

Distributed equivalence. With the same global batch, the update of W processes equals that
of one process on the whole batch when the gradient DDP averages is W times each rank's share
of the gradient of the *global* loss. For the two losses:

* caption: each rank sums its tokens' cross-entropy and divides by (global token count / W),
  so the average over ranks is the global token mean, and so is its gradient. (open_clip
  averages per-rank means: a token on a rank holding fewer tokens counts for more.)
* contrastive, ``gather_with_grad``: the gather's backward sums all ranks' gradients for
  this rank's features, so every rank holds the gradient of the global loss: exact, with
  ``local_loss`` on or off (with ``local_loss`` each rank's loss is its rows' share).
* contrastive, neither flag: every rank computes the full global loss but gradient flows only
  through its own features, i.e. one W-th of what the average needs; the features' gradient
  is scaled by W (``contrastive_features``), which makes it exact at no cost. open_clip does
  not, so there the contrastive gradient reaching the towers shrinks with the number of GPUs
  (``logit_scale`` excepted).
* contrastive, ``local_loss`` without ``gather_with_grad``: an approximation by construction
  (as in open_clip): the gradient through the other ranks' copies of this rank's features is
  never computed. Losses, the caption-only decoder and ``logit_scale`` still match after a step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import random
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Column
from rich.text import Text
from torch import nn

from . import distributed as D
from ..weights.checkpoint import TRAINING_CHECKPOINT as CHECKPOINT_FORMAT
from ..weights.checkpoint import atomic_write, save_native
from ..data.datasets import Batch, DataConfig, TrainData, describe_skipped, eval_batches
from ..errors import CocaError
from .loss import CoCaLoss

PRECISIONS = ("auto", "amp", "amp_bf16", "bf16", "fp32")
REPORTERS = ("tensorboard", "wandb")
CHECKPOINTS = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^step_(\d+)\.pt$")


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
        if self.lr <= 0 or self.eps <= 0 or self.wd < 0:
            raise CocaError("--lr and --eps must be positive, --wd not negative")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise CocaError("--beta1 and --beta2 must lie in [0, 1)")
        if self.coca_caption_loss_weight < 0 or self.coca_contrastive_loss_weight < 0:
            raise CocaError("loss weights must not be negative")
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
    """Cheap checks of the settings, model name and data, before any process is started."""
    from ..model.config import get_model_config
    from ..data.datasets import dataset_kind, read_table, resolve_shards, shard_sizes

    cfg.check()
    check_reporters(cfg.report_to)
    if cfg.model:
        get_model_config(cfg.model)
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


# -- optimisation ---------------------------------------------------------------------------------

def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases, the logit scale/bias and embeddings are not decayed."""
    leaf = name.rsplit(".", 1)[-1]
    return (param.ndim < 2 or leaf == "bias" or "ln_" in name or "norm" in name or leaf in ("logit_scale", "logit_bias")
            or "embedding" in name or leaf == "cls_emb")


def param_groups(model: nn.Module, wd: float) -> list[dict]:
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if no_weight_decay(name, param) else decay).append(param)
    return [{"params": plain, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused where this torch supports it for the device and dtype (several times faster)."""
    groups = param_groups(model, cfg.wd)
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs)


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """open_clip's schedule: linear warmup over ``warmup`` steps, then a cosine to zero at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = total - warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / span)) * base_lr if span > 0 else base_lr


def fitting_warmup(warmup: int, total_steps: int) -> int:
    """``warmup`` if the run is longer, else 10% of the steps: a warmup as long as the run would
    keep the learning rate far below its peak throughout (a fine-tune of 8 steps, warmup 1000)."""
    return warmup if warmup < total_steps else max(1, round(total_steps / 10))


def lock_image_tower(visual: nn.Module, unlocked_groups: int = 0) -> None:
    """Freeze the image tower (LiT), leaving the last ``unlocked_groups`` groups trainable:
    stem, each block, last block + pooling head, projection."""
    for p in visual.parameters():
        p.requires_grad = False
    if not unlocked_groups:
        return
    head = [m for m in (getattr(visual, "attn_pool", None), getattr(visual, "ln_post", None)) if m is not None]
    groups = [[visual.conv1, visual.class_embedding, visual.positional_embedding, visual.ln_pre],
              *[[b] for b in visual.transformer.resblocks[:-1]],
              [visual.transformer.resblocks[-1], *head], [visual.proj]]
    _unlock(groups[-unlocked_groups:])


def lock_text_tower(text: nn.Module, unlocked_layers: int = 0) -> None:
    """Freeze the unimodal text tower, leaving the last ``unlocked_layers`` groups trainable:
    embeddings, each block, last block + final norm, projection (open_clip's groups)."""
    for p in text.parameters():
        p.requires_grad = False
    if not unlocked_layers:
        return
    if not hasattr(text, "transformer") or not hasattr(text.transformer, "resblocks"):
        raise CocaError("--lock-text-unlocked-layers needs the built-in text tower")
    blocks = list(text.transformer.resblocks)
    groups = [[text.token_embedding, text.positional_embedding, text.cls_emb],
              *[[b] for b in blocks[:-1]], [blocks[-1], text.ln_final], [text.text_projection]]
    _unlock(groups[-unlocked_layers:])


def _unlock(groups) -> None:
    for group in groups:
        for item in group:
            if isinstance(item, nn.Parameter):
                item.requires_grad = True
            elif isinstance(item, nn.Module):
                for p in item.parameters():
                    p.requires_grad = True


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def contrastive_features(image_features, text_features, world_size: int, local_loss: bool, gather_with_grad: bool):
    """Scale the features' gradient by W where only this rank's features carry gradient into a
    loss every rank computes in full (neither flag): DDP's average then equals the gradient of
    the global loss (see the module docstring)."""
    if world_size > 1 and not local_loss and not gather_with_grad:
        return _ScaleGrad.apply(image_features, world_size), _ScaleGrad.apply(text_features, world_size)
    return image_features, text_features


# -- checkpoints ----------------------------------------------------------------------------------

def checkpoint_dir(output: str | Path) -> Path:
    return Path(output) / CHECKPOINTS


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``folder``, oldest first (temp files ignored)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_NAME.match(p.name))]
    return sorted(found)


def find_checkpoint(resume: str, output: str | Path) -> Optional[Path]:
    """``latest`` (None when the run has none yet), a run folder or a checkpoint file."""
    if resume == "latest":
        found = list_checkpoints(checkpoint_dir(output))
        return found[-1][1] if found else None
    path = Path(resume).expanduser()
    if path.is_dir():
        found = list_checkpoints(path) or list_checkpoints(path / CHECKPOINTS)
        if not found:
            raise CocaError(f"no checkpoints in {path}")
        return found[-1][1]
    if not path.is_file():
        raise CocaError(f"checkpoint not found: {resume}")
    return path


def save_checkpoint(path: Path, state: dict) -> None:
    """Written to a temporary file and renamed: a crash never leaves a half-written checkpoint."""
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except OSError as err:
        raise CocaError(f"cannot write checkpoint {path}: {err}", exit_code=1) from None


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unreadable for any reason: one line
        raise CocaError(f"cannot read checkpoint {path}: {str(err).splitlines()[0] if str(err) else err}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CocaError(f"{path} is not a coca training checkpoint")
    return state


def prune_checkpoints(folder: Path, keep: int) -> None:
    for _, path in list_checkpoints(folder)[:-keep]:
        path.unlink(missing_ok=True)


def rng_state() -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))


# -- reporting ------------------------------------------------------------------------------------

class Metrics:
    """``metrics.jsonl`` plus TensorBoard / W&B when asked for (master process only)."""

    def __init__(self, output: Path, cfg: TrainConfig, enabled: bool, resumed_step: Optional[int]):
        self.path = output / "metrics.jsonl"
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        if resumed_step is not None and self.path.exists():
            self._truncate(resumed_step)  # drop what a killed run logged after its last checkpoint
        names = reporters(cfg.report_to)
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output / "tensorboard"))
        if "wandb" in names:
            import wandb

            self.wandb = wandb
            wandb.init(project=cfg.wandb_project, name=output.name, dir=str(output),
                       config=dataclasses.asdict(cfg), resume="allow")

    def _truncate(self, step: int) -> None:
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line cut off by the kill
        text = "".join(line + "\n" for line in kept)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        prefix = "val/" if record.get("split") == "val" else "train/"
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(prefix + key, value, record["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({prefix + k: v for k, v in scalars.items()}, step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


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


class Progress:
    """Training progress on stderr, step/total and ETA first.

    On a terminal: a live bar whose step count and ETA keep their width at any terminal size
    (the losses after them are cut to fit). Otherwise (a log file, a pipe): a plain line at every
    logged step, and at least every ``plain_every_s`` seconds so a slow run never goes quiet.
    """

    plain_every_s = 30.0

    def __init__(self, console, total: int, enabled: bool, start_step: int = 0):
        self.console, self.total, self.start_step = console, total, start_step
        self.enabled = enabled and console is not None
        self.live = None
        self.started = self.last_line = time.monotonic()
        if self.enabled and console.is_terminal:
            def fixed():
                return Column(no_wrap=True)  # never squeezed: only the free-text column gives way

            self.live = RichProgress(TextColumn("training", table_column=fixed()),
                                     BarColumn(bar_width=20, table_column=fixed()),
                                     MofNCompleteColumn(table_column=fixed()),
                                     TimeRemainingColumn(table_column=fixed()), _CutToFit(),
                                     console=console, transient=False)
            self.task = self.live.add_task("train", total=total, info="")
            self.live.start()

    def update(self, step: int, record: Optional[dict], text: str) -> None:
        if not self.enabled:
            return
        if self.live is not None:
            self.live.update(self.task, completed=step, info=text)
        elif record is not None or time.monotonic() - self.last_line >= self.plain_every_s:
            self.console.print(f"step {step}/{self.total}  ETA {self.eta(step)}  {text}", markup=False,
                               highlight=False, soft_wrap=True)
            self.last_line = time.monotonic()

    def eta(self, step: int) -> str:
        """H:MM:SS left at the mean pace of the steps done since this run (or resumption) began."""
        done = step - self.start_step
        if done <= 0:
            return "-:--:--"
        seconds = (time.monotonic() - self.started) / done * (self.total - step)
        return str(datetime.timedelta(seconds=round(seconds)))

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


class _CutToFit(ProgressColumn):
    """The task's ``info`` on one line, cut with an ellipsis where the terminal ends."""

    def render(self, task):
        return Text(task.fields["info"], no_wrap=True, overflow="ellipsis")


class StopSignal:
    """SIGTERM (preemption) or a first Ctrl-C ask for a checkpoint and a clean stop."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.previous: dict = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, _frame):
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# -- the trainer ----------------------------------------------------------------------------------

def _tokenizer_for(config):
    if config.text_cfg.hf_tokenizer_name:
        from ..model.hf_text import HFTokenizer

        return HFTokenizer(config.text_cfg.hf_tokenizer_name, config.text_cfg.context_length)
    from ..data.tokenizer import Tokenizer

    return Tokenizer(context_length=config.text_cfg.context_length)


def default_output(model: Optional[str]) -> str:
    stem = Path(model).stem if model else "coca"
    return str(Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}")


class Trainer:
    def __init__(self, cfg: TrainConfig, world: D.World, console=None):
        from ..weights.factory import create_model, preprocess_config
        from ..data.transforms import image_transform

        self.cfg, self.world, self.console = cfg, world, console
        self.output = Path(cfg.output)
        self.device = world.device
        precision = cfg.precision if cfg.precision != "auto" else ("amp" if self.device.type == "cuda" else "fp32")
        self.precision = precision
        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.model = create_model(cfg.model, cfg.pretrained, precision="bf16" if precision == "bf16" else "fp32",
                                  device=self.device).train()
        self.config = self.model.config
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if cfg.lock_image:
            lock_image_tower(self.model.visual, cfg.lock_image_unlocked_groups)
        if cfg.lock_text:
            lock_text_tower(self.model.text, cfg.lock_text_unlocked_layers)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise CocaError("every parameter is locked: nothing to train")
        self.tokenizer = _tokenizer_for(self.config)
        pp = preprocess_config(self.model)
        self.train_transform = image_transform(pp.size, is_train=True, mean=pp.mean, std=pp.std)
        self.val_transform = image_transform(pp.size, is_train=False, mean=pp.mean, std=pp.std,
                                             interpolation=pp.interpolation, resize_mode=pp.resize_mode)
        self.data = TrainData(cfg.data_config(), self.train_transform, self.tokenizer, world.rank, world.world_size,
                              cfg.accum_freq, pin_memory=self.device.type == "cuda")
        self.total_steps = self.data.steps_per_epoch * cfg.epochs
        self.warmup = fitting_warmup(cfg.warmup, self.total_steps)
        self.loss = CoCaLoss(cfg.coca_caption_loss_weight, cfg.coca_contrastive_loss_weight,
                             pad_id=self.model.pad_id, local_loss=cfg.local_loss,
                             gather_with_grad=cfg.gather_with_grad, cache_labels=True, rank=world.rank,
                             world_size=world.world_size)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "amp")
        self.autocast_dtype = {"amp": torch.float16, "amp_bf16": torch.bfloat16}.get(precision)
        self.input_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.ddp = None
        if world.distributed:
            unused = cfg.coca_contrastive_loss_weight == 0 or cfg.coca_caption_loss_weight == 0
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=unused)
        self.step = 0  # steps done (one step: accum_freq micro-batches, one optimizer update)
        self.skipped: Counter = Counter()  # this rank's skipped samples, by reason
        self.skipped_total = 0  # all ranks'
        self.nonfinite_skipped = 0
        self.last_saved = -1

    # -- one optimizer step -------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _losses(self, out: dict, image_features, text_features, caption_tokens: float) -> dict:
        image_features, text_features = contrastive_features(image_features, text_features, self.world.world_size,
                                                             self.cfg.local_loss, self.cfg.gather_with_grad)
        return self.loss(image_features, text_features, out["logits"], out["labels"], out["logit_scale"],
                         output_dict=True, logit_bias=out.get("logit_bias"), caption_tokens=caption_tokens)

    def train_step(self, micro: list[Batch], stop: bool) -> dict:
        """Forward/backward over ``accum_freq`` micro-batches and one optimizer step.

        With accumulation the contrastive loss covers all micro-batches (open_clip's scheme:
        features of the others come from a no-grad pass), so the gradient equals that of one
        batch ``accum_freq`` times larger.
        """
        net = self.ddp or self.model
        images = [b.images.to(self.device, self.input_dtype, non_blocking=True) for b in micro]
        texts = [b.texts.to(self.device, non_blocking=True) for b in micro]
        tokens = torch.tensor([float(sum((t[:, 1:] != self.model.pad_id).sum().item() for t in texts))],
                              device=self.device)
        caption_tokens = max(D.all_reduce_sum(tokens, self.world).item(), 1.0) / self.world.world_size
        cached = None
        if len(micro) > 1 and self.cfg.coca_contrastive_loss_weight:
            with torch.no_grad(), self.autocast():
                outs = [self.model(i, t, caption_tokens_only=True) for i, t in zip(images, texts)]
                cached = ([o["image_features"] for o in outs], [o["text_features"] for o in outs])
        self.optimizer.zero_grad(set_to_none=True)
        result = {"contrastive_loss": 0.0, "caption_loss": 0.0, "nonfinite": False, "stop": False, "skipped": 0}
        world = self.world.world_size
        for j, (image, text) in enumerate(zip(images, texts)):
            last = j == len(micro) - 1
            with contextlib.nullcontext() if (last or self.ddp is None) else self.ddp.no_sync():
                with self.autocast():
                    out = net(image, text, caption_tokens_only=True)
                    image_features, text_features = out["image_features"], out["text_features"]
                    if cached is not None:
                        image_features = torch.cat([*cached[0][:j], image_features, *cached[0][j + 1:]])
                        text_features = torch.cat([*cached[1][:j], text_features, *cached[1][j + 1:]])
                    losses = self._losses(out, image_features, text_features, caption_tokens)
                    total = losses["contrastive_loss"] + losses["caption_loss"]
                # one small all-reduce: logged losses, and decisions every rank must take together
                stats = torch.stack([losses["contrastive_loss"].detach().float(),
                                     losses["caption_loss"].detach().float(),
                                     (~torch.isfinite(total.detach())).float(),
                                     torch.tensor(float(stop), device=self.device),
                                     torch.tensor(float(sum(micro[j].skipped.values())), device=self.device)])
                stats = D.all_reduce_sum(stats, self.world).tolist()
                result["contrastive_loss"] = stats[0] / world  # the same in every pass
                result["caption_loss"] += stats[1] / world
                result["stop"] = result["stop"] or stats[3] > 0
                result["skipped"] += int(stats[4])
                if stats[2] > 0:
                    result["nonfinite"] = True
                    break
                self.scaler.scale(total).backward()
        if result["nonfinite"]:
            self.optimizer.zero_grad(set_to_none=True)
            return result
        if self.cfg.grad_clip_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                           self.cfg.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        return result

    # -- checkpoints --------------------------------------------------------------------------
    def state(self, epoch: int, step_in_epoch: int) -> dict:
        """The checkpoint; a collective call (every rank contributes its RNG and data position)."""
        ranks = D.all_gather_object({"rng": rng_state(), "data": self.data.state, "skipped": dict(self.skipped)},
                                    self.world)
        return {"format": CHECKPOINT_FORMAT, "version": 1, "step": self.step, "epoch": epoch,
                "step_in_epoch": step_in_epoch, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "scheduler": {"kind": "cosine", "base_lr": self.cfg.lr, "warmup": self.warmup,
                              "total_steps": self.total_steps},
                "rng": [r["rng"] for r in ranks], "data": [r["data"] for r in ranks],
                "world_size": self.world.world_size, "steps_per_epoch": self.data.steps_per_epoch,
                "model_config": self.config.to_dict(), "skipped": [r["skipped"] for r in ranks],
                "skipped_total": self.skipped_total, "nonfinite_skipped": self.nonfinite_skipped}

    def save(self, epoch: int, step_in_epoch: int) -> Optional[Path]:
        if self.last_saved == self.step:
            return None
        state = self.state(epoch, step_in_epoch)
        path = checkpoint_dir(self.output) / f"step_{self.step:09d}.pt"
        if self.world.is_master:
            save_checkpoint(path, state)
            prune_checkpoints(path.parent, self.cfg.keep)
        D.barrier(self.world)
        self.last_saved = self.step
        return path

    def restore(self, path: Path) -> tuple[int, int, Optional[dict]]:
        """Load a checkpoint; returns (epoch, step in epoch, this rank's data position)."""
        state = load_checkpoint(path)
        if state["model_config"] != self.config.to_dict():
            raise CocaError(f"checkpoint {path} was made for another model config than --model {self.cfg.model}")
        self.model.load_state_dict(state["model"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as err:
            raise CocaError(f"checkpoint {path} does not fit the optimizer (were --lock-* flags changed?): "
                            f"{err}") from None
        self.scaler.load_state_dict(state["scaler"])
        self.step = self.last_saved = int(state["step"])
        self.skipped_total = int(state["skipped_total"])
        self.nonfinite_skipped = int(state["nonfinite_skipped"])
        same_layout = (state["world_size"] == self.world.world_size
                       and state["steps_per_epoch"] == self.data.steps_per_epoch)
        if same_layout:
            set_rng_state(state["rng"][self.world.rank])
            data_state = state["data"][self.world.rank]
            self.skipped = Counter(state["skipped"][self.world.rank])
        else:
            seed_everything(self.cfg.seed + self.world.rank + self.step)
            data_state = None
            self._print("note: the number of processes or the epoch length changed since the checkpoint; "
                        "the data position and random state are approximated")
        epoch, in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        if not same_layout:  # recompute the position from the global step
            epoch, in_epoch = divmod(self.step, self.data.steps_per_epoch)
        return epoch, in_epoch, data_state

    # -- validation ---------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        """Val losses, retrieval recall@1/5 both ways and three sample captions (master only)."""
        from ..model.generation import generate, max_decode_length
        from ..data.tokenizer import decode

        model, cfg = self.model, self.cfg
        model.eval()
        image_feats, text_feats, pictures, contrastive, caption_sum, tokens, n = [], [], [], 0.0, 0.0, 0, 0
        samples: list[dict] = []
        skipped: Counter = Counter()
        single = CoCaLoss(1.0, 1.0, pad_id=model.pad_id)
        for batch in eval_batches(cfg.val_data, cfg.data_config(), self.val_transform, self.tokenizer,
                                  cfg.val_num_samples, cfg.batch_size):
            skipped.update(batch.skipped)
            pictures += [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in batch.images]
            images = batch.images.to(self.device, self.input_dtype)
            texts = batch.texts.to(self.device)
            with self.autocast():
                out = model(images, texts, caption_tokens_only=True)
            labels = out["labels"]
            caption_sum += F.cross_entropy(out["logits"].float().permute(0, 2, 1), labels,
                                           ignore_index=model.pad_id, reduction="sum").item()
            tokens += int((labels != model.pad_id).sum())
            contrastive += single(out["image_features"].float(), out["text_features"].float(), out["logits"], labels,
                                  out["logit_scale"].float(), output_dict=True)["contrastive_loss"].item() * len(texts)
            n += len(texts)
            image_feats.append(out["image_features"].float().cpu())
            text_feats.append(out["text_features"].float().cpu())
            if len(samples) < 3:
                take = min(3 - len(samples), len(texts))
                seq_len = min(30, max_decode_length(model) + 1)
                ids = generate(model, images[:take], generation_type="top_k", top_k=1, seq_len=seq_len,
                               min_seq_len=min(5, seq_len - 1))
                samples += [{"caption": decode(i), "reference": decode(r)} for i, r in zip(ids.tolist(),
                                                                                           texts[:take].tolist())]
        model.train()
        if n == 0:
            raise CocaError(f"no usable samples in --val-data {cfg.val_data} ({describe_skipped(skipped)})")
        metrics = {"val_contrastive_loss": contrastive / n, "val_caption_loss": caption_sum / max(tokens, 1),
                   **validation_recall(torch.cat(image_feats), torch.cat(text_feats), pictures), "val_samples": n,
                   "captions": samples}
        if skipped:
            metrics["val_skipped"] = sum(skipped.values())
        return metrics

    # -- the loop -----------------------------------------------------------------------------
    def _print(self, text: str) -> None:
        if self.world.is_master and self.console is not None:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def run(self) -> Path:
        cfg, world = self.cfg, self.world
        resume_from = find_checkpoint(cfg.resume, self.output) if cfg.resume else None
        if resume_from is None and list_checkpoints(checkpoint_dir(self.output)):  # not --resume
            raise CocaError(f"{self.output} already holds checkpoints: pass --resume latest to continue the run, "
                            "or choose another --output")
        epoch, in_epoch, data_state = 0, 0, None
        if resume_from is not None:
            epoch, in_epoch, data_state = self.restore(resume_from)
            self._print(f"resumed from {resume_from} (step {self.step})")
        elif cfg.resume == "latest":
            self._print(f"no checkpoint in {checkpoint_dir(self.output)} yet: starting from scratch")
        if resume_from is None:
            seed_everything(cfg.seed + world.rank)  # ranks draw different random numbers from here on
        if world.is_master:
            self.output.mkdir(parents=True, exist_ok=True)
            text = json.dumps(dataclasses.asdict(cfg), indent=2) + "\n"
            atomic_write(self.output / "train_config.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        if self.warmup != cfg.warmup:
            self._print(f"warning: --warmup {cfg.warmup} is not shorter than this run ({self.total_steps} steps): "
                        f"the learning rate would stay far below --lr; warming up over {self.warmup} "
                        f"step{'s' if self.warmup > 1 else ''} instead (10% of the run)")
        metrics = Metrics(self.output, cfg, world.is_master, self.step if resume_from else None)
        progress = Progress(self.console, self.total_steps, world.is_master, start_step=self.step)
        global_batch = cfg.batch_size * world.world_size * cfg.accum_freq
        try:
            with StopSignal() as stop:
                self._loop(epoch, in_epoch, data_state, stop, metrics, progress, global_batch)
        finally:
            progress.close()
            metrics.close()
        skipped = sum(map(Counter, D.all_gather_object(dict(self.skipped), world)), Counter())
        if world.is_master:
            final = self.output / "final"
            save_native(_float_copy(self.model), self.config, final)
            if skipped:
                self._print(f"skipped samples: {describe_skipped(skipped)}")
            skipped_steps = f" ({self.nonfinite_skipped} skipped: non-finite loss)" if self.nonfinite_skipped else ""
            self._print(f"done: {self.step} steps{skipped_steps}; final model in {final} "
                        f"(use it as --pretrained {final})")
        D.barrier(world)
        return self.output / "final"

    def _loop(self, epoch, in_epoch, data_state, stop, metrics, progress, global_batch):
        cfg, spe = self.cfg, self.data.steps_per_epoch
        window_start, window_samples, data_wait, rate = time.perf_counter(), 0, 0.0, ""
        while epoch < cfg.epochs:
            batches = self.data.epoch(epoch, in_epoch, data_state)
            data_state = None
            while in_epoch < spe:
                fetch = time.perf_counter()
                micro = [next(batches) for _ in range(cfg.accum_freq)]
                data_wait += time.perf_counter() - fetch  # a starved loop waits here
                for b in micro:
                    self.skipped.update(b.skipped)
                lr = cosine_lr(self.step, cfg.lr, self.warmup, self.total_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                result = self.train_step(micro, stop.signum is not None)
                self.skipped_total += result["skipped"]
                if result["nonfinite"]:
                    if not cfg.skip_nonfinite:
                        last = list_checkpoints(checkpoint_dir(self.output))
                        where = f"; the last good checkpoint is {last[-1][1]}" if last else ""
                        raise CocaError(f"non-finite loss at step {self.step + 1} (contrastive "
                                        f"{result['contrastive_loss']:.4g}, caption {result['caption_loss']:.4g})"
                                        f"{where}; lower --lr, or pass --skip-nonfinite", exit_code=1)
                    self.nonfinite_skipped += 1
                    progress.print(f"skipped step {self.step + 1}: non-finite loss (weights not updated)")
                self.step += 1  # counts batches consumed: the schedule and data position stay in step
                in_epoch += 1
                window_samples += global_batch
                log_now = self.step % cfg.log_every_n_steps == 0 or in_epoch == spe
                record = None
                if log_now and not result["nonfinite"]:
                    elapsed = time.perf_counter() - window_start
                    record = {"step": self.step, "epoch": epoch + in_epoch / spe, "lr": lr,
                              "contrastive_loss": result["contrastive_loss"], "caption_loss": result["caption_loss"],
                              "loss": result["contrastive_loss"] + result["caption_loss"],
                              "samples_per_s": window_samples / max(elapsed, 1e-9),
                              "data_wait": data_wait / max(elapsed, 1e-9),
                              "samples": self.step * global_batch, "skipped": self.skipped_total}
                    if self.nonfinite_skipped:
                        record["nonfinite_skipped"] = self.nonfinite_skipped
                    metrics.log(record)
                    window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
                if record is not None:
                    rate = f"  {record['samples_per_s']:.1f} samples/s  data wait {record['data_wait']:.0%}"
                progress.update(self.step, record, f"epoch {epoch}  contrastive {result['contrastive_loss']:.4f}  "
                                f"caption {result['caption_loss']:.4f}  lr {lr:.3g}{rate}")
                if result["stop"]:
                    self._stop(epoch, in_epoch, stop.signum)
                if cfg.save_every_n_steps and self.step % cfg.save_every_n_steps == 0 and in_epoch < spe:
                    self.save(epoch, in_epoch)
            batches.close()
            epoch, in_epoch = epoch + 1, 0
            if cfg.val_data:
                if self.world.is_master:
                    record = {"step": self.step, "epoch": epoch, "split": "val", **self.validate()}
                    metrics.log(record)
                    progress.print(_describe_val(record))
                D.barrier(self.world)
            self.save(epoch, 0)

    def _stop(self, epoch: int, in_epoch: int, signum: Optional[int]):
        spe = self.data.steps_per_epoch
        path = self.save(*((epoch + 1, 0) if in_epoch == spe else (epoch, in_epoch)))
        path = path or list_checkpoints(checkpoint_dir(self.output))[-1][1]
        name = "SIGTERM" if signum == signal.SIGTERM else "interrupt"
        raise CocaError(f"stopped by {name} after step {self.step}: checkpoint {path} saved; continue with "
                        f"--resume latest, or use it as --pretrained {path}",
                        exit_code=130 if signum == signal.SIGINT else 143)


def validation_recall(image_features: torch.Tensor, text_features: torch.Tensor, pictures: list[str],
                      ks=(1, 5)) -> dict:
    """Recall@k of the validation pairs by the definition ``coca eval retrieval`` uses
    (:func:`coca_cli.tasks.retrieval.retrieval_recall`, CLIP_benchmark's): rows showing the same picture
    (``pictures`` identifies it; a table lists an image once per caption) are one image, found
    image→text when any of its captions is among its k best."""
    from ..tasks.retrieval import retrieval_recall

    first_row: dict[str, int] = {}
    for row, picture in enumerate(pictures):
        first_row.setdefault(picture, row)
    image_of = {picture: i for i, picture in enumerate(first_row)}
    scores = text_features @ image_features[list(first_row.values())].T
    recall = retrieval_recall(scores, [image_of[p] for p in pictures], ks)
    return {f"{ours}_R@{k}": recall[f"{theirs}_recall@{k}"] for ours, theirs in
            (("image_to_text", "text_retrieval"), ("text_to_image", "image_retrieval")) for k in ks}


def _describe_val(record: dict) -> str:
    text = (f"validation after epoch {record['epoch']}: contrastive {record['val_contrastive_loss']:.4f}  caption "
            f"{record['val_caption_loss']:.4f}  image->text R@1 {record['image_to_text_R@1']:.3f} R@5 "
            f"{record['image_to_text_R@5']:.3f}  text->image R@1 {record['text_to_image_R@1']:.3f} R@5 "
            f"{record['text_to_image_R@5']:.3f}")
    for sample in record["captions"]:
        text += f"\n  '{sample['caption']}'  (reference: '{sample['reference']}')"
    return text


class _StateOnly:
    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def _float_copy(model: nn.Module):
    """The export is float32 whatever the training precision."""
    if all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point()):
        return model
    return _StateOnly({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()})


def train(cfg: TrainConfig, console=None) -> Path:
    """Run (or continue) training in this process; joins the process group when launched by
    torchrun/SLURM. Returns the final export folder."""
    cfg.check()
    check_reporters(cfg.report_to)
    world = D.init(cfg.device)
    if cfg.workers is None:
        cfg.workers = D.default_workers()
    try:
        cfg.output = D.broadcast_object(cfg.output or default_output(cfg.model), world)
        return Trainer(cfg, world, console).run()
    finally:
        D.cleanup(world)
