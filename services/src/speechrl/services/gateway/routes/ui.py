"""/ui: the dashboard page and its two assets, from the package (gateway/ui/static), never a CDN.

The page loads without a token; it asks /v1/dashboard/auth whether one is needed, and if so asks
the user for it and sends it as `Authorization: Bearer` on every call.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from speechrl.services.gateway.ui import ASSETS, STATIC

router = APIRouter(include_in_schema=False)

# The page runs only its own files: no inline script, no other origin (a token in sessionStorage stays
# with this origin). data: for the empty favicon, which spares the browser a 404.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a new gateway version's page is picked up on reload
}


@router.get("/ui")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/ui/")
async def page_slash() -> RedirectResponse:
    return RedirectResponse("../ui")  # relative: the gateway may sit under a path prefix


@router.get("/ui/{name}")
async def asset(name: Literal["dashboard.js", "dashboard.css"]) -> FileResponse:
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)
