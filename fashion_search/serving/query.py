"""What a search asks for: weighted parts (photos, image URLs, catalog ids, texts; negative weights subtract), filters,
a page (k results from offset), a box of the photo to search by, and whether near-duplicates collapse. Parsed from
the JSON route's body here, checked before any work; photos and ids then go through the gate like every other."""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
from dataclasses import dataclass, field

from fashion_search.errors import QueryError
from fashion_search.metrics import TOP_K
from fashion_search.stores import SEARCH_DEPTH, Match, as_text

MAX_K = 100  # results in one page
MAX_PARTS = 8
MAX_URL_PARTS = 2  # fetched together, within one deadline
MAX_WEIGHT = 10.0
PART_KINDS = ("photo", "url", "item", "text")
# How a query with words ranks: fused with the catalog's own words (hybrid), by its embedding alone (vector), or by
# the catalog's words alone (lexical; a query's photos are then left out). Without words every mode is vector.
MODES = ("hybrid", "vector", "lexical")


@dataclass(frozen=True)
class Part:
    kind: str  # one of PART_KINDS
    value: object  # photo: bytes; url, item, text: str
    weight: float = 1.0


@dataclass(frozen=True)
class Query:
    parts: tuple[Part, ...]
    filters: dict = field(default_factory=dict)  # column -> value, list of values, or Match
    k: int = TOP_K
    offset: int = 0
    box: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 in the photo's pixels (upright)
    collapse: bool = True
    mode: str = "hybrid"  # one of MODES

    @property
    def words(self) -> str:
        """The words the catalog's text is searched for: the text parts of positive weight ("away from" words are
        for the vector side alone)."""
        return " ".join(str(part.value) for part in self.parts if part.kind == "text" and part.weight > 0).strip()

    @property
    def ranking(self) -> str:
        """How this query ranks: its mode where it has words, else vector."""
        return self.mode if self.words else "vector"

    @property
    def kind(self) -> str:
        """What match-confidence calibration its scores take: photo, text or composed, and "text hybrid", "text
        lexical", ... where the catalog's words rank too (their scores are on other scales)."""
        kinds = {"text" if part.kind == "text" else "photo" for part in self.parts}
        kind = kinds.pop() if len(kinds) == 1 and len(self.parts) == 1 else "composed"
        return kind if self.ranking == "vector" else f"{kind} {self.ranking}"


def parse_mode(value) -> str:
    if value is None or value == "":
        return "hybrid"
    if value not in MODES:
        raise QueryError(f"mode is one of {', '.join(MODES)}")
    return value


def check_page(k, offset):
    if not (isinstance(k, int) and 1 <= k <= MAX_K):
        raise QueryError(f"k is a whole number from 1 to {MAX_K}")
    if not (isinstance(offset, int) and 0 <= offset and offset + k <= SEARCH_DEPTH):
        raise QueryError(f"offset is a whole number from 0, with offset + k at most {SEARCH_DEPTH}")


def parse_box(value) -> tuple[int, int, int, int] | None:
    """x0,y0,x1,y1 (text or a list of four numbers) in the photo's pixels; None for no box."""
    if value in (None, "", []):
        return None
    parts = str(value).split(",") if isinstance(value, str) else list(value) if isinstance(value, list) else None
    try:
        x0, y0, x1, y1 = (int(round(float(v))) for v in parts)
    except (TypeError, ValueError, OverflowError):
        raise QueryError("box is x0,y0,x1,y1: four pixel coordinates of the photo") from None
    if not (0 <= x0 < x1 and 0 <= y0 < y1):
        raise QueryError("box is x0,y0,x1,y1 with x0 < x1 and y0 < y1, all at least 0")
    return x0, y0, x1, y1


def parse_filters(value) -> dict:
    """{"column": "Red" | ["Red", "Blue"] | {"not": "Black" or [...]}} -> column -> value or Match."""
    if value in (None, {}):
        return {}
    if not isinstance(value, dict):
        raise QueryError('filters is an object: {"column": value, [values] or {"not": value or [values]}}')
    filters = {}
    for column, given in value.items():
        if isinstance(given, dict):
            if set(given) != {"not"}:
                raise QueryError(f'filter {str(column)[:100]!r}: an object filter is {{"not": value or [values]}}')
            excluded = given["not"] if isinstance(given["not"], list) else [given["not"]]
            filters[str(column)] = Match(tuple(as_text(v) for v in excluded), exclude=True)
        elif isinstance(given, (str, int, float, list)) and not isinstance(given, bool):
            filters[str(column)] = [as_text(v) for v in given] if isinstance(given, list) else as_text(given)
        else:
            raise QueryError(f"filter {str(column)[:100]!r}: a value, a list of values or {{\"not\": ...}}")
    return filters


def flag(value, name: str, default: bool) -> bool:
    """A yes/no field: JSON's true and false, or the text true/false, 1/0, yes/no (a query string's)."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise QueryError(f"{name} is true or false")


def query_params_filters(params) -> dict:
    """Filters of a GET route's query string: ``baseColour=Red,Blue`` (one of them), ``baseColour!=Black`` (any but
    that one; a client sends it as the parameter ``baseColour!``)."""
    filters = {}
    for column, value in params.items():
        if column.endswith("!"):
            filters[column[:-1]] = Match(tuple(v.strip() for v in value.split(",") if v.strip()), exclude=True)
        else:
            filters[column] = value
    return filters


def whole_number(value, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise QueryError(f"{name} is a whole number") from None
    if isinstance(value, float) and not value.is_integer():
        raise QueryError(f"{name} is a whole number")
    return number


def parse_part(given, max_photo_bytes: int) -> Part:
    if not isinstance(given, dict):
        raise QueryError('each part is an object: {"photo": base64} or {"url": ...} or {"item": id} or {"text": ...}, '
                         'with an optional "weight"')
    kinds = [kind for kind in PART_KINDS if kind in given]
    if len(kinds) != 1 or set(given) - {kinds[0], "weight"}:
        raise QueryError(f"a part has exactly one of {', '.join(PART_KINDS)}, and optionally a weight")
    kind, value = kinds[0], given[kinds[0]]
    weight = given.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or \
            abs(weight) > MAX_WEIGHT:
        raise QueryError(f"a part's weight is a number from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}")
    if kind == "photo":
        if not isinstance(value, str) or len(value) > (max_photo_bytes * 4) // 3 + 4:
            raise QueryError(f"a photo part is its file's bytes in base64, at most {max_photo_bytes // 2**20} MB")
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise QueryError("a photo part is its file's bytes in base64") from None
        if len(value) > max_photo_bytes:
            raise QueryError(f"a photo part is its file's bytes in base64, at most {max_photo_bytes // 2**20} MB")
    elif not isinstance(value, (str, int)) or isinstance(value, bool):
        raise QueryError(f"a {kind} part is text")
    return Part(kind, value if kind == "photo" else str(value), float(weight))


def from_json(body, max_photo_bytes: int) -> Query:
    """The JSON route's body: {"parts": [...], "filters": {...}, "k": 5, "offset": 0, "box": [x0, y0, x1, y1],
    "collapse": true}."""
    if not isinstance(body, dict):
        raise QueryError('the body is a JSON object: {"parts": [...], "filters": {...}, "k": 5, "offset": 0}')
    unknown = sorted(set(body) - {"parts", "filters", "k", "offset", "box", "collapse", "mode"})
    if unknown:
        raise QueryError(f"unknown field {unknown[0][:100]!r} (fields: parts, filters, k, offset, box, collapse, "
                         f"mode)")
    parts = body.get("parts")
    if not isinstance(parts, list) or not 1 <= len(parts) <= MAX_PARTS:
        raise QueryError(f"parts is a list of 1 to {MAX_PARTS} parts")
    if sum(isinstance(part, dict) and "url" in part for part in parts) > MAX_URL_PARTS:
        raise QueryError(f"a query has at most {MAX_URL_PARTS} URL parts")
    query = Query(tuple(parse_part(part, max_photo_bytes) for part in parts), parse_filters(body.get("filters")),
                  whole_number(body.get("k"), "k", TOP_K), whole_number(body.get("offset"), "offset", 0),
                  parse_box(body.get("box")), flag(body.get("collapse"), "collapse", True), parse_mode(body.get("mode")))
    check_page(query.k, query.offset)
    if query.box is not None and not any(part.kind in ("photo", "url") for part in query.parts):
        raise QueryError("a box needs a photo or URL part to cut it from")
    return query


MAX_JSON_VALUES = 10_000  # values in one JSON query (parts, filter values, a box): far more than any query needs
MAX_JSON_DEPTH = 6  # {"filters": {"column": {"not": [value]}}} is 4 deep


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise QueryError("numbers in the query are finite")
    return number


def _not_a_number(name: str):
    raise QueryError(f"{name} is not a JSON number: numbers in the query are finite")


def parse_json(text):
    """JSON text or bytes from outside, within MAX_JSON_VALUES values and MAX_JSON_DEPTH levels, its numbers finite
    (no Infinity, NaN or 1e999). The values are counted from the separators before any parsing, so a body of millions
    of empty lists is refused in milliseconds."""
    text = text or ""
    if isinstance(text, (bytes, bytearray)):
        separators = text.count(b",") + text.count(b"[") + text.count(b"{")
    else:
        separators = text.count(",") + text.count("[") + text.count("{")
    if separators > MAX_JSON_VALUES:
        raise QueryError(f"the query holds more than {MAX_JSON_VALUES:,} values")
    try:
        body = json.loads(text, parse_float=_finite, parse_constant=_not_a_number)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, QueryError):
            raise
        raise QueryError('the body is JSON: {"parts": [...], "filters": {...}, "k": 5, "offset": 0}') from None
    stack = [(body, 1)]
    while stack:  # at most MAX_JSON_VALUES containers: the separators were counted
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise QueryError(f"the query nests deeper than {MAX_JSON_DEPTH} levels")
            stack += [(item, depth + 1) for item in (value.values() if isinstance(value, dict) else value)]
    return body


def from_text(text, max_photo_bytes: int) -> Query:
    """The JSON route's body (or the Gradio API's /search argument) as text or bytes."""
    return from_json(parse_json(text), max_photo_bytes)


PAGE_PARAMS = ("k", "offset", "box", "collapse", "mode")
PART_PARAMS = {"text": "q", "url": "url", "item": "id"}  # the query-string parameter of each GET route's part


def from_params(params, kind: str, filter_columns, value=None) -> Query:
    """A one-part query from a route's query string: its part (``value``, or the parameter PART_PARAMS names), the
    page, a box, and filters on ``filter_columns`` (query_params_filters)."""
    first = PART_PARAMS.get(kind)
    filters = {column: v for column, v in params.items() if column not in (*PAGE_PARAMS, first)}
    known = {*filter_columns, *(f"{column}!" for column in filter_columns)}
    unknown = sorted(set(filters) - known)
    if unknown:
        raise QueryError(f"unknown parameter {unknown[0][:100]!r} (filters: {', '.join(filter_columns)}; also k, "
                         f"offset, box, collapse, mode)")
    query = Query((Part(kind, params.get(first, "") if value is None else value),), query_params_filters(filters),
                  whole_number(params.get("k"), "k", TOP_K), whole_number(params.get("offset"), "offset", 0),
                  parse_box(params.get("box")), flag(params.get("collapse"), "collapse", True),
                  parse_mode(params.get("mode")))
    check_page(query.k, query.offset)
    return query


def with_photo(query: Query, data: bytes) -> Query:
    """The query with its one part's photo filled in (the image route checks the query string before the body)."""
    return dataclasses.replace(query, parts=(Part("photo", data),))
