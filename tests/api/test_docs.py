"""/docs and /redoc work on a host with no way out: every script, style sheet and icon they
load is served by the API itself."""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import pytest

from tests.api.conftest import Api


class _Assets(HTMLParser):
    """The URLs a page loads: script sources, linked style sheets and icons."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        url = found.get("src") if tag == "script" else found.get("href") if tag == "link" else None
        if url:
            self.urls.append(url)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_documentation_pages_load_nothing_from_another_host(api: Api, page: str) -> None:
    answer = api.client.get(page)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/html")
    parser = _Assets()
    parser.feed(answer.text)
    assert any(u.endswith(".js") for u in parser.urls), parser.urls  # the page has its UI
    if page == "/docs":  # nor is the schema sent to an online validator for a badge
        assert '"validatorUrl": null' in answer.text
    base = str(answer.url)
    for url in parser.urls:
        where = urlsplit(urljoin(base, url))
        assert where.netloc == urlsplit(base).netloc, f"{page} loads {url} from another host"
        fetched = api.client.get(where.path)
        assert fetched.status_code == 200, f"{page}: {url} answers {fetched.status_code}"
        assert fetched.content, f"{page}: {url} is empty"
