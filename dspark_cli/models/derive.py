"""The draft at its fastest: a copy re-encoded in a layout this build decodes faster, derived once and cached.

A draft model never changes the output (the target verifies every token), only the speed, so it may use any
layout. Small models are often stored in types the CPU decodes slowly: Qwen2.5-0.5B's "Q4_K_M" file is mostly
Q5_0/Q8_0 inside (its 896-wide rows do not fit K-quant blocks), and requantized to Q4_0 (served by llama.cpp's
repacked Q4_0 kernels) it steps ~1.5x faster on a CPU. Nothing here is assumed: the first time a draft file
meets a build, each candidate layout is made with llama.cpp's quantizer and measured against the file itself,
interleaved:
- a draft step's time (one-token decodes after a short prompt, the median);
- agreement with the target (teacher-forced on a calibration text: how often the draft's top token is the
  target's), which a smaller output head may lower;
- and with the target's own one- and five-token step times, the speed speculation would reach with each
  (Leviathan's E(alpha, k) over k draft steps and a k+1 verify, the best k), so a faster draft that agrees less
  is taken only when the whole wins by DERIVE_MARGIN.
The verdict (and the winner's file) is kept in dspark's cache, keyed by the source's content and the build: a
changed source or another build derives again; `--draft-as-is` skips all of it.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from ..console import say
from ..errors import DsparkError, OutputError
from ..files import fingerprint, locked, write_atomic

DERIVE_MARGIN = 1.05  # how much faster speculation must be predicted with a derived draft for it to be used
STEPS = 12  # one-token draft steps timed per candidate and round
CALIBRATION_TOKENS = 192  # the most of the calibration text used (the candidates load with a 256-token context)
ROUNDS = 3  # rounds of timing, candidates interleaved
# A calibration text the target sees teacher-forced: code and prose, what users ask a small draft to write.
CALIBRATION = (
    "def moving_average(values, window):\n"
    "    \"\"\"Return the averages of each run of `window` consecutive values.\"\"\"\n"
    "    if window <= 0:\n"
    "        raise ValueError(\"window must be positive\")\n"
    "    out = []\n"
    "    for i in range(len(values) - window + 1):\n"
    "        out.append(sum(values[i:i + window]) / window)\n"
    "    return out\n\n"
    "The function above walks over the list once per window. A faster version keeps a running total: it adds "
    "the value entering the window and subtracts the one leaving it, so each step costs the same however wide "
    "the window is. This matters when the list is long, for example when smoothing a year of sensor readings."
)


def derived_dir() -> Path:
    """$DSPARK_DERIVED, else the cache's derived/ folder ($DSPARK_CACHE or ~/.cache/dspark)."""
    from ..places import cache_dir

    return cache_dir("derived", "DSPARK_DERIVED")


def _candidates():
    """(name, llama.cpp file type, output-head and embedding type or None: the quantizer's own choice)."""
    import llama_cpp

    return (("q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, None),
            ("q4_0-head", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, llama_cpp.GGML_TYPE_Q4_0))


def fastest_draft(source: Path, target, *, threads: int | None, quiet: bool = False,
                  directory: Path | None = None) -> Path:
    """The draft file to load: a cached derived copy when one was measured faster here, else `source`. Derives and
    measures the first time (seconds, once per source file and build); any failure keeps `source`."""
    from ..llama.machine import build_id

    folder = directory or derived_dir()
    stem = f"{fingerprint(source)}-{build_id()}"
    known = _known(folder, stem, source)
    if known is not None:
        return known
    try:
        with locked(folder):  # another dspark may be deriving it right now: wait, then take its verdict
            known = _known(folder, stem, source)
            return known if known is not None else _measure(source, target, folder, stem, threads, quiet)
    except OSError as e:  # no cache folder to write in: the file as it is
        if not quiet:
            say(f"draft {source.name}: kept as it is (cannot write in {folder}: {e.strerror or e})")
        return source


def stored_verdict(source: Path, directory: Path | None = None) -> tuple[dict | None, Path]:
    """The verdict on `source` for this build (what `doctor` shows; None when it was never measured) and the file
    a load uses for it (the derived copy, or `source`)."""
    from ..llama.machine import build_id

    folder = directory or derived_dir()
    stem = f"{fingerprint(source)}-{build_id()}"
    return _read_verdict(folder / f"{stem}.json"), _known(folder, stem, source) or source


def _known(folder: Path, stem: str, source: Path) -> Path | None:
    """The file a stored verdict names (the source, or its derived copy), None without a usable verdict."""
    verdict = _read_verdict(folder / f"{stem}.json")
    if verdict is None:
        return None
    choice = verdict.get("choice")
    if choice is None:
        return source
    path = folder / f"{stem}-{choice}.gguf"
    return path if path.is_file() else None


def _measure(source: Path, target, folder: Path, stem: str, threads: int | None, quiet: bool) -> Path:
    from ..llama.model import Model
    from ..llama.vocab import pairing_problem

    # A draft of another vocabulary drafts through text (engine/through_text.py): its agreement with the target
    # cannot be measured token for token, so it is kept as it is, and no verdict is kept (with a target of its
    # own vocabulary the same file is measured as usual).
    vocab = Model(source, role="draft", vocab_only=True)
    try:
        if pairing_problem(target, vocab) is not None:
            return source
    finally:
        vocab.close()
    verdict_path = folder / f"{stem}.json"
    if not quiet:
        say(f"measuring whether a re-encoded copy of the draft {source.name} runs faster on this build (once)")
    try:
        verdict = _derive(source, target, folder, stem, threads)
    except DsparkError as e:  # a layout the quantizer refuses, a full disk: the file as it is, said once
        verdict = {"choice": None, "why": e.message}
    except OSError as e:
        verdict = {"choice": None, "why": e.strerror or str(e)}
    except Exception as e:  # noqa: BLE001 - a faster draft is an extra: whatever failed, the file itself loads
        verdict = {"choice": None, "why": f"measuring failed: {type(e).__name__}: {e}"}
    verdict["source"] = {"path": str(source.resolve()), "fingerprint": stem.split("-")[0]}
    try:
        write_atomic(verdict_path, json.dumps(verdict, indent=1) + "\n", make_dirs=True)
    except OutputError:
        pass  # measured again next time
    _forget_older(folder, stem, verdict["source"]["path"])
    choice = verdict["choice"]
    if not quiet:
        say(_verdict_line(source, verdict))
    return folder / f"{stem}-{choice}.gguf" if choice else source


KEEP_BUILDS = 3  # verdicts (and copies) kept per draft file: builds a user switches between, e.g. a CPU and a GPU venv


def _forget_older(folder: Path, stem: str, source_path: str) -> None:
    """Remove the verdicts and copies made from an earlier content of the same source file, and those of other
    builds beyond the KEEP_BUILDS - 1 measured most recently: derived files are hundreds of MB, but a build switched
    back to should not measure again."""
    fingerprint_now = stem.split("-")[0]
    others = []
    for other in folder.glob("*.json"):
        data = _read_verdict(other) if other.stem != stem else None
        if data is None or (data.get("source") or {}).get("path") != source_path:
            continue
        if other.stem.split("-")[0] == fingerprint_now:
            others.append(other)
        else:
            _remove(folder, other)
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for other in others[KEEP_BUILDS - 1:]:
        _remove(folder, other)


def _remove(folder: Path, verdict: Path) -> None:
    for copy in folder.glob(f"{verdict.stem}-*.gguf"):
        copy.unlink(missing_ok=True)
    verdict.unlink(missing_ok=True)


def _verdict_line(source: Path, verdict: dict) -> str:
    choice, figures = verdict["choice"], verdict.get("figures", {})
    if choice is None:
        why = verdict.get("why") or "no re-encoded copy was faster here"
        return f"draft {source.name}: kept as it is ({why})"
    mine, orig = figures[choice], figures["as-is"]
    return (f"draft {source.name}: using a {choice} copy derived for this build ({orig['step_ms'] / mine['step_ms']:.2f}x "
            f"faster steps, {mine['agreement']:.0%} agreement with the target against {orig['agreement']:.0%}, "
            f"predicted {mine['rate'] / orig['rate']:.2f}x the speed with speculation); --draft-as-is uses the file")


def _read_verdict(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not (data.get("choice") is None or isinstance(data.get("choice"), str)):
        return None
    return data


def _derive(source: Path, target, folder: Path, stem: str, threads: int | None) -> dict:
    from ..llama.model import Model
    from ..llama.quantize import requantize

    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    for name, ftype, head in _candidates():
        dest = folder / f"{stem}-{name}.gguf"
        requantize(source, dest, ftype, what=f"a {name} copy of the draft", head_type=head)
        made[name] = dest
    try:
        # At most one batch of logits, and room in the candidates' small contexts (a byte-level vocabulary makes
        # many tokens of the text).
        text = target.tokenize(CALIBRATION, add_special=False)[:min(CALIBRATION_TOKENS, target.n_batch, target.n_ctx - 1)]
        if len(text) < 48:
            raise DsparkError(f"the calibration text is only {len(text)} tokens for this target")
        target.truncate(0)
        rows = target.sync(text, n_logits=len(text))
        wanted = [int(r.argmax()) for r in rows[:-1]]  # the target's pick after each prefix
        target.truncate(0)
        v1, v5 = _target_steps(target, text)
        models = {"as-is": source, **made}
        loaded = {name: Model(path, role="draft", n_ctx=256, n_threads=threads) for name, path in models.items()}
        try:
            figures = {name: {"agreement": _agreement(m, text, wanted)} for name, m in loaded.items()}
            times: dict[str, list[float]] = {name: [] for name in loaded}
            order = list(loaded)
            for r in range(ROUNDS):
                for name in (order if r % 2 == 0 else order[::-1]):
                    times[name].append(_step_seconds(loaded[name], text))
        finally:
            for m in loaded.values():
                m.close()
        for name, f in figures.items():
            f["step_ms"] = statistics.median(times[name]) * 1000
            f["rate"] = _rate(f["agreement"], f["step_ms"] / 1000, v1, v5)
        best = max(figures, key=lambda n: figures[n]["rate"])
        choice = best if best != "as-is" and figures[best]["rate"] >= DERIVE_MARGIN * figures["as-is"]["rate"] else None
    except BaseException:
        for path in made.values():
            path.unlink(missing_ok=True)
        raise
    for name, path in made.items():
        if name != choice:
            path.unlink(missing_ok=True)
    return {"choice": choice, "figures": figures, "target_step_ms": [v1 * 1000, v5 * 1000], "measured": time.time()}


def _agreement(model, text: list[int], wanted: list[int]) -> float:
    model.truncate(0)
    rows = model.sync(text, n_logits=len(text))
    picks = [int(r.argmax()) for r in rows[:-1]]
    model.truncate(0)
    return sum(a == b for a, b in zip(picks, wanted)) / max(1, len(wanted))


def _step_seconds(model, text: list[int]) -> float:
    """The median one-token decode after a 32-token prompt."""
    model.truncate(0)
    model.sync(text[:32], n_logits=1)
    out = []
    for i in range(32, 32 + STEPS):
        t0 = time.perf_counter()
        model.sync(text[: i + 1], n_logits=1)
        out.append(time.perf_counter() - t0)
    model.truncate(0)
    return statistics.median(out)


def _target_steps(target, text: list[int]) -> tuple[float, float]:
    """The target's one-token step and five-token verify, medians of a few."""
    target.truncate(0)
    target.sync(text[:32], n_logits=1)
    ones, fives = [], []
    for i in range(4):
        t0 = time.perf_counter()
        target.sync(text[:33], n_logits=1)
        ones.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        target.sync(text[:38], n_logits=5)
        fives.append(time.perf_counter() - t0)
        target.truncate(32)
    target.truncate(0)
    return statistics.median(ones), statistics.median(fives)


def _rate(alpha: float, d: float, v1: float, v5: float) -> float:
    """Tokens per second of speculation at the best draft length, acceptance alpha per token (Leviathan). Plain
    steps are left out: a draft is judged by what drafting with it brings, even where that is below them."""
    slope = max(0.0, (v5 - v1) / 4)
    best = 0.0
    for k in range(1, 9):
        e = (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1.0
        best = max(best, e / (k * d + v1 + slope * k))
    return best
