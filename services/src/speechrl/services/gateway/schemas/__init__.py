"""Typed request and reply models of the gateway, one module per resource, with schema examples."""
