#!/usr/bin/env bash
# Does clip-retrieval, in its own environment, index `e2-plugins run embed --shard-size` output, and does its back
# end map each hit to the right metadata row? Not part of the test suite.
#
#   benchmarks/clip_retrieval_check.sh [VENV] [WORKDIR]
#
# VENV: a virtual environment with clip-retrieval; made when it has none, with
#   pip install clip-retrieval==2.45.0 'setuptools<81'   (its `clip` import needs pkg_resources)
# WORKDIR (default: a new temporary folder): 30 coloured squares and the first 30 / 45 distinct texts of the
# synthetic validation set, embedded with demo:e2, 2 items per shard (15 image shards: img_emb_10 sorts before
# img_emb_2): "paired", 30 texts, text j for image j; "unpaired", 45 texts; "unreadable", 30 texts with image 5
# unreadable. Hits are looked up with the back end's own code (clip_back.load_index, load_metadata_provider,
# KnnService.query with embedding_input), short of the CLIP model a running `clip-retrieval back` loads.
set -euo pipefail
VENV=$(realpath -m "${1:-clip-retrieval-venv}")
WORK=$(realpath -m "${2:-$(mktemp -d)}")
PY=${E2_PYTHON:-python}   # the environment with this package (e2-plugins)
if [ ! -x "$VENV/bin/clip-retrieval" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q clip-retrieval==2.45.0 'setuptools<81'
fi
echo "clip-retrieval $("$VENV/bin/pip" show clip-retrieval | sed -n 's/^Version: //p')," \
     "autofaiss $("$VENV/bin/pip" show autofaiss | sed -n 's/^Version: //p')," \
     "faiss-cpu $("$VENV/bin/pip" show faiss-cpu | sed -n 's/^Version: //p') in $VENV; work in $WORK"
mkdir -p "$WORK" && cd "$WORK"

"$PY" - <<'EOF'
import colorsys, os
from PIL import Image
from e2_core.data import open_dataset
from e2_core.texts import build_texts
os.makedirs("images", exist_ok=True)
for i in range(30):
    rgb = colorsys.hsv_to_rgb(i / 30, 0.9, 1.0 if i % 2 == 0 else 0.55)
    Image.new("RGB", (64, 64), tuple(int(255 * c) for c in rgb)).save(f"images/sq_{i:02d}.png")
data, texts = open_dataset("synthetic", None, "validation", prepare=True), []
for i in range(len(data)):
    text = build_texts(data.product(i).tags, data.spec)[0]
    if text not in texts:
        texts.append(text)
    if len(texts) == 45:
        break
for n in (30, 45):
    open(f"texts{n}.txt", "w").write("\n".join(texts[:n]) + "\n")
EOF

mkdir -p images-bad && cp images/*.png images-bad/ && echo "not an image" > images-bad/sq_05.png
for case in "paired images texts30" "unpaired images texts45" "unreadable images-bad texts30"; do
    set -- $case
    rm -rf "$1" && mkdir "$1" && cd "$1"
    e2-plugins run embed --images "../$2" --texts "../$3.txt" --shard-size 2 --out e2-emb --no-progress > embed.log
    # README's conversion, for metadata/ and text_metadata/
    "$VENV/bin/python" -c "import glob, pandas as pd; [pd.read_json(f, lines=True, dtype=False).to_parquet(f[:-6] + '.parquet') for f in glob.glob('e2-emb/*metadata/*.jsonl')]"
    "$VENV/bin/clip-retrieval" index --embeddings_folder e2-emb --index_folder e2-index > index.log 2>&1
    # README's second index folder: the text index with the text rows as its metadata
    "$VENV/bin/python" -c "import glob, os, shutil; os.makedirs('e2-text-index/metadata'); shutil.copy('e2-index/text.index', 'e2-text-index'); [shutil.copy(f, 'e2-text-index/metadata') for f in glob.glob('e2-emb/text_metadata/*.parquet')]"
    cd ..
done

PYTHONWARNINGS=ignore "$VENV/bin/python" - <<'EOF'
import json
import numpy as np
from clip_retrieval.clip_back import ClipResource, KnnService, load_index, load_metadata_provider

def rows(folder, name, meta):  # this package's row order: shard 0, 1, 2, ... (not the file names' order)
    n = len(json.load(open(f"{folder}/manifest.json"))["img" if name == "img_emb" else "text"]["shards"])
    return (np.concatenate([np.load(f"{folder}/{name}/{name}_{i}.npy") for i in range(n)]),
            [json.loads(line) for i in range(n) for line in open(f"{folder}/{meta}/{meta}_{i}.jsonl")])

def back(index_folder, modality):  # clip back's loading, less its CLIP model
    index = load_index(f"{index_folder}/{modality}.index", False)
    provider, _ = load_metadata_provider(index_folder, False, False, None, ["item", "image_path", "caption"], False)
    resource = ClipResource("cpu", None, None, None, None, None, None, provider, index if modality == "image" else None,
                            index if modality == "text" else None, None, ["item", "image_path", "caption"], False, None)
    return KnnService(clip_resources={"e2": resource})

def hits(service, modality, embeddings):
    out = []
    for e in embeddings:
        try:
            out.append(service.query(embedding_input=e.tolist(), modality=modality, num_images=1, num_result_ids=1,
                                     deduplicate=False)[0])
        except IndexError:  # the hit's row is past the end of the metadata
            out.append(None)
    return out

def line(ok, what, good, total):
    print(f"{'PASS' if ok else 'FAIL'} {what}: {good}/{total}")

for case, n in (("paired", 30), ("unpaired", 45), ("unreadable", 30)):
    img, img_meta = rows(f"{case}/e2-emb", "img_emb", "metadata")
    txt, txt_meta = rows(f"{case}/e2-emb", "text_emb", "text_metadata")
    got = hits(back(f"{case}/e2-index", "image"), "image", img)
    good = sum(h is not None and h.get("image_path") == m["image_path"] for h, m in zip(got, img_meta))
    line(good == len(img), f"{case}: image hits -> own image row (e2-index/metadata/)", good, len(img))
    got = hits(back(f"{case}/e2-text-index", "text"), "text", txt)
    good = sum(h is not None and (h.get("item"), h.get("caption")) == (m["item"], m["caption"]) for h, m in zip(got, txt_meta))
    line(good == len(txt), f"{case}: text hits -> own text row (text_metadata/ as e2-text-index/metadata/)", good, len(txt))
    got = hits(back(f"{case}/e2-index", "text"), "text", txt)  # text j describes image j (sq_{j:02d}.png)
    mine = sum(h is not None and h.get("image_path", "").endswith(f"sq_{m['item']:02d}.png") for h, m in zip(got, txt_meta))
    summary = f"{sum(h is not None for h in got)} return an image row, {got.count(None)} raise IndexError"
    if case == "paired":
        line(mine == n, "paired: text hits -> their own image's row (e2-index/metadata/)", mine, n)
    elif case == "unpaired":  # texts that are not one per image: no text has an image row of its own
        print(f"INFO unpaired: text hits through e2-index/metadata/: {summary}")
    else:
        print(f"INFO unreadable: text hits -> their own image's row (e2-index/metadata/): {mine}/{n}; {summary}")
EOF
