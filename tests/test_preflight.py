"""The memory estimate and the preflight, on real GGUF headers and this machine's real memory."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import write_tiny_gguf  # noqa: E402

from dspark_cli.errors import ModelFileError, ResourceError
from dspark_cli.llama.memory import COMPUTE_FIXED, N_BATCH, estimate, plan, preflight, read_shape


def test_kv_cache_formula(tmp_path):
    f = write_tiny_gguf(tmp_path / "m.gguf", n_layer=3, n_embd=64, n_head=4, n_head_kv=2, n_vocab=300)
    m = estimate(f, n_ctx=1000)
    # 2 (K and V) * layers * ctx * head_dim * kv heads * 2 bytes, head_dim = 64 / 4
    assert m.kv_cache == 2 * 3 * 1000 * 16 * 2 * 2
    assert m.weights == f.stat().st_size
    assert m.compute == COMPUTE_FIXED + 300 * N_BATCH * 4
    g = write_tiny_gguf(tmp_path / "k.gguf", n_layer=2, n_head=4, n_head_kv=1, key_length=40)
    assert estimate(g, n_ctx=10).kv_cache == 10 * 2 * 1 * (40 + 40) * 2  # explicit key/value length wins


def test_header_of_a_real_model_matches_llama_cpp(demo_paths):
    smol = demo_paths[1]
    s = read_shape(smol)
    assert (s.arch, s.n_layer, s.n_vocab, s.key_length) == ("llama", 30, 49152, 64)
    # llama.cpp reports "KV self size = 90.00 MiB" for this model at n_ctx 4096 (f16 K and V).
    assert estimate(smol, n_ctx=4096).kv_cache == 90 * 2**20


def test_fits_on_this_machine(tmp_path):
    t = write_tiny_gguf(tmp_path / "t.gguf", weights=100_000)
    d = write_tiny_gguf(tmp_path / "d.gguf")
    p = preflight(t, d, n_ctx=4096, n_gpu_layers=0, n_gpu_layers_draft=0, force=False)
    assert p.fits and not p.forced
    assert p.ram_needed == p.target.total + p.draft.total
    assert abs(p.ram_available - psutil.virtual_memory().available) < 2 << 30


def test_too_big_stops_with_numbers_and_ways_out(tmp_path):
    # 64 layers x 8 KV heads x 128 dims: 256 KiB of KV per token; 1M tokens is 256 GiB, more than this machine.
    t = write_tiny_gguf(tmp_path / "t.gguf", n_layer=64, n_embd=1024, n_head=8, n_head_kv=8, key_length=128)
    with pytest.raises(ResourceError) as e:
        preflight(t, None, n_ctx=1 << 20, n_gpu_layers=0, n_gpu_layers_draft=0, force=False)
    msg, hint = e.value.message, e.value.hint
    assert msg.startswith("not enough memory:") and "KV cache 256.0 GiB at 1048576 tokens" in msg
    assert "RAM" in msg and "available" in msg
    assert "--ctx-size" in hint and "smaller quant" in hint and "--force" in hint
    # The suggested context really fits.
    suggested = int(hint.split("--ctx-size ")[1].split()[0])
    assert preflight(t, None, n_ctx=suggested, n_gpu_layers=0, n_gpu_layers_draft=0, force=False).fits
    assert suggested >= 1024 and (suggested & (suggested - 1)) == 0  # a power of two


def test_force_goes_ahead(tmp_path):
    t = write_tiny_gguf(tmp_path / "t.gguf", n_layer=64, n_embd=1024, n_head=8, n_head_kv=8, key_length=128)
    p = preflight(t, None, n_ctx=1 << 20, n_gpu_layers=0, n_gpu_layers_draft=0, force=True)
    assert p.forced and not p.fits


def test_gpu_layers_without_a_gpu_backend_count_as_ram(tmp_path):
    from dspark_cli.llama.machine import gpu_summary

    t = write_tiny_gguf(tmp_path / "t.gguf")
    cpu_only = {"backend": "none", "offload": False, "vram_free": None}
    p = plan(t, None, n_ctx=512, n_gpu_layers=999, gpu=cpu_only)
    assert p.vram_needed == 0 and p.ram_needed == p.target.total
    assert any("no GPU backend" in n for n in p.notes)
    gpu = {"backend": "CUDA", "offload": True, "vram_free": 1 << 40}
    p = plan(t, None, n_ctx=512, n_gpu_layers=999, gpu=gpu)
    assert p.ram_needed == p.target.compute and p.vram_needed == p.target.total
    if not gpu_summary()["offload"]:  # on this machine, for real
        real = plan(t, None, n_ctx=512, n_gpu_layers=999)
        assert real.vram_needed == 0


@pytest.mark.parametrize("content,text", [(b"not gguf at all", "not a GGUF"), (b"GGUF\x03\x00\x00\x00", "truncated")])
def test_bad_files(tmp_path, content, text):
    f = tmp_path / "x.gguf"
    f.write_bytes(content)
    with pytest.raises(ModelFileError) as e:
        preflight(f, None, n_ctx=512, n_gpu_layers=0, n_gpu_layers_draft=0, force=False)
    assert text in e.value.message
