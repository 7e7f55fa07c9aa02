"""Serving searches: URL fetching, micro-batching, the CLIP query encoder, the catalog and its index, and the search
service that app.py puts behind a page and a JSON API."""
