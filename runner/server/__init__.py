"""The OpenAI-compatible server: app.py (routes, `create_app`, `serve`) is where a request starts."""

from ossgguf.runner.server.app import create_app, serve

__all__ = ["create_app", "serve"]
