"""moejax.load_tokenizer against transformers' tokenizer on experiments.make_tiny's files."""

import json
import os
import shutil

import pytest

import moejax
from experiments.make_tiny import make_tiny

OWN_TEMPLATE = (
    "{% for m in messages %}\n"
    "  {% if m['role'] == 'system' %}{% continue %}{% endif %}\n"
    "<|{{ m['role'] }}|>\n"
    "  {{ m['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

CHATS = [
    [{"role": "user", "content": "Tell me a story about a cat."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hi, how are you?"},
     {"role": "user", "content": "  What is the weather like?  "}],
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("tiny") / "ckpt"))


def with_template(tiny, tmp_path, template):
    d = tmp_path / "own"
    shutil.copytree(tiny, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(d)


def test_encode_decode_and_special_tokens_match_transformers(tiny):
    from transformers import AutoTokenizer

    ours, theirs = moejax.load_tokenizer(tiny), AutoTokenizer.from_pretrained(tiny)
    text = "The little cat read a book about the sea. Unseen words: zebra quokka!"
    ids = ours.encode(text)
    assert ids == theirs.encode(text) and ids[0] == ours.bos_token_id == 1
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == text
    assert ours.eos_token_ids == [theirs.eos_token_id] == [2]
    assert ours.vocab_size == 400


@pytest.mark.parametrize("own", [False, True], ids=["mixtral_instruct", "own"])
def test_chat_template_renders_as_transformers(tiny, tmp_path, own):
    from transformers import AutoTokenizer

    d = with_template(tiny, tmp_path, OWN_TEMPLATE) if own else tiny
    ours, theirs = moejax.load_tokenizer(d), AutoTokenizer.from_pretrained(d)
    for chat in CHATS:
        text = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert ours.render_chat(chat) == text
        ids = theirs.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        assert ours.encode_chat(chat) == list(ids)
    if own:
        assert ours.render_chat(CHATS[0]).endswith("<|assistant|>\n")
    else:
        assert ours.render_chat(CHATS[1]).startswith("<s> [INST] Be brief.\n\nHello [/INST]")


def test_template_errors_are_one_line(tiny, tmp_path):
    tok = moejax.load_tokenizer(tiny)
    with pytest.raises(ValueError, match="roles must alternate") as e:
        tok.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert "\n" not in str(e.value)
    bare = moejax.load_tokenizer(with_template(tiny, tmp_path, None))
    with pytest.raises(ValueError, match="no chat template"):
        bare.encode_chat(CHATS[0])
    assert bare.encode("Hello")[0] == 1  # plain prompts need no template


def test_missing_or_bad_tokenizer_is_one_line(tiny, tmp_path):
    d = tmp_path / "no_tok"
    shutil.copytree(tiny, d)
    os.remove(d / "tokenizer.json")
    with pytest.raises(ValueError, match="tokenizer.json not found") as e:
        moejax.load_tokenizer(d)
    assert str(d / "tokenizer.json") in str(e.value) and "\n" not in str(e.value)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a tokenizers file"):
        moejax.load_tokenizer(d)


def test_generation_config_eos_list_wins(tiny, tmp_path):
    d = with_template(tiny, tmp_path, OWN_TEMPLATE)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 7]}, f)
    assert moejax.load_tokenizer(d).eos_token_ids == [2, 7]
