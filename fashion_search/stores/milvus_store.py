"""Milvus behind the store interface, through one pymilvus client for both forms:

- ``milvus:PATH.db``: Milvus Lite, embedded in the process. It searches by brute force: the embedded twin for tests
  and small catalogs, not a replacement for the FAISS default.
- ``milvus://HOST:PORT/COLLECTION``: a Milvus server or cluster, with an HNSW index by default.

Options follow a ``?``: ``index=FLAT|HNSW|DISKANN`` and ``consistency=Strong|Bounded|Session|Eventually``.

Words. Where the server ranks text itself (Milvus 2.5 and later, and Milvus Lite: a BM25 function over a ``words``
field into a sparse vector), a new collection holds each item's words, normalised and stemmed as the app's own
index has them (fashion_search.lexical.words), and on a server the app's lexical side asks it, inside its filters.
On Milvus Lite (brute force), on a server without it (2.4 and older), or with a collection created without it, the
app builds its own BM25 index from the records (serving.hybrid), re-read at most every minute.

Consistency, per call. Searches and look-ups use Bounded by default: they do not wait for the server's time tick
(a Strong search waits for it, a few hundred ms), so an item written by another process (catalog.py) shows up
within the server's staleness bound, seconds, rather than at once. ``count`` and the end of ``build`` use Strong: they
report, and publish, exactly what was written. A write (upsert, delete) is atomic per request, not across a whole
update: an interrupted ``catalog.py add`` leaves some of its items added, and running it again completes it (upserts
replace by key).
"""
from __future__ import annotations

import json
import time
from urllib.parse import parse_qs, urlsplit

import numpy as np

from fashion_search.errors import UserError
from fashion_search.lexical import item_text, words
from fashion_search.stores import (FILTER_COLUMNS, MAX_KEY_BYTES, SEARCH_DEPTH, Hit, OtherCatalog, as_match, chunks,
                                   filter_values, source_of)
from fashion_search.stores.faiss_index import HNSW_EF_CONSTRUCTION, HNSW_M

DEFAULT_COLLECTION = "fashion_catalog"
FILTERS_KEY = "_filters"  # inside each stored record: its filter columns beyond the scalar fields, as text
FINGERPRINT_PROPERTY = "fashion_search.fingerprint"  # set once the base catalog is completely written
KEY_LENGTH, TEXT_LENGTH = MAX_KEY_BYTES, 1024
WORDS_LENGTH = 8192  # bytes of an item's words in the server's text field (its first words, where it has more)
WRITE_BATCH = 1_000
HNSW_PARAMS = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}  # as the FAISS store's graph
SEARCH_EF = 64
INDEXES = ("FLAT", "HNSW", "DISKANN")
CONSISTENCY = ("Strong", "Bounded", "Session", "Eventually")


def public(record: dict) -> dict:
    """A stored record as the caller gave it."""
    return {key: value for key, value in record.items() if key != FILTERS_KEY}


def parse_spec(spec: str) -> dict:
    """'milvus:PATH.db[?opts]' or 'milvus://HOST:PORT/COLLECTION[?opts]' -> client uri, collection, options."""
    body, _, query = spec[len("milvus:"):].partition("?")
    options = {name: values[-1] for name, values in parse_qs(query).items()}
    if body.startswith("//"):
        parts = urlsplit("http:" + body)
        if not parts.hostname or not parts.port:
            raise UserError(f"--index {spec!r}: give the server as milvus://HOST:PORT/COLLECTION")
        target = {"uri": f"http://{parts.hostname}:{parts.port}", "lite": False,
                  "collection": parts.path.strip("/") or DEFAULT_COLLECTION}
    elif body.endswith(".db"):
        target = {"uri": body, "lite": True, "collection": DEFAULT_COLLECTION}
    else:
        raise UserError(f"--index {spec!r}: Milvus Lite takes a file ending in .db (milvus:PATH.db)")
    index = options.get("index", "FLAT" if target["lite"] else "HNSW").upper()
    consistency = options.get("consistency", "Bounded").capitalize()
    if index not in INDEXES or consistency not in CONSISTENCY:
        raise UserError(f"--index {spec!r}: index is one of {', '.join(INDEXES)}, consistency one of "
                        f"{', '.join(CONSISTENCY)}")
    return {**target, "index": index, "consistency": consistency}


def string_literal(value) -> str:
    """Any text as a Milvus string literal: the one place where a value from outside (an item id, a filter value)
    enters an expression. pymilvus's own get() and delete(ids=...) put varchar keys in single quotes unescaped, so
    this store never calls them. JSON's escapes (of quotes, backslashes and control characters) are ones
    Milvus's grammar takes; non-ASCII text stays literal, since Milvus refuses the escapes of surrogate pairs."""
    return json.dumps(str(value), ensure_ascii=False)


def filter_expression(filters: dict | None) -> str:
    """Each Match as an expression: ``column in [...]`` (or ``not in``) for the page's columns, which are scalar
    fields; for any other column, comparisons with a path into the record's JSON, whose filter values are text."""
    terms = []
    for column, match in (filters or {}).items():
        match = as_match(match)
        if column in FILTER_COLUMNS:
            values = ", ".join(string_literal(value) for value in match.values)
            terms.append(f"{column} {'not in' if match.exclude else 'in'} [{values}]")
        else:  # Milvus Lite takes no `in` on a JSON path: one comparison per value
            field = f"record[{string_literal(FILTERS_KEY)}][{string_literal(column)}]"
            any_of = " or ".join(f"{field} == {string_literal(value)}" for value in match.values)
            terms.append(f"not ({any_of})" if match.exclude else f"({any_of})")
    return " and ".join(terms)


def keys_expression(keys) -> str:
    return f"key in [{', '.join(string_literal(key) for key in keys)}]"


def item_words(record: dict) -> str:
    """An item's words as the server's text field holds them: its normalised, stemmed tokens, space-separated."""
    return " ".join(words(item_text(record))).encode()[:WORDS_LENGTH].decode(errors="ignore")


def holds_words(described: dict) -> bool:
    """Whether a collection ranks words itself: it has the words field and its BM25 function."""
    return any(field["name"] == "sparse" for field in described.get("fields", ())) and \
        any(getattr(function.get("type"), "name", None) == "BM25" for function in described.get("functions") or ())


class MilvusStore:
    version = None  # the server's collection changes without telling

    def __init__(self, client, target: dict, dim: int, fingerprint: str):
        self.client, self.target, self.dim, self.fingerprint = client, target, dim, fingerprint
        self.collection = target["collection"]
        # Milvus Lite has the BM25 function but searches by brute force, far slower than the app's own index
        # (BENCHMARKS.md, section 15), so the app ranks a Lite catalog's words
        self.has_words = holds_words(client.describe_collection(self.collection))
        self.ranks_words = self.has_words and not target["lite"]

    @classmethod
    def open(cls, spec: str, dim: int, fingerprint: str, create: bool = True) -> "MilvusStore":
        target = parse_spec(spec)
        try:
            from pymilvus import MilvusClient
        except ImportError:
            raise UserError("--index milvus needs pymilvus: pip install -r requirements-scale.txt") from None
        try:
            client = MilvusClient(uri=target["uri"])
        except Exception as exc:  # noqa: BLE001 - pymilvus raises several types for an unreachable server
            raise UserError(f"cannot reach Milvus at {target['uri']} ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from None
        name = target["collection"]
        if not client.has_collection(name):
            if not create:
                raise UserError(f"no collection {name!r} at {target['uri']}")
            create_collection(client, name, dim, target["index"])
            return cls(client, target, dim, "")
        described = client.describe_collection(name)
        stored_dim = next(f["params"].get("dim") for f in described["fields"] if f["name"] == "vector")
        stored = (described.get("properties") or {}).get(FINGERPRINT_PROPERTY, "")
        if stored and fingerprint and source_of(stored) != source_of(fingerprint):
            raise OtherCatalog(f"Milvus collection {name!r} at {target['uri']} holds the catalog of "
                               f"{source_of(stored) or 'an unknown source'}, not of {source_of(fingerprint)}: "
                               f"nothing was changed", source_of(stored))
        if int(stored_dim) != dim or (stored and fingerprint and stored != fingerprint):
            raise UserError(f"Milvus collection {name!r} at {target['uri']} holds another catalog or model "
                            f"(dimension {stored_dim}): pass another collection, or drop this one")
        client.load_collection(name)
        return cls(client, target, dim, stored)

    # writes ------------------------------------------------------------------------------------------------------

    def build(self, fingerprint, keys, vectors, records):
        """Upsert everything, wait until it is all visible, then mark the collection as holding this catalog (an
        interrupted build is resumed by the next open, which finds no mark)."""
        self.upsert(keys, vectors, records)
        self.count()  # Strong: returns once every write above is visible
        self.wait_for_index(len(keys))
        self.client.alter_collection_properties(self.collection, properties={FINGERPRINT_PROPERTY: fingerprint})
        self.fingerprint = fingerprint

    def wait_for_index(self, rows: int, timeout=1800.0):
        """Seal the written segments and wait until the server's vector index covers them (until then it searches
        them by brute force). Milvus Lite, which has no such index, returns at once."""
        if self.target["lite"]:
            return
        self.client.flush(self.collection)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if int(self.client.describe_index(self.collection, "vector").get("indexed_rows", 0)) >= rows:
                return
            time.sleep(1)

    def upsert(self, keys, vectors, records):
        vectors = np.asarray(vectors, dtype=np.float32)
        keys, records = list(keys), list(records)
        for part in chunks(len(keys), WRITE_BATCH):
            rows = [{"key": key, "vector": vector.tolist(), "record": self._record(record),
                     **{c: v for c, v in filter_values(record).items() if c in FILTER_COLUMNS},
                     **({"words": item_words(record)} if self.has_words else {})}
                    for key, vector, record in zip(keys[part], vectors[part], records[part])]
            self.client.upsert(self.collection, rows)

    def delete(self, keys) -> int:
        keys, removed = list(dict.fromkeys(keys)), 0
        for part in chunks(len(keys), WRITE_BATCH):
            present = sorted(row["key"] for row in self._rows(keys[part], ["key"], "Strong"))
            if present:
                self.client.delete(self.collection, filter=keys_expression(present))
            removed += len(present)
        return removed

    def _rows(self, keys, fields, consistency) -> list[dict]:
        """The rows with these keys (never more: each key is a literal, not expression text)."""
        return self.client.query(self.collection, filter=keys_expression(keys), output_fields=fields,
                                 consistency_level=consistency) if keys else []

    # reads -------------------------------------------------------------------------------------------------------

    @staticmethod
    def _record(record: dict) -> dict:
        """The record as stored: its JSON values (types kept: an id may be a number), and under FILTERS_KEY every
        filter column as the text filters compare (2012 for a year of 2012.0)."""
        plain = json.loads(json.dumps(record, default=str))
        return {**plain, FILTERS_KEY: {c: v for c, v in filter_values(record).items() if c not in FILTER_COLUMNS}}

    def search(self, vector, k, filters=None, offset=0, vectors=False) -> list[Hit]:
        if k <= 0:
            return []
        found = self.client.search(
            self.collection, [np.asarray(vector, dtype=np.float32).tolist()], limit=k, offset=offset,
            filter=filter_expression(filters), output_fields=["record", "vector"] if vectors else ["record"],
            # one breadth for every page (pages of one query never overlap or skip)
            search_params={"metric_type": "IP", "params": {"ef": max(SEARCH_EF, SEARCH_DEPTH)}},
            consistency_level=self.target["consistency"])
        # hit.id: the primary key, which servers return as "id" and Milvus Lite under its field name
        return [Hit(hit.id, float(hit["distance"]), public(hit["entity"]["record"]),
                    np.asarray(hit["entity"]["vector"], dtype=np.float32) if vectors else None) for hit in found[0]]

    def search_words(self, text: str, k: int, filters=None) -> list[str]:
        """Keys of the k items whose words best match the text's (BM25, in the server), among those every filter
        matches. The words are data the server's analyzer splits, never expression text."""
        tokens = " ".join(words(text))
        if k <= 0 or not tokens:
            return []
        found = self.client.search(self.collection, [tokens], anns_field="sparse", limit=k,
                                   filter=filter_expression(filters), output_fields=["key"],
                                   search_params={"metric_type": "BM25"},
                                   consistency_level=self.target["consistency"])
        return [hit.id for hit in found[0]]

    def count(self) -> int:
        rows = self.client.query(self.collection, filter="", output_fields=["count(*)"], consistency_level="Strong")
        return int(rows[0]["count(*)"])

    def fetch(self, key):
        rows = [row for row in self._rows([key], ["key", "vector", "record"], self.target["consistency"])
                if row["key"] == key]
        if not rows:
            return None
        return np.asarray(rows[0]["vector"], dtype=np.float32), public(rows[0]["record"])

    def _scan(self, fields: list[str]):
        """Every row of the collection with these fields, batch by batch (the whole collection, read once)."""
        iterator = self.client.query_iterator(self.collection, batch_size=10_000, filter="", output_fields=fields)
        try:
            while batch := iterator.next():
                yield from batch
        finally:
            iterator.close()

    def values(self) -> dict[str, list[str]]:
        """Read through the whole collection once (the filters' choices, at start)."""
        seen: dict[str, set] = {column: set() for column in FILTER_COLUMNS}
        for row in self._scan(["record"]):
            for column, value in filter_values(public(row["record"])).items():
                seen.setdefault(column, set()).add(value)
        return {column: sorted(values - {""}) for column, values in seen.items()}

    def items(self) -> tuple[list[str], np.ndarray]:
        """Every item's key and vector (float32 [N, dim]), read through the whole collection."""
        rows = list(self._scan(["key", "vector"]))
        vectors = np.asarray([row["vector"] for row in rows], dtype=np.float32).reshape(len(rows), self.dim)
        return [row["key"] for row in rows], vectors

    def records(self) -> tuple[list[str], list[dict]]:
        """Every item's key and record, read through the whole collection."""
        rows = list(self._scan(["key", "record"]))
        return [row["key"] for row in rows], [public(row["record"]) for row in rows]

    def refresh(self) -> bool:
        return False  # every search asks the server, at the store's consistency level

    def close(self):
        self.client.close()


def create_collection(client, name: str, dim: int, index: str):
    """A new collection; with the words field and its BM25 function where the server has them."""
    from pymilvus.exceptions import MilvusException

    try:
        client.create_collection(name, **collection_schema(client, dim, index, with_words=True))
        if holds_words(client.describe_collection(name)):
            return
        client.drop_collection(name)  # a server that took the schema but not the function
    except MilvusException:  # a server before 2.5: no BM25 function (or no sparse vectors)
        if client.has_collection(name):
            client.drop_collection(name)
    client.create_collection(name, **collection_schema(client, dim, index, with_words=False))


def collection_schema(client, dim: int, index: str, with_words: bool) -> dict:
    from pymilvus import DataType, Function, FunctionType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=KEY_LENGTH)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("record", DataType.JSON)  # what a search returns, with its own types (an id may be a number)
    for column in FILTER_COLUMNS:  # scalar copies of the filter columns, which the search filters on
        schema.add_field(column, DataType.VARCHAR, max_length=TEXT_LENGTH)
    params = client.prepare_index_params()
    params.add_index("vector", index_type=index, index_name="vector", metric_type="IP",
                     params=HNSW_PARAMS if index == "HNSW" else {})
    if with_words:
        # the words arrive normalised and stemmed (item_words): the standard analyzer only splits them
        schema.add_field("words", DataType.VARCHAR, max_length=WORDS_LENGTH, enable_analyzer=True,
                         analyzer_params={"tokenizer": "standard"})
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_function(Function(name="words_bm25", function_type=FunctionType.BM25,
                                     input_field_names=["words"], output_field_names=["sparse"]))
        params.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", index_name="sparse", metric_type="BM25")
    return {"schema": schema, "index_params": params}
