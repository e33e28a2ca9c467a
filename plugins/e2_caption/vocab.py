"""What a decoder writes: captions <-> token ids (each row: the text's ids, then the end token)."""
from __future__ import annotations

import re
from typing import List, Sequence, Tuple

import torch

_START, _END = 49406, 49407  # open_clip's start-of-text and end-of-text ids


class BPEVocab:
    """The encoder's own BPE (open_clip's tokenizer), kept to the ids the training captions use, so a
    new decoder's embedding and output layers are small. ``ids[i]`` is the BPE id of decoder id ``i``."""

    kind = "bpe"

    def __init__(self, tokenizer, ids: Sequence[int]):
        self.tokenizer, self.ids = tokenizer, list(ids)
        self.index = {bpe: i for i, bpe in enumerate(self.ids)}

    @classmethod
    def from_captions(cls, tokenizer, captions: Sequence[str]) -> "BPEVocab":
        used = sorted({int(t) for t in tokenizer(list(captions)).flatten().tolist()} - {0, _START, _END})
        return cls(tokenizer, [_END] + used)  # decoder id 0 is the end token

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def eos(self) -> int:
        return 0

    def state(self) -> dict:
        return {"kind": self.kind, "ids": self.ids}

    def encode(self, captions: Sequence[str], max_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for row in self.tokenizer(list(captions)).tolist():
            text = [self.index[t] for t in row if t not in (0, _START, _END) and t in self.index][:max_tokens]
            rows.append(text + [self.eos])
        return _pad(rows, self.eos)

    def decode(self, ids: Sequence[int]) -> str:
        bpe = [self.ids[i] for i in ids if 0 < i < len(self.ids)]
        return detokenize(_bpe_decoder().decode(bpe))


#: How open_clip's BPE decoding spaces what its tokenizer split (every token ends a word), and the text as
#: written: numbers one digit per token ("1 0 0 %"), hyphens, slashes, apostrophes, punctuation.
_REJOIN = [
    (re.compile(r"(?<=\d) (?=\d)"), ""),                       # 1 0 0 -> 100
    (re.compile(r"(?<=\d) ([.,]) (?=\d)"), r"\1"),              # 1 . 5 -> 1.5, 1 , 0 0 0 -> 1,000
    (re.compile(r" ([%.,!?;:)\]}])"), r"\1"),                    # 100 % -> 100%, wool . -> wool.
    (re.compile(r"([(\[{#$£€]) "), r"\1"),                       # ( slim ) -> (slim), # 1 2 -> #12
    (re.compile(r"(?<=\w) ?([-/]) ?(?=\w)"), r"\1"),            # relaxed - fit -> relaxed-fit, red / white
    (re.compile(r"(?<=\w) ?' ?(?=(?:s|t|re|ve|m|ll|d)\b)"), "'"),  # men 's -> men's
    (re.compile(r"(?<=\w) ' (?=\w)"), "'"),                     # o ' hara -> o'hara
]


def detokenize(text: str) -> str:
    """Decoded BPE text written as text: digits, ``%``, hyphens, slashes, apostrophes and punctuation joined
    back to their words (``"1 0 0 % relaxed - fit"`` -> ``"100% relaxed-fit"``)."""
    text = " ".join(text.split())
    for pattern, replacement in _REJOIN:
        text = pattern.sub(replacement, text)
    return text


class HFVocab:
    """The tokenizer of a local language model (``DecoderConfig.language_model``)."""

    kind = "hf"

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"{path}: its tokenizer has no end-of-text token; a captioner needs one")

    @property
    def size(self) -> int:
        return len(self.tokenizer)

    @property
    def eos(self) -> int:
        return self.tokenizer.eos_token_id

    def state(self) -> dict:
        return {"kind": self.kind, "path": self.path}

    def encode(self, captions: Sequence[str], max_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
        rows = [self.tokenizer(" " + c.strip(), add_special_tokens=False)["input_ids"][:max_tokens] + [self.eos]
                for c in captions]
        return _pad(rows, self.eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def vocab_from_state(state: dict, tokenizer):
    return BPEVocab(tokenizer, state["ids"]) if state["kind"] == "bpe" else HFVocab(state["path"])


def _pad(rows: List[List[int]], pad: int) -> Tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = True
    return ids, mask


_DECODER = None


def _bpe_decoder():
    global _DECODER
    if _DECODER is None:
        import open_clip

        _DECODER = open_clip.SimpleTokenizer()
    return _DECODER
