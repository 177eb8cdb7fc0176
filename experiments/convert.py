"""Convert a Hugging Face checkpoint to moejax's native format (orbax, page layout).

    python -m experiments.convert --checkpoint HF_DIR --out DIR [--dtype bfloat16]
                                  [--page_bytes 16777216] [--expert_dtype int8|int4
                                  [--group_size 64]]

Experts are written in moejax layout ([E, h, f] / [E, f, h], flattened, chunked on disk
at --page_bytes), optionally cast to --dtype, optionally quantized (--expert_dtype:
group-wise symmetric codes + scales, moejax/quant.py); see moejax/checkpoints/native.py.
Host memory: one layer at a time (each written as soon as it is read): 0.63x the weights
at peak for an 8-layer model (tests/host_offload/test_load_rss.py), never the model.
"""

from __future__ import annotations

import os
import time

from absl import flags

from experiments.cli import fail, no_extra_args, quiet_logs, run, writable
from moejax.checkpoints.native import convert_hf

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "HF checkpoint directory (config.json + safetensors)",
                    required=True)
flags.DEFINE_string("out", None, "output directory (must not exist)", required=True)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "cast weights to")
flags.DEFINE_integer("page_bytes", None, "on-disk chunk (= store page) size in bytes",
                     lower_bound=1)
flags.DEFINE_enum("expert_dtype", None, ["int8", "int4"], "quantize the experts to")
flags.DEFINE_integer("group_size", None, "quantization group along the reduction axis "
                     "(default 64; needs --expert_dtype)", lower_bound=1)
flags.register_validator("out", lambda v: v is None or (not os.path.exists(v)
                                                         and writable(v)),
                         message="must be a new directory in a writable place")


def main(argv):
    no_extra_args(argv)
    quiet_logs()
    t = time.perf_counter()
    try:
        if FLAGS.group_size is not None and FLAGS.expert_dtype is None:
            fail("--group_size needs --expert_dtype int8|int4")
        cfg = convert_hf(FLAGS.checkpoint, FLAGS.out, FLAGS.dtype, FLAGS.page_bytes,
                         FLAGS.expert_dtype, FLAGS.group_size)
    except (ValueError, OSError) as e:
        fail(str(e))
    experts = f", {cfg.expert_dtype} experts (group {cfg.expert_group_size})" \
        if cfg.expert_quantized else ""
    print(f"wrote {FLAGS.out}: {cfg.name} {cfg.dtype}{experts}, "
          f"{cfg.weight_bytes() / 2**20:.1f} MiB "
          f"in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    run(main)
