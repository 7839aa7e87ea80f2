"""Fetching the URLs the model chooses, safely, and turning HTML into the browser's text.

The model picks URLs, so a fetch must not reach this machine or its network: `fetch` resolves the
host, refuses any address that is not global (loopback, private, link-local, shared, reserved,
multicast) unless the user allowed it (`allow`: host names, addresses or networks), connects to the
address it checked (no second DNS answer), and checks every redirect the same way. `file:` and other
schemes are refused. Bodies are read to a size limit within a time limit.

HTML to text follows OpenAI's reference browser: links become `【{id}†{text}(†{domain})】` (lxml), the
rest is html2text's plain text.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from ossgguf.errors import OssggufError

MAX_BYTES = 2 << 20
TIMEOUT = 15.0
MAX_REDIRECTS = 5
USER_AGENT = "ossgguf-browser/0.1"


class FetchRefused(OssggufError):
    """A URL the browser will not open: its scheme, or an address it may not reach."""


@dataclass
class Fetched:
    url: str  # after redirects
    content_type: str
    text: str


def _allowed(host: str, ips: list[ipaddress._BaseAddress], allow: list[str]) -> bool:
    for entry in allow:
        entry = entry.strip().lower()
        if entry == host.lower():
            return True
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            continue
        if any(ip in net for ip in ips):
            return True
    return False


def resolve(url: str, allow: list[str]) -> tuple[str, str, int, list[str]]:
    """(scheme, host, port, addresses to connect to) for `url`, or FetchRefused."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchRefused(f"cannot open {url!r}: only http and https URLs are opened")
    host = parts.hostname
    if not host:
        raise FetchRefused(f"cannot open {url!r}: no host")
    port = parts.port or (443 if scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OssggufError(f"cannot resolve {host}: {e.strerror}") from None
    ips = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not _allowed(host, ips, allow) and (bad := [ip for ip in ips if not ip.is_global or ip.is_multicast]):
        raise FetchRefused(f"cannot open {url!r}: {host} is {bad[0]}, a loopback, private or reserved address "
                           "(the user can allow it with --browser-allow)")
    return scheme, host, port, list(dict.fromkeys(str(ip) for ip in ips))


class _Conn(http.client.HTTPConnection):
    """Connects to the first of the checked addresses that answers (never a new DNS lookup)."""

    def __init__(self, host: str, port: int, addresses: list[str], timeout: float, **kw) -> None:
        super().__init__(host, port, timeout=timeout, **kw)
        self._addresses = addresses

    def connect(self) -> None:
        error: OSError | None = None
        for address in self._addresses:
            try:
                self.sock = socket.create_connection((address, self.port), self.timeout)
                return
            except OSError as e:
                error = e
        raise error or OSError("no address")


class _TLSConn(_Conn, http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)


def fetch(url: str, allow: list[str] | None = None, max_bytes: int = MAX_BYTES, timeout: float = TIMEOUT) -> Fetched:
    """GET `url` (see the module's text); the body decoded as text."""
    allow = allow or []
    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port, addresses = resolve(url, allow)
        parts = urlsplit(url)
        left = max(1.0, deadline - time.monotonic())
        conn = _TLSConn(host, port, addresses, left, context=ssl.create_default_context()) if scheme == "https" \
            else _Conn(host, port, addresses, left)
        try:
            conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                         headers={"User-Agent": USER_AGENT, "Accept": "text/html, text/plain, */*;q=0.5",
                                  "Accept-Encoding": "identity"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                url = urljoin(url, resp.getheader("Location"))
                continue
            if resp.status >= 400:
                raise OssggufError(f"{url}: HTTP {resp.status} {resp.reason}")
            ctype = resp.getheader("Content-Type", "text/html")
            body = bytearray()
            while len(body) < max_bytes:
                if time.monotonic() > deadline:
                    raise OssggufError(f"{url}: not read within {timeout:g} s")
                chunk = resp.read(min(65536, max_bytes - len(body)))
                if not chunk:
                    break
                body += chunk
        except (OSError, http.client.HTTPException) as e:
            raise OssggufError(f"cannot fetch {url}: {e}") from None
        finally:
            conn.close()
        kind = ctype.split(";")[0].strip().lower()
        if not (kind.startswith("text/") or kind in ("application/json", "application/xml", "application/xhtml+xml")):
            raise OssggufError(f"{url} is {kind}, not a text page")
        m = re.search(r"charset=([\w-]+)", ctype)
        try:
            text = bytes(body).decode(m.group(1) if m else "utf-8", errors="replace")
        except LookupError:
            text = bytes(body).decode("utf-8", errors="replace")
        return Fetched(url, kind, text)
    raise OssggufError(f"{url}: more than {MAX_REDIRECTS} redirects")


# -- HTML to text (as OpenAI's reference browser does) -----------------------------------------------
def domain(url: str) -> str:
    return urlsplit(url).netloc


def _merge_ws(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _replace_with_text(node, text: str) -> None:
    prev, parent, tail = node.getprevious(), node.getparent(), node.tail or ""
    if prev is None:
        parent.text = (parent.text or "") + text + tail
    else:
        prev.tail = (prev.tail or "") + text + tail
    parent.remove(node)


def html_page(html: str, url: str, title: str | None = None) -> tuple[str, str, dict[str, str]]:
    """(title, text, link id -> URL) of an HTML page."""
    import html2text
    import lxml.etree
    import lxml.html

    html = html.replace("【", "〖").replace("】", "〗")  # the page cannot forge a link or a citation
    if not html.strip():
        return title or domain(url), "", {}
    try:
        root = lxml.html.fromstring(html)
    except (lxml.etree.ParserError, ValueError):
        return title or domain(url), html, {}
    found = root.find(".//title")
    title = title or (_merge_ws(found.text_content()) if found is not None else "") or domain(url)
    for node in root.xpath("//script|//style|//noscript|//head"):
        node.getparent().remove(node)
    here, ids = domain(url), {}  # link URL -> its id, in order
    for a in root.findall(".//a[@href]"):
        href = a.attrib["href"]
        text = _merge_ws(" ".join(a.itertext())).replace("†", "‡")
        if href.startswith(("mailto:", "javascript:")) or not text:
            continue
        if href.startswith("#"):
            _replace_with_text(a, text)
            continue
        link = urljoin(url, href)
        if not domain(link):
            continue
        link_id = ids.setdefault(link, str(len(ids)))
        _replace_with_text(a, f"【{link_id}†{text}】" if domain(link) == here else f"【{link_id}†{text}†{domain(link)}】")
    h = html2text.HTML2Text()
    h.ignore_links = h.ignore_images = h.ignore_tables = h.ignore_emphasis = True
    h.body_width, h.unicode_snob = 0, True
    text = h.handle(lxml.etree.tostring(root, encoding="unicode")).strip()
    text = re.sub(r"^\s+$", "", text, flags=re.MULTILINE)
    return title, re.sub(r"\n(\s*\n)+", "\n\n", text), {i: link for link, i in ids.items()}
