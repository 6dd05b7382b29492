"""Test setup: 8 fake CPU devices (set before JAX starts), offline, small shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices8():
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 devices; JAX was initialised before conftest set XLA_FLAGS")
    return devices[:8]


WORDS = ("the cat sat on a mat while dog ran far away into green fields under blue sky and "
         "then came home at night to sleep by the warm fire").split()


def random_documents(n: int, seed: int = 0, min_words: int = 20, max_words: int = 200) -> list[str]:
    import random
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A byte-level BPE (vocab 300) and prepared train/validation sets of 32-token sequences."""
    from maxprune.data import prepare as prepare_lib
    from maxprune.data import tokenizer as tokenizer_lib

    root = tmp_path_factory.mktemp("tiny_corpus")
    docs = random_documents(500)
    for split, chunk in (("train", docs[:450]), ("validation", docs[450:])):
        (root / split).mkdir()
        for i, doc in enumerate(chunk):
            (root / split / f"{i:04d}.txt").write_text(doc)
    tok = tokenizer_lib.train_bpe(iter(docs[:450]), 300, root / "tokenizer")
    for split in ("train", "validation"):
        prepare_lib.prepare(f"txt:{root / split}/*.txt", tok, root / f"{split}_ds", 32, workers=1,
                            progress=False)
    return {"root": root, "tokenizer": tok, "train": root / "train_ds", "validation": root / "validation_ds"}
