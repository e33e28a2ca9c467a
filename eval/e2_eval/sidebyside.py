"""The side-by-side runner of the tasks that compare encoders (a baseline and the encoder under test):
both encoders are loaded, and a bad one refused, before any work; each method's result is written to
``results.json`` as soon as it exists; a method that fails is reported in one line while the others
still run and are written; and one renderer draws every task's table.

    >>> runner = SideBySide(out, {"baseline": "demo:clip-ft", "encoder": "demo:e2"}, device)  # doctest: +SKIP
    >>> for label, encoder in runner.encoders():                                              # doctest: +SKIP
    ...     runner.record(label, "searle", lambda: score(encoder))
    >>> runner.finish()            # raises MethodsFailed when a method failed, after writing everything
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from e2_core import load_encoder
from e2_core.checkpoint import _atomic_write
from e2_core.errors import MethodsFailed

log = logging.getLogger(__name__)


class SideBySide:
    """Loads ``sources`` (role -> encoder source, in order) on ``device`` and keeps ``OUT/results.json``:
    ``{**header, "encoders": {label: {"role", "source", "kind", SECTION: {method: result}}}, "failed": {}}``,
    ``SECTION`` being ``"methods"`` (or, say, ``"protocols"``)."""

    def __init__(self, out: Path, sources: Mapping[str, str], device, header: Optional[Dict] = None,
                 section: str = "methods"):
        models = {role: load_encoder(source, device=device) for role, source in sources.items()}  # refused first
        self.path, self.section = Path(out) / "results.json", section
        self.models: Dict[str, Any] = {}
        self.results: Dict[str, Any] = {**(header or {}), "encoders": {}, "failed": {}}
        for role, model in models.items():
            label = model.label if model.label not in self.models else f"{model.label} #2"
            self.models[label] = model
            self.results["encoders"][label] = {"role": role, "source": str(sources[role]), "kind": model.kind,
                                               section: {}}

    def encoders(self) -> Iterator[Tuple[str, Any]]:
        """``(label, encoder)`` of each side, the baseline first."""
        return iter(list(self.models.items()))

    def entry(self, label: str) -> Dict:
        """The results entry of one encoder, for what the task records besides its methods."""
        return self.results["encoders"][label]

    def check_vocabulary(self, label: str, texts: Sequence[str], what: str, effect: str = "",
                         train_on: Tuple[str, Optional[str]] = ("catalog", None)) -> None:
        """Records ``label``'s :meth:`~e2_core.Encoder.vocabulary_coverage` of ``texts`` (the task's ``what``, e.g.
        "validation texts") in its entry (``vocabulary_coverage``) and warns, in one line, when some of their
        tokens have no embedding: ``effect`` says what more that does to the task, and the line gives the command
        that trains the encoder on ``train_on`` (a dataset and its root). A stand-in encoder without the method is
        left unchecked."""
        model = self.models[label]
        if not hasattr(model, "vocabulary_coverage"):
            return
        coverage = self.entry(label)["vocabulary_coverage"] = model.vocabulary_coverage(texts)
        if coverage["unembedded"]:
            log.warning("%s (%s) has no embedding for %.1f%% of the token occurrences of the %d %s (%d of %d distinct "
                        "tokens; words such as %s): their token-embedding rows are all zero, so %s that differ only in "
                        "these words look the same to this encoder%s. %s; or use a CLIP with a full vocabulary (e.g. "
                        "ViT-B-32:openai)", label, model.name, 100 * coverage["share"], len(texts), what,
                        coverage["unembedded_distinct"], coverage["distinct"],
                        ", ".join(repr(w) for w in coverage["words"]), what, effect,
                        _train_command(model, self.entry(label)["role"], *train_on))

    def record(self, label: str, method: str, run: Callable[[], Any]) -> Optional[Any]:
        """``run()``'s result, stored as ``method``'s for ``label`` and written at once; a failure is logged
        in one line, stored under ``failed`` and written, and ``None`` returned."""
        try:
            result = run()
        except Exception as err:  # noqa: BLE001 - one method's failure must not cost the others' results
            message = (str(err).strip().splitlines() or [""])[0] or type(err).__name__
            log.debug("%s with %s failed", method, label, exc_info=True)
            log.error("%s with %s failed: %s: %s", method, label, type(err).__name__, message)
            self.results["failed"][f"{label}/{method}"] = f"{type(err).__name__}: {message}"
            self.write()
            return None
        self.results["encoders"][label][self.section][method] = result
        self.write()
        return result

    def write(self) -> Path:
        """``results.json`` as it stands, replaced atomically (never left empty or half-written)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.results, indent=2, default=str)
        _atomic_write(self.path, lambda tmp: Path(tmp).write_text(text), len(text))
        return self.path

    def finish(self) -> Path:
        """Writes the results; raises :class:`MethodsFailed` naming each failure, if any."""
        path = self.write()
        failed = self.results["failed"]
        if failed:
            raise MethodsFailed(f"{len(failed)} run(s) failed ({'; '.join(f'{k}: {v}' for k, v in failed.items())}); "
                                f"every other result is in {path}")
        return path


def _train_command(encoder, role: str, dataset: str, data_root: Optional[str]) -> str:
    """The command that trains ``encoder``'s kind on ``dataset``, in a warning's words; ``role``: its option."""
    clip = encoder.kind == "CLIP"
    return (f"Train the encoder on products described in these words, e.g. `e2-plugins train --method "
            f"{'clip-ft' if clip else 'e2'} --pretrained {encoder.name if clip else 'CLIP'} --dataset {dataset} "
            f"--data-root {data_root or 'ROOT'}`" + ("" if clip else " (CLIP: the CLIP it extends, e.g. demo:clip-ft)")
            + f", and pass the checkpoint it writes as --{role}")


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], first: int = 1) -> str:
    """Rows under a header, the first ``first`` columns left-aligned and the rest right-aligned; a
    float is shown with one decimal, ``None`` as ``-``."""
    cells = [[_cell(v) for v in row] for row in [list(header)] + [list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(max(map(len, cells)))]
    return "\n".join("  ".join(v.ljust(widths[i]) if i < first else v.rjust(widths[i]) for i, v in enumerate(row))
                     .rstrip() for row in cells)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def report_skipped(label: str, skipped: List[str], where: Path) -> None:
    """One line for the images an encoder's run could not read (all of them are in ``where``)."""
    if skipped:
        log.warning("%s: %d unreadable image(s) skipped, e.g. %s (all listed under \"skipped_images\" in %s)",
                    label, len(skipped), "; ".join(skipped[:3]), where)
