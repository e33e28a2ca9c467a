"""The caption task's page: a few images, each with every encoder's and method's caption and its
references (``captions.html``, the thumbnails beside it in ``page/``)."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Dict, List

STYLE = ("body{font-family:sans-serif;margin:16px}.item{display:flex;gap:16px;margin-bottom:18px;"
         "border-bottom:1px solid #ddd;padding-bottom:12px}th{text-align:left;padding-right:12px;"
         "color:#555;font-weight:normal}.refs{margin:6px 0 0;color:#555}")


def write_page(out: Path, data, references: Dict[str, List[str]], shown: Dict[str, Dict[str, str]],
               count: int) -> Path:
    """captions.html: each image with every encoder's and method's caption and its references."""
    folder = out / "page"
    folder.mkdir(exist_ok=True)
    rows = []
    for key in list(references)[:count]:
        sample = data[int(key)]  # the view that was captioned: the first readable one
        if sample.error is not None:
            continue
        image = sample.image.convert("RGB")
        image.thumbnail((160, 160))
        image.save(folder / f"{key}.png")
        generated = "".join(f"<tr><th>{html.escape(name)}</th><td>{html.escape(p.get(key, ''))}</td></tr>"
                            for name, p in shown.items())
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in references[key])
        rows.append(f'<div class="item"><img src="page/{key}.png" alt="product {key}"><div><table>{generated}'
                    f'</table><p class="refs">References:</p><ul>{refs}</ul></div></div>')
    page = out / "captions.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>e2-plugins captions</title><style>{STYLE}"
                    "</style></head><body><h1>Generated captions and references</h1>" + "".join(rows)
                    + "</body></html>", encoding="utf-8")
    return page
