"""`CoCaLoss` / `ClipLoss` against open_clip's on the same inputs: values and gradients, in one
process and across two gloo processes for every local_loss / gather_with_grad combination."""


import pytest
import torch
import torch.nn.functional as F

from coca_cli.errors import CocaError
from coca_cli.train.loss import ClipLoss, CoCaLoss

PAD = 0


def inputs(seed=0, batch=6, dim=16, length=7, vocab=50):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    logits = torch.randn(batch, length, vocab, generator=gen)
    labels = torch.randint(1, vocab, (batch, length), generator=gen)
    for row in range(batch):  # captions of different lengths, padded with the pad id
        labels[row, 2 + row % (length - 2):] = PAD
    scale = torch.tensor(10.0)
    return image, text, logits, labels, scale


def grads(loss_fn, image, text, logits, labels, scale):
    leaves = [t.clone().requires_grad_(True) for t in (image, text, logits, scale)]
    out = loss_fn(leaves[0], leaves[1], leaves[2], labels, leaves[3], output_dict=True)
    sum(out.values()).backward()
    return {k: v.detach() for k, v in out.items()}, [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("caption_weight,clip_weight", [(2.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.5, 3.0)])
def test_coca_loss_equals_open_clip(caption_weight, clip_weight):
    from open_clip.loss import CoCaLoss as RefLoss

    args = inputs()
    ours, our_grads = grads(CoCaLoss(caption_weight, clip_weight, pad_id=PAD), *args)
    ref, ref_grads = grads(RefLoss(caption_weight, clip_weight, pad_id=PAD), *args)
    assert set(ours) == set(ref) == {"contrastive_loss", "caption_loss"}
    for key in ours:
        torch.testing.assert_close(ours[key].float(), ref[key].float(), rtol=1e-6, atol=1e-6)
    for mine, theirs in zip(our_grads, ref_grads):
        if theirs is None:  # open_clip builds no graph through the features when the weight is 0
            assert mine is None or torch.count_nonzero(mine) == 0
        else:
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)


def test_tuple_output_and_pad_tokens_ignored():
    from open_clip.loss import CoCaLoss as RefLoss

    image, text, logits, labels, scale = inputs(seed=1)
    ours = CoCaLoss(2.0, 1.0)(image, text, logits, labels, scale)
    ref = RefLoss(2.0, 1.0)(image, text, logits, labels, scale)
    assert isinstance(ours, tuple) and len(ours) == 2
    torch.testing.assert_close(torch.stack(ours), torch.stack(ref))
    # changing the logits at padded positions changes nothing
    noisy = logits.clone()
    noisy[labels == PAD] = 100 * torch.randn_like(noisy[labels == PAD])
    torch.testing.assert_close(CoCaLoss(2.0, 1.0)(image, text, noisy, labels, scale)[1], ours[1])
    expected = F.cross_entropy(logits[labels != PAD], labels[labels != PAD])
    torch.testing.assert_close(ours[1], 2.0 * expected)


def test_caption_tokens_divides_the_summed_cross_entropy():
    image, text, logits, labels, scale = inputs(seed=2)
    n = int((labels != PAD).sum())
    mean = CoCaLoss(1.0, 1.0)(image, text, logits, labels, scale, output_dict=True)["caption_loss"]
    per_token = CoCaLoss(1.0, 1.0)(image, text, logits, labels, scale, output_dict=True,
                                   caption_tokens=2 * n)["caption_loss"]
    torch.testing.assert_close(per_token, mean / 2)


def test_clip_loss_equals_open_clip_with_bias_and_cached_labels():
    from open_clip.loss import ClipLoss as RefClip

    image, text, _, _, scale = inputs(seed=3)
    bias = torch.tensor(-2.0)
    ours, ref = ClipLoss(cache_labels=True), RefClip(cache_labels=True)
    for _ in range(2):  # second call uses the cached labels
        torch.testing.assert_close(ours(image, text, scale, bias), ref(image, text, scale, bias))
    assert ours(image, text, scale, output_dict=True).keys() == {"contrastive_loss"}


def test_horovod_is_refused_with_a_clear_error():
    with pytest.raises(CocaError, match="horovod is not supported"):
        CoCaLoss(1.0, 1.0, use_horovod=True)


# -- across processes ---------------------------------------------------------------------------

def _compare_on_rank(rank: int, world: int, store: str, failures):
    import torch.distributed as dist
    from open_clip.loss import CoCaLoss as RefLoss

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        image, text, logits, labels, scale = inputs(seed=10 + rank)  # each rank its own batch
        for local_loss in (False, True):
            for gather_with_grad in (False, True):
                kw = {"local_loss": local_loss, "gather_with_grad": gather_with_grad, "rank": rank,
                      "world_size": world}
                ours, our_grads = grads(CoCaLoss(2.0, 1.0, **kw), image, text, logits, labels, scale)
                ref, ref_grads = grads(RefLoss(2.0, 1.0, **kw), image, text, logits, labels, scale)
                for key in ours:
                    if not torch.allclose(ours[key], ref[key], rtol=1e-6, atol=1e-6):
                        failures.append(f"{kw}: {key} {ours[key]} != {ref[key]}")
                for i, (mine, theirs) in enumerate(zip(our_grads, ref_grads)):
                    if not torch.allclose(mine, theirs, rtol=1e-5, atol=1e-7):
                        failures.append(f"{kw}: gradient {i} differs by {(mine - theirs).abs().max()}")
    finally:
        dist.destroy_process_group()


def _worker(rank, world, store, queue):
    failures = []
    try:
        _compare_on_rank(rank, world, store, failures)
    except Exception as err:  # noqa: BLE001 - reported to the test
        failures.append(repr(err))
    queue.put((rank, failures))


def test_distributed_losses_and_gradients_equal_open_clip(tmp_path):
    """Two gloo ranks meeting through a file store: no port to race for, no deadline to miss."""
    import warnings

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        procs = [ctx.Process(target=_worker, args=(rank, 2, str(tmp_path / "store"), queue)) for rank in range(2)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=1800) for _ in procs)  # a hang guard only: each rank always reports
        for p in procs:
            p.join()
    assert results == {0: [], 1: []}


def test_caption_tokens_only_gives_the_same_loss_and_gradients():
    """Training's trimmed decoder (up to the longest caption, projection at caption tokens only)
    against the full [B, T, vocab] logits, on captions of different lengths."""
    from coca_cli.model.config import get_model_config
    from coca_cli.model.coca import CoCa
    from coca_cli.data.tokenizer import tokenize

    torch.manual_seed(0)
    # float64: the two paths sum in different orders, and in fp32 the gradients' rounding noise
    # (sums of many terms) would exceed atol where the gradient is large; here it cannot.
    model = CoCa.from_config(get_model_config("coca_tiny")).double()
    images = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    texts = tokenize(["a dog", "a red car parked on a street at night", "wow a cat", "x " * 20], context_length=32)
    texts[2, 2] = 0  # id 0 decodes to '!' but is also the pad id: never a label, in both paths
    loss_fn = CoCaLoss(2.0, 1.0, pad_id=model.pad_id)
    results = []
    for trimmed in (False, True):
        model.zero_grad()
        out = model(images, texts, caption_tokens_only=trimmed)
        losses = loss_fn(out["image_features"], out["text_features"], out["logits"], out["labels"],
                         out["logit_scale"], output_dict=True)
        sum(losses.values()).backward()
        results.append((losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full, full_grads), (trim, trim_grads) = results
    assert full_grads.keys() == trim_grads.keys()
    for key in full:
        assert torch.allclose(full[key], trim[key], rtol=1e-5, atol=1e-6), key
    for name, grad in full_grads.items():
        assert torch.allclose(grad, trim_grads[name], rtol=1e-4, atol=1e-6), name
    out = model(images, texts, caption_tokens_only=True)
    assert out["logits"].shape[:2] == out["labels"].shape == (1, int((texts[:, 1:] != 0).sum()))
