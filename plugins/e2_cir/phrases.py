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

_WORD = re.compile(r"[A-Za-z0-9%'\-]+")
_TAGS = ("NN", "JJ", "DT", "CD", "VBN")  # nouns (incl. proper), adjectives, determiners, numbers, participles


def keyword_phrases(text: str) -> List[str]:
    """The caption's keyword phrases, in order (e.g. ``"is red with a small logo"`` -> ``["red", "small logo"]``)."""
    words = _WORD.findall(text)
    tags = _tags(words)
    phrases, current = [], []
    for word, keep in zip(words, tags):
        if keep:
            current.append(word)
        elif current:
            phrases.append(" ".join(current))
            current = []
    if current:
        phrases.append(" ".join(current))
    return [p for p in (_trim(p) for p in phrases) if p]


def _tags(words: Sequence[str]) -> List[bool]:
    try:
        import nltk

        tagged = nltk.pos_tag(list(words))
        return [tag.startswith(_TAGS) and word.lower() not in ("a", "an", "the") for word, tag in tagged]
    except (ImportError, LookupError):
        return [word.lower() not in FUNCTION_WORDS for word in words]


def _trim(phrase: str) -> str:
    words = phrase.split()
    while words and words[0].lower() in FUNCTION_WORDS:
        words.pop(0)
    return " ".join(words)


def tagger() -> str:
    """Which tagger :func:`keyword_phrases` uses here."""
    try:
        import nltk

        nltk.pos_tag(["test"])
        return "nltk"
    except (ImportError, LookupError):
        return "fallback (function-word list; nltk tagger data not installed)"


def mask_phrase(text: str, phrase: str, placeholder: str = "$") -> str:
    """``text`` with its first occurrence of ``phrase`` replaced by the placeholder."""
    return re.sub(rf"\b{re.escape(phrase)}\b", placeholder, text, count=1)


class Vocabulary:
    """The keyword phrases of a set of captions (most frequent first), and the captions holding each."""

    def __init__(self, captions: Sequence[str], size: int = 256):
        counts: Counter = Counter()
        holding: Dict[str, List[str]] = {}
        for caption in captions:
            for phrase in dict.fromkeys(keyword_phrases(caption)):
                counts[phrase] += 1
                holding.setdefault(phrase, []).append(caption)
        self.phrases = [p for p, _ in counts.most_common(size)]
        self.captions = {p: holding[p] for p in self.phrases}
        if not self.phrases:
            raise ValueError("no keyword phrases in the training captions; the vocabulary is empty")

    def __len__(self) -> int:
        return len(self.phrases)
