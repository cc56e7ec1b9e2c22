"""Published weights: names, download once through huggingface_hub, and the offline message.

Downloads run against a local stand-in for the hub on 127.0.0.1 (tests/hub_server.py).
"""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from coca_cli import list_pretrained
from coca_cli.weights.pretrained import default_weights, hub_repo
from conftest import ROOT, openclip_reference
from hub_server import HubServer


def test_published_names_match_openclip():
    import open_clip

    ours = set(list_pretrained())
    theirs = {(m, t) for m, t in open_clip.list_pretrained() if m.startswith("coca")}
    assert ours == theirs
    # open_clip's docs spell the tag with capitals and dashes; both resolve the same.
    assert hub_repo("coca_ViT-L-14", "mscoco_finetuned_laion2B-s13B-b90k") == \
        "laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k"
    assert hub_repo("coca_ViT-B-32", "laion2b_s13b_b90k") == "laion/CoCa-ViT-B-32-laion2B-s13B-b90k"


def _coca(args, env, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "coca_cli", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=1800)


@pytest.fixture
def hub_files(tmp_path):
    ref = openclip_reference("coca_tiny", seed=7)
    torch.save(ref.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    cfg = json.loads((ROOT / "models" / "coca_tiny.json").read_text())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    return ref, {
        "someone/coca-tiny/open_clip_pytorch_model.bin": tmp_path / "open_clip_pytorch_model.bin",
        "someone/coca-tiny/open_clip_config.json": tmp_path / "open_clip_config.json",
        # a published tag resolves to LAION's repository id
        "laion/CoCa-ViT-B-32-laion2B-s13B-b90k/open_clip_pytorch_model.bin": tmp_path / "open_clip_pytorch_model.bin",
    }


def test_hub_download_happens_once_and_then_works_offline(tmp_path, hub_files):
    ref, files = hub_files
    with HubServer(files) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="0")
        for run in range(2):
            result = _coca(["convert", "hf-hub:someone/coca-tiny", "--output", tmp_path / f"out{run}"], env)
            assert result.returncode == 0, result.stderr
        assert hub.downloads("open_clip_pytorch_model.bin") == 1  # the second run used the cache
        assert hub.downloads("open_clip_config.json") == 1
    offline = dict(env, HF_HUB_OFFLINE="1")
    result = _coca(["convert", "hf-hub:someone/coca-tiny", "--output", tmp_path / "out2"], offline)
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file

    state = load_file(tmp_path / "out2" / "model.safetensors")
    assert all(torch.equal(state[k], v) for k, v in ref.state_dict().items())


def test_published_tag_downloads_from_laion_repository(tmp_path, hub_files):
    _, files = hub_files
    with HubServer(files) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="0")
        code = "from coca_cli.weights.pretrained import resolve; print(resolve('coca_ViT-B-32', 'laion2B-s13B-b90k'))"
        result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "models--laion--CoCa-ViT-B-32-laion2B-s13B-b90k" in result.stdout
        assert hub.downloads("open_clip_pytorch_model.bin") == 1


def test_hub_model_names_load_their_own_weights_without_a_default_tag(tmp_path, hub_files):
    """``--model hf-hub:org/repo`` without --pretrained: the repository's weights, with no word
    about the command's default tag (open_clip ignores ``pretrained`` for such names)."""
    _, files = hub_files
    image = ROOT / "examples" / "images" / "astronaut.jpg"
    with HubServer(files) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="0")
        for command in (["caption", image, "--seq-len", "8", "--json"], ["classify", image, "--labels", "dog,cat"],
                        ["retrieve", "--images", image, "--query", "a dog", "--html", tmp_path / "page.html"]):
            result = _coca([*command, "--model", "hf-hub:someone/coca-tiny", "--device", "cpu"], env)
            assert result.returncode == 0, result.stderr
            assert "ignored" not in result.stderr and "Warning" not in result.stderr, result.stderr
            assert json.loads(result.stdout.splitlines()[0])
        assert "someone/coca-tiny" in (tmp_path / "page.html").read_text()
        assert hub.downloads("open_clip_pytorch_model.bin") == 1


def test_a_hub_tokenizer_downloads_the_config_and_not_the_weights(tmp_path, hub_files):
    """get_tokenizer('hf-hub:org/repo') needs the repository's open_clip config alone, as in
    open_clip; a repository without one, or no network, is one line saying so."""
    _, files = hub_files
    code = ("import sys; from coca_cli import get_tokenizer; from coca_cli.errors import CocaError\n"
            "for repo in sys.argv[1:]:\n"
            "    try: tok = get_tokenizer('hf-hub:' + repo); print(tok.context_length, tuple(tok(['a dog']).shape))\n"
            "    except CocaError as err: print(err)")
    laion = "laion/CoCa-ViT-B-32-laion2B-s13B-b90k"  # the hub serves its weights alone

    def tokenizers(env, *repos):
        result = subprocess.run([sys.executable, "-c", code, *repos], env=env, cwd=ROOT, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    with HubServer(files) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="0")
        assert tokenizers(env, "someone/coca-tiny", laion) == [
            "32 (1, 32)",  # coca_tiny's context length, from the downloaded config
            f"Hugging Face repository {laion} has none of: open_clip_config.json"]
        assert hub.downloads("open_clip_config.json") == 1
        assert hub.downloads("open_clip_pytorch_model.bin") == 0
    offline = dict(env, HF_HUB_OFFLINE="1")
    cached, uncached = tokenizers(offline, "someone/coca-tiny", "someone/uncached")
    assert cached == "32 (1, 32)"
    assert re.fullmatch(r"cannot download open_clip_config.json from Hugging Face \(someone/uncached\): no network "
                        r"or hub unreachable \(\w+\); name the model it holds instead", uncached), uncached


def test_library_warnings_reach_the_terminal_as_one_line(tmp_path, hub_files, capsys):
    """--pretrained beside a model name that brings its weights is ignored, as open_clip does; the
    library's UserWarning says so in one line, and Python's own display is back afterwards."""
    from coca_cli.cli import main

    before = warnings.showwarning
    image = ROOT / "examples" / "images" / "astronaut.jpg"
    code = main(["caption", str(image), "--model", f"local-dir:{tmp_path}", "--pretrained", "laion2b_s13b_b90k",
                 "--seq-len", "8", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0 and out.startswith(str(image))
    assert err.splitlines() == [f"warning: pretrained='laion2b_s13b_b90k' is ignored: model 'local-dir:{tmp_path}' "
                                "brings its own weights"]
    assert warnings.showwarning is before


def test_default_weights_follow_the_job_unless_the_model_name_brings_its_own():
    assert default_weights(None, None, captioning=True) == ("coca_ViT-L-14", "mscoco_finetuned_laion2b_s13b_b90k")
    assert default_weights("coca_ViT-B-32", None, captioning=False) == ("coca_ViT-B-32", "laion2b_s13b_b90k")
    assert default_weights("coca_ViT-B-32", "w.pt", captioning=True) == ("coca_ViT-B-32", "w.pt")
    for name in ("hf-hub:someone/coca-tiny", "local-dir:/weights"):
        assert default_weights(name, None, captioning=True) == (name, None)


@pytest.mark.parametrize("failure", ["no-dns", "refused"])
def test_a_hub_that_cannot_be_reached_means_the_cache_at_once(tmp_path, hub_files, monkeypatch, failure):
    """No DNS (no network), or a hub host that refuses connections (a firewall, a dead mirror):
    huggingface_hub would retry ~23 s before falling back to its cache or failing; the cache is
    read at once instead, and an empty one fails in one line. With a proxy set, names are the
    proxy's to resolve, so no verdict is drawn from our resolver."""
    import socket

    import huggingface_hub

    from coca_cli.errors import CocaError
    from coca_cli.weights import pretrained

    _, files = hub_files
    cache = tmp_path / "cache"
    with HubServer(files) as hub:  # into the cache, as an earlier run with network would have
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
        code = ("from coca_cli.weights.pretrained import download; "
                f"print(download('someone/coca-tiny', {str(cache)!r}))")
        result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    online = Path(result.stdout.strip())

    asked = []
    real_download = huggingface_hub.hf_hub_download

    def spy(*args, **kwargs):
        asked.append(kwargs.get("local_files_only"))
        return real_download(*args, **kwargs)

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def resolved(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("203.0.113.7", port))]

    def refused(address, *args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # conftest sets it; users do not
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.example")
    monkeypatch.setattr(pretrained.socket, "getaddrinfo", no_dns if failure == "no-dns" else resolved)
    monkeypatch.setattr(pretrained.socket, "create_connection", refused)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert pretrained.download("someone/coca-tiny", cache_dir=str(cache)) == online
    assert asked and all(asked)  # the cache only, never the network
    why = "gaierror" if failure == "no-dns" else "ConnectionRefusedError"
    with pytest.raises(CocaError, match=r"^cannot download weights from Hugging Face \(someone/other\): no network "
                                        rf"or hub unreachable \({why}\)"):
        pretrained.download("someone/other", cache_dir=str(cache))

    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    assert pretrained._unreachable_hub() is None


@pytest.mark.parametrize("how", ["offline-mode", "unreachable"])
def test_caption_without_network_says_how_to_pass_a_local_file(tmp_path, how):
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    if how == "offline-mode":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2",
                   HF_HUB_DOWNLOAD_TIMEOUT="2")
    result = _coca(["caption", ROOT / "examples" / "images"], env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot download weights" in lines[0] and "--pretrained PATH" in lines[0]
    assert "laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k" in lines[0]
    assert result.stdout == ""
