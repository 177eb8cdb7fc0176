"""Write a tiny random Mixtral checkpoint with a real tokenizer, to try jobs end to end.

    python -m experiments.make_tiny --out DIR [--seed 0]

DIR gets HF files — config.json, model.safetensors (random float32 weights), and a
`tokenizers` BPE tokenizer trained on a short built-in English text (tokenizer.json
with <s>/</s>/<unk>, tokenizer_config.json with a Mixtral-Instruct-shaped chat
template, generation_config.json with eos_token_id) — written with numpy and
safetensors alone: no torch, no download. transformers' MixtralForCausalLM and
AutoTokenizer load it too (the tests use them as the oracle).
"""

from __future__ import annotations

import json
import os

import numpy as np

TEXT = """\
The quick brown fox jumps over the lazy dog. A small model can still write a sentence.
Once upon a time there was a little town by the sea. Every morning the fishermen went
out in their boats, and every evening they came home with the day's catch. The children
ran along the beach and the old people sat in the sun and told stories about the past.
What is the weather like today? It is sunny and warm, with a light wind from the west.
Please tell me a story about a cat who lived in a library and read books at night.
The cat liked books about the ocean, about mountains and about the stars in the sky.
Machine learning models learn patterns from data. A mixture of experts routes each token
to a few experts, so a large model costs less to run than its size suggests.
Hello, how are you? I am fine, thank you. What would you like to do this afternoon?
We could go for a walk in the park, read a book, or cook a nice dinner together.
"""

SPECIALS = ("<unk>", "<s>", "</s>")

# Shaped like mistralai/Mixtral-8x7B-Instruct-v0.1's template: [INST] … [/INST] turns,
# an optional system message, raise_exception when the roles do not alternate.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles "
    "must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + "
    "' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the "
    "exception of an initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n")


def train_tokenizer(vocab_size: int = 400):
    """A byte-level BPE `tokenizers.Tokenizer` on TEXT; the post-processor adds <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEXT.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def hf_config(vocab: int, hidden: int, layers: int, experts: int, max_positions: int,
              bos: int, eos: int) -> dict:
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": hidden // 4, "num_local_experts": experts,
            "num_experts_per_tok": 2, "max_position_embeddings": max_positions,
            "rope_theta": 1e4, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "sliding_window": None, "tie_word_embeddings": False, "dtype": "float32",
            "bos_token_id": bos, "eos_token_id": eos, "router_aux_loss_coef": 0.0}


def random_weights(c: dict, seed: int) -> dict[str, np.ndarray]:
    """HF Mixtral tensors ([out, in] Linear weights), N(0, 0.15²) as tests/oracle.py
    widens them (so routing and logits are not near ties), norms 1."""
    rng = np.random.default_rng(seed)
    h, f, v, d = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    w = lambda *s: (0.15 * rng.standard_normal(s)).astype(np.float32)
    one = lambda n: np.ones(n, np.float32)
    t = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": one(h),
         "lm_head.weight": w(v, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": one(h),
                  p + "post_attention_layernorm.weight": one(h),
                  p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
                  p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
                  p + "block_sparse_moe.gate.weight": w(c["num_local_experts"], h)})
        for e in range(c["num_local_experts"]):
            x = f"{p}block_sparse_moe.experts.{e}."
            t.update({x + "w1.weight": w(f, h), x + "w3.weight": w(f, h),
                      x + "w2.weight": w(h, f)})
    return t


def _dump(path: str, d: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(d, f, indent=1)


def make_tiny(out: str, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
              num_experts: int = 4, max_positions: int = 256, vocab_size: int = 400,
              model_vocab_size: int | None = None) -> str:
    """Write the tiny checkpoint into `out` (created; may exist if empty); returns it.
    `model_vocab_size` (default: the tokenizer's) sizes the model's embedding alone."""
    from safetensors.numpy import save_file

    os.makedirs(out, exist_ok=True)
    tok = train_tokenizer(vocab_size)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    c = hf_config(model_vocab_size or tok.get_vocab_size(), hidden_size, num_layers, num_experts,
                  max_positions, bos, eos)
    save_file(random_weights(c, seed), os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    _dump(os.path.join(out, "config.json"), c)
    tok.save(os.path.join(out, "tokenizer.json"))
    _dump(os.path.join(out, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": max_positions,
        "chat_template": CHAT_TEMPLATE})
    _dump(os.path.join(out, "generation_config.json"),
          {"bos_token_id": bos, "eos_token_id": eos})
    return out


def _define_flags():
    """Flags only when run as a command, so importing make_tiny defines none."""
    from absl import flags

    from experiments.cli import writable
    flags.DEFINE_string("out", None, "output directory (new, or empty)", required=True)
    flags.DEFINE_integer("seed", 0, "random weights' seed", lower_bound=0)
    flags.register_validator(
        "out", lambda v: v is None or (writable(os.path.join(v, "config.json")) and not (
            os.path.isdir(v) and os.listdir(v))),
        message="must be a new (or empty) directory in a writable place")


def main(argv):
    from absl import flags

    from experiments.cli import no_extra_args
    no_extra_args(argv)
    out = make_tiny(flags.FLAGS.out, flags.FLAGS.seed)
    with open(os.path.join(out, "config.json")) as f:
        c = json.load(f)
    print(f"wrote {out}: tiny random Mixtral (hidden {c['hidden_size']}, "
          f"{c['num_hidden_layers']} layers, {c['num_local_experts']} experts top-2, vocab "
          f"{c['vocab_size']}, {c['max_position_embeddings']} positions) + BPE tokenizer")


if __name__ == "__main__":
    from experiments.cli import run

    _define_flags()
    run(main)
