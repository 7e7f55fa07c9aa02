"""The catalog's words: normalisation, BM25 retrieval as data (no query syntax), reciprocal rank fusion, and the
shopper protocol's figures against independent computations."""
import numpy as np
import pandas as pd
import pytest

from fashion_search import lexical, shoppers

RECORDS = [{"productDisplayName": "Puma Men Black Leather Wallet", "articleType": "Wallets", "baseColour": "Black",
            "gender": "Men", "id": 1},
           {"productDisplayName": "Nike Men Red T-Shirt", "articleType": "Tshirts", "baseColour": "Red",
            "gender": "Men", "id": 2},
           {"productDisplayName": "Nike Women Red Running Shoes", "articleType": "Sports Shoes", "baseColour": "Red",
            "gender": "Women", "id": 3},
           {"productDisplayName": "Fossil Women Brown Watch", "articleType": "Watches", "baseColour": "Brown",
            "gender": "Women", "id": 4}]


def test_spellings_of_one_word_meet():
    assert lexical.words("T-Shirt") == lexical.words("Tshirts") == lexical.words("t shirt") == ["tshirt"]
    assert lexical.words("Wallets") == lexical.words("wallet")
    assert lexical.words("Café") == lexical.words("cafe")
    assert lexical.words("black wallet for men") == ["black", "wallet", "men"]  # stop words dropped


def test_bm25_finds_items_by_their_words_and_honours_the_allowed_ones():
    index = lexical.TextIndex([str(r["id"]) for r in RECORDS], RECORDS)
    assert [key for key, _ in index.search("black leather wallets", 4)] == ["1"]
    assert [key for key, _ in index.search("red tshirt", 4)][0] == "2"
    assert {key for key, _ in index.search("red", 4)} == {"2", "3"}
    allowed = np.array([False, False, True, False])
    assert [key for key, _ in index.search("red", 4, allowed)] == ["3"]
    assert index.search("zebra", 4) == []  # no word of the catalog: no result


@pytest.mark.parametrize("text", ['" OR *', 'articleType:Watches', 'NEAR(red shirt)', "red\" OR \"1", "*", "' --"])
def test_query_syntax_is_only_words(text):
    """A query reaches the engine as tokens: an operator, a field name or a quote is at most a word."""
    index = lexical.TextIndex([str(r["id"]) for r in RECORDS], RECORDS)
    found = [key for key, _ in index.search(text, 4)]
    expected = {str(r["id"]) for r in RECORDS if set(lexical.words(text)) & set(lexical.words(lexical.item_text(r)))}
    assert set(found) == expected


def test_fusion_against_a_hand_computation():
    fused = dict(lexical.fuse([["a", "b", "c"], ["c", "a"]], [1.0, 2.0], k=60))
    assert fused["a"] == pytest.approx(1 / 61 + 2 / 62)
    assert fused["c"] == pytest.approx(1 / 63 + 2 / 61)
    assert fused["b"] == pytest.approx(1 / 62)
    assert [key for key, _ in lexical.fuse([["a", "b", "c"], ["c", "a"]], [1.0, 2.0], k=60)] == ["c", "a", "b"]


def test_shopper_queries_are_phrased_as_shoppers_write_and_judged_by_every_named_attribute():
    meta = pd.DataFrame(RECORDS * 3)
    queries = shoppers.make_queries(meta, per_template=2, seed=0)
    assert {q["template"] for q in queries} == set(shoppers.TEMPLATES)
    for query in queries:
        assert query["text"] == query["text"].lower() and query["attributes"]["articleType"] in set(meta.articleType)
    assert shoppers.type_words("Casual Shoes", np.random.default_rng(0)) == "casual shoe"
    assert shoppers.type_words("Jeans", np.random.default_rng(0)) == "jeans"
    assert [shoppers.type_words(t, None) for t in ("Watches", "Dresses", "Tops")] == ["watch", "dress", "top"]
    assert shoppers.type_words("Tshirts", np.random.default_rng(0)) in ("t-shirt", "tshirt", "t shirt")
    gallery = pd.DataFrame(RECORDS)
    assert shoppers.relevant({"articleType": "Tshirts", "baseColour": "Red", "brand": "Nike"}, gallery).tolist() == \
        [False, True, False, False]


def test_shopper_figures_against_a_hand_computation():
    rel = np.array([True, False, True, False, False, False, False, False, False, False, False, True])
    ranking = np.array([1, 0, 5, 2, 3, 4, 6, 7, 8, 9, 10, 11])  # relevant at ranks 2 and 4 (and 12, past NDCG@10)
    result = shoppers.figures([ranking, np.array([], dtype=int)], [rel, rel])
    dcg = 1 / np.log2(3) + 1 / np.log2(5)
    ideal = 1 / np.log2(2) + 1 / np.log2(3) + 1 / np.log2(4)
    assert result["precision@5"] == pytest.approx(round((2 / 5 + 0) / 2, 4))
    assert result["success@5"] == 0.5
    assert result["ndcg@10"] == pytest.approx(round(dcg / ideal / 2, 4))
