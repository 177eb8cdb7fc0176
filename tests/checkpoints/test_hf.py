"""Loading an HF checkpoint reads every byte of it once (DBRX's fused Wqkv included)."""

import numpy as np

import moejax
from moejax.checkpoints import safetensors_io
from tests.oracle import hf_model


def test_dbrx_checkpoint_bytes_read_once(tmp_path, monkeypatch):
    _, d = hf_model("dbrx", tmp_path / "dbrx")
    files = safetensors_io.CheckpointFiles(d)
    on_disk = sum(end - begin for f in files.files.values()
                  for _, _, begin, end in f.entries.values())
    files.close()
    read = []
    real = safetensors_io.SafetensorsFile.read

    def counting(self, name, rows=None):
        out = real(self, name, rows)
        read.append(out.nbytes)
        return out

    monkeypatch.setattr(safetensors_io.SafetensorsFile, "read", counting)
    moejax.load_pretrained(d)
    assert sum(read) == on_disk
    assert np.all(np.array(read) > 0)
