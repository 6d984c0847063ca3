__version__ = "0.1.0"


def __getattr__(name):  # `recbook.load_optimized` without importing torch at `import recbook`
    if name == "load_optimized":
        from recbook.pipeline import load_optimized
        return load_optimized
    raise AttributeError(f"module 'recbook' has no attribute {name!r}")
