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
    # clip_qkv 0.5: with the widened init q, k, v have std ≈ 1, so the clamp is active.
    "dbrx": ("DbrxConfig", "DbrxForCausalLM", dict(
        vocab_size=101, d_model=48, n_heads=4, n_layers=2, max_seq_len=128,
        attn_config=dict(kv_n_heads=2, clip_qkv=0.5, rope_theta=1e4),  # HF requires the
        # (unused) attn_config.rope_theta; its rotary reads rope_parameters: keep them equal
        ffn_config=dict(ffn_hidden_size=40, moe_num_experts=4, moe_top_k=2,
                        moe_normalize_expert_weights=1.0),
        rope_parameters=dict(rope_type="default", rope_theta=1e4),
        tie_word_embeddings=False)),
    # head_dim 16 ≠ hidden / heads = 12; 8 small experts, top-3.
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=101, hidden_size=48, intermediate_size=56, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[],
        decoder_sparse_step=1, max_position_embeddings=128, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=1e4),
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


def bf16_logits_err(hf, directory, vocab: int) -> float:
    """Save a bfloat16 copy of `hf`, load it with moejax in bfloat16, and return the
    median over positions of the relative error of its logits against HF's bfloat16
    model's (the median: a bf16 router near-tie flips an expert at a few positions on
    one side only). A sanity bound for the bf16 path end to end (weights read, cast
    and run in bf16): ~1 % here, as far from HF bf16 as moejax in float32 on the same
    weights is, since the two round at different points. It cannot tell which
    precision an op ran in; tests/layers/test_norm.py checks that bit for bit."""
    import copy

    import torch

    import moejax

    hb = copy.deepcopy(hf).to(torch.bfloat16)
    hb.save_pretrained(str(directory))
    m = moejax.load_pretrained(directory)
    assert m.config.dtype == "bfloat16"
    tok = np.random.default_rng(6).integers(0, vocab, (2, 12))
    ours, theirs = np.asarray(m.logits(tok), np.float64), hf_logits(hb, tok)
    per_pos = np.max(np.abs(ours - theirs), -1) / np.max(np.abs(theirs), -1)
    return float(np.median(per_pos))


def tokens_match(ours: list[int], theirs: list[int], scores, tol: float = 1e-4) -> bool:
    """Equal, or first differing where HF's top-2 logits are within `tol` (a near-tie):
    from there on the continuations legitimately diverge."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            top2 = np.sort(scores[i])[-2:]
            return bool(top2[1] - top2[0] < tol) and len(ours) == len(theirs)
    return len(ours) == len(theirs)


# ---------------------------------------------------------- checks every family runs
# The all-on-device engine and the offloaded one with every expert streamed.
ENGINES = {"device": {}, "offload-wg0": dict(gpu_weight_fraction=0.0, attention_device="cpu")}


def random_prompts(vocab: int, seed: int = 2, lengths=(5, 13, 1, 8)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab, n)] for n in lengths]


def padded_logits_err(hf, ours, vocab: int, side: str) -> float:
    """Relative error of moejax vs HF logits on a left- or right-padded batch (real
    positions only)."""
    tok = np.random.default_rng(1).integers(0, vocab, (3, 12))
    am = np.ones((3, 12), np.int32)
    if side == "left":
        am[0, :5], am[1, :2] = 0, 0
    else:
        am[0, 7:], am[2, 3:] = 0, 0
    real = am == 1
    return rel_err(np.asarray(ours.logits(tok, am))[real], hf_logits(hf, tok, am)[real])


def greedy_mismatches(hf, ours, vocab: int, engine_kw: dict, new: int = 10) -> list:
    """(prompt, ours, HF's) for every ragged-batch row whose greedy tokens differ from
    HF's per-prompt greedy generation (beyond a near-tie)."""
    import moejax

    prompts = random_prompts(vocab)
    outs = moejax.Engine(ours, **engine_kw).generate(prompts, max_new_tokens=new)
    bad = []
    for p, o in zip(prompts, outs):
        theirs, scores = hf_greedy(hf, p, new)
        if not tokens_match(o, theirs, scores):
            bad.append((p, o, theirs))
    return bad


def batch_and_alone(ours, vocab: int, new: int = 6):
    """(tokens of a ragged batch, tokens of each prompt run alone)."""
    import moejax

    eng = moejax.Engine(ours)
    prompts = random_prompts(vocab, seed=3)
    return (eng.generate(prompts, max_new_tokens=new),
            [eng.generate([p], max_new_tokens=new)[0] for p in prompts])
