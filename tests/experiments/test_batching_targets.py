"""The static vs continuous target table (experiments.batching_targets), one row."""

import pytest

from experiments.batching_targets import markdown, target_row, workloads


def test_one_row_has_every_figure():
    name, wl = workloads(2000)[0]
    row = target_row("mixtral_l4", name, wl)
    assert (name, row["gen_mean"], row["moe_lightning_measured_tokens_per_s"]) == \
        ("mtbench_g32", 32, 203)
    for res in ("max", "lookahead"):
        tps = row[f"continuous_{res}_tokens_per_s"]
        assert 0 < tps <= row[f"continuous_{res}_steady_tokens_per_s"]
        assert row[f"continuous_{res}_fraction_of_limit"] == pytest.approx(
            tps / row["limit_tokens_per_s"])
    assert row["static_tokens_per_s"] > 0
    assert "mtbench_g32" in markdown([row])
