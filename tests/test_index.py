"""The index task and FaissIndex at catalog scale: built shard by shard from an embed folder, compressed
storage reranked from the shards, saved and opened again, refused when the folder changed."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from e2_embed import EmbeddingShards, build_index, open_index
from e2_eval import FaissIndex, neighbour_recall, topk_indices
from e2_eval import search
from e2_plugins.cli import main
from other_data import write_embeddings

faiss = pytest.importorskip("faiss")


def clustered(n, dim, seed, clusters):
    """Unit vectors around ``clusters`` centres (neighbours at nearly equal distances, like products of one kind)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, dim, generator=g), dim=1)
    x = centres[torch.randint(clusters, (n,), generator=g)]
    return F.normalize(x + torch.randn(n, dim, generator=g) * (0.8 / math.sqrt(dim)), dim=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    images = clustered(6000, 32, 0, 60)
    texts = F.normalize(images[::20] + torch.randn(300, 32, generator=torch.Generator().manual_seed(1)) * 0.05, dim=1)
    return write_embeddings(tmp_path_factory.mktemp("catalog") / "emb", images, texts, shard_size=1700)


def test_shards_read_rows_at_any_positions(folder):
    gallery = EmbeddingShards(folder)
    whole = np.array(gallery[:])
    rows = np.array([5999, 0, 1700, 1699, 3400, 5, 5])
    assert np.array_equal(gallery[rows], whole[rows]) and np.array_equal(gallery[[3, 2]], whole[[3, 2]])
    with pytest.raises(IndexError, match=r"row positions must lie in \[0, 6000\)"):
        gallery[np.array([6000])]


def test_index_task_builds_from_the_shards_and_opens_again(folder, capsys):
    assert main(["run", "index", "--embeddings", str(folder), "--spec", "IVF64,Flat", "--nprobe", "64",
                 "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["spec"] == "IVF64,Flat" and report["items"] == 6000 and report["search"]["rerank"] == 0
    # every list searched: exact, and said so by the check (texts as queries)
    assert report["check"].pop("ms per query") > 0
    assert report["check"] == {"queries": 300, "from": "text_emb", "recall@10": 1.0}
    saved = json.loads((folder / "index" / "img_emb.json").read_text())
    assert saved.pop("check").pop("ms per query") > 0 and saved == {k: v for k, v in report.items() if k != "check"}
    index = open_index(folder)
    queries = torch.from_numpy(np.array(EmbeddingShards(folder, "text_emb")[:]))
    assert index.spec == "IVF64,Flat" and torch.equal(index.search(queries, 10), topk_indices(queries, index.gallery, 10))
    assert index.gallery.metadata()[int(index.search(queries[:1], 1)[0, 0])]["image_path"].startswith("img-")


def test_compressed_storage_is_reranked_from_the_shards(folder, tmp_path):
    out = tmp_path / "pq.faiss"
    report = build_index(folder, spec="IVF64,PQ4", nprobe=64, out=out, progress=False)
    check = report["check"]
    assert report["search"]["rerank"] == 10                      # compressed storage: reranked by default
    assert check["recall@10 without rerank"] < 0.6 < 0.95 < check["recall@10"]
    assert report["bytes"] < 6000 * 32 * 4 / 4                    # codes, not vectors
    queries = torch.from_numpy(np.array(EmbeddingShards(folder, "text_emb")[:]))
    index = open_index(folder, index=out)
    found = index.search(queries, 10)
    assert index.rerank == 10 and round(neighbour_recall(found, topk_indices(queries, index.gallery, 10)), 4) \
        == check["recall@10"]


def test_an_index_of_a_changed_folder_is_refused(folder, tmp_path):
    copy = tmp_path / "emb"
    write_embeddings(copy, clustered(500, 32, 2, 5), shard_size=200)
    build_index(copy, spec="Flat", check=0, progress=False)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["img"]["source"] = "elsewhere"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"built from another state of .*emb \(its manifest.json changed since.*"
                                         r"e2-plugins run index --embeddings"):
        open_index(copy)
    with pytest.raises(FileNotFoundError, match=r"text_emb.json: no index description; build it with"):
        open_index(folder, kind="text")


def test_adding_reads_one_chunk_at_a_time():
    class Recorded:
        def __init__(self, x):
            self.x, self.shape, self.dtype, self.reads = x, x.shape, x.dtype, []

        def __getitem__(self, key):
            self.reads.append(len(self.x[key]))
            return self.x[key]

    gallery = Recorded(clustered(2000, 16, 3, 20).numpy())
    FaissIndex(gallery, "IVF20,Flat", train_size=500, chunk_size=300)
    assert max(gallery.reads) <= 300 and sum(gallery.reads[-7:]) == 2000   # training runs, then 7 chunks added


def test_auto_stores_whole_vectors_up_to_the_limit_then_codes(monkeypatch):
    assert search.resolve_spec("auto", 1_000_000, 512) == "IVF4000,Flat"
    assert search.resolve_spec("auto", 10_000_000, 512) == "IVF12649,PQ64"
    assert search.resolve_spec("auto", 10_000_000, 100) == "IVF12649,PQ10"    # D/8 = 12.5: the largest divisor below
    assert search.resolve_spec("HNSW32", 10, 4) == "HNSW32"


def test_save_and_load_keep_the_results_and_refuse_another_gallery(tmp_path):
    gallery, queries = clustered(1500, 16, 4, 15), clustered(20, 16, 5, 15)
    index = FaissIndex(gallery, "IVF16,PQ4", nprobe=16, rerank=5)
    assert not faiss.downcast_index(faiss.extract_index_ivf(index.index)).do_polysemous_training   # unused, slow
    index.save(tmp_path / "a.faiss")
    again = FaissIndex.load(tmp_path / "a.faiss", gallery, nprobe=16, rerank=5)
    assert torch.equal(again.search(queries, 7), index.search(queries, 7))
    assert FaissIndex.load(tmp_path / "a.faiss").rerank == 0          # no gallery to rerank from
    with pytest.raises(ValueError, match=r"indexes 1500 items of dimension 16, but the gallery is \(100, 16\)"):
        FaissIndex.load(tmp_path / "a.faiss", gallery[:100])
    with pytest.raises(ValueError, match="rerank reads the candidates' rows from the gallery"):
        FaissIndex.load(tmp_path / "a.faiss", rerank=3)
    (tmp_path / "bad.faiss").write_bytes(b"not an index")
    with pytest.raises(ValueError, match=r"bad.faiss: not a faiss index file"):
        FaissIndex.load(tmp_path / "bad.faiss")


def test_a_failed_save_leaves_no_file(tmp_path, monkeypatch):
    index = FaissIndex(clustered(300, 8, 6, 3), "Flat")

    def broken(_, path):
        open(path, "wb").write(b"half")
        raise RuntimeError("disk full")
    monkeypatch.setattr(faiss, "write_index", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        index.save(tmp_path / "x.faiss")
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_names_what_is_missing(tmp_path, folder, monkeypatch, capsys):
    assert main(["run", "index", "--embeddings", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such folder; give a folder written by `e2-plugins run embed --shard-size N`" in \
        capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)
    assert main(["run", "index", "--embeddings", str(folder), "--out", str(tmp_path / "x.faiss")]) == 2
    assert "the faiss backend needs faiss: pip install 'e2-plugins[faiss]'" in capsys.readouterr().err
    assert not (tmp_path / "x.faiss").exists()
