"""Training and fine-tuning CoCa: the Trainer, one optimizer step, the epochs around it, the export.

One process or many (``torch.distributed``, launched by ``coca train --gpus N``, torchrun or
SLURM). The run folder ``--output DIR`` holds::

    DIR/train_config.json       the settings of the run
    DIR/metrics.jsonl           one JSON object per logged step and per validation
    DIR/checkpoints/step_*.pt   model (and its config), optimizer, scaler, schedule, step, RNG and
                                data position; also usable as --pretrained
    DIR/final/                  model.safetensors + config.json, what every --pretrained accepts

Settings are in ``config``, the optimizer and schedule in ``optim``, the objective (and why W
processes update like one) in ``loss``, the files of a run in ``checkpoints``, what it reports in
``progress``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import distributed as D
from ..data.datasets import Batch, TrainData, describe_skipped
from ..data.transforms import BatchBuffers
from ..errors import CocaError
from ..files import atomic_write, claim_folder
from ..model.config import pair
from ..weights.checkpoint import save_native
from ..weights.convert import nonfinite_tensor
from .checkpoints import (CHECKPOINT_FORMAT, checkpoint_dir, find_checkpoint, float_copy, list_checkpoints,
                          load_checkpoint, prune_checkpoints, rng_state, save_checkpoint, seed_everything,
                          set_rng_state)
from .config import TrainConfig, check_compile, check_reporters, default_output
from .loss import CoCaLoss, contrastive_features
from .optim import cosine_lr, fitting_warmup, freeze_unreached, lock_image_tower, lock_text_tower, make_optimizer
from .progress import Metrics, Progress, StopSignal
from .validation import describe_val, validate


# What a run writes in its folder (the docstring above): a folder holding anything else is not a run folder.
RUN_FOLDER = ("train_config.json", "metrics.jsonl", "checkpoints", "final", "tensorboard", "wandb")


def _tokenizer_for(config):
    if config.text_cfg.hf_tokenizer_name:
        from ..model.hf_text import HFTokenizer

        return HFTokenizer(config.text_cfg.hf_tokenizer_name, config.text_cfg.context_length)
    from ..data.tokenizer import Tokenizer

    return Tokenizer(context_length=config.text_cfg.context_length)


class Trainer:
    """One process's run: model, data, loss and optimizer built from the settings; ``run`` drives
    the epochs, ``train_step`` is one optimizer update."""

    def __init__(self, cfg: TrainConfig, world: D.World, console=None):
        from ..weights.factory import create_model, preprocess_config
        from ..data.transforms import gpu_decoding, image_transform

        self.cfg, self.world, self.console = cfg, world, console
        self.output = Path(cfg.output)
        self.device = world.device
        precision = cfg.precision if cfg.precision != "auto" else ("amp" if self.device.type == "cuda" else "fp32")
        self.precision = precision
        self.input_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
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
        if cfg.gpu_decode:
            self.train_transform, why_not = gpu_decoding(self.train_transform, self.device)
            if why_not:
                self._print(f"warning: {why_not}")
        self.val_transform = image_transform(pp.size, is_train=False, mean=pp.mean, std=pp.std,
                                             interpolation=pp.interpolation, resize_mode=pp.resize_mode)
        self.batch_buffers = BatchBuffers()
        self.data = TrainData(cfg.data_config(), self.train_transform, self.tokenizer, world.rank, world.world_size,
                              cfg.accum_freq, pin_memory=self.device.type == "cuda")
        self.total_steps = self.data.steps_per_epoch * cfg.epochs
        self.warmup = fitting_warmup(cfg.warmup, self.total_steps)
        self.loss = CoCaLoss(cfg.coca_caption_loss_weight, cfg.coca_contrastive_loss_weight,
                             pad_id=self.model.pad_id, local_loss=cfg.local_loss,
                             gather_with_grad=cfg.gather_with_grad, cache_labels=True, rank=world.rank,
                             world_size=world.world_size)
        self.optimizer = make_optimizer(self.model, cfg)
        # after the optimizer, which then holds what it held before (checkpoints of older runs resume)
        freeze_unreached(self.model, self._blank_sample_loss())  # what no weighted loss trains
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "amp")
        self.autocast_dtype = {"amp": torch.float16, "amp_bf16": torch.bfloat16}.get(precision)
        self.ddp = None
        if world.distributed:  # every trainable parameter gets a gradient every step (freeze_unreached)
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # what runs the training forward; --compile wraps it after DDP, as open_clip_train's --torchcompile.
        # self.model stays the eager module: checkpoints keep its keys (no "_orig_mod." prefix).
        self.net = self.ddp or self.model
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.step = 0  # steps done (one step: accum_freq micro-batches, one optimizer update)
        self.skipped: Counter = Counter()  # this rank's skipped samples, by reason
        self.skipped_total = 0  # all ranks'
        self.nonfinite_skipped = 0
        self.last_saved = -1

    def _blank_sample_loss(self) -> torch.Tensor:
        """The weighted training loss of one blank image and caption, in this process alone: which
        parameters it reaches does not depend on the data."""
        height, width = pair(self.model.visual.image_size)
        image = torch.zeros(1, 3, height, width, device=self.device, dtype=self.input_dtype)
        text = self.tokenizer(["a"]).to(self.device)
        out = self.model(image, text, caption_tokens_only=True)
        loss = CoCaLoss(self.cfg.coca_caption_loss_weight, self.cfg.coca_contrastive_loss_weight,
                        pad_id=self.model.pad_id)
        parts = loss(out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"],
                     output_dict=True, logit_bias=out.get("logit_bias"))
        return parts["contrastive_loss"] + parts["caption_loss"]

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
        # the last step's images (and the graph that saved them) went with its locals: their buffers are free
        images = [self.batch_buffers.to(b.images, self.device, self.input_dtype, slot=j, non_blocking=True)
                  for j, b in enumerate(micro)]
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
                    out = self.net(image, text, caption_tokens_only=True)
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
        self.require_finite_weights()
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

    def require_finite_weights(self) -> None:
        """Weights holding NaN or inf are never saved nor exported: every step since the last
        check had a finite loss, so the update of the last step (``self.step``) made them so."""
        damaged = nonfinite_tensor(self.model.state_dict())
        if damaged:
            raise CocaError(f"training diverged at step {self.step}: its update made tensor {damaged} NaN or inf; "
                            f"{self.last_good_checkpoint()}; lower --lr", exit_code=1)

    def last_good_checkpoint(self) -> str:
        """Where to go back to after a divergence (only finite weights are ever saved)."""
        found = list_checkpoints(checkpoint_dir(self.output))
        if not found:
            return "no checkpoint was saved before it"
        return f"the last good checkpoint is {found[-1][1]} (continue from it with --resume {found[-1][1]})"

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
        damaged = nonfinite_tensor(self.model.state_dict())
        if damaged:  # training would only carry the NaNs along
            raise CocaError(f"tensor {damaged} of the starting weights ({resume_from or cfg.pretrained}) holds NaN "
                            "or inf values: they are damaged", exit_code=1)
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
        self.require_finite_weights()
        if world.is_master:
            final = self.output / "final"
            save_native(float_copy(self.model), self.config, final)
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
                        raise CocaError(f"non-finite loss at step {self.step + 1} (contrastive "
                                        f"{result['contrastive_loss']:.4g}, caption {result['caption_loss']:.4g}); "
                                        f"{self.last_good_checkpoint()}; lower --lr, or pass --skip-nonfinite",
                                        exit_code=1)
                    self.require_finite_weights()  # skipping cannot help once the weights themselves are lost
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
                    record = {"step": self.step, "epoch": epoch, "split": "val",
                              **validate(self.model, cfg, self.val_transform, self.tokenizer, self.device,
                                         self.input_dtype, self.autocast)}
                    metrics.log(record)
                    progress.print(describe_val(record))
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


def train(cfg: TrainConfig, console=None) -> Path:
    """Run (or continue) training in this process; joins the process group when launched by
    torchrun/SLURM. Returns the final export folder."""
    cfg.check()
    check_reporters(cfg.report_to)
    world = D.init(cfg.device)
    if cfg.compile:
        check_compile(world.device.type)
    if cfg.workers is None:
        cfg.workers = D.default_workers()
    try:
        cfg.output = D.broadcast_object(cfg.output or default_output(cfg.model), world)
        claim_folder(Path(cfg.output), RUN_FOLDER)
        return Trainer(cfg, world, console).run()
    finally:
        D.cleanup(world)
