"""A checkpoint's tokenizer: HF `tokenizers` (tokenizer.json), special tokens, EOS ids and
the chat template rendered with jinja2 as transformers does, so no transformers or torch.
    tok = moejax.load_tokenizer(checkpoint_dir); ids = tok.encode("Hello")
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}]); text = tok.decode(new_ids)"""

from __future__ import annotations

import json
import os
from datetime import datetime

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                "cls_token", "mask_token")


def _read_json(path: str) -> dict:
    """The JSON object in `path`, {} when absent; ValueError naming the file if bad."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


def _token_str(v) -> str | None:
    """A special token as a string or an AddedToken dict {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _template(cfg: dict) -> str | None:
    """The chat template: a string, or the "default" of a list of named templates."""
    t = cfg.get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    return t if isinstance(t, str) else None


def compile_template(source: str):
    """jinja2 template in transformers' apply_chat_template environment (sandboxed,
    trim_blocks, lstrip_blocks, loopcontrols, raise_exception, tojson)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template does not compile: {e}") from None


class Tokenizer:
    """encode/decode; `eos_token_ids` from generation_config.json, else the EOS token."""

    def __init__(self, tok, config: dict | None = None, generation: dict | None = None):
        config, generation = config or {}, generation or {}
        self.tok = tok
        self.special = {k: s for k in SPECIAL_KEYS if (s := _token_str(config.get(k)))}
        self.chat_template = _template(config)
        self._compiled = None
        self.bos_token_id = self._id(self.special.get("bos_token"),
                                     generation.get("bos_token_id"))
        eos = generation.get("eos_token_id")
        if eos is None and self.special.get("eos_token") is not None:
            eos = tok.token_to_id(self.special["eos_token"])
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        self.eos_token_ids = [int(e) for e in eos]

    def _id(self, token: str | None, default=None):
        i = self.tok.token_to_id(token) if token is not None else None
        return default if i is None else i

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; the tokenizer's post-processor adds BOS (if it does)."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids],
                               skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """apply_chat_template(tokenize=False) of `messages`; one-line ValueError when there
        is no template or it raises (e.g. roles not alternating)."""
        import jinja2

        if self.chat_template is None:
            raise ValueError("the tokenizer has no chat template (tokenizer_config.json "
                             "chat_template)")
        if self._compiled is None:
            self._compiled = compile_template(self.chat_template)
        try:
            return self._compiled.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **self.special)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template: {' '.join(str(e).split())}") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Ids of the rendered chat (its special tokens come from the template)."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def load_tokenizer(checkpoint_dir: str | os.PathLike) -> Tokenizer:
    """The Tokenizer of a checkpoint dir: tokenizer.json (+ tokenizer_config.json and
    generation_config.json); one-line ValueError naming a missing or unreadable file."""
    from tokenizers import Tokenizer as HFTokenizer

    d = os.fspath(checkpoint_dir)
    path = os.path.join(d, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: the checkpoint has no tokenizer "
                         "(a HF tokenizers tokenizer.json is needed)")
    try:
        tok = HFTokenizer.from_file(path)
    except Exception as e:  # tokenizers raises its own Exception type
        raise ValueError(f"{path}: not a tokenizers file ({str(e).splitlines()[0]})") \
            from None
    return Tokenizer(tok, _read_json(os.path.join(d, "tokenizer_config.json")),
                     _read_json(os.path.join(d, "generation_config.json")))
