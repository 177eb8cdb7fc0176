from moejax.model_config.dispatch import capacity_bucket


def test_capacity_bucket_covers_count_with_bounded_padding():
    for count in range(1, 600):
        c = capacity_bucket(count, 10_000)
        assert count <= c <= max(8, 1.25 * count)
    assert capacity_bucket(50, 40) == 40  # never above the token count
