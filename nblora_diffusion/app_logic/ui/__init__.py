"""The Gradio page of the app (app/app.py parses the command line and starts it): one module per tab,
each a builder of its components and a wiring of its events to ``AppHandlers``; ``blocks`` puts them
together, queues and serves the page."""

from .blocks import build_app, create_app, launch_app

__all__ = ["build_app", "create_app", "launch_app"]
