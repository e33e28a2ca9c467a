import pytest

import torch

from e2_core import AMAZON_FASHION, FASHIONGEN, build_texts, get_tokenizer, tokenize_entities, trim_padding
from conftest import TINY

TAGS = {"subcategory": "SHIRTS", "brand": "Raf Simons", "description": "Long sleeve cotton shirt.",
        "season": "FW2016", "composition": "100% cotton", "name": "ignored"}


def test_fashiongen_texts():
    global_text, entities = build_texts(TAGS, FASHIONGEN)
    assert global_text == "100% cotton. SHIRTS. Raf Simons. FW2016. Long sleeve cotton shirt."
    assert entities == ["SHIRTS", "Raf Simons", "Long sleeve cotton shirt.", "FW2016", "100% cotton"]


def test_amazon_texts_and_missing_field():
    assert build_texts({"brand": "Levi's", "title": "501 jeans"}, AMAZON_FASHION) == ("Levi's. 501 jeans", ["Levi's"])
    with pytest.raises(KeyError, match="'title'"):
        build_texts({"brand": "Levi's"}, AMAZON_FASHION)


def test_tokenize_entities_dedupes_and_trims():
    tok = get_tokenizer(TINY)
    et = tokenize_entities(tok, [["SHIRTS", "Acne Studios"], ["SHIRTS", "Prada"], ["JEANS", "Acne Studios"]])
    assert et.index.tolist() == [[0, 1], [0, 2], [3, 1]]  # the index doubles as multi-positive labels
    assert et.tokens.shape[0] == 4 and et.tokens.shape[1] < 32
    assert torch.equal(et.tokens, trim_padding(tok(["SHIRTS", "Acne Studios", "Prada", "JEANS"])))
    with pytest.raises(ValueError, match="different number"):
        tokenize_entities(tok, [["a", "b"], ["c"]])


def test_trim_padding_keeps_every_real_token():
    tok = get_tokenizer(TINY)
    tokens = tok(["a", "a much longer text with more words"])
    trimmed = trim_padding(tokens)
    assert trimmed.shape[1] == int((tokens != 0).sum(1).max())
    assert torch.equal(trimmed, tokens[:, :trimmed.shape[1]]) and (tokens[:, trimmed.shape[1]:] == 0).all()
