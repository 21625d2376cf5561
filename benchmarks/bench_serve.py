"""Serving benchmark: TTFT / inter-token latency p50/p99 and aggregate tokens/s through `mimoflash serve` at 1, 8 and
32 concurrent streams, beside the engine's own offline throughput (`LLM.generate`, same prompts, same concurrency)
and, with --with-transformers, `transformers serve` (with and without `--continuous-batching`) on the same
checkpoint, prompts and clients.

    .venv/bin/python benchmarks/bench_serve.py                     # shipped model, 1/8/32 streams
    .venv/bin/python benchmarks/bench_serve.py --mtp 2             # also the server with MTP
    .venv/bin/python benchmarks/bench_serve.py --stream-interval 4 # also the server sending >= 4 tokens per chunk
    .venv/bin/python benchmarks/bench_serve.py --with-transformers # also `transformers serve` where it works

Seeded prompts (the shipped model's sample prompts, varied), greedy, `ignore_eos` so every request generates
exactly --max-tokens. Rounds are interleaved (offline, server, server+MTP per concurrency, --repeats times) and
medians are reported. Prints a table and ends with ONE JSON line. Not run in CI.

The clients: all streams of a round are coroutines in this one process (one asyncio loop), each a streaming
`POST /v1/completions` that reads the SSE lines and parses every `data:` chunk as JSON (`--client aiohttp`, the
default, parses HTTP in C; `--client httpx` is pure Python and costs about three times the CPU per chunk). They run
on the same machine as the server, so their CPU time is taken from it; `LLM.generate` has no client at all.

Per round the table also gives the CPU seconds used by each process: the engine (the server's engine process, or
`LLM.generate` in this process), the server process (HTTP, JSON, SSE; a server without an engine process counts
everything here) and the clients (this process while the streams run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

# The same OpenMP wait policy as `mimoflash serve` (mimoflash/cli.py): the offline engine in this process and the
# server's engine process then wait alike; with spinning waits the offline figures collapse on a busy machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, timeout: float = 180) -> subprocess.Popen:
    """Start a server; -> its process once `url` answers. Its stderr goes to a temporary file (`proc.log`)."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    proc.log = log
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not start")


def prompts(n: int, seed: int) -> list[str]:
    from mimoflash.default import SAMPLE_PROMPTS
    import random
    rng = random.Random(seed)
    return [SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)] + " " * rng.randint(0, 2) for i in range(n)]


class StreamStats:
    """One stream's SSE lines -> arrival times of chunks with text, the usage's token count, a server-side error."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.times: list[float] = []
        self.tokens: int | None = None
        self.error: str | None = None

    def line(self, line: bytes) -> None:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            return
        chunk = json.loads(line[6:])
        if chunk.get("error"):
            self.error = str(chunk["error"])
        if chunk.get("choices") and (chunk["choices"][0].get("text") or chunk["choices"][0].get("delta")):
            self.times.append(time.perf_counter())
        if chunk.get("usage"):
            self.tokens = chunk["usage"]["completion_tokens"]

    def result(self) -> dict:
        # Tokens from usage where the server reports it (a chunk may carry several tokens), else one per chunk.
        t = self.times
        return {"ttft": t[0] - self.t0 if t else None, "itl": [b - a for a, b in zip(t, t[1:])],
                "tokens": self.tokens if self.tokens is not None else len(t), "error": self.error}


def request_body(model: str, prompt: str, max_tokens: int, extra: dict) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}


async def stream_aiohttp(session, url: str, body: dict) -> dict:
    st = StreamStats()
    async with session.post(url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.content:
            st.line(line)
    return st.result()


async def stream_httpx(client, url: str, body: dict) -> dict:
    st = StreamStats()
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            st.line(line.encode())
    return st.result()


async def http_round(url: str, model: str, ps: list[str], max_tokens: int, extra: dict,
                     client: str = "aiohttp") -> dict:
    """All streams at once, one connection each: -> aggregate tokens/s over the round's wall time, TTFTs, ITLs."""
    if client == "aiohttp":
        import aiohttp
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                        timeout=aiohttp.ClientTimeout(total=600))
        one = stream_aiohttp
    else:
        session = httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None))
        one = stream_httpx
    async with session:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(session, url, request_body(model, p, max_tokens, extra)) for p in ps))
        wall = time.perf_counter() - t0
    errors = [r["error"] for r in res if r["error"]]
    if errors:
        raise RuntimeError(f"the server streamed an error: {errors[0]}")
    ttft = [r["ttft"] for r in res if r["ttft"] is not None]
    itl = [x for r in res for x in r["itl"]]
    return {"tok_s": sum(r["tokens"] for r in res) / wall, "ttft": ttft, "itl": itl}


def process_cpu(pid: int) -> float:
    """CPU seconds process `pid` has run so far, all its threads (the scheduler's nanosecond counts: /proc/PID/stat
    counts in 10 ms ticks, too coarse for a round). Threads that ended are not counted."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(open(f"/proc/{pid}/task/{tid}/schedstat").read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def own_cpu() -> float:
    return process_cpu(os.getpid())


def engine_child(pid: int) -> int | None:
    """The engine process `mimoflash serve` started (multiprocessing's spawn child), or None."""
    try:
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        return None
    for child in children:
        if b"spawn_main" in open(f"/proc/{child}/cmdline", "rb").read():
            return int(child)
    return None


def measured(fn, pids: dict[str, int]) -> dict:
    """Run one round -> its result with `cpu`: CPU seconds of each process in `pids` and of this one ("client":
    the HTTP clients, or the offline engine itself) over the round."""
    before = {k: process_cpu(p) for k, p in pids.items()}
    c0 = own_cpu()
    r = fn()
    r["cpu"] = {k: process_cpu(p) - before[k] for k, p in pids.items()}
    r["cpu"]["client"] = own_cpu() - c0
    return r


def offline_round(llm, ps: list[str], max_tokens: int) -> dict:
    from mimoflash import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(ps, sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    return {"tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / wall,
            "ttft": [o.metrics.time_to_first_token for o in outs], "itl": []}


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mtp", type=int, default=None, help="also run the server with MTP K")
    ap.add_argument("--stream-interval", type=int, default=None, metavar="N",
                    help="also run the server with --stream-interval N (at least N tokens per chunk)")
    ap.add_argument("--with-transformers", action="store_true",
                    help="also `transformers serve`, with and without --continuous-batching (same prompts, clients)")
    ap.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp", help="HTTP client of the streams")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from mimoflash import LLM
    from mimoflash.default import default_model
    path = a.model or default_model()
    conc = [int(c) for c in a.concurrency.split(",")]
    max_seqs = max(conc)
    llm = LLM(path, max_num_seqs=max_seqs, progress=False)

    servers = {}
    failed: dict[str, str] = {}                      # system -> the error that kept it out of the table
    procs = []
    py = sys.executable
    port = free_port()
    procs.append(start([py, "-m", "mimoflash", "serve", path, "--port", str(port), "--max-num-seqs", str(max_seqs),
                        "--served-model-name", "m", "--log-level", "warning"], f"http://127.0.0.1:{port}/health"))
    servers["server"] = (f"http://127.0.0.1:{port}", "m", {"ignore_eos": True})
    owner = {"server": procs[-1]}                    # system -> its server process
    if a.mtp:
        port = free_port()
        procs.append(start([py, "-m", "mimoflash", "serve", path, "--port", str(port), "--max-num-seqs",
                            str(max_seqs), "--served-model-name", "m", "--mtp", str(a.mtp), "--log-level", "warning"],
                           f"http://127.0.0.1:{port}/health"))
        servers[f"server+mtp{a.mtp}"] = (f"http://127.0.0.1:{port}", "m", {"ignore_eos": True})
        owner[f"server+mtp{a.mtp}"] = procs[-1]
    if a.stream_interval:
        port = free_port()
        procs.append(start([py, "-m", "mimoflash", "serve", path, "--port", str(port), "--max-num-seqs",
                            str(max_seqs), "--served-model-name", "m", "--stream-interval", str(a.stream_interval),
                            "--log-level", "warning"], f"http://127.0.0.1:{port}/health"))
        servers[f"server si={a.stream_interval}"] = (f"http://127.0.0.1:{port}", "m", {"ignore_eos": True})
        owner[f"server si={a.stream_interval}"] = procs[-1]
    if a.with_transformers:
        exe = os.path.join(os.path.dirname(py), "transformers")
        for name, flags in (("transformers serve", []), ("transformers serve --cb", ["--continuous-batching"])):
            port = free_port()
            try:
                proc = start([exe, "serve", path, "--host", "127.0.0.1", "--port", str(port), "--log-level",
                              "warning", *flags], f"http://127.0.0.1:{port}/health", timeout=300)
            except Exception as e:                   # noqa: BLE001 -- report and go on without it
                failed[name] = f"did not start: {e}"
                continue
            procs.append(proc)
            url = f"http://127.0.0.1:{port}"
            try:                                     # a probe: does it generate at all?
                r = asyncio.run(asyncio.wait_for(http_round(url, path, ["def add(a, b):"], 4, {}, a.client), 120))
                if r["tok_s"] <= 0:
                    raise RuntimeError("no tokens streamed")
                servers[name] = (url, path, {})
                owner[name] = proc
            except Exception as e:                   # noqa: BLE001
                failed[name] = _last_error_line(proc) or str(e)
                procs.remove(proc)                   # stopped now: it may hold a large cache
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    for name, why in failed.items():
        print(f"{name}: failed: {why}", file=sys.stderr)
    pids = {}                                        # system -> {"server": pid, "engine": pid of its engine process}
    for name, proc in owner.items():
        pids[name] = {"server": proc.pid}
        child = engine_child(proc.pid)
        if child is not None:
            pids[name]["engine"] = child
    rows = []
    try:
        for c in conc:
            ps = prompts(c, a.seed + c)
            asyncio.run(http_round(servers["server"][0], "m", ps[:1], 4, {"ignore_eos": True}, a.client))  # warm
            offline_round(llm, ps[:1], 4)
            runs: dict[str, list[dict]] = {}
            for _ in range(a.repeats):                                   # interleaved
                runs.setdefault("offline LLM.generate", []).append(
                    measured(lambda: offline_round(llm, ps, a.max_tokens), {}))
                for name, (url, model, extra) in servers.items():
                    runs.setdefault(name, []).append(measured(
                        lambda: asyncio.run(http_round(url, model, ps, a.max_tokens, extra, a.client)), pids[name]))
            base = statistics.median(r["tok_s"] for r in runs["offline LLM.generate"])
            for name, rs in runs.items():
                tok_s = statistics.median(r["tok_s"] for r in rs)
                ttft = [x for r in rs for x in r["ttft"] if x is not None]
                itl = [x for r in rs for x in r["itl"]]
                cpu = {k: round(statistics.median(r["cpu"][k] for r in rs), 3) for k in rs[0]["cpu"]}
                if name == "offline LLM.generate":
                    cpu = {"engine": cpu["client"]}
                rows.append({"concurrency": c, "system": name, "tok_s": round(tok_s, 1), "cpu_s": cpu,
                             "vs_offline": round(tok_s / base, 3),
                             "ttft_p50_ms": _ms(pct(ttft, 50)), "ttft_p99_ms": _ms(pct(ttft, 99)),
                             "itl_p50_ms": _ms(pct(itl, 50)), "itl_p99_ms": _ms(pct(itl, 99))})
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    print(f"\n{'streams':>7} {'system':<22} {'tok/s':>8} {'vs offline':>10} {'TTFT p50':>9} {'p99':>8} "
          f"{'ITL p50':>8} {'p99':>8}  {'CPU s/round: engine / server / clients':<40}"
          f"(ms; greedy, {a.max_tokens} tokens/request, medians of {a.repeats}, {a.client} clients)")
    for r in rows:
        cpu = " / ".join(f"{r['cpu_s'][k]:.3f}" if k in r["cpu_s"] else "-" for k in ("engine", "server", "client"))
        print(f"{r['concurrency']:>7} {r['system']:<22} {r['tok_s']:>8} {r['vs_offline']:>10} "
              f"{_s(r['ttft_p50_ms']):>9} {_s(r['ttft_p99_ms']):>8} {_s(r['itl_p50_ms']):>8} {_s(r['itl_p99_ms']):>8}"
              f"  {cpu}")
    for name, why in failed.items():
        print(f"{name}: failed: {why}")
    print(json.dumps({"bench": "serve", "model": path, "max_tokens": a.max_tokens, "repeats": a.repeats,
                      "client": a.client, "rows": rows, "failed": failed}))
    return 0


def _last_error_line(proc) -> str | None:
    """The last `SomethingError: ...` line a server wrote to its stderr (the traceback's message)."""
    proc.log.seek(0)
    lines = [ln.strip() for ln in proc.log.read().decode(errors="replace").splitlines()]
    errs = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    return errs[-1] if errs else None


def _ms(x):
    return None if x is None else round(1000 * x, 1)


def _s(x):
    return "-" if x is None else str(x)


if __name__ == "__main__":
    sys.exit(main())
