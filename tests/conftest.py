import os

# libgomp spin-waiting makes small ops erratic on 2 vCPUs; tests run many small ops.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Data and reference caches go to a throw-away folder, never the user's ~/.cache.
if "PREFTUNE_CACHE" not in os.environ:
    import tempfile

    os.environ["PREFTUNE_CACHE"] = tempfile.mkdtemp(prefix="preftune-test-cache-")
