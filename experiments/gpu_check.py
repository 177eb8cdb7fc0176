"""One command for a GPU machine (docs/design.md §8): what the CPU testbed cannot show.

    python -m experiments.gpu_check --output_dir experiments/results/gpu_h200

On a machine without a GPU it says so in one line and exits 1. On a GPU (an H200
emulating an L4, say), within ~8 minutes, everything under --output_dir:
  1. the `gpu`-marked tests (pytest -m gpu);
  2. offloaded-engine parity on the GPU against the all-on-device reference, float32 at
     "highest" precision and bf16 (parity.json);
  3. the link: 16 MiB pinned pages vs one big copy, from pinned and pageable memory, and
     the same pages through the tensor-parallel stream code (a NamedSharding on a
     1-device mesh) (link.json);
  3b. tensor-parallel parity: `Engine(devices=[gpu])` (the mesh, sharded pages, the
     shard_map FFN with its psum) against the reference (tensor_parallel.json);
  4. the throughput experiment on a Mixtral-shaped bf16 model larger than the budget,
     under an allocator-enforced --device_budget_gib: calibration, measured vs predicted
     tok/s and peak device bytes, overlap on and off side by side (throughput_*.json,
     timeline.png).
The device budget is enforced by the allocator (XLA_PYTHON_CLIENT_MEM_FRACTION, no
preallocation), set here before JAX starts; summary.json collects the figures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from absl import flags

from experiments.cli import fail, no_extra_args, run

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "experiments/results/gpu_check", "output folder")
flags.DEFINE_float("device_budget_gib", 24.0, "device budget the allocator enforces (an L4)",
                   lower_bound=1.0)
flags.DEFINE_integer("model_layers", 10, "layers of the Mixtral-shaped model (bf16 experts: "
                     "2.8 GB a layer; more than the budget, so experts stream)",
                     lower_bound=2)
flags.DEFINE_integer("run_gen_len", 16, "generated tokens per sequence in the throughput runs",
                     lower_bound=2)
flags.DEFINE_integer("max_batch", 512, "cap on the searched batch", lower_bound=1)
flags.DEFINE_bool("tests", True, "run the gpu-marked tests")
GiB = 2**30


def gpu_memory_bytes() -> int | None:
    """Total memory of GPU 0 from nvidia-smi (before JAX starts), or None: no GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
        return int(float(out.split()[0]) * 2**20)  # MiB
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


def write(name: str, obj) -> None:
    with open(os.path.join(FLAGS.output_dir, name), "w") as f:
        json.dump(obj, f, indent=1, default=str)


def gpu_tests() -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"],
                       capture_output=True, text=True)
    tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
    return {"returncode": r.returncode, "summary": tail[0], "s": time.perf_counter() - t0}


def parity(dtype: str, devices=None) -> dict:
    """The offloaded engine (streaming, CPU attention; on the `devices` mesh when given)
    against the all-on-device reference on a tiny random model: greedy tokens and
    prompt logits."""
    import numpy as np

    import moejax

    cfg = moejax.get_model("tiny_mixtral").replace(num_layers=5, dtype=dtype)
    model = moejax.MoEModel.random(cfg, seed=1, experts="device")
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(0, cfg.vocab_size, n))) for n in (5, 11, 2, 7)]
    ref = moejax.Engine(model)
    off = moejax.Engine(model, gpu_weight_fraction=0.3, page_bytes=cfg.page_nbytes(1),
                        devices=devices)
    want, got = ref.generate(prompts, 8), off.generate(prompts, 8)
    lr, lo = ref.prompt_logits(prompts), off.prompt_logits(prompts)
    err = float(np.max(np.abs(lo - lr)) / np.max(np.abs(lr)))
    agree = float(np.mean([a == b for x, y in zip(want, got) for a, b in zip(x, y)]))
    return {"dtype": dtype, "tokens_identical": want == got, "token_agreement": agree,
            "logits_max_rel_err": err, "pages_per_layer": off.store.num_pages(0),
            "mesh_devices": None if devices is None else len(devices)}


def link(total: int = GiB, page: int = 16 * 2**20) -> dict:
    """GB/s host → device (medians): pinned pages as the store streams them, one big
    pinned copy, one big copy from pageable NumPy memory."""
    import jax
    import numpy as np

    from moejax.calibration.microbench import median_seconds
    from moejax.host_offload.memory import device_sharding, pinned_sharding

    dev = jax.devices()[0]
    host = np.ones(total // 4, np.float32)
    pinned = jax.device_put(host, pinned_sharding(dev))
    pages = [jax.device_put(host[i:i + page // 4], pinned_sharding(dev))
             for i in range(0, host.size, page // 4)]

    best = lambda fn: total / median_seconds(fn, 3) / 1e9  # GB/s, median of 3 after a warm-up
    put = lambda x: jax.device_put(x, device_sharding(dev))
    from moejax.host_offload import sharding as tp

    mesh = tp.make_mesh([dev])  # the k-device stream code: a page as a NamedSharding
    mput = lambda x: jax.device_put(x, tp.sharding(mesh, tp.REPLICATED))
    return {"pinned_pages_GBps": best(lambda: jax.block_until_ready([put(p) for p in pages])),
            "mesh_pinned_pages_GBps": best(
                lambda: jax.block_until_ready([mput(p) for p in pages])),
            "pinned_one_copy_GBps": best(lambda: put(pinned).block_until_ready()),
            "pageable_one_copy_GBps": best(lambda: put(host).block_until_ready()),
            "page_bytes": page, "total_bytes": total}


def throughput(overlap: bool, png: bool) -> dict:
    """experiments.throughput on the Mixtral-shaped model (a subprocess: its own flags;
    the allocator budget travels in the environment)."""
    name = f"throughput_{'overlap' if overlap else 'serial'}.json"
    cmd = [sys.executable, "-m", "experiments.throughput", "--config", "mixtral_l4",
           "--local_hidden_size", "4096", "--local_num_layers", str(FLAGS.model_layers),
           "--device_memory_gb", f"{FLAGS.device_budget_gib * GiB / 1e9:.3f}",
           "--gen_len", str(FLAGS.run_gen_len), "--max_local_batch", str(FLAGS.max_batch),
           f"--overlap={str(overlap).lower()}",
           "--output_json", os.path.join(FLAGS.output_dir, name)]
    if png:
        cmd += ["--timeline_png", os.path.join(FLAGS.output_dir, "timeline.png")]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    out = {"returncode": r.returncode, "s": time.perf_counter() - t0,
           "log_tail": (r.stdout + r.stderr).strip().splitlines()[-6:]}
    if r.returncode == 0:
        local = json.load(open(os.path.join(FLAGS.output_dir, name)))["local"]
        out.update({k: local.get(k) for k in (
            "measured_tokens_per_s", "predicted_tokens_per_s", "prediction_error",
            "peak_device_bytes_measured", "peak_device_bytes_predicted",
            "device_budget_bytes", "limit_tokens_per_s", "policy")})
    return out


def main(argv):
    no_extra_args(argv)
    total = gpu_memory_bytes()
    if total is None:
        fail("no GPU here (nvidia-smi found none): run this on a GPU machine")
    from moejax.host_offload.memory import enforce_device_budget

    enforce_device_budget(int(FLAGS.device_budget_gib * GiB), total)
    os.environ.setdefault("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "100")
    import jax

    if jax.default_backend() != "gpu":
        fail(f"no GPU for JAX (backend {jax.default_backend()!r}): install jax[cuda12]")
    jax.config.update("jax_default_matmul_precision", "highest")
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    dev = jax.devices()[0]
    summary = {"device": dev.device_kind, "jax": jax.__version__, "gpu_memory_bytes": total,
               "device_budget_bytes": int(FLAGS.device_budget_gib * GiB)}
    if FLAGS.tests:
        summary["gpu_tests"] = gpu_tests()
    summary["parity"] = [parity("float32"), parity("bfloat16")]
    write("parity.json", summary["parity"])
    summary["tensor_parallel"] = [parity(d, [dev]) for d in ("float32", "bfloat16")]
    write("tensor_parallel.json", summary["tensor_parallel"])
    summary["link"] = link()
    write("link.json", summary["link"])
    summary["throughput"] = {"overlap": throughput(True, png=True),
                             "serial": throughput(False, png=False)}
    write("summary.json", summary)
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    run(main)
