"""steps/base_model.py: base models as plain Hugging Face folders in the store, built once."""

from steps.base_model import prepare_base_model
from steps.base_model.shipped import TINY_BERT_SHAPE, TINY_SHAPE
from steps.config import BaseModelConfig


def test_the_gguf_tokenizer_is_converted_once_and_reused_byte_for_byte(store, tiny_model, tmp_path, monkeypatch):
    """A base model built in a new prefix takes the tokenizer from the local cache (no second
    GGUF conversion) and stores the same tokenizer files a fresh conversion writes."""
    from transformers import AutoTokenizer

    from steps.base_model import prepare_base_model
    from steps.base_model.shipped import gguf_path
    from steps.config import BaseModelConfig

    assert any((store.cache_dir / "gguf-tokenizers").iterdir())  # tiny_model's build filled it
    conversions, real = [], AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        conversions.append(kwargs.get("gguf_file"))
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    built = store.download(prepare_base_model(BaseModelConfig(source="tiny-random-llama"), store).base)
    assert conversions == [None]
    gguf = gguf_path()
    real(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp_path)  # a fresh conversion
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names and all((built / n).read_bytes() == (tmp_path / n).read_bytes() for n in names)


def test_tiny_models_have_their_shapes_and_a_tokenizer_and_are_built_once(store):
    import json

    for source, shape in (("tiny-random-llama", TINY_SHAPE), ("tiny-random-bert", TINY_BERT_SHAPE)):
        ref = prepare_base_model(BaseModelConfig(source=source), store)
        folder = store.download(ref.base)
        config = json.loads((folder / "config.json").read_text())
        assert {k: config[k] for k in shape} == shape, source
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
        assert not list(folder.glob("*.bin")) and ref.base.stats["source"] == source
        keys = store.list_keys(store.prefix + "/")
        assert prepare_base_model(BaseModelConfig(source=source), store) == ref
        assert store.list_keys(store.prefix + "/") == keys


def test_concurrent_builders_sharing_a_cache_convert_the_gguf_tokenizer_once(tmp_path, monkeypatch):
    """Two builders at once (pytest-xdist workers, two flow runs on one machine): one converts under
    the lock, the other waits and loads the converted files."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoTokenizer

    from steps.base_model.shipped import gguf_path, gguf_tokenizer

    conversions, real = [], AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        conversions.append(kwargs.get("gguf_file"))
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    cache = tmp_path / "gguf-tokenizers" / "digest"
    with ThreadPoolExecutor(2) as pool:
        vocab = [len(t) for t in pool.map(lambda _: gguf_tokenizer(gguf_path(), cache), range(2))]
    assert sorted(conversions, key=str) == [None, gguf_path().name] and vocab[0] == vocab[1]
    assert [p.name for p in cache.parent.iterdir() if not p.name.endswith(".lock")] == ["digest"]
