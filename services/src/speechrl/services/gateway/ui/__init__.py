"""The dashboard page's files: plain HTML, CSS and JavaScript in static/, no build step, no CDN.

Package data (services/pyproject.toml), served by routes/ui.py. The charts are SVG drawn by
static/dashboard.js; every number comes from the gateway's /v1/dashboard/* routes.
"""

from pathlib import Path

STATIC = Path(__file__).parent / "static"
# The files the page loads, by URL name, with their media types. Nothing else under /ui is served.
ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
# What the bearer-token middleware lets through: the page and its assets hold no data.
OPEN_PATHS = ("/ui", "/ui/", *(f"/ui/{name}" for name in ASSETS))
