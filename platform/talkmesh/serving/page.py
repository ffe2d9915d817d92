"""The web page at the service's root: ``GET /`` (web/page/index.html), ``/ui/*`` (its script
and style) and ``/ui/vendor/three/*`` (three.js as npm installed it into web/node_modules by
`make setup`; never copied into the repository). The page calls the same ``/v1`` API as any
client, with the API key the user types (none in dev mode from loopback)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

from talkmesh.serving.errors import ServiceError

__all__ = ["WEB", "mount_page"]

WEB = Path(__file__).resolve().parents[3] / "web"  # the checkout's web/ folder


def mount_page(api: FastAPI) -> None:
    """Add the page's routes to ``api`` (the more specific three.js mount first)."""
    from fastapi.staticfiles import StaticFiles

    api.mount("/ui/vendor/three", StaticFiles(directory=WEB / "node_modules" / "three", check_dir=False), name="three")
    api.mount("/ui", StaticFiles(directory=WEB / "page", check_dir=False), name="ui")

    @api.get("/", include_in_schema=False)
    def page() -> FileResponse:
        index = WEB / "page" / "index.html"
        if not index.is_file() or not (WEB / "node_modules" / "three").is_dir():
            msg = f"the web page is not installed here ({WEB}): run `make setup` in a talkmesh checkout"
            raise ServiceError(404, "not_found", msg)
        return FileResponse(index, media_type="text/html")
