"""Accuracy metrics of quantized experts against the float model (no flags: shared by
experiments.quant_accuracy, experiments.bench_quant and the tests)."""

from __future__ import annotations

import numpy as np


def logit_errors(ref: np.ndarray, got: np.ndarray) -> dict:
    """{mean_rel_err, max_rel_err}: ‖got − ref‖₂ / ‖ref‖₂ per position (over the vocab)."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    rel = np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    return {"mean_rel_err": float(rel.mean()), "max_rel_err": float(rel.max())}


def greedy_agreement(ref: list[list[int]], got: list[list[int]]) -> dict:
    """{greedy_match, greedy_prefix}: positions equal / all, mean common-prefix length."""
    eq = [np.asarray(a) == np.asarray(b) for a, b in zip(ref, got)]
    prefix = [int(np.argmin(e)) if not e.all() else len(e) for e in eq]
    return {"greedy_match": float(np.mean(np.concatenate(eq))),
            "greedy_prefix": float(np.mean(prefix))}


def _prompts(vocab: int, n: int = 4, length: int = 16) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [list(map(int, rng.integers(0, vocab, length))) for _ in range(n)]
