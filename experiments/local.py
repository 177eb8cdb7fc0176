"""What the experiments share about running here: the scaled model, the calibrated
`local` hardware, the emulated device budget, a progress bar and the Gantt chart."""

from __future__ import annotations

import os
import sys
import time

from experiments.cli import fail

GB = 1e9


def policy_dict(p) -> dict:
    return {k: getattr(p, k) for k in ("batch_size", "micro_batch_size", "num_micro_batches",
                                       "gpu_weight_fraction", "attention_device",
                                       "kv_cache_device", "page_bytes", "overlap")}


def local_config(setup, checkpoint: str | None = None, hidden_size: int = 768,
                 num_layers: int = 8):
    """(ModelConfig, note) of what runs here, before any weight is read: the
    checkpoint's (float32), or the preset's architecture scaled to fit (random
    weights); the note says which, plainly."""
    from moejax.host_offload.memory import default_dtype
    from moejax.model_config.setups import scaled_for_local

    if checkpoint:
        from moejax.checkpoints import checkpoint_config
        try:
            cfg = checkpoint_config(checkpoint).replace(dtype=default_dtype())
        except ValueError as e:
            fail(str(e))
        return cfg, (f"checkpoint {checkpoint} ({cfg.family}: hidden {cfg.hidden_size}, "
                     f"{cfg.num_layers} layers, {cfg.num_experts} experts top-{cfg.top_k}, "
                     f"{cfg.weight_bytes() / GB:.2f} GB {cfg.dtype})")
    full = setup.model
    cfg = scaled_for_local(full, hidden_size=hidden_size, num_layers=num_layers)
    cfg = cfg.replace(dtype=default_dtype())  # float32 on the CPU testbed, bf16 on a GPU
    shape = (f"hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_experts} "
             f"experts top-{cfg.top_k}, {cfg.weight_bytes() / GB:.2f} GB {cfg.dtype}, random "
             "weights")
    if cfg.name == full.name:
        return cfg, f"{full.name} itself ({shape})"
    f32 = full.replace(dtype="float32").weight_bytes()
    if f32 > 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"):
        why = f"{full.name} ({full.weight_bytes() / GB:.1f} GB) does not fit this machine"
    else:
        why = (f"{full.name} scaled down by --local_hidden_size={hidden_size}, "
               f"--local_num_layers={num_layers}")
    return cfg, f"{why}: ran its architecture scaled to {cfg.name} ({shape})"


def check_positions(cfg, prompt_len: int, gen_len: int) -> None:
    """One-line exit when prompt + generation exceed the local model's positions."""
    if prompt_len + gen_len > cfg.max_positions:
        fail(f"--prompt_len={prompt_len} + --gen_len={gen_len} exceeds {cfg.name}'s "
             f"{cfg.max_positions} positions")


def local_model(cfg, checkpoint: str | None = None):
    """The MoEModel of `local_config`: the checkpoint's weights (experts left in host
    memory for the engine's store to adopt, no second copy), or random ones."""
    from moejax import MoEModel, load_pretrained

    if checkpoint:
        try:
            return load_pretrained(checkpoint, dtype=cfg.dtype, experts="host")
        except ValueError as e:
            fail(str(e))
    return MoEModel.random(cfg, seed=0)


def local_hardware(cfg, fresh: bool = False):
    """`local` calibrated with this model's expert shape (cached per model; with
    `fresh`, measured again now and the cache rewritten); the file
    `$MOEJAX_CALIBRATION` names instead, when set."""
    from moejax.calibration import load_local, local_calibration_path

    path = local_calibration_path(cfg)
    if fresh or not os.path.exists(path):
        print(f"calibrating this machine for {cfg.name} ({'again' if fresh else 'once'}; "
              f"cached in {path}) …", flush=True)
    return load_local(path, recalibrate=fresh, model=cfg)


def default_budget(cfg, page_bytes: int, workload=None, sequences: int = 8) -> float:
    """Device bytes at which the store keeps ~10 % of experts resident and streams the
    rest, plus room for activations: 15 % of the weights, and at least what a batch of
    `sequences` of `workload` needs (a tiny model's activations outweigh its weights)."""
    from moejax.host_offload import make_plan
    from moejax.schedule.predict import memory_bytes

    plan = make_plan(cfg, page_bytes, 0.1)
    budget = plan.device_bytes() + 0.15 * cfg.weight_bytes()
    if workload is not None:
        wg = plan.gpu_weight_fraction
        budget = max(budget, float(memory_bytes(cfg, workload, sequences, 1, wg)[0]))
    return budget


class Progress:
    """One-line progress bar on stderr."""

    def __init__(self, label: str, unit: str = "steps"):
        self.label, self.unit, self.t0 = label, unit, time.perf_counter()

    def __call__(self, done: int, total: int):
        w = 30
        fill = w * done // total
        sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (w - fill)}] {done}/{total} "
                         f"{self.unit}, {time.perf_counter() - self.t0:5.1f} s")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def gantt(run, cfg, hw, path: str, decode_steps: int = 2):
    """Measured (top) and simulated (bottom) timelines, one lane per resource."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moejax.schedule.simulate import simulate

    sim = simulate(run.entries, cfg, hw, run.policy, imbalance=run.imbalance)
    keep = [e for e in run.entries if e.stage == "prefill" or e.step <= decode_steps]
    colors = {"page": "#4c72b0", "embed": "#999999", "pre_attn": "#55a868", "attn": "#c44e52",
              "d2h_qkv": "#8172b2", "cpu_attn": "#c44e52", "h2d_attn": "#937860",
              "d2h_kv": "#8172b2", "post_attn": "#dd8452", "head": "#333333"}
    lanes = ["gpu", "cpu", "h2d", "d2h"]
    fig, axes = plt.subplots(2, 1, figsize=(14, 6), sharex=False)
    for ax, (title, start, end) in zip(axes, [
            ("measured", run.trace.start_s, run.trace.end_s),
            ("predicted (simulated with the op prices)", sim.start_s, sim.end_s)]):
        for e in keep:
            y = lanes.index(e.resource)
            ax.barh(y, end[e.id] - start[e.id], left=start[e.id], height=0.6,
                    color=colors[e.op], edgecolor="none")
        ax.set_yticks(range(4), lanes)
        ax.invert_yaxis()
        ax.set_title(f"{title}: prefill + {decode_steps} decode steps")
        ax.set_xlabel("seconds")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, list(colors), loc="lower center", ncol=10, fontsize=8)
    fig.suptitle(f"{cfg.name}: {run.policy.micro_batch_size}×"
                 f"{run.policy.num_micro_batches} micro-batches, wg="
                 f"{run.policy.gpu_weight_fraction:.2f}, overlap={run.policy.overlap}")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)




def warm_up(engine, prompts, batching: str, max_new=None) -> None:
    """Compile what a timed run will, untimed. Continuous with `max_new`: the job itself
    (its admissions, hence its padded micro-batch shapes, are deterministic, so the timed
    run compiles nothing). Else a prefill micro-batch of each padded prompt length (one
    call per length: a group's shape is its longest prompt's) and a decode step, at the
    policy's micro-batch size (a call of ubs copies of the prompt)."""
    from moejax.schedule.policy import padded_len

    if batching == "continuous" and max_new is not None:
        engine.generate(prompts, max_new, batching="continuous")
        return
    seen = {}
    for p in prompts:
        seen.setdefault(padded_len(len(p)), p)
    ubs = engine.policy.micro_batch_size if engine.policy is not None else 1
    for p in seen.values():
        engine.generate([p] * ubs, 2, batching=batching)


def measure(engine, prompts, gen_len: int, label: str | None = None,
            warm: bool = True) -> float:
    """Wall seconds of one timed `generate`, after (with `warm`) an untimed one that
    compiles the shapes of the timed run (same micro-batch, a few decode steps)."""
    if warm:
        engine.generate(prompts, min(gen_len, 3), batching="static")
    t0 = time.perf_counter()
    engine.generate(prompts, gen_len, progress=Progress(label) if label else None,
                    batching="static")
    return time.perf_counter() - t0
