import os

# libgomp spin-waiting makes small ops erratic on 2 vCPUs; tests run many small ops.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Data and reference caches go to a throw-away folder, never the user's ~/.cache.
if "PREFTUNE_CACHE" not in os.environ:
    import tempfile

    os.environ["PREFTUNE_CACHE"] = tempfile.mkdtemp(prefix="preftune-test-cache-")


# ---------------------------------------------------------------------------------------------------
# Shared tiny models and tokenizers (built once per session; tests read them, never write into them)

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """tests/_tiny.py's tiny Llama (2 layers, hidden 32, tied, seed 0) with the char tokenizer beside it."""
    from _tiny import make_tiny_llama

    out = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(out, seed=0)
    return out


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    """A char tokenizer folder as a real one behaves: it decodes to plain text and its chat template
    starts with BOS."""
    from _tiny import BOS_CHAT_TEMPLATE, make_char_tokenizer

    out = tmp_path_factory.mktemp("tok")
    make_char_tokenizer(out, fuse=True, chat_template=BOS_CHAT_TEMPLATE)
    return out


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The smallest model folder (1 layer, hidden 16) with :func:`tok_dir`'s tokenizer: the CLI tests'."""
    from _tiny import BOS_CHAT_TEMPLATE, make_tiny_llama

    out = tmp_path_factory.mktemp("model")
    make_tiny_llama(out, layers=1, hidden=16, fuse=True, chat_template=BOS_CHAT_TEMPLATE)
    return out
