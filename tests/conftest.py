import os

# Tests run at the teaching size and never touch the network.
os.environ.setdefault("IN_TEST", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
