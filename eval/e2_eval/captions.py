"""The captioning harness: the COCO caption metrics (pycocoevalcap BLEU-1..4, METEOR, ROUGE-L, CIDEr,
and SPICE when its jars are there) after PTB tokenisation, and predictions in the COCO results format.

pycocoevalcap's PTB tokenizer writes a temporary file inside its own package folder; here the same jar
runs with the file in a temporary folder, so a read-only install works. METEOR and the tokenizer need
Java: without it they are skipped with one line (a simple Python tokenisation stands in) and the rest
is reported. SPICE needs Stanford CoreNLP jars it would download: skipped with one line when absent.
Items without a reference caption are reported, not scored.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...",
               ";"}


def _package_dir() -> Optional[Path]:
    try:
        import pycocoevalcap
    except ImportError:
        return None
    return Path(list(pycocoevalcap.__path__)[0])


def java_available() -> bool:
    return shutil.which("java") is not None


def ptb_tokenize(captions: Mapping[str, Sequence[str]]) -> Tuple[Dict[str, List[str]], str]:
    """Lower-cased PTB tokens joined by spaces, punctuation removed (pycocoevalcap's tokenisation), and
    which tokenizer ran. Without Java: a regex tokenisation, said so."""
    ids = [k for k, texts in captions.items() for _ in texts]
    lines = [" ".join(t.split()) for texts in captions.values() for t in texts]
    jar = (_package_dir() or Path("/nonexistent")) / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    if java_available() and jar.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "captions.txt"
            source.write_text("\n".join(lines), encoding="utf-8")
            out = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                                  "-lowerCase", str(source)], capture_output=True, check=True).stdout.decode()
        tokenized = out.split("\n")[:len(lines)]
        how = "PTB tokenizer (Stanford CoreNLP 3.4.1)"
    else:
        tokenized = [" ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]", line.lower())) for line in lines]
        how = ("regex tokenisation (no Java: the PTB tokenizer is skipped; these scores are not comparable with "
               "PTB-tokenised ones, BLEU-4 and CIDEr read higher)")
    result: Dict[str, List[str]] = {k: [] for k in captions}
    for k, line in zip(ids, tokenized):
        result[k].append(" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATION))
    return result, how


def caption_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                    spice: bool = True) -> Dict:
    """COCO caption metrics of ``predictions`` (id -> caption) against ``references`` (id -> captions).

    Returns ``{"metrics": {"BLEU-1": .., ..., "CIDEr": ..}, "notes": [...], "not_scored": [...]}``:
    ``notes`` says what was skipped and why, ``not_scored`` lists ids without a reference.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    not_scored = sorted(k for k in predictions if not [r for r in references.get(k, ()) if r.strip()])
    ids = [k for k in predictions if k not in set(not_scored)]
    if not ids:
        raise ValueError("no prediction has a reference caption to be scored against")
    refs, how = ptb_tokenize({k: [r for r in references[k] if r.strip()] for k in ids})
    preds, _ = ptb_tokenize({k: [predictions[k]] for k in ids})
    notes = [f"tokenised with the {how}"]
    metrics: Dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(refs, preds, verbose=0)
    metrics.update({f"BLEU-{n + 1}": 100 * float(b) for n, b in enumerate(bleu)})
    meteor = _meteor(refs, preds, notes)
    if meteor is not None:
        metrics["METEOR"] = 100 * meteor
    metrics["ROUGE-L"] = 100 * float(Rouge().compute_score(refs, preds)[0])
    metrics["CIDEr"] = 100 * float(Cider().compute_score(refs, preds)[0])
    if spice:
        value = _spice(refs, preds, notes)
        if value is not None:
            metrics["SPICE"] = 100 * value
    return {"metrics": {k: round(v, 4) for k, v in metrics.items()}, "notes": notes, "not_scored": not_scored,
            "scored": len(ids)}


def _meteor(refs, preds, notes: List[str]) -> Optional[float]:
    if not java_available():
        notes.append("METEOR skipped: it needs Java (install a JRE, e.g. apt-get install default-jre-headless)")
        return None
    return float(_meteor_scorer().compute_score(refs, preds)[0])


_METEOR = None


def _meteor_scorer():
    """One METEOR process for the whole run (its JVM takes seconds to start)."""
    global _METEOR
    if _METEOR is None:
        from pycocoevalcap.meteor.meteor import Meteor

        _METEOR = Meteor()
    return _METEOR


def _spice(refs, preds, notes: List[str]) -> Optional[float]:
    lib = (_package_dir() or Path("/nonexistent")) / "spice" / "lib"
    if not java_available() or not (lib / "stanford-corenlp-3.6.0.jar").is_file():
        notes.append("SPICE skipped: it needs Stanford CoreNLP 3.6.0 jars in pycocoevalcap/spice/lib, which it "
                     "downloads on first use (run pycocoevalcap's get_stanford_models once on a machine with network)")
        return None
    from pycocoevalcap.spice.spice import Spice

    return float(Spice().compute_score(refs, preds)[0])


def coco_results(predictions: Mapping[str, str]) -> List[Dict]:
    """Predictions in the COCO results format: ``[{"image_id": ..., "caption": ...}]``."""
    return [{"image_id": k, "caption": v} for k, v in predictions.items()]


def write_coco_results(predictions: Mapping[str, str], path: os.PathLike) -> Path:
    path = Path(path)
    path.write_text(json.dumps(coco_results(predictions), indent=1, ensure_ascii=False))
    return path


def write_coco_references(references: Mapping[str, List[str]], path: os.PathLike) -> Path:
    """The reference captions in the COCO annotations format (``images`` and ``annotations``, the ids of
    :func:`write_coco_results`), so that anyone can rescore the predictions with pycocoevalcap's own tools."""
    path = Path(path)
    annotations = [{"image_id": image, "id": n, "caption": caption}
                   for n, (image, caption) in enumerate((k, c) for k, captions in references.items() for c in captions)]
    path.write_text(json.dumps({"images": [{"id": k} for k in references], "annotations": annotations},
                               indent=1, ensure_ascii=False))
    return path
