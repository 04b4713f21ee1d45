"""How much memory a target + draft need, and the preflight that stops a load that would not fit.

The estimate is deliberately simple, read from the GGUF header (no model is loaded, no weights are read):
  weights  = the file's size (llama.cpp maps the file; every byte of it is touched while generating)
  KV cache = n_ctx * sum over layers of n_head_kv * (key_length + value_length) * 2 bytes (f16 K and V),
             with key/value length = embedding_length / head_count when the file does not state them.
             Sliding-window layers (Gemma 3, ...) really use less, so this is an upper bound.
  compute  = COMPUTE_FIXED + one batch of logits (n_vocab * N_BATCH * 4 bytes): llama.cpp's scratch buffers.
With GPU layers, the offloaded fraction of weights and KV goes to VRAM instead of RAM. With RPC servers
(--rpc), it is split between the servers and this machine's GPUs in proportion to their free memory, as
llama.cpp splits layers by default, and the servers' part is checked against what they report free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ModelFileError, ResourceError
from .gguf_file import read_metadata

MiB = 1 << 20
GiB = 1 << 30
COMPUTE_FIXED = 128 * MiB
N_BATCH = 512
KV_BYTES = 2  # f16 K and V, llama.cpp's default cache type


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


@dataclass(frozen=True)
class GGUFShape:
    """What the memory estimate needs from a GGUF header."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: tuple[int, ...]  # per layer
    key_length: int
    value_length: int
    n_vocab: int
    context_length: int

    @property
    def kv_bytes_per_token(self) -> int:
        return sum(self.n_head_kv) * (self.key_length + self.value_length) * KV_BYTES


@dataclass(frozen=True)
class ModelMemory:
    path: str
    arch: str
    n_layer: int
    n_ctx: int
    n_vocab: int
    weights: int
    kv_cache: int
    compute: int
    kv_bytes_per_token: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute


def read_shape(path: Path) -> GGUFShape:
    """The model's shape from its GGUF header; ModelFileError when it is not a GGUF file llama.cpp could load."""
    path = Path(path)
    meta = read_metadata(path)

    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(f"{path}: GGUF header has no general.architecture")
    n_layer = meta.get(f"{arch}.block_count")
    n_embd = meta.get(f"{arch}.embedding_length")
    if not isinstance(n_layer, int) or not isinstance(n_embd, int):
        raise ModelFileError(f"{path}: GGUF header lacks {arch}.block_count / {arch}.embedding_length")
    n_head = meta.get(f"{arch}.attention.head_count", 0)
    if isinstance(n_head, list):  # per-layer head counts (OpenELM-style); the estimate uses the largest
        n_head = max(n_head) if n_head else 0
    n_head_kv = meta.get(f"{arch}.attention.head_count_kv", n_head)
    if isinstance(n_head_kv, list):
        per_layer = tuple(int(x) for x in n_head_kv[:n_layer])
    else:
        per_layer = (int(n_head_kv or 0),) * n_layer
    head_dim = n_embd // n_head if n_head else 0
    key_length = int(meta.get(f"{arch}.attention.key_length", head_dim) or 0)
    value_length = int(meta.get(f"{arch}.attention.value_length", head_dim) or 0)
    tokens = meta.get("tokenizer.ggml.tokens")
    n_vocab = tokens if isinstance(tokens, int) else int(meta.get(f"{arch}.vocab_size", 0) or 0)
    return GGUFShape(
        arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=int(n_head or 0), n_head_kv=per_layer,
        key_length=key_length, value_length=value_length, n_vocab=n_vocab,
        context_length=int(meta.get(f"{arch}.context_length", 0) or 0),
    )


def estimate(path: Path, *, n_ctx: int) -> ModelMemory:
    """Memory for one model at a context of n_ctx tokens (0 or less: the model's training context)."""
    path = Path(path)
    shape = read_shape(path)
    ctx = n_ctx if n_ctx > 0 else (shape.context_length or 4096)
    return ModelMemory(
        path=str(path), arch=shape.arch, n_layer=shape.n_layer, n_ctx=ctx, n_vocab=shape.n_vocab,
        weights=path.stat().st_size, kv_cache=ctx * shape.kv_bytes_per_token,
        compute=COMPUTE_FIXED + shape.n_vocab * N_BATCH * 4, kv_bytes_per_token=shape.kv_bytes_per_token,
    )


def rough_need(weights: int, n_ctx: int = 4096) -> int:
    """A guess before a file is downloaded (no header to read): weights, KV ≈ 2.5% of weights per 1k tokens
    of context (typical of 4-bit GQA models), and the compute allowance."""
    return int(weights * (1 + 0.025 * n_ctx / 1024)) + COMPUTE_FIXED + 150_000 * N_BATCH * 4


@dataclass
class MemoryPlan:
    target: ModelMemory
    draft: ModelMemory | None
    n_ctx: int
    gpu_backend: str  # "none" when llama.cpp was built without one
    ram_needed: int
    ram_available: int
    vram_needed: int
    vram_free: int | None  # None: unknown (or no GPU)
    remote_needed: int = 0  # on RPC servers
    remote_free: int | None = None  # None: no RPC servers
    forced: bool = False
    notes: list[str] = field(default_factory=list)
    parallel: int = 1  # sequences sharing n_ctx (dspark serve --parallel): n_ctx / parallel tokens each

    @property
    def fits_ram(self) -> bool:
        return self.ram_needed <= self.ram_available

    @property
    def fits_vram(self) -> bool:
        return self.vram_needed == 0 or self.vram_free is None or self.vram_needed <= self.vram_free

    @property
    def fits_remote(self) -> bool:
        return self.remote_free is None or self.remote_needed <= self.remote_free

    @property
    def fits(self) -> bool:
        return self.fits_ram and self.fits_vram and self.fits_remote

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(fits=self.fits, fits_ram=self.fits_ram, fits_vram=self.fits_vram, fits_remote=self.fits_remote)
        return d

    def breakdown(self) -> str:
        parts = [f"target {fmt_bytes(self.target.weights)}"]
        if self.draft:
            parts.append(f"draft {fmt_bytes(self.draft.weights)}")
        kv = self.target.kv_cache + (self.draft.kv_cache if self.draft else 0)
        compute = self.target.compute + (self.draft.compute if self.draft else 0)
        per = f" ({self.parallel} sequences x {self.n_ctx // self.parallel})" if self.parallel > 1 else ""
        parts.append(f"KV cache {fmt_bytes(kv)} at {self.n_ctx} tokens{per}")
        parts.append(f"buffers {fmt_bytes(compute)}")
        return " + ".join(parts)


def _offload_fraction(n_gpu_layers: int, n_layer: int) -> float:
    if n_gpu_layers == 0 or n_layer <= 0:
        return 0.0
    if n_gpu_layers < 0 or n_gpu_layers >= n_layer:
        return 1.0
    return n_gpu_layers / n_layer


def plan(
    target: Path,
    draft: Path | None,
    *,
    n_ctx: int,
    n_gpu_layers: int = 0,
    n_gpu_layers_draft: int = 0,
    ram_available: int | None = None,
    gpu: dict | None = None,
    remote_free: int | None = None,
    remote: tuple[bool, bool] = (False, False),
) -> MemoryPlan:
    """The memory plan without judging it (doctor shows it; preflight enforces it). remote_free: what the RPC
    servers in use report free, all together (None: none in use); remote: whether the target's and the
    draft's offloaded layers go to them."""
    import psutil

    from .machine import gpu_summary

    t = estimate(target, n_ctx=n_ctx)
    d = estimate(draft, n_ctx=t.n_ctx) if draft is not None else None
    gpu = gpu if gpu is not None else gpu_summary()
    backend = gpu.get("backend", "none")
    offload = gpu.get("offload", False)
    notes: list[str] = []
    vram_free = gpu.get("vram_free")
    if not offload:
        if (n_gpu_layers and not remote[0]) or (n_gpu_layers_draft and not remote[1]):
            notes.append("this llama.cpp has no GPU backend: GPU layers are ignored and everything runs from RAM")
        n_gpu_layers = n_gpu_layers if remote[0] else 0
        n_gpu_layers_draft = n_gpu_layers_draft if remote[1] else 0
    ram = vram = to_remote = 0
    for m, ngl, on_servers in ((t, n_gpu_layers, remote[0]), (d, n_gpu_layers_draft, remote[1])):
        if m is None:
            continue
        frac = _offload_fraction(ngl, m.n_layer)
        offloaded = int((m.weights + m.kv_cache) * frac)
        ram += m.weights + m.kv_cache - offloaded + m.compute
        to_servers = 0
        if on_servers:
            servers_free, local = remote_free or 0, (vram_free or 0) if offload else 0
            to_servers = int(offloaded * servers_free / (servers_free + local)) if servers_free + local else offloaded
            to_remote += to_servers + (m.compute if frac > 0 else 0)
        vram += offloaded - to_servers + (m.compute if frac > 0 and offload and to_servers < offloaded else 0)
    if ram_available is None:
        ram_available = psutil.virtual_memory().available
    return MemoryPlan(
        target=t, draft=d, n_ctx=t.n_ctx, gpu_backend=backend, ram_needed=ram, ram_available=ram_available,
        vram_needed=vram, vram_free=vram_free, remote_needed=to_remote, remote_free=remote_free, notes=notes,
    )


def preflight(
    target: Path,
    draft: Path | None,
    *,
    n_ctx: int,
    n_gpu_layers: int = 0,
    n_gpu_layers_draft: int = 0,
    force: bool = False,
    remote_free: int | None = None,
    remote: tuple[bool, bool] = (False, False),
    parallel: int = 1,
) -> MemoryPlan:
    """Check before any model loads that target + draft + KV cache fit free RAM (and VRAM for offloaded layers).
    parallel: sequences held at once (dspark serve --parallel), each with n_ctx tokens of KV cache.

    Raises ResourceError with the numbers and the ways out when they do not, unless force is set; then the
    returned plan has forced=True and fits=False and the caller goes ahead (and should say so).
    """
    p = plan(target, draft, n_ctx=n_ctx * parallel, n_gpu_layers=n_gpu_layers,
             n_gpu_layers_draft=n_gpu_layers_draft, remote_free=remote_free, remote=remote)
    p.parallel = parallel
    if p.fits:
        return p
    if force:
        p.forced = True
        return p
    if not p.fits_ram:
        raise ResourceError(
            f"not enough memory: {p.breakdown()} need {fmt_bytes(p.ram_needed)} of RAM, "
            f"{fmt_bytes(p.ram_available)} is available",
            hint=_ways_out(p, p.ram_available, ram=True),
        )
    if not p.fits_remote:
        raise ResourceError(
            f"not enough memory on the RPC servers: the layers sent there need {fmt_bytes(p.remote_needed)}, "
            f"they report {fmt_bytes(p.remote_free or 0)} free",
            hint="more servers in --rpc, a smaller --ctx-size, or fewer layers (--n-gpu-layers)")
    raise ResourceError(
        f"not enough GPU memory: the offloaded layers need {fmt_bytes(p.vram_needed)} of VRAM, "
        f"{fmt_bytes(p.vram_free or 0)} is free",
        hint=_ways_out(p, p.vram_free or 0, ram=False),
    )


def _tokens_that_fit(p: MemoryPlan, budget: int, *, ram: bool) -> int:
    """How many tokens of KV cache (all sequences together) fit `budget` next to the rest."""
    needed = p.ram_needed if ram else p.vram_needed
    kv = p.target.kv_cache + (p.draft.kv_cache if p.draft else 0)
    per_token = p.target.kv_bytes_per_token + (p.draft.kv_bytes_per_token if p.draft else 0)
    fixed = needed - kv  # not exact under partial offload, close enough to advise
    if per_token <= 0 or budget <= fixed:
        return 0
    return int((budget - fixed) // per_token)


def max_context(p: MemoryPlan, budget: int, *, ram: bool) -> int:
    """The largest power-of-two context whose KV cache still fits `budget` next to the rest."""
    n = _tokens_that_fit(p, budget, ram=ram)
    return 1 << (n.bit_length() - 1) if n >= 256 else 0  # a power of two: the sizes people pass


def _ways_out(p: MemoryPlan, budget: int, *, ram: bool) -> str:
    ways = []
    per_sequence = p.n_ctx // p.parallel
    ctx = max_context(p, budget, ram=ram) // p.parallel
    if ctx >= 256 and ctx < per_sequence:
        ways.append(f"a smaller context (--ctx-size {ctx} fits)")
    if p.parallel > 1:
        most = min(p.parallel - 1, _tokens_that_fit(p, budget, ram=ram) // max(1, per_sequence))
        ways.append(f"fewer parallel sequences (--parallel {most} fits)" if most >= 1 else "fewer parallel sequences")
    if not ram:
        ways.append("fewer GPU layers (--n-gpu-layers / --n-gpu-layers-draft)")
    ways.append("a smaller quant of the target (e.g. Q4_K_M, Q3_K_M)")
    ways.append("--force to load anyway")
    return "try " + ", ".join(ways)
