"""What a query can answer instead of results: each carries the HTTP status of the JSON routes."""


class QueryError(ValueError):
    """Bad or refused input: its message is shown on the page and raised to API clients as gr.Error."""
    status = 400


class Busy(QueryError):
    """Too many requests are waiting: refused at once rather than queued without limit."""
    status = 503


class ModelFailure(QueryError):
    """The model failed on the batch this request was in (the other batches are unaffected)."""
    status = 500
