"""The URL route's guards against a local HTTP server (conftest.Handler): addresses, schemes, redirects, bodies,
the total deadline."""
import time

import pytest

from conftest import jpeg_bytes
from fashion_search.serving import fetch
from fashion_search.errors import QueryError


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x.jpg", "http://localhost/x.jpg", "http://[::1]/x.jpg", "http://169.254.169.254/latest",
    "http://10.0.0.1/x.jpg", "http://192.168.1.1/x.jpg", "http://[::ffff:127.0.0.1]/x.jpg", "http://2130706433/x.jpg",
    "http://0.0.0.0/x.jpg", "http://224.0.0.1/x.jpg", "http://100.64.0.1/x.jpg", "http://[fe80::1]/x.jpg"])
def test_private_addresses_are_refused(url):
    with pytest.raises(QueryError, match="non-public address"):
        fetch.fetch_url(url)


@pytest.mark.parametrize("url", ["ftp://example.com/x.jpg", "file:///etc/passwd", "javascript:alert(1)", "", "x"])
def test_other_schemes_are_refused(url):
    with pytest.raises(QueryError, match="only http and https"):
        fetch.fetch_url(url)


def test_local_server_is_refused_unless_allowed(server):
    with pytest.raises(QueryError, match="non-public"):
        fetch.fetch_url(f"{server}/img.jpg")
    assert fetch.fetch_url(f"{server}/img.jpg", allow_private=True) == jpeg_bytes()


def test_redirects_are_followed_up_to_the_limit(server):
    # /redirect/N answers N + 1 redirects before the image
    assert fetch.fetch_url(f"{server}/redirect/2", allow_private=True) == jpeg_bytes()
    with pytest.raises(QueryError, match="more than 3 redirects"):
        fetch.fetch_url(f"{server}/redirect/3", allow_private=True)


def test_public_name_redirecting_to_a_private_address_is_refused(server, monkeypatch):
    real = fetch.resolve_public

    def resolve(host, port, allow_private, deadline=None):
        # 'public.test' plays a public server (it is our local one); every other host is checked for real.
        return "127.0.0.1" if host == "public.test" else real(host, port, allow_private, deadline)

    monkeypatch.setattr(fetch, "resolve_public", resolve)
    port = server.rsplit(":", 1)[1]
    with pytest.raises(QueryError, match="non-public address"):
        fetch.fetch_url(f"http://public.test:{port}/to-private")


@pytest.mark.parametrize("path, message", [
    ("/html", "serves 'text/html'"), ("/huge-declared", "larger than 10 MB"), ("/endless", "larger than 10 MB"),
    ("/missing", "HTTP 404")])
def test_bad_bodies_are_refused(server, path, message):
    with pytest.raises(QueryError, match=message):
        fetch.fetch_url(server + path, allow_private=True)


def test_slow_body_hits_the_total_deadline(server, monkeypatch):
    monkeypatch.setattr(fetch, "TOTAL_TIMEOUT", 2.0)
    started = time.monotonic()
    with pytest.raises(QueryError, match="longer than 2 s"):
        fetch.fetch_url(f"{server}/slow", allow_private=True)
    assert time.monotonic() - started < 5
