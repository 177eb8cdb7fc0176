"""Draw the shipped request traces (fixed seeds) into experiments/workloads/*.json.

    python -m experiments.workloads.make_traces

Each trace is {"name", "source", "requests": [{"prompt_len", "output_len"}]}, read by
`moejax.model_config.workload.load_trace`. Only the published means are matched; the
shapes (lognormal prompts, uniform outputs) are assumptions, said so in "source".
"""

from __future__ import annotations

import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def lognormal_lens(rng, n: int, mean: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    """n integer lengths, lognormal with the given mean (before clipping to [lo, hi])."""
    mu = np.log(mean) - sigma ** 2 / 2
    return np.clip(np.round(rng.lognormal(mu, sigma, n)), lo, hi).astype(int)


def traces() -> dict[str, dict]:
    """{name: trace}; deterministic (numpy default_rng seeds 0, 1, 2)."""
    out = {}
    rng = np.random.default_rng(0)
    p = lognormal_lens(rng, 1000, 77, 0.6, 8, 512)
    g = rng.integers(32, 257, 1000)
    out["mtbench"] = (p, g, "MTBench-like: prompts lognormal(sigma 0.6) with mean 77 tokens "
                            "(MoE-Lightning's MTBench mean prompt length), clipped to "
                            "[8, 512]; outputs uniform on [32, 256] (MoE-Lightning's "
                            "generation lengths 32-256); numpy default_rng(0), 1000 requests")
    rng = np.random.default_rng(1)
    p = np.clip(np.round(rng.normal(926, 120, 500)), 256, 2048).astype(int)
    out["rag"] = (p, np.full(500, 128), "RAG-like: prompts normal(mean 926, sd 120) "
                                        "clipped to [256, 2048] (MoE-Lens's RAG-like "
                                        "~926-token prompts); outputs 128; numpy "
                                        "default_rng(1), 500 requests")
    rng = np.random.default_rng(2)
    p = lognormal_lens(rng, 500, 77, 0.6, 8, 512)
    out["longgen"] = (p, np.full(500, 512), "long generation: MTBench-like prompts "
                                            "(lognormal mean 77, sigma 0.6), outputs 512 "
                                            "(MoE-Lens's generation-512 setting); numpy "
                                            "default_rng(2), 500 requests")
    return {name: {"name": name, "source": src,
                   "requests": [{"prompt_len": int(a), "output_len": int(b)}
                                for a, b in zip(p, g)]}
            for name, (p, g, src) in out.items()}


def main() -> None:
    for name, doc in traces().items():
        path = os.path.join(HERE, f"{name}.json")
        with open(path, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
            f.write("\n")
        p = [r["prompt_len"] for r in doc["requests"]]
        g = [r["output_len"] for r in doc["requests"]]
        print(f"{path}: {len(p)} requests, prompt mean {np.mean(p):.1f}, "
              f"output mean {np.mean(g):.1f}")


if __name__ == "__main__":
    main()
