"""One GGUF model with its own llama.cpp context and KV cache, driven through the low-level API.

The class keeps, per sequence, the token ids whose keys/values are in the KV cache (`cached` is sequence 0's,
positions 0..len-1). Everything that changes the cache goes through `eval`/`decode_rows` (append) and
`truncate` (drop a suffix), so those lists and the real cache never disagree; `sync` brings a sequence's cache
to any token list by keeping the common prefix, which is what makes draft-KV reuse and multi-turn reuse fall
out of one mechanism.

Parallel sequences (`n_seq` > 1, what `dspark serve --parallel` batches): each one a llama.cpp seq id, with
`n_ctx` tokens of its own. `separate=True` gives each its own KV stream (llama.cpp's kv_unified off), so a
sequence's keys sit in the very cells, and its attention sums run in the very order, they would alone: what
keeps the target's logits bit-identical to a lone run whatever shares the batch. llama.cpp then splits a
batch into one pass per equal-length run of consecutive sequences, so `decode_rows` callers give every
sequence of a consecutive range the same number of rows. The draft, whose numerics never change the output,
shares one pool (`separate=False`) and takes any mix of rows in one pass.
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
        n_seq: int = 1,
        separate: bool = True,
    ):
        """devices: the ggml devices to offload to (None: llama.cpp's choice, this machine's GPUs); remote: some
        of them are RPC servers; tensor_split: each device's share of the layers, in the order of devices.
        n_seq: sequences held at once, each with n_ctx tokens; separate: each in its own KV stream (see above)."""
        self.path = check_gguf_file(path, role).path
        self.role = role
        self.remote = remote
        self.n_seq = n_seq
        self.separate = separate and n_seq > 1  # each sequence in a KV stream of its own (llama.cpp's kv_unified off)
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
        self.seq_cached: list[list[int]] = [[] for _ in range(self.n_seq)]  # per sequence: the ids in its cache
        # ... and per cached token, whether a prompt batch (more than EXACT_BATCH_MAX rows: llama.cpp's fast
        # kernels) computed its keys and values, or a verify-sized one (dspark's exact kernels). See prompt_plan.
        self.seq_fast: list[list[bool]] = [[] for _ in range(self.n_seq)]
        self._stray: set[int] = set()  # sequences where llama.cpp may hold positions past seq_cached (see _decode)
        self.n_evaluated = 0  # tokens ever run through this model: a cost counter for stats
        self.on_cpu = n_gpu_layers == 0  # everything runs on this machine's CPU
        # A target on dspark's exact kernels keeps its prompts' keys and values as a fresh run computes them
        # (prompt_plan); a draft's numerics never reach the output, and elsewhere nothing is proven exact.
        self.canonical = role == "target" and (self.on_cpu or self.remote) and not kernels.fast_kernels()
        self.n_threads = 0
        if vocab_only:
            self.n_ctx = 0
            self.n_batch = 0
            return

        threads = n_threads or backend.default_threads()
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx * self.n_seq
        cparams.n_seq_max = self.n_seq
        cparams.kv_unified = not self.separate
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
        # Tokens one sequence may hold: its own stream's, or its share of a pool.
        self.n_ctx = llama_cpp.llama_n_ctx(ctx) // self.n_seq if cparams.kv_unified else llama_cpp.llama_n_ctx_seq(ctx)
        # llama.cpp caps a batch at the context it was asked for (and rounds the context up to 256): send it
        # batches of what it says it takes, or it aborts the process on an assert.
        self.n_batch = min(llama_cpp.llama_n_batch(ctx), llama_cpp.llama_n_ubatch(ctx))
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    @property
    def cached(self) -> list[int]:
        """Sequence 0's cached ids (the one sequence of a Model that is not parallel)."""
        return self.seq_cached[0]

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
    def eval(self, tokens: list[int], n_logits: int = 1, seq: int = 0) -> np.ndarray | None:
        """Append `tokens` to sequence `seq`'s cache. Returns the logits of the last `n_logits` of them as an
        (n_logits, n_vocab) float32 view, valid until the next eval."""
        if self._ctx is None:
            raise ModelFileError(f"the {self.role} model was closed")
        if not tokens:
            if n_logits:
                raise ValueError("eval: logits asked for with no tokens")
            return None
        if len(self.seq_cached[seq]) + len(tokens) > self.n_ctx:
            raise PromptError(
                f"the {self.role} context is full ({self.n_ctx} tokens); use a larger --ctx-size"
            )
        if n_logits > self.n_batch:
            raise ValueError("eval: more logits than fit one batch")
        split = len(tokens) - n_logits
        # Tokens without logits go in full batches; the ones we need logits for go last, in one batch,
        # so all their rows are in llama.cpp's output buffer together.
        for start in range(0, split, self.n_batch):
            chunk = tokens[start : min(split, start + self.n_batch)]
            self._decode([(seq, chunk, 0)])
        if n_logits:
            self._decode([(seq, tokens[split:], n_logits)])
            ptr = llama_cpp.llama_get_logits(self._ctx)
            return np.ctypeslib.as_array(ptr, shape=(n_logits, self.n_vocab))
        # Without logits to read, a GPU may still be computing when llama_decode returns: wait, so the time this
        # call took is its own (the cost model times the prompt) and not the next step's. (An RPC server's
        # backend does not wait here: the engine does not time a remote prompt.)
        llama_cpp.llama_synchronize(self._ctx)
        return None

    def decode_rows(self, parts: list[tuple[int, list[int], int]]) -> np.ndarray:
        """One batch over several sequences: parts are (seq, tokens appended to it, rows with logits); a part's
        logit rows are its FIRST ones when n > 0 and its last -n when n < 0 (a draft's catch-up then its newest
        token). Returns the logit rows of all parts in order, an (n, n_vocab) view valid until the next decode."""
        if self._ctx is None:
            raise ModelFileError(f"the {self.role} model was closed")
        if sum(len(t) for _, t, _ in parts) > self.n_batch:
            raise ValueError("decode_rows: more rows than fit one batch")
        for seq, tokens, _ in parts:
            if len(self.seq_cached[seq]) + len(tokens) > self.n_ctx:
                raise PromptError(f"the {self.role} context is full ({self.n_ctx} tokens); use a larger --ctx-size")
        n_out = self._decode(parts)
        ptr = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))

    def _decode(self, parts: list[tuple[int, list[int], int]]) -> int:
        """llama_decode over parts (seq, tokens, logit rows: first n if n >= 0, last -n if n < 0); returns the
        logit rows. A KeyboardInterrupt can land between llama_decode returning and the cached lists being
        extended; the stray set makes the next call drop whatever llama.cpp holds past them, so the two never
        disagree."""
        for seq in list(self._stray):
            self._seq_rm(len(self.seq_cached[seq]), seq)
        b = self._batch
        i = n_out = 0
        starts = []
        for seq, tokens, n_logits in parts:
            pos0 = len(self.seq_cached[seq])
            starts.append(pos0)
            lo, hi = (0, n_logits) if n_logits >= 0 else (len(tokens) + n_logits, len(tokens))
            for j, t in enumerate(tokens):
                b.token[i] = t
                b.pos[i] = pos0 + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = lo <= j < hi
                i += 1
            n_out += hi - lo
            self._stray.add(seq)
        b.n_tokens = i
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            for (seq, _, _), pos0 in zip(parts, starts):
                self._seq_rm(pos0, seq)  # leave nothing half-written: the cache may hold part of the batch
            raise ModelFileError(f"llama_decode failed on the {self.role} model (code {rc})")
        fast = i > kernels.EXACT_BATCH_MAX
        for seq, tokens, _ in parts:
            self.seq_cached[seq].extend(tokens)
            self.seq_fast[seq].extend([fast] * len(tokens))
            self._stray.discard(seq)
        self.n_evaluated += i
        backend.raise_if_interrupted()  # a Ctrl-C that llama.cpp's log callback caught during the batch
        return n_out

    def _seq_rm(self, keep: int, seq: int = 0) -> None:
        """Drop positions >= keep of sequence `seq` from llama.cpp's cache (and from its cached list, first, so
        that an interrupt in between leaves the list the shorter of the two, which the stray set then repairs)."""
        del self.seq_cached[seq][keep:]
        del self.seq_fast[seq][keep:]
        self._stray.add(seq)
        if not llama_cpp.llama_memory_seq_rm(self._mem, seq, keep, -1):
            # Some caches (recurrent models) cannot drop a suffix: start over from nothing.
            self.seq_cached[seq].clear()
            self.seq_fast[seq].clear()
            llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._stray.discard(seq)

    def truncate(self, n_keep: int, seq: int = 0) -> None:
        """Drop every cached token of sequence `seq` from position n_keep on (nothing to do once the model is
        closed)."""
        if self._ctx is None:
            return
        if n_keep < len(self.seq_cached[seq]) or seq in self._stray:
            self._seq_rm(n_keep, seq)

    def common_prefix(self, tokens: list[int], seq: int = 0) -> int:
        """How many of `tokens` are already in sequence `seq`'s cache, from the start."""
        cached = self.seq_cached[seq]
        if len(cached) <= len(tokens) and tokens[: len(cached)] == cached:
            return len(cached)  # the usual case, compared at C speed
        common = 0
        limit = min(len(tokens), len(cached))
        while common < limit and cached[common] == tokens[common]:
            common += 1
        return common

    def sync(self, tokens: list[int], n_logits: int = 1, seq: int = 0) -> np.ndarray | None:
        """Make sequence `seq`'s cache hold exactly `tokens`, evaluating only what is not already there, and
        return the logits of the last n_logits tokens (which are re-evaluated if they were cached already).
        With no logits wanted, `tokens` is a prompt: it is brought in as prompt_plan says."""
        if n_logits == 0:
            keep, batches = self.prompt_plan(tokens, seq)
            self.truncate(keep, seq)
            for size in batches:
                done = len(self.seq_cached[seq])
                self.eval(tokens[done : done + size], 0, seq)
            return None
        common = min(self.common_prefix(tokens, seq), len(tokens) - n_logits)
        self.truncate(common, seq)
        return self.eval(tokens[len(self.seq_cached[seq]) :], n_logits, seq)

    def prompt_plan(self, tokens: list[int], seq: int = 0) -> tuple[int, list[int]]:
        """How to bring sequence `seq`'s cache to the prompt `tokens`: (cached tokens kept, then the sizes of the
        batches that process the rest).

        A canonical target keeps every prompt token's keys and values exactly as a fresh run computes them. A
        fresh run processes a prompt in n_batch chunks from its start: through llama.cpp's fast batch kernels,
        but for a last chunk of EXACT_BATCH_MAX tokens or fewer, which takes dspark's exact ones; and the two
        round differently (keys up to ~0.4 apart on the real pair, enough to flip a greedy near-tie). So a
        cached prefix is kept only as far as each of its tokens went through the kind of batch a fresh run would
        use for it (a previous answer's tokens, computed by verify batches, are not: a resent conversation
        processes them again, unless the server re-processed them while idle, see engine/batch.py), and the rest
        is cut into batches of the same kinds, never into a fast-kernel chunk too small to take them. Any other
        model keeps its whole common prefix and processes the rest in n_batch chunks."""
        keep = self._keepable(tokens, seq)
        n, size = len(tokens), self.n_batch
        if not self.canonical:
            return keep, [min(size, n - i) for i in range(keep, n, size)]
        fast_end = self._fast_end(n)
        batches = []
        if fast_end > keep:
            count = -(-(fast_end - keep) // size)
            share, extra = divmod(fast_end - keep, count)
            batches = [share + (1 if j < extra else 0) for j in range(count)]  # each > EXACT_BATCH_MAX, <= n_batch
        if n > max(keep, fast_end):
            batches.append(n - max(keep, fast_end))  # the exact-kernel tail, as a fresh run makes it
        return keep, batches

    def _fast_end(self, n: int) -> int:
        """A fresh run of an n-token prompt computes tokens [0, fast_end) with the fast kernels (prompt_plan)."""
        rem = n % self.n_batch
        return n - rem if 0 < rem <= kernels.EXACT_BATCH_MAX else n

    def _keepable(self, tokens: list[int], seq: int) -> int:
        """How many of `tokens` sequence `seq`'s cache holds as a fresh run of them would compute them
        (prompt_plan)."""
        common = self.common_prefix(tokens, seq)
        if not self.canonical:
            return common
        fast_end = self._fast_end(len(tokens))
        flags = self.seq_fast[seq]
        keep = next((i for i in range(common) if flags[i] != (i < fast_end)), common)
        if 0 < fast_end - keep <= kernels.EXACT_BATCH_MAX:  # too few to make a fast batch: take some kept along
            keep = max(0, fast_end - kernels.EXACT_BATCH_MAX - 1)
        return keep

    def keeps(self, tokens: list[int]) -> list[int]:
        """Per sequence, how many of `tokens` its cache keeps (prompt_plan's keep, were `tokens` its prompt)."""
        return [self._keepable(tokens, s) for s in range(self.n_seq)]

    def donor(self, tokens: list[int], seq: int) -> tuple[int, int]:
        """The other sequence whose cache keeps the most of `tokens` (as prompt_plan would keep them for a
        sequence holding its cache) and how many: (-1, 0) when none keeps more than `seq`'s own cache."""
        keeps = self.keeps(tokens)
        best = max((s for s in range(self.n_seq) if s != seq), key=keeps.__getitem__, default=-1)
        return (best, keeps[best]) if best >= 0 and keeps[best] > keeps[seq] else (-1, 0)

    def copy_prefix(self, donor: int, seq: int, n_keep: int) -> None:
        """Make sequence `seq`'s cache the first n_keep tokens of sequence `donor`'s (what it held is dropped).
        A shared pool only tags the donor's cells with `seq`; separate streams copy the donor's whole stream
        (llama.cpp copies a stream only whole, at the start of the next llama_decode), then drop what lies past
        n_keep. Either way the kept keys sit in the cells, in the order, the donor's do: where a fresh run of a
        prompt with that prefix would put them, so the attention sums run as they would alone (module
        docstring)."""
        if self._ctx is None:
            raise ModelFileError(f"the {self.role} model was closed")
        n_keep = min(n_keep, len(self.seq_cached[donor]))
        self._stray.add(seq)
        llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
        llama_cpp.llama_memory_seq_cp(self._mem, donor, seq, -1, -1)
        self.seq_cached[seq] = self.seq_cached[donor][:n_keep]
        self.seq_fast[seq] = self.seq_fast[donor][:n_keep]
        self._seq_rm(n_keep, seq)

    def settle(self, seq: int = 0) -> int:
        """Re-process, as a prompt batch, the cached tokens a fresh run would have computed with the fast kernels
        but this cache has from verify batches (an answer's): then a next prompt extending the cache (a resent
        conversation) keeps all of it. At most one batch; returns the tokens processed (0: nothing to do)."""
        if not self.canonical:
            return 0
        flags = self.seq_fast[seq]
        first = next((i for i, f in enumerate(flags) if not f), len(flags))
        end = len(flags)
        if end - first < 1 or end <= kernels.EXACT_BATCH_MAX:
            return 0
        start = max(0, min(first, end - kernels.EXACT_BATCH_MAX - 1))  # a fast batch: more than EXACT_BATCH_MAX
        stop = min(end, start + self.n_batch)  # one batch; the cache lets go of what lies past it
        tokens = self.seq_cached[seq][start:stop]
        self.truncate(start, seq)
        self.eval(tokens, 0, seq)
        return stop - start

    def kv_pos_max(self, seq: int = 0) -> int:
        """Highest position llama.cpp holds for sequence `seq` (-1 when empty): for consistency checks."""
        return llama_cpp.llama_memory_seq_pos_max(self._mem, seq)
