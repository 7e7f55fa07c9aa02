"""The lexical side of a catalog over each vector store backend (the stores' contract fixtures: tests/conftest.py)."""
from conftest import STORE_DIM, store_items
from fashion_search.stores import open_store


def test_words_rank_inside_the_server_where_it_can_and_beside_the_store_where_not(spec, request):
    """The lexical side of a catalog over each backend: a Milvus server of 2.5 on ranks the items' words with its own
    BM25 function (Milvus Lite has it too, asked here directly); FAISS, Lite and older servers through the app's own
    index. Either way a query's words find the items holding them, inside the filters, and words are never
    expression text."""
    from fashion_search.serving.hybrid import CatalogWords, StoreWords

    store = open_store(*spec, STORE_DIM, "run#1")
    keys, vectors, records = store_items(12)
    for i, record in enumerate(records):
        record["productDisplayName"] = ["Leather Wallets", "Cotton T-Shirt", "Steel Watch"][i % 3] + f" {i}"
    store.build("run#1", keys, vectors, records)
    backend = request.node.callspec.params["spec"]
    assert store.ranks_words is False or backend not in ("faiss", "lite")  # Lite: the app's index is the faster
    searchers = [CatalogWords(store).current()]
    if backend == "server":
        assert not store.has_words  # Milvus 2.3: no BM25 function, the collection was made without words
    if backend == "lite":
        assert store.has_words  # the words field and its BM25 function: asked as a 2.5 server's would be
        store.ranks_words = True
        searchers.append(CatalogWords(store).current())
        assert isinstance(searchers[-1], StoreWords)
    for words in searchers:
        check_words(words, keys, records)
    store.close()


def check_words(words, keys, records):
    from fashion_search.stores import Match

    wallets = {key for key, record in zip(keys, records) if "Wallets" in record["productDisplayName"]}
    assert set(words.search("leather wallet", {}, 20)) == wallets
    assert set(words.search("t-shirts", {}, 20)) == {k for k, r in zip(keys, records) if "T-Shirt" in
                                                      r["productDisplayName"]}  # stems and joined words meet
    red = {key for key, record in zip(keys, records) if record["baseColour"] == "Red"}
    assert set(words.search("wallet", {"baseColour": Match(("Red",))}, 20)) == wallets & red
    assert words.search("\" or key != \"", {}, 20) == [] and words.search("the of", {}, 20) == []
