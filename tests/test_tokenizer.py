import pickle

import pytest

from maxprune.data.tokenizer import LLAMA3_SHA256, Tokenizer, train_bpe
from maxprune.errors import MaxpruneError

# Ids checked against tiktoken on Meta's tokenizer.model (the reference), 2026-11-28.
PARAGRAPH = ("Pruning Llama-3.1-8B at 50% keeps 4,015,308,800 parameters; we're "
             "retraining on 50B tokens.\n\n  Naïve café — 東京 🚀 isn't it?\tDone.")
PARAGRAPH_IDS = [3617, 38302, 445, 81101, 12, 18, 13, 16, 12, 23, 33, 520, 220, 1135, 4, 13912, 220, 19,
                 11, 16037, 11, 14498, 11, 4728, 5137, 26, 584, 2351, 312, 31754, 389, 220, 1135, 33,
                 11460, 382, 220, 13106, 38672, 588, 53050, 2001, 119109, 11410, 248, 222, 4536, 956,
                 433, 30, 11198, 606, 13]
CORPUS = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs",
          "how vexingly quick daft zebras jump", "the five boxing wizards jump quickly"] * 5


@pytest.fixture(scope="module")
def llama3():
    return Tokenizer.llama3()


def test_llama3_reference_ids(llama3):
    assert llama3.encode("Hello world") == [9906, 1917]
    assert llama3.encode("Hello world", bos=True, eos=True) == [128000, 9906, 1917, 128001]
    assert (llama3.bos_id, llama3.eos_id, llama3.vocab_size) == (128000, 128001, 128256)
    assert llama3.encode(PARAGRAPH) == PARAGRAPH_IDS
    assert llama3.decode(PARAGRAPH_IDS) == PARAGRAPH
    assert llama3.hash == LLAMA3_SHA256 and llama3.name == "llama3"


def test_llama3_backends_agree(llama3):
    """tiktoken on tokenizer.model (the reference; used when installed) and HF tokenizers agree."""
    if llama3.backend != "tiktoken":
        pytest.skip("tiktoken is not installed")
    from maxprune.data.tokenizer import LLAMA3_SHA256, _llama3_file

    hf = Tokenizer(_llama3_file().read_bytes(), "llama3", use_tiktoken=False)
    assert hf.backend == "tokenizers" and hf.hash == LLAMA3_SHA256
    texts = [PARAGRAPH, " ".join(CORPUS) + "\n\nTHE END 12345 ...!!", "a<|end_of_text|>b", "", "   \t\n x"]
    assert hf.encode_batch(texts) == llama3.encode_batch(texts) == [llama3.encode(t) for t in texts]
    assert hf.encode(PARAGRAPH) == PARAGRAPH_IDS


def test_special_token_text_in_a_document_stays_text(llama3):
    ids = llama3.encode("a<|end_of_text|>b<|begin_of_text|>")
    assert 128001 not in ids and 128000 not in ids
    assert llama3.decode(ids) == "a<|end_of_text|>b<|begin_of_text|>"


def test_encode_batch_equals_encode(llama3):
    texts = [PARAGRAPH, "", "Hello world", CORPUS[0]]
    assert llama3.encode_batch(texts) == [llama3.encode(t) for t in texts]
    assert llama3.encode_batch(texts, bos=True)[1] == [128000]


def test_save_load_and_pickle_keep_identity(llama3, tmp_path):
    llama3.save(tmp_path / "tok")
    for path in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        loaded = Tokenizer.load(path)
        assert (loaded.hash, loaded.name) == (LLAMA3_SHA256, "llama3")
        assert (loaded.bos_id, loaded.eos_id) == (128000, 128001)
    assert Tokenizer.load("llama3").hash == LLAMA3_SHA256
    clone = pickle.loads(pickle.dumps(llama3))
    assert clone.encode(PARAGRAPH) == PARAGRAPH_IDS and clone.hash == llama3.hash


def test_train_bpe_is_deterministic_and_roundtrips(tmp_path):
    a = train_bpe(iter(CORPUS), 300, tmp_path / "a")
    b = train_bpe(iter(CORPUS), 300, tmp_path / "b")
    assert a.hash == b.hash and 256 + 3 < a.vocab_size <= 300
    assert (a.bos_id, a.eos_id) == (0, 1)  # special tokens take the first ids
    text = "the lazy zebras jump! ünseen bytes ✓"
    assert a.decode(a.encode(text)) == text
    assert len(a.encode(CORPUS[0])) < len(CORPUS[0].encode())  # merges were learned
    loaded = Tokenizer.load(tmp_path / "a")
    assert (loaded.hash, loaded.name, loaded.bos_id, loaded.eos_id) == (a.hash, "a", 0, 1)


def test_train_bpe_refuses_bad_inputs(tmp_path):
    with pytest.raises(MaxpruneError, match="vocab_size=100 must be >= 259"):
        train_bpe(iter(CORPUS), 100, tmp_path / "x")
    train_bpe(iter(CORPUS), 280, tmp_path / "x")
    with pytest.raises(MaxpruneError, match="tokenizer.json exists; pass --overwrite"):
        train_bpe(iter(CORPUS), 290, tmp_path / "x")
    with pytest.raises(MaxpruneError, match="holds another tokenizer"):
        train_bpe(iter(CORPUS[:4]), 270, tmp_path / "y").save(tmp_path / "x")


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(MaxpruneError, match=f"no tokenizer at {tmp_path}"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(MaxpruneError, match="is not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)
