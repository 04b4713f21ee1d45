"""From the model options every command shares to loaded models and a drafter."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .engine.drafters import METHOD_DRAFT, METHOD_HYBRID, METHOD_LOOKUP, Drafter, make_drafter
from .console import say
from .errors import UsageError
from .llama.backend import MAX_THREADS, THREADS_VARIABLE, release_workers, threads_from_environment
from .llama.model import Model

MAX_CTX = 2**31 - 1
MAX_PARALLEL = 256  # LLAMA_MAX_SEQ
DRAFT_NONE = "none"  # --draft none: the target alone
DRAFT_LOOKUP = METHOD_LOOKUP  # --draft lookup: prompt lookup, no second model


DEFAULT_MEMORY_MB = 64  # the drafting memory's bound: some millions of tokens, a small share of any model's memory
MAX_MEMORY_MB = 1 << 20


@dataclass
class ModelOptions:
    target: str | None = None  # a model reference; None = the demo pair (or --pair's target)
    draft: str | None = None  # a model reference, "none", "lookup"; None = the pair's draft
    pair: str | None = None
    ctx_size: int = 4096
    n_gpu_layers: int | None = None  # None: all layers when llama.cpp has a GPU backend, else 0
    n_gpu_layers_draft: int | None = None
    threads: int | None = None
    draft_p_min: float = 0.0
    lookup: bool = True  # with a draft model, prompt lookup too (the hybrid drafter)
    pull: bool = False
    offline: bool = False
    force: bool = False
    rpc: str | None = None  # "HOST:PORT[,...]": RPC servers holding the target's layers
    rpc_draft: str | None = None  # the same for the draft (which stays on this machine by default)
    tensor_split: str | None = None  # "3,1": each device's share of the target's layers
    parallel: int = 1  # generations at once, batched (dspark serve --parallel): a KV sequence each
    profile: bool = True  # start the cost model from what earlier runs measured here, and add to it (profiles.py)
    draft_as_is: bool = False  # never derive a faster copy of the draft (models/derive.py)
    exact: bool = False  # speculate only with verify batches proven exact here (llama/proof.py)
    memory_mb: int = DEFAULT_MEMORY_MB  # the drafting memory's bound (engine/memory.py); 0: no memory
    draft_cache: str | None = None  # a file the drafting memory is read from at load and saved to at close

    def rpc_endpoints(self, draft: bool = False):
        from .llama.rpc import parse_endpoints

        text = self.rpc_draft if draft else self.rpc
        return parse_endpoints(text, "--rpc-draft" if draft else "--rpc") if text is not None else []

    def split_shares(self) -> list[float] | None:
        if self.tensor_split is None:
            return None
        try:
            shares = [float(x) for x in self.tensor_split.split(",")]
        except ValueError:
            shares = []
        if not shares or any(not (x >= 0) or x == float("inf") for x in shares) or not sum(shares) > 0:
            raise UsageError(f"--tensor-split takes shares like 3,1 (numbers, 0 or more, not all 0), got {self.tensor_split!r}")
        return shares

    def validate(self) -> None:
        if self.ctx_size < 16:
            raise UsageError(f"--ctx-size must be at least 16, got {self.ctx_size}")
        if self.ctx_size > MAX_CTX:  # llama.cpp keeps it in 32 bits: larger values wrap around
            raise UsageError(f"--ctx-size must be at most {MAX_CTX}, got {self.ctx_size}")
        for flag, v in (("--n-gpu-layers", self.n_gpu_layers), ("--n-gpu-layers-draft", self.n_gpu_layers_draft)):
            if v is not None and v < 0:
                raise UsageError(f"{flag} must be 0 or more, got {v}")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise UsageError(f"--threads must be between 1 and {MAX_THREADS} (llama.cpp's limit), got {self.threads}")
        threads_from_environment()  # a bad $DSPARK_THREADS is refused before anything loads
        if not 0 <= self.memory_mb <= MAX_MEMORY_MB:
            raise UsageError(f"--draft-memory must be between 0 (off) and {MAX_MEMORY_MB} MB, got {self.memory_mb}")
        if self.draft_cache is not None and not self.draft_cache.strip():
            raise UsageError("--draft-cache needs a file name, got an empty one")
        if self.draft_cache is not None and (not self.memory_mb or self.draft == DRAFT_NONE):
            raise UsageError("--draft-cache keeps the drafting memory, which is off here "
                             + ("(--draft-memory 0)" if not self.memory_mb else "(--draft none: nothing drafts)"))
        if not 1 <= self.parallel <= MAX_PARALLEL:
            raise UsageError(f"--parallel must be between 1 and {MAX_PARALLEL}, got {self.parallel}")
        if not 0.0 <= self.draft_p_min < 1.0:
            raise UsageError(f"--draft-p-min must be in [0, 1), got {self.draft_p_min}")
        for flag, v in (("--target", self.target), ("--draft", self.draft), ("--pair", self.pair)):
            if v is not None and not v.strip():
                raise UsageError(f"{flag} is empty: name a model (a GGUF path, org/repo:file.gguf, a registry name)")
        if self.pair and (self.target or self.draft not in (None, DRAFT_NONE, DRAFT_LOOKUP)):
            raise UsageError("--pair sets both models; drop --target/--draft or drop --pair")
        target_servers, draft_servers = self.rpc_endpoints(), self.rpc_endpoints(draft=True)
        self.split_shares()
        if draft_servers and self.draft in (DRAFT_NONE, DRAFT_LOOKUP):
            raise UsageError(f"--rpc-draft: there is no draft model with --draft {self.draft}")
        for flag, n in (("--n-gpu-layers", self.n_gpu_layers), ("--n-gpu-layers-draft", self.n_gpu_layers_draft)):
            if n == 0 and (target_servers if flag == "--n-gpu-layers" else draft_servers):
                raise UsageError(f"{flag} 0 keeps every layer on this machine: the RPC servers would hold none")


@dataclass
class Loaded:
    target: Model
    drafter: Drafter | None
    draft_model: Model | None
    target_path: Path
    draft_path: Path | None
    profile: object = None  # models.profiles.StoredProfile: the cost model's prior, updated by every generation
    exactness: object = None  # llama.proof.Verdict for the target here (None: the target alone, nothing to prove)
    verify_max: int | None = None  # the largest verify batch the engine may send (None: no bound)
    draft_cache: object = None  # models.draft_cache.DraftCache: where the drafting memory is saved at close

    @property
    def exact_label(self) -> str:
        """What stats and reports say about exactness: the proof's verdict, or that the target runs alone."""
        from .engine.stats import EXACT_ALONE

        return self.exactness.label if self.exactness is not None else EXACT_ALONE

    def close(self) -> None:
        if self.draft_cache is not None and self.drafter is not None and self.drafter.memory is not None:
            self.draft_cache.write(self.drafter.memory)
            self.draft_cache = None
        if self.draft_model is not None:
            self.draft_model.close()
        self.target.close()


def _gpu_layers(requested: int | None, servers: list) -> int:
    """Layers to offload: as asked, else all of them when there is somewhere to put them (a GPU here, or
    RPC servers), else none."""
    if requested is not None:
        return requested
    from .llama.ggml import local_accelerators

    return 999 if servers or local_accelerators() else 0


@dataclass
class Placement:
    """Where one model's offloaded layers go: ggml devices (None: llama.cpp's default, this machine's GPUs)."""

    n_gpu_layers: int
    devices: list[int] | None = None
    servers: list = field(default_factory=list)  # the RPC endpoints among them
    tensor_split: list[float] | None = None

    def describe(self) -> str:
        """Where the layers run, in words that name the device for cached measurements: "cpu", or the offloaded
        layers' count and devices (ggml names an RPC server's device by its address)."""
        if self.n_gpu_layers == 0:
            return "cpu"
        from .llama.ggml import device_name, local_accelerators

        names = [device_name(d) for d in (self.devices if self.devices is not None else local_accelerators())]
        return f"{self.n_gpu_layers} layers on " + ",".join(names)

    def model_args(self) -> dict:
        return dict(n_gpu_layers=self.n_gpu_layers, devices=self.devices, tensor_split=self.tensor_split,
                    remote=bool(self.servers))


def placement(opts: ModelOptions, *, draft: bool) -> Placement:
    """Connects to the model's RPC servers (RemoteError when one cannot be reached) and lists its devices:
    the servers' first, then this machine's GPUs, as llama.cpp orders them for --rpc."""
    from .llama.ggml import local_accelerators
    from .llama.rpc import server_devices

    servers = opts.rpc_endpoints(draft=draft)
    ngl = _gpu_layers(opts.n_gpu_layers_draft if draft else opts.n_gpu_layers, servers)
    devices = server_devices(servers) + local_accelerators() if servers else None
    shares = None if draft else opts.split_shares()
    if shares is not None:
        n = len(devices) if devices is not None else len(local_accelerators())
        if n < 2:
            raise UsageError("--tensor-split divides the target between devices: it needs --rpc servers or GPUs, "
                             f"and this target has {n} device{'s' if n != 1 else ''}")
        if len(shares) > n:
            raise UsageError(f"--tensor-split gives {len(shares)} shares; the target has {n} devices "
                             "(the --rpc servers' in order, then this machine's GPUs)")
    return Placement(ngl, devices, servers, shares)


def resolve_paths(opts: ModelOptions) -> tuple[Path, Path | str | None]:
    """(target path, draft path or "lookup" or None) after registry/hub resolution."""
    target_ref, draft_ref = opts.target, opts.draft
    if opts.pair:
        from .models.refs import resolve_pair

        pair_target, pair_draft = resolve_pair(opts.pair)
        target_ref = pair_target
        draft_ref = draft_ref if draft_ref in (DRAFT_NONE, DRAFT_LOOKUP) else pair_draft
    if target_ref is None:
        from .models.demo import demo_pair

        demo_target, demo_draft = demo_pair()
        target_path = demo_target
        if draft_ref is None:
            draft_ref = str(demo_draft)
    else:
        target_path = _resolve(target_ref, opts)
    if draft_ref is None or draft_ref == DRAFT_NONE:
        return target_path, None
    if draft_ref == DRAFT_LOOKUP:
        return target_path, DRAFT_LOOKUP
    return target_path, _resolve(draft_ref, opts)


def _resolve(ref: str, opts: ModelOptions) -> Path:
    from .models.refs import resolve_model

    return resolve_model(ref, pull=opts.pull, offline=opts.offline)


def load(opts: ModelOptions, *, quiet: bool = False) -> Loaded:
    opts.validate()
    target_path, draft = resolve_paths(opts)
    draft_path = draft if isinstance(draft, Path) else None
    if (opts.rpc or opts.rpc_draft) and not quiet:
        say(f"connecting to RPC servers {', '.join(filter(None, (opts.rpc, opts.rpc_draft)))}")
    where = placement(opts, draft=False)
    where_draft = placement(opts, draft=True)
    servers = where.servers + [ep for ep in where_draft.servers if ep not in where.servers]
    from .llama.memory import preflight
    from .llama.rpc import remote_memory

    preflight(target_path, draft_path, n_ctx=opts.ctx_size, n_gpu_layers=where.n_gpu_layers,
              n_gpu_layers_draft=where_draft.n_gpu_layers, force=opts.force,
              remote_free=remote_memory(servers)[0] if servers else None,
              remote=(bool(where.servers), bool(where_draft.servers)), parallel=opts.parallel)

    hardware = os.cpu_count() or 1
    threads = opts.threads or threads_from_environment()
    if threads is not None and threads > hardware:
        flag = f"--threads {threads}" if opts.threads else f"{THREADS_VARIABLE}={threads}"
        say(f"warning: {flag} is more than this machine's {hardware} hardware threads; "
            "llama.cpp gets slower, not faster, past them")
    if not quiet:
        what = f"draft {draft_path.name}" if draft_path else ("prompt lookup" if draft == DRAFT_LOOKUP else "no draft")
        say(f"loading target {target_path.name} + {what}")
    # With parallel sequences, the target keeps each in a KV stream of its own (bit-identical to a lone run); the
    # draft, whose numerics never change the output, pools them (any mix of rows in one pass).
    target = Model(target_path, role="target", n_ctx=opts.ctx_size, n_threads=opts.threads, n_seq=opts.parallel,
                   **where.model_args())
    draft_model = None
    drafter: Drafter | None = None
    try:
        if draft_path is not None:
            from .llama.vocab import vocab_report

            draft_file = draft_path
            if not opts.draft_as_is and where_draft.n_gpu_layers == 0 and not where_draft.servers:
                # On this machine's CPU, a copy in a layout it steps faster, when measured so (once per build; a
                # draft of another vocabulary is kept as it is).
                from .models.derive import fastest_draft

                draft_file = fastest_draft(draft_path, target, threads=opts.threads, quiet=quiet)
            draft_model = Model(draft_file, role="draft", n_ctx=opts.ctx_size, n_threads=opts.threads,
                                n_seq=opts.parallel, separate=False, **where_draft.model_args())
            report, through_text = vocab_report(target, draft_model)
            if not quiet and through_text:
                say(f"draft {draft_path.name}: {report}")
            drafter = make_drafter(METHOD_HYBRID if opts.lookup else METHOD_DRAFT, draft_model, opts.draft_p_min,
                                   through_text_for=target if through_text else None)
            if through_text and opts.parallel > 1 and not quiet:
                say("batched generations (--parallel) draft from prompt lookup and the memory only: a draft of "
                    "another vocabulary drafts for one generation at a time")
        elif draft == DRAFT_LOOKUP:
            drafter = make_drafter(METHOD_LOOKUP)
        exactness, verify_max = _hold_to_proof(opts, target, where, speculates=drafter is not None, quiet=quiet)
    except BaseException:
        if draft_model is not None:
            draft_model.close()
        target.close()
        raise
    finally:
        # The draft's measure and the proof decoded on this thread; the generations may run on another (a
        # server's scheduler), and two threads' OpenMP workers slow every pass (backend.release_workers).
        release_workers()
    if verify_max == 1 and drafter is not None:  # --exact where no verify batch is proven: the target alone
        if draft_model is not None:
            draft_model.close()
        drafter, draft_model, draft_path = None, None, None
    if where.servers or where_draft.servers:
        from .llama.rpc import keep_alive

        keep_alive(servers)
    profile = None
    draft_cache = None
    if drafter is not None and opts.memory_mb:
        from .engine.memory import DraftMemory

        drafter.memory = DraftMemory(opts.memory_mb << 20)
        if opts.draft_cache is not None:
            from .models.draft_cache import DraftCache, vocab_id

            draft_cache = DraftCache(opts.draft_cache, vocab_id(target), quiet=quiet)
            draft_cache.read(drafter.memory, quiet=quiet)
    if drafter is not None and opts.profile:
        from .models.profiles import open_profile, profile_key

        profile = open_profile(profile_key(target, draft_model), quiet=quiet)
    return Loaded(target, drafter, draft_model, target_path, draft_path, profile, exactness, verify_max, draft_cache)


def _hold_to_proof(opts: ModelOptions, target: Model, where: Placement, *, speculates: bool, quiet: bool):
    """(the proof's verdict or None, the engine's verify bound) for a loaded target. The proof runs (once per file
    and build, llama/proof.py) where verify batches will: with a drafter, or with several sequences per pass.
    With --exact the bound is the largest proven size (1: the target alone); without, a verdict short of proven
    is said once and speculation runs anyway."""
    from .llama.kernels import default_verify_max

    verify_max = default_verify_max(target)
    if not speculates and opts.parallel == 1:
        return None, verify_max
    verdict = _prove(target, where, quiet=quiet)
    if not opts.exact:
        if not verdict.proven and not quiet:
            say(f"warning: speculation is not proven exact here: {verdict.why()}; greedy output may differ from "
                "the target alone at near-ties (--exact: "
                + ("the target alone)" if verdict.bound < 2 else f"batches of at most {verdict.bound})"))
        return verdict, verify_max
    if 1 < opts.parallel and verdict.bound < opts.parallel:
        raise UsageError(f"--exact --parallel {opts.parallel}: batching {opts.parallel} sequences takes passes of "
                         f"{opts.parallel} tokens, and {_proven_words(verdict)}",
                         hint=f"use --parallel {verdict.bound}" if verdict.bound > 1 else "drop --parallel")
    if not quiet and speculates and not verdict.proven:
        say(f"--exact: {_proven_words(verdict)}; " + ("running the target alone" if verdict.bound < 2 else
                                                         f"verify batches held to {verdict.bound} tokens"))
    return verdict, min(verify_max or verdict.bound, verdict.bound)


def _proven_words(verdict) -> str:
    """The verdict as the end of a sentence."""
    if verdict.bound < 2:
        return f"no verify batch is proven exact here ({verdict.why()})"
    return f"verify batches are proven exact up to {verdict.bound} tokens only ({verdict.why()})"


def _prove(target: Model, where: Placement, *, quiet: bool):
    """The exactness proof's verdict for the target where it runs (run once, then kept: models/proofs.py)."""
    from .llama.kernels import EXACT_BATCH_MAX
    from .models.proofs import verdict_for

    def running() -> None:
        if not quiet:
            say("proving that verify batches match one-token decoding on this build and device (once)")

    return verdict_for(target, device=where.describe(), largest=EXACT_BATCH_MAX, on_run=running)
