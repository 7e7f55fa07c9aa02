"""Fetching a query image from a URL with every guard a public server needs: public addresses only, pinned
connections (no DNS rebinding), checked redirects, one deadline over the whole fetch, a size cap."""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from urllib.parse import urljoin, urlsplit

from fashion_search.errors import QueryError

MAX_DOWNLOAD_BYTES = 10 * 1024 * 1024
MAX_REDIRECTS = 3
CONNECT_TIMEOUT, READ_TIMEOUT, TOTAL_TIMEOUT = 3.0, 5.0, 15.0


# Ranges that Python 3.11's ipaddress.is_global lets through but that lead into private networks: NAT64, 6to4,
# Teredo, IPv4-compatible and IPv4-translated (SIIT) addresses embed an IPv4 address a gateway may forward to;
# site-local is the old private IPv6 range; 100.64.0.0/10 is carrier-grade NAT space, where clouds put metadata
# services (100.100.100.200); 192.88.99.0/24 is the retired 6to4 relay anycast range.
REFUSED_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32", "::/96", "::ffff:0:0:0/96", "fec0::/10",
    "100.64.0.0/10", "192.88.99.0/24"))


def check_address(address: str, allow_private: bool):
    """Refuse every address that is not public unicast (loopback, private, link-local, multicast, reserved,
    unspecified, shared, documentation, and the tunnelling ranges of REFUSED_NETWORKS), IPv4-mapped IPv6 included."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    tunnelled = any(ip.version == net.version and ip in net for net in REFUSED_NETWORKS)
    if not allow_private and (not ip.is_global or tunnelled) or ip.is_multicast or ip.is_unspecified:
        raise QueryError(f"refused: the URL points to a non-public address ({ip})")
    return str(ip)


class Deadline:
    """One wall-clock limit for a whole fetch: DNS, connect, TLS, headers, every redirect and the body."""

    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left; QueryError once none are."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise self.error()
        return left

    def error(self) -> QueryError:
        return QueryError(f"refused: fetching the URL took longer than {self.seconds:g} s")

    def watch(self, sock):
        """Shut ``sock`` down when the deadline passes, which ends any read or handshake blocked on it however
        slowly its peer drips bytes (a per-read timeout never fires while bytes keep coming)."""
        timer = threading.Timer(self.left(), _shutdown, (sock,))
        timer.daemon = True
        timer.start()
        return timer


def _shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


def resolve_public(host: str, port: int, allow_private: bool, deadline: Deadline | None = None) -> str:
    """Resolve once and check every address; the connection then goes to the checked address (no DNS rebinding).
    The lookup runs in a helper thread so that a slow resolver cannot outlast the deadline."""
    from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout

    pool = ThreadPoolExecutor(max_workers=1)
    lookup = pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    pool.shutdown(wait=False)
    try:
        infos = lookup.result(timeout=deadline.left() if deadline else None)
    except FutureTimeout:
        raise deadline.error() from None
    except (socket.gaierror, UnicodeError) as exc:
        raise QueryError(f"cannot resolve host {host!r} ({exc})") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        check_address(address, allow_private)
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the checked address, within the deadline, with a watchdog on the socket."""

    def __init__(self, host, port, address, deadline: Deadline):
        super().__init__(host, port, timeout=min(READ_TIMEOUT, deadline.left()))
        self._address, self._deadline, self.watchdog = address, deadline, None

    def _open(self):
        sock = socket.create_connection((self._address, self.port), timeout=min(CONNECT_TIMEOUT, self._deadline.left()))
        self.watchdog = self._deadline.watch(sock)
        sock.settimeout(min(READ_TIMEOUT, self._deadline.left()))
        return sock

    def connect(self):
        self.sock = self._open()

    def close(self):
        super().close()
        if self.watchdog is not None:
            self.watchdog.cancel()


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    default_port = 443

    def connect(self):
        # the certificate is checked for the host name; the handshake runs under the same watchdog
        self.sock = ssl.create_default_context().wrap_socket(self._open(), server_hostname=self.host)


def fetch_url(url: str, allow_private: bool = False, max_bytes: int = MAX_DOWNLOAD_BYTES,
              deadline: Deadline | None = None) -> bytes:
    """GET an image over http(s) with every guard a public server needs: scheme check, public-address check on
    every hop (at most MAX_REDIRECTS redirects), connect and read timeouts, one TOTAL_TIMEOUT deadline over the
    whole fetch (or ``deadline``, shared by the fetches of one query), a streamed size cap."""
    url = (url or "").strip()
    deadline = deadline or Deadline(TOTAL_TIMEOUT)
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise QueryError(f"refused: only http and https URLs are fetched, not {parts.scheme or 'no scheme'!r}")
        if not parts.hostname:
            raise QueryError("refused: the URL has no host")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise QueryError("refused: the URL has an invalid port") from None
        address = resolve_public(parts.hostname, port, allow_private, deadline)
        connection_class = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        connection = connection_class(parts.hostname, port, address, deadline)
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", path, headers={"User-Agent": "fashion-search/1.0", "Accept": "image/*"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise QueryError(f"the server answered {response.status} without a Location")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise QueryError(f"the server answered HTTP {response.status} for this URL")
            content_type = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if content_type and not content_type.startswith("image/") and content_type != "application/octet-stream":
                raise QueryError(f"refused: the URL serves {content_type!r}, not an image")
            declared = response.getheader("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise QueryError(f"refused: the image is larger than {max_bytes // 2**20} MB")
            body = bytearray()
            while chunk := response.read1(65536):  # read1: whatever arrived, so a trickling body hits the deadline
                body += chunk
                if len(body) > max_bytes:
                    raise QueryError(f"refused: the image is larger than {max_bytes // 2**20} MB")
                deadline.left()
            deadline.left()  # a body the watchdog cut short ends like a whole one: only the clock tells them apart
            return bytes(body)
        except (TimeoutError, socket.timeout):
            deadline.left()
            raise QueryError("the server did not answer in time") from None
        except (OSError, http.client.HTTPException) as exc:
            deadline.left()  # the watchdog's shutdown surfaces as a closed connection
            raise QueryError(f"could not fetch the URL ({type(exc).__name__}: {exc})") from None
        finally:
            connection.close()
    raise QueryError(f"refused: more than {MAX_REDIRECTS} redirects")
