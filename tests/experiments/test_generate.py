"""experiments.generate end to end on experiments.make_tiny's checkpoint: HF's greedy ids
as the oracle, kill-and-resume, and one-line refusals of bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments.make_tiny import make_tiny
from tests.oracle import tokens_match

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = "the cat read a book about the sea and the stars in the sky at night".split()


def cli(*args, wait=True):
    cmd = [sys.executable, "-m", "experiments.generate", *map(str, args)]
    kw = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, **kw) if wait else subprocess.Popen(cmd, **kw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_out(path) -> dict:
    lines = path.read_text().splitlines()
    out = {json.dumps(r["id"]): r for r in map(json.loads, lines)}
    assert len(out) == len(lines), "an id appears twice"
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny checkpoint, its HF model, and a second EOS id (the 4th greedy token of
    prompt 0) so that some requests stop at an EOS."""
    import torch
    import transformers

    d = make_tiny(str(tmp_path_factory.mktemp("tiny") / "ckpt"))
    hf = transformers.MixtralForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    ids = torch.tensor([tok.encode(GREEDY[0]["prompt"])])
    first = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                        do_sample=False, pad_token_id=0)[0, -1].item()
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [2, first]}, f)
    hf.generation_config.eos_token_id = [2, first]
    return d, hf, tok


GREEDY = [
    {"id": "a", "prompt": "Once upon a time there was"},
    {"prompt": "The quick brown fox", "max_new_tokens": 5},
    {"id": 7, "messages": [{"role": "user", "content": "Tell me a story about a cat."}]},
    {"id": "long", "prompt": " ".join(WORDS * 3), "max_new_tokens": 3},
    {"id": "chat2", "messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Hello"},
                                 {"role": "assistant", "content": "Hi"},
                                 {"role": "user", "content": "What is the weather?"}]},
    {"id": "b", "prompt": "Hello, how are you?"},
]


def hf_ids(hf, tok, req, new):
    import torch

    if "messages" in req:
        p = tok.apply_chat_template(req["messages"], tokenize=True, add_generation_prompt=True)
        p = list(p["input_ids"] if not isinstance(p, list) else p)
    else:
        p = tok.encode(req["prompt"])
    ids = torch.tensor([p])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                          do_sample=False, pad_token_id=0, output_scores=True,
                          return_dict_in_generate=True)
    return p, out.sequences[0, len(p):].tolist(), [s[0].numpy() for s in out.scores]


def test_greedy_job_matches_hf_generate_and_reruns_as_a_no_op(tiny, tmp_path):
    d, hf, tok = tiny
    src, out = write_jsonl(tmp_path / "in.jsonl", GREEDY), tmp_path / "out.jsonl"
    r = cli("--checkpoint", d, "--prompts", src, "--output", out, "--max_new_tokens", 10,
            "--batch_size", 4)
    assert r.returncode == 0, r.stderr
    got = read_out(out)
    assert list(got) == ['"a"', "7", '"chat2"', '"b"', "2", '"long"']  # by length group
    eos = set(hf.generation_config.eos_token_id)
    reasons = set()
    for n, req in enumerate(GREEDY, 1):
        rec = got[json.dumps(req.get("id", n))]
        prompt, theirs, scores = hf_ids(hf, tok, req, req.get("max_new_tokens", 10))
        assert tokens_match(rec["token_ids"], theirs, scores), (req, rec, theirs)
        ended = rec["token_ids"][-1] in eos
        assert rec["finish_reason"] == ("eos" if ended else "length")
        body = rec["token_ids"][:-1] if ended else rec["token_ids"]
        assert rec["completion"] == tok.decode(body, skip_special_tokens=True)
        assert (rec["prompt_tokens"], rec["completion_tokens"]) == (
            len(prompt), len(rec["token_ids"]))
        reasons.add(rec["finish_reason"])
    assert reasons == {"eos", "length"}
    stats = json.loads((tmp_path / "out.jsonl.stats.json").read_text())
    assert stats["requests"] == 6 and stats["measured_tokens_per_s"] > 0
    assert stats["predicted_tokens_per_s"] > 0 and stats["limit_tokens_per_s"] > 0
    assert stats["policy"]["batch_size"] == 4
    assert "tok/s" in r.stdout and "predicted" in r.stdout
    before = out.read_bytes()
    again = cli("--checkpoint", d, "--prompts", src, "--output", out, "--nopredict")
    assert again.returncode == 0 and "0 requests (6 already done)" in again.stdout
    assert out.read_bytes() == before


def sampled_job(tmp_path, n=24):
    rows = [{"id": f"r{i}", "prompt": " ".join(WORDS[i % 7:i % 7 + 2 + i % 5])}
            for i in range(n)]
    return write_jsonl(tmp_path / "in.jsonl", rows)


def test_sigkill_then_rerun_loses_nothing_and_equals_an_uninterrupted_run(tiny, tmp_path):
    d = tiny[0]
    src = sampled_job(tmp_path)
    common = ["--checkpoint", d, "--prompts", src, "--max_new_tokens", 10, "--temperature",
              0.8, "--top_k", 40, "--seed", 3, "--nopredict"]
    ref = cli(*common, "--output", tmp_path / "ref.jsonl", "--batch_size", 8)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out.jsonl"
    p = cli(*common, "--output", out, "--batch_size", 2, wait=False)
    t0 = time.monotonic()
    while not (out.exists() and out.read_text().count("\n") >= 1):
        assert p.poll() is None and time.monotonic() - t0 < 60, p.communicate()
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    written = out.read_text().count("\n")
    assert 1 <= written < 24
    with open(out, "a") as f:
        f.write('{"id": "r23", "completion": "half a li')  # a torn last line
    r = cli(*common, "--output", out, "--batch_size", 2)
    assert r.returncode == 0, r.stderr
    assert f"({written} already done)" in r.stdout
    got, want = read_out(out), read_out(tmp_path / "ref.jsonl")
    assert set(got) == set(want) and len(got) == 24
    assert all(got[k]["token_ids"] == want[k]["token_ids"] for k in want)


BAD = {  # name: (input lines, extra flags, a piece of the error)
    "malformed": (['{"id": 1, "prompt": "a"}', '{"id": 2, "prompt": '], [], "line 2: malformed"),
    "no_prompt": (['{"id": 1, "text": "a"}'], [], "line 1: needs exactly one of"),
    "empty": (['{"id": 1, "prompt": ""}'], [], "line 1: \"prompt\" must be a non-empty"),
    "too_long": ([json.dumps({"prompt": " ".join(WORDS * 30)})], [], "exceed the model's"),
    "duplicate": (['{"id": "x", "prompt": "a"}', '{"id": "x", "prompt": "b"}'], [],
                  "line 2: duplicate id \"x\""),
    "bad_roles": ([json.dumps({"messages": [{"role": "user", "content": "a"}] * 2})], [],
                  "roles must alternate"),
    "same_file": (['{"prompt": "a"}'], ["SAME"], "is the --prompts file"),
    "no_dir": (['{"prompt": "a"}'], ["NODIR"], "does not exist"),
    "no_tokenizer": (['{"prompt": "a"}'], ["NOTOK"], "tokenizer.json not found"),
    "bad_top_p": (['{"prompt": "a"}'], ["--temperature=1", "--top_p=1.5"], "top_p"),
    "top_k_greedy": (['{"prompt": "a"}'], ["--top_k=3"], "need --temperature > 0"),
}


def test_bad_input_is_one_line_before_anything_runs(tiny, tmp_path):
    import shutil

    d = tiny[0]
    notok = tmp_path / "notok"
    shutil.copytree(d, notok)
    os.remove(notok / "tokenizer.json")
    procs = {}
    for name, (lines, extra, _) in BAD.items():
        src = tmp_path / f"{name}.jsonl"
        src.write_text("\n".join(lines) + "\n")
        out = {"SAME": src, "NODIR": tmp_path / "nope" / "o.jsonl"}.get(
            (extra or [""])[0], tmp_path / f"{name}.out.jsonl")
        ckpt = notok if extra == ["NOTOK"] else d
        flags_ = [f for f in extra if f.startswith("--")]
        procs[name] = (out, cli("--checkpoint", ckpt, "--prompts", src, "--output", out,
                                *flags_, wait=False))
    for name, (out, p) in procs.items():
        _, err = p.communicate()
        assert p.returncode != 0, name
        assert err.strip().count("\n") == 0 and "Traceback" not in err, (name, err)
        assert err.startswith("generate: ") and BAD[name][2] in err, (name, err)
        if name != "same_file":
            assert not out.exists(), name


def test_ctrl_c_stops_after_the_running_batch_with_whole_lines(tiny, tmp_path):
    src, out = sampled_job(tmp_path), tmp_path / "out.jsonl"
    p = cli("--checkpoint", tiny[0], "--prompts", src, "--output", out, "--batch_size", 1,
            "--max_new_tokens", 10, "--nopredict", wait=False)
    while not (out.exists() and out.read_text().count("\n") >= 1):
        assert p.poll() is None, p.communicate()
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate()
    assert p.returncode == 1 and "interrupted: every finished request is written" in err
    text = out.read_text()
    assert text.endswith("\n") and 1 <= len(read_out(out)) < 24
