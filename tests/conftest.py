"""Session set-up: float32 matmuls at "highest" precision and no preallocation (so the
tests are right on a GPU too, where TF32 and XLA's 75 % preallocation are the defaults),
`gpu`-marked tests skipped without a GPU, four forced CPU devices (the tensor-parallel
tests), and a tiny calibration of the `local` hardware, so that engines which search
their micro-batching do not run the full one."""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# four CPU devices for the tensor-parallel tests (tests/test_engine_multi_device.py); a
# GPU backend ignores the flag, and everything else still runs on jax.devices()[0]
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=4").strip()

if os.environ.get("PYTEST_XDIST_WORKER"):  # xdist workers share the cores: one thread
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    os.environ["XLA_FLAGS"] += " --xla_cpu_multi_thread_eigen=false"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU (experiments.gpu_check runs these)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _calibrate_once(root) -> str:
    """The tiny calibration at root/local_hw.json, made by the first xdist worker (an
    O_EXCL lock file) while the others wait for it to appear (written, then renamed)."""
    import time

    from moejax.calibration import calibrate

    path, lock = root / "local_hw.json", root / "local_hw.lock"
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        t0 = time.monotonic()
        while not path.exists() and time.monotonic() - t0 < 600:
            time.sleep(0.2)
        return str(path)
    tmp = root / "local_hw.partial.json"
    calibrate("tiny_mixtral", token_counts=(8, 16), copy_bytes=1 << 22, read_bytes=1 << 22,
              attention_batch=4, attention_context=32, repeats=1, path=str(tmp))
    os.replace(tmp, path)
    return str(path)


@pytest.fixture(scope="session", autouse=True)
def local_calibration(tmp_path_factory):
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run
    path = _calibrate_once(root)
    old = os.environ.get("MOEJAX_CALIBRATION")
    os.environ["MOEJAX_CALIBRATION"] = path
    yield path
    if old is None:
        os.environ.pop("MOEJAX_CALIBRATION", None)
    else:
        os.environ["MOEJAX_CALIBRATION"] = old
