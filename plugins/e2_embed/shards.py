"""Sharded, resumable embedding output, and its memory-mapped reader.

A shard folder (``e2-plugins run embed --shard-size N --out DIR``) holds, for images (texts alike with
``text_emb/``, ``text_metadata/``, ``text_index.npy``):

* ``img_emb/img_emb_{i}.npy``: float32 (rows, D), shard i covering items ``i*N ... (i+1)*N - 1`` of the
  input list less its unreadable images (``region_emb/``, ``selected_patches/`` with ``--regions``);
  plain ``.npy`` files that ``numpy.load``, faiss and clip-retrieval-style indexers read;
* ``metadata/metadata_{i}.jsonl``: one line per row, ``{"item": n, "image_path": ...}``;
* ``img_index.npy``: int64 (items, 2), the shard and row of each item, -1 for an unreadable image;
* ``manifest.json``: the encoder, its weight digest and the settings, and per input the shards done.

A shard's files are written (atomically) before the manifest records it, so a run killed at any point
continues at its first unrecorded shard, which it writes again: no item is duplicated or dropped. A
recorded shard whose files were damaged later (truncated, overwritten, deleted) is written again, with
the shards after it, by the same command.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from tqdm.auto import tqdm

from e2_core.checkpoint import _atomic_write

log = logging.getLogger(__name__)

__all__ = ["EmbeddingShards", "ShardedRun"]

MANIFEST = "manifest.json"
#: kind -> (embedding names, metadata folder, label field)
KINDS = {"img": (("img_emb", "region_emb", "selected_patches"), "metadata", "image_path"),
         "text": (("text_emb",), "text_metadata", "caption")}


#: the embedding streams' tensor names (``e2_core.embedding``) -> this folder's names
FOLDER_NAMES = {"image_features": "img_emb", "regional_features": "region_emb", "selected_patches": "selected_patches",
                "text_features": "text_emb"}
#: where the processes of a torchrun record the shards they finished, until process 0 folds them into the manifest
FINISHED = "finished"
#: settings of folders written before the setting was recorded
SAVED_BEFORE = {"fast_decode": False}


def _write_json(path: Path, value) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=1)))


def _write_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    _atomic_write(path, write, array.nbytes)


def _read_manifest(folder: Path):
    try:
        return json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / MANIFEST}: not valid JSON ({err}); delete the folder to start over") from err


def _names(kind: str, manifest: dict) -> tuple:
    """The embedding files each shard of ``kind`` has in this folder."""
    names = KINDS[kind][0]
    return names if kind != "img" or manifest.get("regions") else names[:1]


def _shard_problem(folder: Path, kind: str, shard: int, manifest: dict, metadata: bool = True) -> Optional[str]:
    """What is wrong with a recorded shard's files, or None. Only the .npy headers are read (and, with
    ``metadata``, the metadata's lines), never the embeddings."""
    rows = manifest[kind]["shards"][shard]["rows"]
    for name in _names(kind, manifest):
        path = folder / name / f"{name}_{shard}.npy"
        try:
            array = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            return f"{path} is missing"
        except (ValueError, OSError) as err:
            return f"{path} is not a readable .npy file ({str(err).split('. ')[0]})"  # never unpickled
        expected = (rows, manifest["dim"]) if name == _names(kind, manifest)[0] else (rows,)
        if array.shape[:len(expected)] != expected or array.dtype != np.float32 and name != "selected_patches":
            return f"{path} holds {array.dtype} {array.shape}, not float32 {expected} as {MANIFEST} records"
    if metadata:
        path = folder / KINDS[kind][1] / f"{KINDS[kind][1]}_{shard}.jsonl"
        try:
            with open(path, "rb") as f:
                lines = sum(1 for _ in f)
        except FileNotFoundError:
            return f"{path} is missing"
        if lines != rows:
            return f"{path} has {lines} lines, not {rows} as {MANIFEST} records"
    return None


def _damaged(problem: str) -> str:
    return f"{problem}; run the same `e2-plugins run embed` command again: it writes the damaged shard anew"


class ShardedRun:
    """Writes one embed run's shards into ``folder``, continuing where an earlier run of the same
    encoder, settings and inputs stopped (anything else there is refused). Under torchrun each process
    writes the shards ``s`` with ``s % world == rank`` and records each beside its files; process 0 folds them
    into the manifest when all are written, which makes the folder a one-process run's, byte for byte."""

    def __init__(self, folder: Path, net, shard_size: int, batch_size: int, regions: bool, progress: bool = True,
                 fast_decode: bool = False):
        self.folder, self.progress, self.shard_size, self.batch_size = folder, progress, shard_size, batch_size
        self.rank, self.world = ranks()
        if self.rank != 0:
            _barrier(self.world)  # process 0 checks the folder and starts its manifest first
        settings = {"encoder": net.name, "fingerprint": net.fingerprint(), "entities": list(net.entities),
                    "dim": net.embed_dim, "shard_size": shard_size, "batch_size": batch_size, "regions": regions,
                    "fast_decode": fast_decode}
        manifest = _read_manifest(folder)
        if manifest is None and folder.exists() and any(folder.iterdir()):
            raise ValueError(f"out={folder} is a non-empty folder without {MANIFEST}: not an embed shard folder; "
                             f"choose another output folder")
        for key, value in settings.items():
            saved = manifest.get(key, SAVED_BEFORE.get(key)) if manifest is not None else value
            if saved != value:
                raise ValueError(f"out={folder} holds embeddings made with {key}={saved!r}, not "
                                 f"{key}={value!r}; use another output folder, or delete it to start over")
        self.manifest = manifest or {"format": 1, **settings}
        if self.rank == 0 and self.world > 1:
            if manifest is None:
                folder.mkdir(parents=True, exist_ok=True)
                _write_json(folder / MANIFEST, self.manifest)
            _barrier(self.world)

    def write(self, kind: str, labels: List[str], source, encode: Callable) -> dict:
        """Embeds the items not done yet: ``encode(batches)`` is a stream of ``e2_core.embedding`` for
        these batches of item numbers. Returns the run's report."""
        digest = hashlib.sha256("\n".join(labels).encode()).hexdigest()
        # images are the same files however their paths are written (relative, absolute, through a link)
        files = hashlib.sha256("\n".join(map(os.path.realpath, labels)).encode()).hexdigest() if kind == "img" else None
        record = self.manifest.setdefault(kind, {"source": str(source), "count": len(labels), "digest": digest,
                                                 "files": files, "shards": [], "complete": False})
        same = digest == record["digest"] or (files is not None and files == record.get("files"))
        if record["count"] != len(labels) or not same:
            raise ValueError(f"out={self.folder} holds embeddings of other {kind} inputs ({record['count']} items "
                             f"from {record['source']}); use another output folder, or delete it to start over")
        for shard in range(len(record["shards"])):
            problem = _shard_problem(self.folder, kind, shard, self.manifest)
            if problem:
                log.warning("%s: writing shard %d and the ones after it again", problem, shard)
                del record["shards"][shard:]
                record["complete"] = False
                break
        size, n = self.shard_size, len(labels)
        self._fold(kind)  # shards other processes finished (under torchrun) count as recorded
        done, total = len(record["shards"]), math.ceil(n / size)
        finished = set(range(done)) | set(self._finished(kind))
        todo = [s for s in range(total) if s not in finished and s % self.world == self.rank]
        batches = [list(range(b, min(b + self.batch_size, (s + 1) * size, n)))
                   for s in todo for b in range(s * size, min((s + 1) * size, n), self.batch_size)]
        bar = tqdm(total=n, initial=min(n, len(finished) * size), desc=f"embed {kind}", unit="item",
                   disable=not self.progress or self.rank != 0)
        parts, items, unreadable = {}, [], []
        for batch, (kept, tensors, failed) in zip(batches, encode(batches)):
            items += kept
            unreadable += failed
            for name, tensor in tensors.items():
                parts.setdefault(FOLDER_NAMES[name], []).append(tensor.numpy())
            bar.update(len(batch) * self.world)
            shard = batch[0] // size
            if batch[-1] == min(n, (shard + 1) * size) - 1:
                self._finish_shard(kind, shard, labels, parts, items, unreadable)
                parts, items, unreadable = {}, [], []
        bar.close()
        _barrier(self.world)  # every process's shards are written
        if self.rank == 0:
            self._fold(kind)
            if len(record["shards"]) != total:
                raise RuntimeError(f"{self.folder}: {total - len(record['shards'])} {kind} shard(s) were not written "
                                   "by any process; run the same command again")
            record["complete"] = True
            _write_npy(self.folder / f"{kind}_index.npy", _index(record, size))
            _write_json(self.folder / MANIFEST, self.manifest)
        _barrier(self.world)
        record.update(_read_manifest(self.folder)[kind])  # what process 0 recorded
        rows = sum(s["rows"] for s in record["shards"])
        report = {"images" if kind == "img" else "texts": rows, f"{kind}_shards": total, f"{kind}_resumed_at_shard": done}
        if kind == "img":
            report["unreadable_images"] = [reason for s in record["shards"] for _, reason in s["unreadable"]]
        return report

    def finish(self) -> None:
        """Nothing left to write: each shard and the manifest are saved as they are done."""

    def _finish_shard(self, kind, shard, labels, parts, items, unreadable):
        _, metadata, field = KINDS[kind]
        for name, arrays in parts.items():
            _write_npy(self.folder / name / f"{name}_{shard}.npy", np.concatenate(arrays))
        lines = "".join(json.dumps({"item": i, field: labels[i]}) + "\n" for i in items)
        (self.folder / metadata).mkdir(parents=True, exist_ok=True)
        _atomic_write(self.folder / metadata / f"{metadata}_{shard}.jsonl", lambda tmp: Path(tmp).write_text(lines))
        entry = {"rows": len(items), "unreadable": [list(u) for u in unreadable]}
        if self.world == 1 and shard == len(self.manifest[kind]["shards"]):
            self.manifest[kind]["shards"].append(entry)
            _write_json(self.folder / MANIFEST, self.manifest)         # the shard counts as done from here
        else:  # under torchrun: recorded beside its files, folded into the manifest by process 0
            (self.folder / FINISHED).mkdir(exist_ok=True)
            _write_json(self.folder / FINISHED / f"{kind}_{shard}.json", entry)

    def _finished(self, kind: str) -> Dict[int, dict]:
        """The shards of ``kind`` a process finished that the manifest does not record yet."""
        found = {}
        for path in (self.folder / FINISHED).glob(f"{kind}_*.json"):
            try:
                found[int(path.stem.rsplit("_", 1)[1])] = json.loads(path.read_text())
            except (ValueError, OSError):  # cut short: its shard is written again
                continue
        return found

    def _fold(self, kind: str) -> None:
        """Record, in order, the finished shards that extend the manifest's (process 0 writes it)."""
        record, finished = self.manifest[kind], self._finished(kind)
        while len(record["shards"]) in finished:
            shard = len(record["shards"])
            record["shards"].append(finished[shard])
            if _shard_problem(self.folder, kind, shard, self.manifest):  # damaged since: written again
                record["shards"].pop()
                break
        if self.rank == 0 and finished:
            _write_json(self.folder / MANIFEST, self.manifest)
            for shard in range(len(record["shards"])):
                (self.folder / FINISHED / f"{kind}_{shard}.json").unlink(missing_ok=True)
            if not any((self.folder / FINISHED).iterdir()):
                (self.folder / FINISHED).rmdir()


def ranks() -> Tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` unless torch.distributed runs (torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _index(record, size) -> np.ndarray:
    index = np.full((record["count"], 2), -1, dtype=np.int64)
    for shard, info in enumerate(record["shards"]):
        skipped = {item for item, _ in info["unreadable"]}
        items = [i for i in range(shard * size, min((shard + 1) * size, record["count"])) if i not in skipped]
        index[items, 0], index[items, 1] = shard, np.arange(len(items))
    return index


class EmbeddingShards:
    """The embeddings of a finished shard folder as one (items, ...) array, memory-mapped shard by shard:
    ``len``, ``shape``, ``dtype``, slicing (``shards[a:b]`` reads only those rows) and row positions
    (``shards[[7, 3]]``). ``topk_indices`` searches it in chunks, never loading it whole.

    Example:
        >>> gallery = EmbeddingShards("catalog-emb")                     # doctest: +SKIP
        >>> top = e2_eval.topk_indices(text_features, gallery, k=10)      # doctest: +SKIP
        >>> [gallery.metadata()[i]["image_path"] for i in top[0]]         # doctest: +SKIP
    """

    def __init__(self, folder, name: str = "img_emb"):
        self.folder, self.name = Path(folder), name
        kind = next((k for k, (names, _, _) in KINDS.items() if name in names), None)
        if kind is None:
            raise ValueError(f"unknown embedding name {name!r}; one of "
                             f"{', '.join(n for names, _, _ in KINDS.values() for n in names)}")
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: no such folder; give a folder written by `e2-plugins run embed "
                                    f"--shard-size N`")
        manifest = _read_manifest(self.folder)
        if manifest is None:
            raise FileNotFoundError(f"{self.folder}: no {MANIFEST}; not a folder written by `e2-plugins run embed "
                                    f"--shard-size N`, or its run stopped before the first shard (run it again)")
        record = manifest.get(kind)
        if record is None:
            raise ValueError(f"{self.folder} holds no {kind} embeddings")
        if not record["complete"]:
            raise ValueError(f"{self.folder}: the embed run is unfinished ({len(record['shards'])} of "
                             f"{math.ceil(record['count'] / manifest['shard_size'])} shards); run the same command "
                             f"again to finish it")
        if name not in _names(kind, manifest):
            raise ValueError(f"{self.folder} holds no {name} (embedded without regions=True)")
        self._kind, self._record = kind, record
        self._shards = [s for s, info in enumerate(record["shards"]) if info["rows"]]
        for shard in self._shards:
            problem = _shard_problem(self.folder, kind, shard, manifest, metadata=False)
            if problem:
                raise ValueError(_damaged(problem))
        self._manifest = manifest
        self._arrays = [np.load(self.folder / name / f"{name}_{s}.npy", mmap_mode="r") for s in self._shards]
        self._starts = np.cumsum([0] + [len(a) for a in self._arrays])
        trailing = self._arrays[0].shape[1:] if self._arrays else (manifest["dim"],)
        self.shape = (int(self._starts[-1]), *trailing)
        self.dtype = self._arrays[0].dtype if self._arrays else np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self[key:key + 1 if key != -1 else None][0]
        if isinstance(key, (list, np.ndarray)):
            return self._take(np.asarray(key))
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("EmbeddingShards reads contiguous row ranges only")
        pieces = []
        for array, first in zip(self._arrays, self._starts[:-1]):
            a, b = max(start - first, 0), min(stop - first, len(array))
            if a < b:
                pieces.append(array[a:b])
        if not pieces:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _take(self, rows: np.ndarray) -> np.ndarray:
        """The rows at the positions ``rows`` (any order, repeats allowed), each shard read once."""
        if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
            raise ValueError(f"EmbeddingShards takes a 1-D array of row positions, got {rows.dtype} {rows.shape}")
        if rows.size and not 0 <= rows.min() <= rows.max() < len(self):
            raise IndexError(f"row positions must lie in [0, {len(self)}), got {rows.min()} ... {rows.max()}")
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(shard):
            at = shard == s
            out[at] = self._arrays[s][rows[at] - self._starts[s]]
        return out

    def metadata(self) -> List[dict]:
        """One dict per row, in row order: the item number and its image path or caption."""
        folder = KINDS[self._kind][1]
        rows = []
        for shard in self._shards:
            problem = _shard_problem(self.folder, self._kind, shard, self._manifest)
            if problem:
                raise ValueError(_damaged(problem))
            with open(self.folder / folder / f"{folder}_{shard}.jsonl") as f:
                rows += [json.loads(line) for line in f]
        return rows
