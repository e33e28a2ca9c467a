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


# --- LinCIR's keyword runs --------------------------------------------------------------------------

#: Determiners: LinCIR's keyword runs include them (spaCy's DET), so the fallback below keeps them in a run.
DETERMINERS = frozenset("a an the this these those some any no each every another all both either neither".split())

#: Words the fallback of :func:`keyword_runs` never counts as a noun, adjective or determiner: the function
#: words above less the determiners (and "same", "different", "other", "ones", which spaCy tags ADJ / NOUN),
#: plus clitics, auxiliaries, prepositions, conjunctions, pronouns and adverbs.
RUN_BREAKERS = (FUNCTION_WORDS - DETERMINERS - {"same", "different", "other", "ones"}) | frozenset("""
's n't 're 've 'll 'd 'm am will would can could should may might must shall about above across after against
along among around before behind below beneath beside besides between beyond down during except inside near off
out outside through throughout toward towards underneath until up upon within via if because while although
though whereas yet when where why how again almost always never now often quite slightly much even still really
somewhat mostly fully mainly completely entirely totally partially extremely highly overly us him himself herself
itself themselves mine yours hers ours theirs get gets got getting""".split())

_RUN_TOKEN = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*|\S")  # a word (inner apostrophes kept), or one other character
_CLITIC = re.compile(r"(?i)(?<=\w)(n['\u2019]t|['\u2019](?:s|re|ve|ll|d|m))$")
_RUN_TAGS = ("NN", "JJ", "DT", "PDT")  # Penn tags of spaCy's NOUN, PROPN, ADJ and DET


def keyword_runs(text: str) -> List[str]:
    """LinCIR's keyword phrases: the maximal runs of nouns, proper nouns, adjectives and determiners, in order
    and with repeats, each run's tokens joined by single spaces (LinCIR's code: spaCy's POS in
    NOUN/PROPN/ADJ/DET, tokens joined with " "), so a run need not occur in ``text`` as written.

    Tokens as spaCy cuts them, roughly: words (inner apostrophes kept, ``n't``/``'s``-style clitics split
    off) and every other character alone (``&``, ``/``, ``-``, ``,``, ``%``), which ends a run. Tags: nltk's
    tagger where its data is installed, else the fallback: a word is in a run unless it is in
    :data:`RUN_BREAKERS` or has no letter (numbers end a run: spaCy's NUM).
    E.g. ``"has a red dress, not the blue one"`` -> ``["a red dress", "the blue"]``."""
    tokens = []
    for match in _RUN_TOKEN.finditer(text):
        word = match.group()
        clitic = _CLITIC.search(word) if len(word) > 1 and word[0].isalnum() else None
        tokens.extend([word[:clitic.start()], clitic.group()] if clitic else [word])
    runs: List[List[str]] = [[]]
    for token, kept in zip(tokens, _run_tags(tokens)):
        if kept:
            runs[-1].append(token)
        elif runs[-1]:
            runs.append([])
    return [" ".join(run) for run in runs if run]


def _run_tags(tokens: Sequence[str]) -> List[bool]:
    try:
        import nltk

        return [tag.startswith(_RUN_TAGS) for _, tag in nltk.pos_tag(list(tokens))] if tokens else []
    except (ImportError, LookupError):
        return [any(ch.isalpha() for ch in token) and token.lower().replace("\u2019", "'") not in RUN_BREAKERS
                for token in tokens]
