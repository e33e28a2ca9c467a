"""`e2-plugins run index` at catalog scale: a clustered gallery written as an embed shard folder, indexed by the
task's own code (shard by shard from the memory-mapped shards), searched with and without reranking, its
recall@10 against exact search; then the same index on paper for larger catalogs, from the rates measured here.

The gallery is the one ``search_scale.py`` searches (unit vectors around items/100 centres, queries noisy
copies of gallery items), written once under ``--out`` with ``tests/other_data.write_embeddings`` (the
package's shard writer without an encoder). Memory: the process's anonymous resident memory (the index, the
training sample, the chunk being added; the memory-mapped shards are file pages the kernel can drop),
sampled every 50 ms, its peak above the start of the build.

    python benchmarks/index_scale.py --items 1000000 --threads 2 --out runs/bench-index
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from e2_embed import EmbeddingShards, build_index, open_index
from e2_eval import neighbour_recall, topk_indices

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from other_data import write_embeddings  # noqa: E402  (the tests' writer of given vectors)
from search_scale import clustered  # noqa: E402


def anon_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024


class PeakMemory:
    """Peak anonymous resident memory above the start, sampled in a thread."""

    def __enter__(self):
        self.start = self.peak = anon_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, anon_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.extra = self.peak - self.start


def gallery_folder(out: Path, items: int, dim: int, queries: int, shard_size: int) -> Path:
    folder = out / f"gallery-{items}-{dim}"
    if not (folder / "manifest.json").is_file() or not json.loads((folder / "manifest.json").read_text()).get(
            "text", {}).get("complete"):
        print(f"writing {items:,} vectors to {folder} ...", flush=True)
        gallery = clustered(items, dim, seed=items, clusters=max(10, items // 100))
        pick = torch.randint(items, (queries,), generator=torch.Generator().manual_seed(1))
        noisy = F.normalize(gallery[pick] + torch.randn(queries, dim) * (0.5 / math.sqrt(dim)), dim=1)
        write_embeddings(folder, gallery, noisy, shard_size=shard_size)
        del gallery
    return folder


def timed_search(index, queries, k, repeats):
    best, found = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        found = index.search(queries, k)
        best = min(best, time.perf_counter() - start)
    return found, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=100_000)
    parser.add_argument("--specs", nargs="+", default=["IVF{lists},PQ{codes}"],
                        help="faiss descriptions; {lists} is round(4 sqrt(items)), {codes} D/8")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--rerank", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scales", type=float, nargs="+", default=[1e7, 1e8], help="catalog sizes on paper")
    parser.add_argument("--out", default="runs/bench-index")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    folder = gallery_folder(Path(args.out), args.items, args.dim, args.queries, args.shard_size)
    gallery = EmbeddingShards(folder)
    queries = torch.from_numpy(np.array(EmbeddingShards(folder, "text_emb")[:]))
    start = time.perf_counter()
    exact = topk_indices(queries, gallery, 10)
    exact_s = time.perf_counter() - start
    print(f"\n{args.items:,} items, {args.dim}-d, {len(queries)} queries, top-10, {args.threads} threads "
          f"(torch and faiss), faiss {faiss.__version__}; exact top-10 (topk_indices over the shards): "
          f"{exact_s:.1f} s, {1e3 * exact_s / len(queries):.2f} ms per query\n")
    lists, codes = round(4 * math.sqrt(args.items)), max(m for m in range(1, args.dim // 8 + 1) if args.dim % m == 0)
    print("| index | train rows | train s | add s | index MB | peak extra MB | nprobe | rerank | ms per query | "
          "recall@10 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    measured = []
    for spec in args.specs:
        spec = spec.format(lists=lists, codes=codes)
        path = folder / "index" / (spec.replace(",", "_") + ".faiss")
        with PeakMemory() as memory:
            report = build_index(folder, spec=spec, rerank=args.rerank, check=0, out=path, progress=False)
        index = open_index(folder, index=path)
        ivf = faiss.try_extract_index_ivf(index.index)
        rows = []
        for nprobe in args.nprobe if ivf is not None else [None]:
            if ivf is not None:
                ivf.nprobe = nprobe
            for rerank in sorted({0, args.rerank}):
                index.rerank = rerank
                found, seconds = timed_search(index, queries, 10, args.repeats)
                rows.append(dict(nprobe=nprobe, rerank=rerank, ms=1e3 * seconds / len(queries),
                                 recall=neighbour_recall(found, exact)))
        coarse_ms = assign_ms = None
        if ivf is not None:
            start = time.perf_counter()
            ivf.quantizer.search(np.ascontiguousarray(queries.numpy()), min(args.nprobe))
            coarse_ms = 1e3 * (time.perf_counter() - start) / len(queries)
            chunk = np.ascontiguousarray(gallery[:65536], dtype=np.float32)   # assigning rows as adding does
            start = time.perf_counter()
            ivf.quantizer.search(chunk, 1)
            assign_ms = 1e3 * (time.perf_counter() - start) / len(chunk)
        for i, row in enumerate(rows):
            head = (f"| {spec} | {report['train_rows']:,} | {report['train_seconds']:.1f} | {report['add_seconds']:.1f} | "
                    f"{report['bytes'] / 2**20:.0f} | {memory.extra:.0f} |" if i == 0 else "| | | | | | |")
            print(f"{head} {row['nprobe']} | {row['rerank']} | {row['ms']:.3f} | {row['recall']:.3f} |")
        codebook_s = None
        if "PQ" in spec:   # the codebooks' share of the training, timed alone on as many rows
            pq = faiss.ProductQuantizer(args.dim, int(spec.rsplit("PQ", 1)[1].split("x")[0]), 8)
            sample = np.ascontiguousarray(gallery[:report["train_rows"]], dtype=np.float32)
            start = time.perf_counter()
            pq.train(sample)
            codebook_s = time.perf_counter() - start
        measured.append(dict(spec=spec, report=report, rows=rows, coarse_ms=coarse_ms, assign_ms=assign_ms, lists=lists,
                             memory=memory.extra, codebook_s=codebook_s))
    for m in measured:
        if "PQ" in m["spec"] and m["coarse_ms"] is not None:
            paper(m, args)
    Path(args.out, "results.json").write_text(json.dumps(dict(items=args.items, dim=args.dim, exact_s=exact_s,
                                                              measured=measured), indent=1))


def paper(m, args) -> None:
    """The IVF-PQ index at larger sizes, from this run's rates (formulas printed beside). faiss's k-means uses at
    most 256 rows per centroid: the coarse one min(T, 256 L) rows, each codebook's 65,536."""
    n0, lists0, report = args.items, m["lists"], m["report"]
    codes = int(m["spec"].rsplit("PQ", 1)[1].split("x")[0])
    rows0 = min(report["train_rows"], 256 * lists0)
    by = {(r["nprobe"], r["rerank"]): r["ms"] for r in m["rows"]}
    lo, hi = min(args.nprobe), max(args.nprobe)
    coarse = m["coarse_ms"]                                                    # ms per vector against L0 centroids
    per_item = (by[(hi, 0)] - by[(lo, 0)]) / ((hi - lo) * n0 / lists0)       # ms per code scanned
    fixed = by[(lo, 0)] - coarse - per_item * lo * n0 / lists0
    rerank_ms = by[(lo, args.rerank)] - by[(lo, 0)]
    kmeans_s = report["train_seconds"] - m["codebook_s"]
    assign = m["assign_ms"]                                                    # ms per added row, L0 centroids
    encode_ms = 1e3 * report["add_seconds"] / n0 - assign
    print(f"\nOn paper ({m['spec']} at {n0:,} items, nprobe {lo}, rerank {args.rerank}; D = {args.dim}, "
          f"{codes}-byte codes): lists L(N) = round(4 sqrt N), training rows T(N) = max(100,000, 40 L);")
    print(f"  memory(N) = N (codes + 8-byte id) + L D 4 (centroids) + 256 D 4 (codebooks); measured at {n0:,}: "
          f"{report['bytes'] / 2**20:.0f} MB, formula {memory(n0, lists0, codes, args.dim) / 2**20:.0f} MB;")
    print(f"  train(N) = coarse k-means {kmeans_s:.1f} s x min(T, 256 L) L / ({rows0:,} x {lists0:,}) "
          f"+ codebooks {m['codebook_s']:.1f} s (timed alone here; 65,536 rows at any N);")
    print(f"  add(N) = N x (assignment {assign * 1e3:.2f} us x L/{lists0:,} + encoding {encode_ms * 1e3:.2f} us) "
          f"(assignment timed alone on {min(65536, n0):,} rows, encoding the rest of the measured add);")
    print(f"  ms per query(N) = {fixed:.3f} + coarse {coarse:.4f} x L/{lists0:,} + {per_item * 1e6:.2f} ns x nprobe N / L "
          f"codes scanned + rerank {rerank_ms:.3f} (rows in the page cache; from disk, {args.rerank * 10} random reads)")
    print("\n| items | lists | training rows | index GB | training sample GB | train h | add h | ms per query | "
          "with rerank |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in [n0, *args.scales]:
        n = int(n)
        lists = max(1, min(65536, round(4 * math.sqrt(n))))
        train = min(n, max(100_000, 40 * lists))
        train_h = (kmeans_s * min(train, 256 * lists) * lists / (rows0 * lists0) + m["codebook_s"]) / 3600
        add_h = n * (assign * lists / lists0 + encode_ms) / 3.6e6
        query = fixed + coarse * lists / lists0 + per_item * lo * n / lists
        print(f"| {n:,} | {lists:,} | {train:,} | {memory(n, lists, codes, args.dim) / 2**30:.2f} | "
              f"{train * args.dim * 4 / 2**30:.2f} | {train_h:.2f} | {add_h:.2f} | {query:.2f} | {query + rerank_ms:.2f} |")


def memory(n, lists, codes, dim) -> float:
    return n * (codes + 8) + lists * dim * 4 + 256 * dim * 4


if __name__ == "__main__":
    main()
