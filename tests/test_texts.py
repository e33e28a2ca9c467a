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


def test_tokenize_entities_dedupes_sorts_and_buckets():
    tok = get_tokenizer(TINY)
    rows = [["SHIRTS", "Acne Studios"], ["SHIRTS", "Prada"], ["JEANS", "Acne Studios"]]
    et = tokenize_entities(tok, rows)
    assert et.tokens.shape[0] == 4 and et.tokens.shape[1] < 32
    for row, strings in zip(et.index.tolist(), rows):  # each item points at its own strings' tokens
        expected = trim_padding(tok(strings))
        assert torch.equal(et.tokens[row, :expected.shape[1]], expected)
    assert et.index[:, 0].tolist() == [et.index[0, 0]] * 2 + [et.index[2, 0]]  # shared values share a row
    lengths = (et.tokens != 0).sum(dim=1).tolist()
    assert lengths == sorted(lengths)

    long = "a long description of a shirt with a small embroidered logo at the chest and a hang tag"
    et = tokenize_entities(tok, [["FW2016", long], ["SS2017", long + " again"]], min_bucket=8)
    season_columns = trim_padding(tok(["FW2016", "SS2017"])).shape[1]
    assert season_columns < 8 < et.tokens.shape[1]
    assert [columns for _, _, columns in et.spans()] == [season_columns, et.tokens.shape[1]]  # no padding to 20+
    assert et.spans()[0][:2] == (0, 2) and et.spans()[1][:2] == (2, 4)
    with pytest.raises(ValueError, match="different number"):
        tokenize_entities(tok, [["a", "b"], ["c"]])


def test_entity_buckets_pad_no_string_past_twice_its_length():
    tok = get_tokenizer(TINY)
    words = "red wool coat with a small logo on the left chest and a season tag".split()
    strings = [" ".join(words[:n]) for n in range(1, len(words) + 1)] + ["x " * 90]  # the last fills the context
    et = tokenize_entities(tok, [[s] for s in strings], min_bucket=8)
    lengths = (et.tokens != 0).sum(dim=1).tolist()
    spans = et.spans()
    assert spans[0][0] == 0 and spans[-1][1] == len(strings) and len(spans) >= 3
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))      # contiguous, every row once
    for start, end, columns in spans:
        assert columns == max(lengths[start:end])                  # cut to the bucket's longest
        assert columns <= 8 or all(2 * n > columns for n in lengths[start:end])
    assert et.tokens.shape[1] == tok.context_length


def test_trim_padding_keeps_every_real_token():
    tok = get_tokenizer(TINY)
    tokens = tok(["a", "a much longer text with more words"])
    trimmed = trim_padding(tokens)
    assert trimmed.shape[1] == int((tokens != 0).sum(1).max())
    assert torch.equal(trimmed, tokens[:, :trimmed.shape[1]]) and (tokens[:, trimmed.shape[1]:] == 0).all()
