"""/docs (Swagger UI) and /redoc work on a machine without internet: every script, stylesheet and
icon their pages load is served by this server (FastAPI's defaults load them from a CDN), and, like
the pages themselves, without an API key."""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from posttrain.api.app import create_app
from posttrain.services.access import digest
from posttrain.services.container import build_services
from posttrain.settings import Settings

EXPECTED_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


class _AssetLinks(HTMLParser):
    """The URLs a browser fetches to render a page: <script src> and <link href>."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href"}.get(tag)
        for name, value in attrs:
            if name == wanted and value:
                self.urls.append(value)


@pytest.fixture(params=["open", "with API keys"])
def client(request, tmp_path):
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'store.db'}")
    if request.param == "with API keys":
        keys = tmp_path / "keys"
        keys.write_text(f"alice:{digest('pt-alice-key')}\n")
        settings.api_keys_file = keys
    services = build_services(settings)
    with TestClient(create_app(services=services), raise_server_exceptions=False) as test_client:
        yield test_client
    services.close()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_every_asset_of_the_docs_page_is_served_locally(client, page):
    response = client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    parser = _AssetLinks()
    parser.feed(response.text)
    assert parser.urls, f"{page} loads no script or stylesheet"
    assert any(url.endswith(".js") for url in parser.urls)
    for url in parser.urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc and url.startswith("/"), f"{page} loads {url} from elsewhere"
        asset = client.get(url)
        assert asset.status_code == 200, url
        suffix = "." + url.rsplit(".", 1)[-1]
        assert EXPECTED_TYPES[suffix] in asset.headers["content-type"], (url, asset.headers["content-type"])
        assert len(asset.content) > 1000, url
    if page == "/docs":
        assert "SwaggerUIBundle" in client.get(next(u for u in parser.urls if u.endswith(".js"))).text
    assert "https://" not in response.text and "http://" not in response.text


def test_the_openapi_document_the_pages_read_is_served(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert "/v1/post-training/supervised-fine-tune" in response.json()["paths"]
