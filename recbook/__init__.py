__version__ = "0.1.0"

_LAZY = {"load_optimized": "recbook.pipeline", "load_recommender": "recbook.recpipeline"}


def __getattr__(name):  # `recbook.load_optimized` / `recbook.load_recommender` without importing torch at `import recbook`
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'recbook' has no attribute {name!r}")
