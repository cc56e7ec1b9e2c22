"""`coca retrieve`: images for a text, or texts for an image."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..errors import CocaError
from . import app, err_console, stdout_format
from .classify import (check_output_file, embed_batches, fail_if_skipped, load_contrastive, require_features,
                       result_sink, weights_name)
from .options import (BatchSizeOption, ContrastivePretrainedOption, DeviceOption, FormatOption, ModelOption,
                      PrecisionOption, ResultsFileOption, WorkersOption)

USAGE = "search images with --images DIR --query TEXT, or texts with --texts FILE --image IMAGE"


class IndexType(str, Enum):
    """How the --images collection is searched: every image (exact), or through a faiss index."""

    exact = "exact"
    flat = "flat"
    ivf = "ivf"
    hnsw = "hnsw"


@app.command("retrieve")
def retrieve_command(
    images: Optional[List[str]] = typer.Option(None, "--images", "-i", help="Collection to search (with --query): "
                                               "image files, folders or glob patterns; repeat for several."),
    query: Optional[List[str]] = typer.Option(None, "--query", "-q", help="Text to find images for; repeat for more."),
    texts: Optional[Path] = typer.Option(None, "--texts", "-t", help="Texts to search (with --image): "
                                         "a UTF-8 file, one text a line."),
    image: Optional[List[str]] = typer.Option(None, "--image", help="Image to find texts for; repeat for several."),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, help="Hits per query."),
    index: Optional[Path] = typer.Option(None, "--index", help="Embedding index of the --images collection "
                                         "[default: .coca-index.pt inside the --images folder; none for files]"),
    index_type: IndexType = typer.Option(IndexType.exact, "--index-type", help="exact: score every image "
                                         "(chunked, exact); flat, ivf or hnsw: a faiss index built once and kept "
                                         "beside --index, for millions of images (pip install 'coca-cli[faiss]')."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", min=1, help="ivf: lists searched per query; more is "
                                         "slower and finds more of the exact hits [default: 32]."),
    output_format: FormatOption = None,
    as_json: bool = typer.Option(False, "--json", help="Same as --format jsonl: one object per query."),
    output: ResultsFileOption = None,
    html: Optional[Path] = typer.Option(None, "--html", help="Also write a results page: the model, each query, "
                                        "every hit's rank, score and thumbnail linked to the full image; one "
                                        "file that works offline, with links relative to its folder."),
    model: ModelOption = None,
    pretrained: ContrastivePretrainedOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "fp32",
    batch_size: BatchSizeOption = 32,
    workers: WorkersOption = 0,
):
    """Rank images by similarity to a text, or texts by similarity to an image.

    The collection's image embeddings are kept in an index file, so later searches embed only
    new or changed images.

    \b
    Example: coca retrieve --images photos/ --query "a red car" --top-k 5
             coca retrieve --texts captions.txt --image q.jpg --output hits.tsv
             coca retrieve --images photos/ --query "a red car" --html hits.html
             coca retrieve --images photos/ --query "a red car" --index-type hnsw
    """
    if bool(images) == bool(texts) or bool(images) != bool(query) or bool(texts) != bool(image):
        raise CocaError(USAGE)
    if index is not None and not images:
        raise CocaError("--index belongs to an --images collection")
    if index_type != IndexType.exact and not images:
        raise CocaError("--index-type belongs to an --images collection")
    if nprobe is not None and index_type != IndexType.ivf:
        raise CocaError("--nprobe belongs to --index-type ivf")
    if index_type != IndexType.exact:
        from ..tasks.ann import require_faiss

        require_faiss(index_type.value)  # before the model loads: a missing extra is said at once
    from ..data.inputs import collect_images

    from ..tasks.templates import read_lines

    paths = collect_images(images or image)  # before torch is imported: a typo is reported at once
    candidates = read_lines(texts, "texts file") if texts else None
    fmt = stdout_format(output_format, as_json)
    check_output_file(output)
    from ..tasks.results_page import check_page_file, write_results_page
    from ..tasks.retrieval import check_index_file

    if index is not None:
        check_index_file(index)  # before the model loads: never replace someone else's file
    check_page_file(html)

    net, transform, tokenizer = load_contrastive(model, pretrained, device, precision)
    unsaved = None  # an index that could not be written is reported after the results
    if images:
        rankings, skipped, unsaved = _images_for_texts(net, transform, tokenizer, images, paths, query, index, top_k,
                                                       index_type, nprobe, batch_size, workers)
    else:
        rankings, skipped = _texts_for_images(net, transform, tokenizer, candidates, paths, top_k, batch_size,
                                              workers)
    with result_sink(output, fmt, rankings[0].columns, _show) as emit:
        for ranking in rankings:
            emit(ranking)
    if html is not None:
        write_results_page(html, rankings, net.config.name, weights_name(model, pretrained))
        err_console.print(f"wrote {html}")
    if unsaved is not None:
        raise unsaved
    fail_if_skipped(skipped, len(paths))


def _images_for_texts(net, transform, tokenizer, images, paths, queries, index, top_k, index_type, nprobe,
                      batch_size, workers):
    """Text→image: embed what the index lacks, then rank the whole collection for each query.
    Returns the rankings, the images skipped and the error of an index that could not be written."""
    from ..tasks.embeddings import embed_texts
    from ..tasks.retrieval import ImageIndex, model_fingerprint, search

    store = ImageIndex(index or _default_index(images), model_fingerprint(net))
    if store.damaged:
        err_console.print(f"warning: rebuilding the index {store.path}: {store.damaged}")
    skipped = 0
    try:
        for batch in embed_batches(net, transform, store.stale(paths), batch_size, workers):
            store.add(batch)
            skipped += len(batch.failures)
    except BaseException:  # Ctrl-C, SIGTERM or a crash: keep what was embedded, for the next run
        _save(store)
        raise
    found = store.lookup(paths)
    unsaved = _save(store)
    require_features(found, len(paths))
    query_features = embed_texts(net, tokenizer, queries)
    candidates = [str(p) for p in found.paths]
    approximate = None if index_type == IndexType.exact else _faiss_index(index_type.value, nprobe, candidates,
                                                                           found.features, store.path)
    rankings = search(queries, query_features, candidates, found.features, top_k,
                      device=next(net.parameters()).device, approximate=approximate)
    return rankings, skipped, unsaved


def _faiss_index(index_type, nprobe, candidates, features, index):
    """The collection's faiss index, reused from beside the image index while its embeddings are unchanged."""
    from ..tasks.ann import IVF_NPROBE, faiss_index_path, load_or_build

    path = faiss_index_path(index, index_type) if index is not None else None
    approximate, report = load_or_build(index_type, candidates, features, path, err_console.print,
                                        nprobe or IVF_NPROBE)
    err_console.print(report)
    return approximate


def _default_index(images: List[str]) -> Optional[Path]:
    """Beside the collection: inside the folder when --images is one folder; else no index."""
    from ..tasks.retrieval import INDEX_FILE

    folder = Path(images[0]).expanduser()
    return folder / INDEX_FILE if len(images) == 1 and folder.is_dir() else None


def _save(store) -> Optional[CocaError]:
    """Write the index; a failure (a full disk, a read-only collection) is returned, so that the
    results are still printed before it is reported."""
    try:
        store.save()
        unsaved = None
    except CocaError as err:
        unsaved = err
    where = f" (index: {store.path})" if store.path else " (no index: pass --index FILE to keep them)"
    err_console.print(f"embedded {store.embedded} new images, reused {store.reused}, removed {store.removed}{where}")
    return unsaved


def _texts_for_images(net, transform, tokenizer, candidates, paths, top_k, batch_size, workers):
    """Image→text: every candidate text is embedded once, then ranked for each query image."""
    from ..tasks.embeddings import ImageFeatures, embed_texts
    from ..tasks.retrieval import search

    candidate_features = embed_texts(net, tokenizer, candidates)
    found = ImageFeatures.concat(embed_batches(net, transform, paths, batch_size, workers))
    require_features(found, len(paths))
    rankings = search([str(p) for p in found.paths], found.features, candidates, candidate_features, top_k,
                      query_is_image=True)
    return rankings, len(found.failures)


def _show(console: Console, ranking) -> None:
    console.print(Text(ranking.query, style="bold"), soft_wrap=True)
    table = Table("#", "score", "text" if ranking.query_is_image else "image")
    for hit in ranking.hits:
        table.add_row(str(hit.rank), f"{hit.score:.4f}", Text(hit.item))
    console.print(table)
