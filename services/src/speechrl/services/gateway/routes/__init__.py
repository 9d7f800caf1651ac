"""Routers of the gateway, one module per resource; `ROUTERS` is what the app mounts.

Trainer protocol front-ends translate to the same SDK clients: the OpenRLHF remote reward-model
endpoint (POST /v1/openrlhf/{scorer}, `routes/openrlhf.py`), slime's remote reward model (POST
/v1/slime/{scorer}, `routes/slime.py`) and the Triton / KServe v2 inference protocol
(/v2/models/{model}/infer, `routes/triton.py`). The dashboard is a page (/ui, `routes/ui.py`) over
small JSON routes (/v1/dashboard/*, `routes/dashboard.py`).
"""

from fastapi import APIRouter

from speechrl.services.gateway.routes import (
    dashboard,
    health,
    intelligibility,
    openrlhf,
    rules,
    slime,
    speaker,
    triton,
    ui,
)

ROUTERS: list[APIRouter] = [
    health.router,
    intelligibility.router,
    speaker.router,
    rules.router,
    openrlhf.router,
    slime.router,
    triton.router,
    dashboard.router,
    ui.router,
]
