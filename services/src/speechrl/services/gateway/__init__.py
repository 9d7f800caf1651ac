"""REST gateway: HTTP/JSON in front of the gRPC scorers, with OpenAPI docs, health and metrics.

`create_app(GatewayConfig(...))` builds the FastAPI app; `speechrl serve gateway` runs it under
uvicorn. Routes translate HTTP to the async SDK clients (speechrl.client) and hold no logic.
"""
