"""Validation after each epoch: losses, retrieval recall and sample captions on --val-data."""

from __future__ import annotations

import hashlib
from collections import Counter

import torch
import torch.nn.functional as F

from ..data.datasets import describe_skipped, eval_batches
from ..errors import CocaError
from .loss import CoCaLoss


@torch.no_grad()
def validate(model, cfg, transform, tokenizer, device, input_dtype, autocast) -> dict:
    """Val losses, retrieval recall@1/5 both ways and three sample captions (master only)."""
    from ..model.generation import generate, max_decode_length
    from ..data.tokenizer import decode

    model.eval()
    image_feats, text_feats, pictures, contrastive, caption_sum, tokens, n = [], [], [], 0.0, 0.0, 0, 0
    samples: list[dict] = []
    skipped: Counter = Counter()
    single = CoCaLoss(1.0, 1.0, pad_id=model.pad_id)
    for batch in eval_batches(cfg.val_data, cfg.data_config(), transform, tokenizer,
                              cfg.val_num_samples, cfg.batch_size):
        skipped.update(batch.skipped)
        pictures += [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in batch.images]
        images = batch.images.to(device, input_dtype)
        texts = batch.texts.to(device)
        with autocast():
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


def describe_val(record: dict) -> str:
    text = (f"validation after epoch {record['epoch']}: contrastive {record['val_contrastive_loss']:.4f}  caption "
            f"{record['val_caption_loss']:.4f}  image->text R@1 {record['image_to_text_R@1']:.3f} R@5 "
            f"{record['image_to_text_R@5']:.3f}  text->image R@1 {record['text_to_image_R@1']:.3f} R@5 "
            f"{record['text_to_image_R@5']:.3f}")
    for sample in record["captions"]:
        text += f"\n  '{sample['caption']}'  (reference: '{sample['reference']}')"
    return text
