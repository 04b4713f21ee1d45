"""One GGUF model with its own llama.cpp context and KV cache, driven through the low-level API.

The class keeps `cached`, the token ids whose keys/values are in the KV cache (sequence 0, positions
0..len-1). Everything that changes the cache goes through `eval` (append) and `truncate` (drop a suffix),
so `cached` and the real cache never disagree; `sync` brings the cache to any token list by keeping the
common prefix, which is what makes draft-KV reuse and multi-turn reuse fall out of one mechanism.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np

from ..errors import ModelFileError, PromptError
from . import backend, kernels
from .gguf_file import check_gguf_file

class Model:
    def __init__(
        self,
        path: str | Path,
        *,
        role: str = "model",
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        vocab_only: bool = False,
        devices: list[int] | None = None,
        tensor_split: list[float] | None = None,
        remote: bool = False,
    ):
        """devices: the ggml devices to offload to (None: llama.cpp's choice, this machine's GPUs); remote: some
        of them are RPC servers; tensor_split: each device's share of the layers, in the order of devices."""
        self.path = check_gguf_file(path, role).path
        self.role = role
        self.remote = remote
        self._model = self._ctx = self._batch = None
        try:
            with backend.deferred_interrupt():
                self._load(n_ctx, n_batch, n_gpu_layers, n_threads, vocab_only, devices, tensor_split)
        except BaseException:  # a failed or interrupted load frees what it had
            self.close()
            raise

    def _load(self, n_ctx, n_batch, n_gpu_layers, n_threads, vocab_only, devices, tensor_split) -> None:
        role = self.role
        backend.init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        mparams.vocab_only = vocab_only
        mparams.progress_callback = backend.load_progress
        if devices is not None:  # kept alive in locals while llama.cpp reads them
            from .ggml import device_array

            device_list = device_array(devices)
            mparams.devices = ctypes.cast(device_list, ctypes.c_void_p)
        if tensor_split:
            split = (ctypes.c_float * llama_cpp.llama_max_devices())(*tensor_split)
            mparams.tensor_split = split
        with backend.capture_log() as lines:
            model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not model:
            raise backend.load_error(f"cannot load {role} model {self.path}", lines)
        self._model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self.cached: list[int] = []
        self._stray = False  # llama.cpp may hold positions past `cached` (see _decode)
        self.n_evaluated = 0  # tokens ever run through this model: a cost counter for stats
        self.on_cpu = n_gpu_layers == 0  # everything runs on this machine's CPU
        self.n_threads = 0
        if vocab_only:
            self.n_ctx = 0
            self.n_batch = 0
            return

        threads = n_threads or backend.default_threads()
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        if (self.on_cpu or self.remote) and not kernels.fast_kernels():
            # On the CPU, llama.cpp's flash attention splits a one-token step's keys across threads once the
            # cache passes 256 positions, and a batch's not: past that point a verify batch's logits moved by
            # up to ~0.6 against one-token decoding (Qwen2.5-Coder 1.5B Q4_K_M), enough to flip greedy
            # near-ties. Without it every row is bit-identical, at ~1% of decode and ~5% of prefill speed.
            # An RPC server's device is unknown from here (often a CPU): off there too.
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        with backend.capture_log() as lines:
            ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            self.close()
            raise backend.load_error(f"cannot create a context for the {role} model {self.path}", lines)
        self._ctx = ctx
        self.n_threads = threads
        self.n_ctx = llama_cpp.llama_n_ctx(ctx)
        # llama.cpp caps a batch at the context it was asked for (and rounds the context up to 256): send it
        # batches of what it says it takes, or it aborts the process on an assert.
        self.n_batch = min(llama_cpp.llama_n_batch(ctx), llama_cpp.llama_n_ubatch(ctx))
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def set_threads(self, n: int) -> None:
        """Change the CPU threads decoding uses from now on (scripts/spec_ceiling.py splits the cores)."""
        if n != self.n_threads:
            llama_cpp.llama_set_n_threads(self._ctx, n, n)
            self.n_threads = n

    # ---- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:  # best effort; close() is the real API
        try:
            self.close()
        except Exception:
            pass

    # ---- vocabulary -----------------------------------------------------------------------------------
    def _vocab(self):
        # Every vocabulary call goes through here: after close() the pointer is freed memory (a segfault).
        if self._model is None:
            raise ModelFileError(f"the {self.role} model was closed")
        return self.vocab

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self._vocab(), data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self._vocab(), data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token prints as (control tokens print nothing)."""
        got = self._pieces.get(token)
        if got is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab(), token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab(), token, buf, -n, 0, False)
            got = buf.raw[:n]
            self._pieces[token] = got
        return got

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        got = self._eog.get(token)
        if got is None:
            got = bool(llama_cpp.llama_vocab_is_eog(self._vocab(), token))
            self._eog[token] = got
        return got

    def token_text(self, token: int) -> bytes:
        return llama_cpp.llama_vocab_get_text(self._vocab(), token) or b""

    def token_attr(self, token: int) -> int:
        """llama.cpp's attribute bits of a token (llama_token_attr: control, user-defined, lstrip, ...)."""
        return int(llama_cpp.llama_vocab_get_attr(self._vocab(), token))

    @property
    def bos(self) -> int:
        return llama_cpp.llama_vocab_bos(self._vocab())

    @property
    def eos(self) -> int:
        return llama_cpp.llama_vocab_eos(self._vocab())

    @property
    def add_bos(self) -> bool:
        return bool(llama_cpp.llama_vocab_get_add_bos(self._vocab()))

    @property
    def add_eos(self) -> bool:
        return bool(llama_cpp.llama_vocab_get_add_eos(self._vocab()))

    @property
    def vocab_type(self) -> int:
        return llama_cpp.llama_vocab_type(self._vocab())

    def chat_template(self) -> str | None:
        self._vocab()
        raw = llama_cpp.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    def metadata(self, key: str) -> str | None:
        self._vocab()
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, 256)
        if n < 0:
            return None
        if n >= 256:
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, n + 1)
        return buf.value.decode("utf-8", errors="replace")

    # ---- the KV cache ---------------------------------------------------------------------------------
    def eval(self, tokens: list[int], n_logits: int = 1) -> np.ndarray | None:
        """Append `tokens` to the cache. Returns the logits of the last `n_logits` of them as an
        (n_logits, n_vocab) float32 view, valid until the next eval."""
        if self._ctx is None:
            raise ModelFileError(f"the {self.role} model was closed")
        if not tokens:
            if n_logits:
                raise ValueError("eval: logits asked for with no tokens")
            return None
        if len(self.cached) + len(tokens) > self.n_ctx:
            raise PromptError(
                f"the {self.role} context is full ({self.n_ctx} tokens); use a larger --ctx-size"
            )
        if n_logits > self.n_batch:
            raise ValueError("eval: more logits than fit one batch")
        split = len(tokens) - n_logits
        # Tokens without logits go in full batches; the ones we need logits for go last, in one batch,
        # so all their rows are in llama.cpp's output buffer together.
        for start in range(0, split, self.n_batch):
            self._decode(tokens[start : min(split, start + self.n_batch)], 0)
        if n_logits:
            self._decode(tokens[split:], n_logits)
            ptr = llama_cpp.llama_get_logits(self._ctx)
            return np.ctypeslib.as_array(ptr, shape=(n_logits, self.n_vocab))
        # Without logits to read, a GPU may still be computing when llama_decode returns: wait, so the time this
        # call took is its own (the cost model times the prompt) and not the next step's. (An RPC server's
        # backend does not wait here: the engine does not time a remote prompt.)
        llama_cpp.llama_synchronize(self._ctx)
        return None

    def _decode(self, tokens: list[int], n_logits: int) -> None:
        # A KeyboardInterrupt can land between llama_decode returning and `cached` being extended; the
        # flag makes the next call drop whatever llama.cpp holds past `cached`, so the two never disagree.
        if self._stray:
            self._seq_rm(len(self.cached))
        b = self._batch
        n = len(tokens)
        pos0 = len(self.cached)
        first_logit = n - n_logits
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = i >= first_logit
        b.n_tokens = n
        self._stray = True
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            self._seq_rm(pos0)  # leave nothing half-written: the cache may hold part of the batch
            raise ModelFileError(f"llama_decode failed on the {self.role} model (code {rc})")
        self.cached.extend(tokens)
        self._stray = False
        self.n_evaluated += n
        backend.raise_if_interrupted()  # a Ctrl-C that llama.cpp's log callback caught during the batch

    def _seq_rm(self, keep: int) -> None:
        """Drop positions >= keep from llama.cpp's cache (and from `cached`, first, so that an interrupt
        in between leaves `cached` the shorter of the two, which the stray flag then repairs)."""
        del self.cached[keep:]
        self._stray = True
        if not llama_cpp.llama_memory_seq_rm(self._mem, 0, keep, -1):
            # Some caches (recurrent models) cannot drop a suffix: start over from nothing.
            self.cached.clear()
            llama_cpp.llama_memory_clear(self._mem, True)
        self._stray = False

    def truncate(self, n_keep: int) -> None:
        """Drop every cached token from position n_keep on (nothing to do once the model is closed)."""
        if self._ctx is None:
            return
        if n_keep < len(self.cached) or self._stray:
            self._seq_rm(n_keep)

    def common_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens` are already in the cache, from the start."""
        cached = self.cached
        if len(cached) <= len(tokens) and tokens[: len(cached)] == cached:
            return len(cached)  # the usual case, compared at C speed
        common = 0
        limit = min(len(tokens), len(cached))
        while common < limit and cached[common] == tokens[common]:
            common += 1
        return common

    def sync(self, tokens: list[int], n_logits: int = 1) -> np.ndarray | None:
        """Make the cache hold exactly `tokens`, evaluating only what is not already there, and return the
        logits of the last n_logits tokens (which are re-evaluated if they were cached already)."""
        common = min(self.common_prefix(tokens), len(tokens) - n_logits)
        self.truncate(common)
        return self.eval(tokens[len(self.cached) :], n_logits)

    def kv_pos_max(self) -> int:
        """Highest position llama.cpp holds for sequence 0 (-1 when empty): for consistency checks."""
        return llama_cpp.llama_memory_seq_pos_max(self._mem, 0)
