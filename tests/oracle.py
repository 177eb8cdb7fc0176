"""The numerical oracle: tiny random HF transformers models, saved with save_pretrained.

Everything here is float32 on the CPU. `hf_model(kind, tmp_path, **overrides)` builds,
saves and returns (torch model, checkpoint directory)."""

from __future__ import annotations

import numpy as np

# Each kind: transformers (config class, model class) names and a tiny config.
TINY = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        vocab_size=101, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=128, rope_theta=1e4,
        tie_word_embeddings=False)),
}


def hf_model(kind: str, directory, seed: int = 0, **overrides):
    import torch
    import transformers

    cfg_name, model_name, kw = TINY[kind]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(**{**kw, **overrides})
    model = getattr(transformers, model_name)(cfg).float().eval()
    with torch.no_grad():  # HF inits small; widen so routing and logits are not ~ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    model.save_pretrained(str(directory))
    return model, str(directory)


def hf_logits(model, tokens: np.ndarray, attention_mask=None) -> np.ndarray:
    import torch

    with torch.no_grad():
        am = None if attention_mask is None else torch.tensor(attention_mask)
        out = model(torch.tensor(tokens, dtype=torch.long), attention_mask=am)
    return out.logits.float().numpy()


def hf_greedy(model, prompt: list[int], max_new_tokens: int):
    """Greedy continuation of one unpadded prompt, with the logits of every step."""
    import torch

    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True,
                             pad_token_id=0, eos_token_id=None)
    toks = out.sequences[0, len(prompt):].tolist()
    return toks, [s[0].float().numpy() for s in out.scores]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def tokens_match(ours: list[int], theirs: list[int], scores, tol: float = 1e-4) -> bool:
    """Equal, or first differing where HF's top-2 logits are within `tol` (a near-tie):
    from there on the continuations legitimately diverge."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            top2 = np.sort(scores[i])[-2:]
            return bool(top2[1] - top2[0] < tol) and len(ours) == len(theirs)
    return len(ours) == len(theirs)
