"""The embed task's shard folders: layout, resuming an interrupted run, the memory-mapped reader."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import e2_core
import e2_embed
from e2_embed import EmbeddingShards, embed
from e2_core.runtime import compiled
from e2_embed.shards import ShardedRun
from e2_eval import topk_indices


@pytest.fixture
def catalog(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(9):
        Image.new("RGB", (70 + i, 64), (i * 25, 100, 255 - i * 20)).save(folder / f"img{i}.png")
    (folder / "img4b.jpg").write_bytes(b"not an image")           # item 5 of 10, in shard 1
    (tmp_path / "texts.txt").write_text("".join(f"caption {i}\n" for i in range(5)))
    return folder


def run(catalog, out, encoder, **options):
    return embed(images=catalog, texts=catalog.parent / "texts.txt", encoder=encoder, out=out, device="cpu",
                 regions=True, batch_size=2, shard_size=4, workers=options.pop("workers", 0), progress=False,
                 **options)


def files(folder: Path):
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_files(folder: Path, expected: Path):
    assert files(folder).keys() == files(expected).keys()
    for name, path in files(expected).items():
        if name.endswith(".npy"):
            assert np.array_equal(np.load(path), np.load(folder / name)), name
        else:
            assert path.read_text() == (folder / name).read_text(), name


def test_shard_folder_layout_and_reader(catalog, tmp_path, tiny_checkpoints):
    out = tmp_path / "emb"
    report = run(catalog, out, tiny_checkpoints["e2"], workers=2)
    assert report["images"] == 9 and report["img_shards"] == 3 and report["texts"] == 5
    assert len(report["unreadable_images"]) == 1 and "img4b.jpg" in report["unreadable_images"][0]
    assert {"img_emb/img_emb_0.npy", "img_emb/img_emb_2.npy", "region_emb/region_emb_1.npy",
            "selected_patches/selected_patches_0.npy", "metadata/metadata_1.jsonl", "text_emb/text_emb_1.npy",
            "text_metadata/text_metadata_0.jsonl", "img_index.npy", "manifest.json"} <= set(files(out))
    assert np.load(out / "img_emb" / "img_emb_1.npy").shape == (3, 64)   # items 4..7 less the unreadable one
    index = np.load(out / "img_index.npy")
    assert index[5].tolist() == [-1, -1] and index[6].tolist() == [1, 1] and index[9].tolist() == [2, 1]

    gallery = EmbeddingShards(out)
    assert gallery.shape == (9, 64) and gallery.dtype == np.float32
    rows = gallery.metadata()
    assert [r["item"] for r in rows] == [0, 1, 2, 3, 4, 6, 7, 8, 9] and rows[5]["image_path"].endswith("img5.png")
    whole = np.concatenate([np.load(out / "img_emb" / f"img_emb_{i}.npy") for i in range(3)])
    assert np.array_equal(gallery[2:7], whole[2:7]) and np.array_equal(gallery[8], whole[8])
    queries = torch.from_numpy(np.array(EmbeddingShards(out, "text_emb")[:]))
    assert torch.equal(topk_indices(queries, gallery, 4, chunk_size=3), topk_indices(queries, torch.from_numpy(whole), 4))
    assert np.allclose(np.linalg.norm(whole, axis=1), 1, atol=1e-5)

    # the same embeddings as the single-file output (same batches)
    single = tmp_path / "single.safetensors"
    embed(images=catalog, encoder=tiny_checkpoints["e2"], out=single, device="cpu", batch_size=2, progress=False)
    with safe_open(str(single), "pt") as f:
        assert np.allclose(f.get_tensor("image_features").numpy(), whole, atol=1e-6)


def test_an_interrupted_run_resumes_without_duplicates_or_gaps(catalog, tmp_path, tiny_checkpoints, monkeypatch):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(catalog, whole, tiny_checkpoints["e2"])

    finish = ShardedRun._finish_shard

    def killed_in_shard_1(self, kind, shard, labels, parts, *rest):
        if kind == "img" and shard == 1:      # its embeddings are on disk, the manifest does not know yet
            np.save(self.folder / "img_emb" / "img_emb_1.npy", np.concatenate(parts["img_emb"]))
            raise KeyboardInterrupt
        return finish(self, kind, shard, labels, parts, *rest)

    monkeypatch.setattr(ShardedRun, "_finish_shard", killed_in_shard_1)
    with pytest.raises(KeyboardInterrupt):
        run(catalog, cut, tiny_checkpoints["e2"])
    assert json.loads((cut / "manifest.json").read_text())["img"]["shards"][0]["rows"] == 4
    with pytest.raises(ValueError, match="unfinished .1 of 3 shards.; run the same command again"):
        EmbeddingShards(cut)
    monkeypatch.setattr(ShardedRun, "_finish_shard", finish)

    report = run(catalog, cut, tiny_checkpoints["e2"])
    assert report["img_resumed_at_shard"] == 1 and report["images"] == 9
    assert_same_files(cut, whole)



def test_a_shard_folder_resumes_when_its_images_are_named_by_another_path(catalog, tmp_path, tiny_checkpoints,
                                                                         monkeypatch):
    """The same files given as a relative folder first and an absolute one next: the same inputs (it was
    refused as "other inputs"); other files are still refused."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    finish = ShardedRun._finish_shard

    def killed_in_shard_1(self, kind, shard, *rest):
        if kind == "img" and shard == 1:
            raise KeyboardInterrupt
        return finish(self, kind, shard, *rest)

    monkeypatch.setattr(ShardedRun, "_finish_shard", killed_in_shard_1)
    with pytest.raises(KeyboardInterrupt):
        run(Path(catalog.name), out, tiny_checkpoints["e2"])
    monkeypatch.setattr(ShardedRun, "_finish_shard", finish)
    report = run(catalog.resolve(), out, tiny_checkpoints["e2"])
    assert report["img_resumed_at_shard"] == 1 and report["images"] == 9
    (catalog / "img0.png").rename(catalog / "img0-renamed.png")
    with pytest.raises(ValueError, match="holds embeddings of other img inputs"):
        run(catalog.resolve(), out, tiny_checkpoints["e2"])


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "deleted", "metadata deleted"])
def test_a_damaged_shard_is_named_and_written_again_by_the_same_command(catalog, tmp_path, tiny_checkpoints,
                                                                       damage, caplog):
    whole, hurt = tmp_path / "whole", tmp_path / "hurt"
    run(catalog, whole, tiny_checkpoints["e2"])
    run(catalog, hurt, tiny_checkpoints["e2"])
    shard = hurt / "img_emb" / "img_emb_1.npy"
    if damage == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(100)
    elif damage == "overwritten":
        np.save(shard, np.zeros((3, 2), np.float32))
    elif damage == "deleted":
        shard.unlink()
    else:
        shard = hurt / "metadata" / "metadata_1.jsonl"
        shard.unlink()
    with pytest.raises(ValueError, match=f"{shard.name} .*; run the same `e2-plugins run embed` command again"):
        EmbeddingShards(hurt).metadata()
    caplog.clear()
    report = run(catalog, hurt, tiny_checkpoints["e2"])
    assert f"{shard.name}" in caplog.text and "writing shard 1 and the ones after it again" in caplog.text
    assert report["img_resumed_at_shard"] == 1 and report["images"] == 9
    assert_same_files(hurt, whole)


def test_the_reader_names_what_a_folder_lacks(catalog, tmp_path, tiny_checkpoints):
    out = tmp_path / "emb"
    embed(images=catalog, encoder=tiny_checkpoints["e2"], out=out, device="cpu", batch_size=2, shard_size=4,
          workers=0, progress=False)
    with pytest.raises(ValueError, match="holds no region_emb .embedded without regions=True"):
        EmbeddingShards(out, "region_emb")
    with pytest.raises(ValueError, match="holds no text embeddings"):
        EmbeddingShards(out, "text_emb")
    with pytest.raises(FileNotFoundError, match="no manifest.json; not a folder written by .* or its run stopped"):
        EmbeddingShards(tmp_path)


def test_a_shard_folder_refuses_another_run(catalog, tmp_path, tiny_checkpoints):
    out = tmp_path / "emb"
    run(catalog, out, tiny_checkpoints["e2"])
    with pytest.raises(ValueError, match="shard_size=4, not shard_size=3; use another output folder"):
        embed(images=catalog, encoder=tiny_checkpoints["e2"], out=out, device="cpu", regions=True, batch_size=2,
              shard_size=3, progress=False)
    with pytest.raises(ValueError, match="encoder="):
        embed(images=catalog, encoder=tiny_checkpoints["clip"], out=out, device="cpu", batch_size=2, shard_size=4,
              progress=False)
    (catalog / "new.png").write_bytes((catalog / "img0.png").read_bytes())
    with pytest.raises(ValueError, match="other img inputs .10 items from"):
        run(catalog, out, tiny_checkpoints["e2"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="non-empty folder without manifest.json"):
        run(catalog, tmp_path / "other", tiny_checkpoints["e2"])
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        EmbeddingShards(tmp_path / "other")


def test_strict_names_the_unreadable_image_decoded_in_a_worker(catalog, tmp_path, tiny_checkpoints):
    with pytest.raises(ValueError, match="img4b.jpg: not a readable image"):
        run(catalog, tmp_path / "emb", tiny_checkpoints["e2"], strict=True, workers=1)
    assert e2_embed.list_images(catalog)[5].name == "img4b.jpg"



def test_compiled_encoding_selects_the_same_patches_as_eager(tiny_checkpoints, capsys):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on a CPU needs a C compiler")
    encoder = e2_core.load_encoder(tiny_checkpoints["e2"])
    images = torch.randn(3, 3, 64, 64)
    encode = compiled(encoder.encode_image_regions, "cpu", enabled=True)
    assert encode != encoder.encode_image_regions
    with torch.no_grad():
        fast, eager = encode(images), encoder.encode_image_regions(images)
    assert "torch.compile failed" not in capsys.readouterr().err
    assert torch.equal(fast.selected_patches, eager.selected_patches)
    assert torch.allclose(fast.image_features, eager.image_features, atol=1e-5)
    assert compiled(encoder.encode_image, "cpu") == encoder.encode_image        # unset: not on a CPU


def test_embed_compiles_when_asked_and_runs_eager_where_compiling_fails(catalog, tmp_path, tiny_checkpoints,
                                                                       monkeypatch, caplog):
    calls = []

    def broken_compile(fn, **options):
        def run(*args, **kwargs):
            calls.append(fn.__name__)
            raise RuntimeError("no C compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    plain = embed(images=catalog, texts=catalog.parent / "texts.txt", encoder=tiny_checkpoints["e2"],
                  out=tmp_path / "plain.safetensors", device="cpu", batch_size=4, workers=0, progress=False)
    assert calls == []                                                    # unset on a CPU: not compiled
    caplog.clear()
    embed(images=catalog, texts=catalog.parent / "texts.txt", encoder=tiny_checkpoints["e2"],
          out=tmp_path / "asked.safetensors", device="cpu", batch_size=4, workers=0, progress=True, compile=True)
    assert calls == ["encode_image", "encode_text"]                        # tried once each, then eager
    err = caplog.text
    assert "encoding under torch.compile: the first batches compile the encoder" in err
    assert err.count("torch.compile failed (RuntimeError: no C compiler found); running without it") == 2
    with safe_open(str(tmp_path / "plain.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "asked.safetensors"), "pt") as b:
        for name in ("image_features", "text_features"):
            assert torch.equal(a.get_tensor(name), b.get_tensor(name))
    assert plain["images"] == 9


def test_fast_decode_reads_jpegs_at_a_reduced_scale_close_to_a_full_decode(tmp_path, tiny_checkpoints):
    folder = tmp_path / "photos"
    folder.mkdir()
    gradient = np.linspace(0, 255, 512 * 384 * 3).reshape(384, 512, 3).astype(np.uint8)
    for i in range(3):
        Image.fromarray(np.roll(gradient, 40 * i, axis=1)).save(folder / f"photo{i}.jpg", quality=92)
    Image.fromarray(gradient).save(folder / "photo.png")                  # not a JPEG: decoded whole either way
    sizes = []
    from e2_core.embedding import _Images

    images = _Images(sorted(folder.iterdir()), lambda image: sizes.append(image.size) or 0, draft=(64, 64))
    [images[i] for i in range(4)]
    assert sizes == [(512, 384), (128, 96), (128, 96), (128, 96)]      # 1/4: the smallest scale >= 64 px each way

    outputs = {}
    for fast in (False, True):
        out = tmp_path / f"fast{fast}.safetensors"
        embed(images=folder, encoder=tiny_checkpoints["e2"], out=out, device="cpu", workers=0, progress=False,
              fast_decode=fast)
        with safe_open(str(out), "pt") as f:
            outputs[fast] = f.get_tensor("image_features")
    cosine = (outputs[False] * outputs[True]).sum(dim=1)
    assert torch.equal(outputs[False][0], outputs[True][0])                # the PNG
    assert cosine[1:].min() > 0.99 and not torch.equal(outputs[False][1:], outputs[True][1:])


def test_a_shard_folder_keeps_its_decoding(catalog, tmp_path, tiny_checkpoints):
    out = tmp_path / "emb"
    run(catalog, out, tiny_checkpoints["e2"])
    with pytest.raises(ValueError, match="fast_decode=False, not fast_decode=True; use another output folder"):
        run(catalog, out, tiny_checkpoints["e2"], fast_decode=True)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["fast_decode"]                                           # a folder from before the option
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert run(catalog, out, tiny_checkpoints["e2"])["images"] == 9
    with pytest.raises(ValueError, match="fast_decode=False, not fast_decode=True"):
        run(catalog, out, tiny_checkpoints["e2"], fast_decode=True)

def test_texts_come_from_a_pipe_and_a_folder_is_refused(catalog, tmp_path, tiny_checkpoints):
    read, write = os.pipe()                                  # what `--texts <(command)` hands over
    os.write(write, b"red shirt\n\nblue jeans\n")
    os.close(write)
    try:
        report = embed(texts=Path(f"/dev/fd/{read}"), encoder=tiny_checkpoints["clip"], out=tmp_path / "emb",
                       device="cpu", progress=False)
    finally:
        os.close(read)
    assert report["texts"] == 2
    with pytest.raises(ValueError, match="is a folder; give a text file"):
        embed(texts=tmp_path, encoder=tiny_checkpoints["clip"], out=tmp_path / "emb2", device="cpu", progress=False)


def test_a_catalog_needs_only_its_image_column(catalog, tmp_path, tiny_checkpoints):
    # A CSV saved by a spreadsheet (BOM, CRLF) with no text column; a JSONL whose paths are under "path".
    (tmp_path / "images.csv").write_bytes("\ufeffimage,title\r\nimgs/img0.png,\"Shirt, red\"\r\n./imgs/img2.png,Coat\r\n"
                                          .encode("utf-8"))
    (tmp_path / "images.jsonl").write_text('{"path": "imgs/img1.png"}\n\n{"path": "%s"}\n' % (catalog / "img3.png"))
    assert e2_embed.list_images(tmp_path / "images.csv") == [catalog / "img0.png", catalog / "img2.png"]
    report = embed(images=tmp_path / "images.jsonl", image_column="path", encoder=tiny_checkpoints["clip"],
                   out=tmp_path / "emb.safetensors", device="cpu", workers=0, progress=False)
    assert report["images"] == 2 and not report["unreadable_images"]
    with pytest.raises(ValueError, match=r"images.jsonl:1: column 'image' missing; this row has \['path'\]"):
        e2_embed.list_images(tmp_path / "images.jsonl")


def test_out_must_match_the_output_kind(catalog, tmp_path, tiny_checkpoints):
    (tmp_path / "emb.safetensors").write_text("")
    with pytest.raises(ValueError, match="is a file; with shard_size, out is the folder of shards"):
        run(catalog, tmp_path / "emb.safetensors", tiny_checkpoints["clip"])
    with pytest.raises(ValueError, match="is a folder; give a .safetensors file, or shard_size=N"):
        embed(images=catalog, encoder=tiny_checkpoints["clip"], out=tmp_path, device="cpu", progress=False)


def test_image_urls_are_named_not_joined_to_the_folder(tmp_path):
    (tmp_path / "images.csv").write_text("image\nlocal.png\nhttps://example.com/a.jpg\n")
    (tmp_path / "images.txt").write_text("local.png\nhttp://example.com/b.png\n")
    with pytest.raises(ValueError, match=r"images.csv:3: https://example.com/a.jpg is a URL; images are read from "
                                         r"local files: download them first"):
        e2_embed.list_images(tmp_path / "images.csv")
    with pytest.raises(ValueError, match=r"images.txt: http://example.com/b.png is a URL"):
        e2_embed.list_images(tmp_path / "images.txt")


TORCHRUN_SCRIPT = """
import os, sys
from e2_embed.shards import ShardedRun
if os.environ.get("KILL_RANK") == os.environ["RANK"]:  # this process dies inside its image shard 1
    finish = ShardedRun._finish_shard
    def dying(self, kind, shard, *rest):
        if kind == "img" and shard == 1:
            os._exit(9)
        return finish(self, kind, shard, *rest)
    ShardedRun._finish_shard = dying
from e2_plugins.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _torchrun(script, args, kill_rank=None):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if kill_rank is not None:
        env["KILL_RANK"] = str(kill_rank)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(port), "--max-restarts", "0", str(script), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_torchrun_processes_share_the_shards_and_write_a_one_process_folder(catalog, tmp_path, tiny_checkpoints):
    """``torchrun --nproc-per-node 2 ... run embed --shard-size 4``: each process writes its shards, process 0
    folds them into the manifest, and the folder equals a one-process run's, byte for byte; also after one
    process is killed inside a shard and the same command runs again."""
    import subprocess
    import sys

    one, two = tmp_path / "one", tmp_path / "two"
    script = tmp_path / "embed_run.py"
    script.write_text(TORCHRUN_SCRIPT)
    args = ["run", "embed", "--images", str(catalog), "--texts", str(catalog.parent / "texts.txt"), "--encoder",
            tiny_checkpoints["e2"], "--device", "cpu", "--regions", "--batch-size", "2", "--shard-size", "4",
            "--workers", "0", "--no-progress"]
    alone = subprocess.run([sys.executable, str(script), *args, "--out", str(one)], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": "0"}, timeout=300)  # the same threads
    assert alone.returncode == 0, alone.stderr[-1000:]
    args += ["--out", str(two)]
    killed = _torchrun(script, args, kill_rank=1)
    assert killed.returncode != 0
    manifest = json.loads((two / "manifest.json").read_text())
    assert "img" not in manifest or not manifest["img"]["complete"]
    again = _torchrun(script, args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert_same_files(two, one)
    assert not (two / "finished").exists()
