"""Keyword phrases of captions, and a vocabulary of them: what LinCIR masks, what SEARLE's regulariser
and CIReVL's offline captioner draw on.

Upstream LinCIR finds the phrases with spaCy's English tagger (runs of nouns, proper nouns,
adjectives and determiners). Here nltk's tagger is used when its data is installed
(``python -m nltk.downloader averaged_perceptron_tagger_eng``, or copy the data into an
``nltk_data`` folder on a machine without network); without it, a documented fallback that needs
no download: maximal runs of words that are not in :data:`FUNCTION_WORDS` (articles, pronouns,
prepositions, conjunctions and the common verbs of relative captions). Neither nltk's data nor
spaCy's model can be fetched on an offline machine.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Dict, List, Sequence

#: Words the fallback never counts as part of a keyword phrase.
FUNCTION_WORDS = frozenset("""
a an the this that these those it its it's is are was were be been being has have had having do does did
and or but nor so than then with without of in on at by for from to into onto over under as like more less
most least very too also just not no instead rather same different one ones which who whom whose what
there here their they them he she his her i me my we our you your all any some each other another only
looks look looking make makes made wear wears worn show shows shown showing""".split())

_WORD = re.compile(r"[\w%'\-]+")  # letters of any script, digits, %, apostrophes, hyphens
_JOINS = re.compile(r"[\s&/,+.]*")  # what may stand between two words of one phrase
_TAGS = ("NN", "JJ", "DT", "CD", "VBN")  # nouns (incl. proper), adjectives, determiners, numbers, participles


def keyword_phrases(text: str) -> List[str]:
    """The caption's keyword phrases, in order, each exactly as the caption writes it (what joins its words
    included: ``"Kestrel & Co"``, ``"red, white"``, ``"Dürer/Lenz"``), so that it can be masked; brackets and
    other punctuation end a phrase. E.g. ``"is red with a small logo"`` -> ``["red", "small logo"]``."""
    matches = list(_WORD.finditer(text))
    keep = _tags([m.group() for m in matches])
    runs: List[list] = []
    for i, (match, kept) in enumerate(zip(matches, keep)):
        if not kept:
            continue
        joined = i > 0 and keep[i - 1] and _JOINS.fullmatch(text[matches[i - 1].end():match.start()])
        if joined and runs:
            runs[-1].append(match)
        else:
            runs.append([match])
    phrases = []
    for run in runs:
        while run and run[0].group().lower() in FUNCTION_WORDS:  # a phrase does not start with "the", "a", ...
            run.pop(0)
        if run:
            phrases.append(text[run[0].start():run[-1].end()])
    return phrases


def _tags(words: Sequence[str]) -> List[bool]:
    try:
        import nltk

        tagged = nltk.pos_tag(list(words))
        return [tag.startswith(_TAGS) and word.lower() not in ("a", "an", "the") for word, tag in tagged]
    except (ImportError, LookupError):
        return [word.lower() not in FUNCTION_WORDS for word in words]


def tagger() -> str:
    """Which tagger :func:`keyword_phrases` uses here."""
    try:
        import nltk

        nltk.pos_tag(["test"])
        return "nltk"
    except (ImportError, LookupError):
        return "fallback (function-word list; nltk tagger data not installed)"


def mask_phrase(text: str, phrase: str, placeholder: str = "$") -> str:
    """``text`` with its first occurrence of ``phrase`` (as a whole: not inside a longer word) replaced by the
    placeholder, spaced apart from what surrounds it so that the tokenizer keeps it one token (``"($)"`` would
    be one); ``text`` itself when it does not hold the phrase."""
    masked = re.sub(rf"(?<!\w){re.escape(phrase)}(?!\w)", lambda _: f" {placeholder} ", text, count=1)
    return text if masked == text else " ".join(masked.split())


class Vocabulary:
    """The keyword phrases of a set of captions (most frequent first), and the captions holding each."""

    def __init__(self, captions: Sequence[str], size: int = 256):
        counts: Counter = Counter()
        holding: Dict[str, List[str]] = {}
        for caption in captions:
            for phrase in dict.fromkeys(keyword_phrases(caption)):
                if mask_phrase(caption, phrase) != caption:  # only captions the phrase can be masked in
                    counts[phrase] += 1
                    holding.setdefault(phrase, []).append(caption)
        self.phrases = [p for p, _ in counts.most_common(size)]
        self.without_phrase = sum(not keyword_phrases(c) for c in captions)  # captions no phrase comes from
        self.captions = {p: holding[p] for p in self.phrases}
        if not self.phrases:
            raise ValueError("no keyword phrases in the training captions; the vocabulary is empty")

    def __len__(self) -> int:
        return len(self.phrases)
