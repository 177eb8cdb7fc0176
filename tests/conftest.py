"""Session set-up: a tiny calibration of the `local` hardware, so that engines which
search their micro-batching (Engine with offload knobs) do not run the full one."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def local_calibration(tmp_path_factory):
    from moejax.calibration import calibrate

    path = str(tmp_path_factory.mktemp("calibration") / "local_hw.json")
    old = os.environ.get("MOEJAX_CALIBRATION")
    os.environ["MOEJAX_CALIBRATION"] = path
    calibrate("tiny_mixtral", token_counts=(8, 16), copy_bytes=1 << 22, read_bytes=1 << 22,
              attention_batch=4, attention_context=32, repeats=1, path=path)
    yield path
    if old is None:
        os.environ.pop("MOEJAX_CALIBRATION", None)
    else:
        os.environ["MOEJAX_CALIBRATION"] = old
