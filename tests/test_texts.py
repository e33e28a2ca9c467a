import pytest

from e2_core import AMAZON_FASHION, FASHIONGEN, build_texts, tokenize_entities, get_tokenizer
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


def test_tokenize_entities_shape_and_ragged_rows():
    tok = get_tokenizer(TINY)
    assert tokenize_entities(tok, [["a", "b"], ["c", "d"], ["e", "f"]]).shape == (3, 2, 32)
    with pytest.raises(ValueError, match="different number"):
        tokenize_entities(tok, [["a", "b"], ["c"]])
