"""The HTTP service: an OpenAI-compatible API and a Gradio web UI in one process.

``create_app(ServeConfig(...), engine=None)`` builds the FastAPI application (the extractive
backend answers when no engine is given); ``run(config)`` loads the model and serves it.
FastAPI and Gradio are imported only by these entry points, never by the other packages.
"""

from glyphserve.serve.config import ServeConfig, default_data_dir

__all__ = ["ServeConfig", "create_app", "default_data_dir", "run"]


def __getattr__(name: str):
    if name in ("create_app", "run"):
        from glyphserve.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'glyphserve.serve' has no attribute {name!r}")
