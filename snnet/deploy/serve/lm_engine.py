"""The model side of a language-model server: one generation worker, its queue, and its timings.

A :class:`~snnet.families.causal_lm.StitchedLM` is not thread-safe, and one generation at a time
is what a CPU serves best without batching, so :class:`LMEngine` runs **one worker thread** that
owns the network: requests wait in a FIFO queue (at most ``max_queue``; past it, 503); when the
worker takes the next one, the controller (:mod:`snnet.deploy.lm_controller`) names its stitch
from the queue and the token timings, and the request is generated wholly on that stitch through
:func:`snnet.generate.generate`, the same call a user makes, with a streamer that hands each new
piece of text to the HTTP side as it is decoded. There is no continuous batching: a request waits
for those ahead of it, which is exactly what the controller plans for.

The timings (:func:`time_stitches`) are measured when the server starts, on this machine: for
every rung of the ladder, the time from the start of a generation to its first token at two prompt
lengths and the time per further token (greedy, the median of a few runs).

Torch runs the model in the worker thread and releases the GIL while it computes, so the event
loop keeps reading requests; the Python between tokens (transformers' generation loop) does take
turns with it.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ...errors import ServeError, SnnetError
from ...results import read_rows
from ..lm_controller import LMController, LMControllerConfig, LMDecision, TokenTiming, Waiting, lm_ladder
from .auth import read_admin_token
from .config import Listen, _count, _finite
from .images import first_line
from .rejected import Rejected

__all__ = ["Event", "Job", "LMEngine", "LMMetrics", "LMServeConfig", "Outcome", "is_lm_folder", "max_context", "time_stitches"]

log = logging.getLogger("uvicorn.error")
Event = tuple[str, Any]  # ("start", LMDecision) | ("text", str) | ("done", Outcome) | ("error", str) | ("stopped", str): not started
_SECONDS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
ARRIVALS = 32  # recent arrivals the request rate is measured over
_TOKEN_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


@dataclass(frozen=True)
class LMServeConfig:
    """What a language-model server runs: the network, the latency targets, the queue, the limits."""

    model: str  # a folder written by StitchedLM.save_pretrained
    results: str | None = None  # results.json of an LM evaluation: bits per byte ranks the stitches
    slo_ms: float | None = 1000.0  # time-to-first-token target (queueing included); None: none
    tpot_ms: float | None = None  # time-per-output-token target; None: none
    max_queue: int = 64  # requests waiting at most (the one generating not counted); past it, 503
    max_upload_bytes: int = 2 ** 20
    stitch: str | None = None  # pin this stitch (id or name) from the start
    threads: int = 1  # torch CPU threads of the generation worker
    rungs: int = 8  # stitches on the ladder at most (each is timed at start)
    profile_tokens: int = 16  # output tokens per timing run
    profile_repeats: int = 3  # timing runs per stitch and prompt length (the median counts)
    body_timeout_s: float = 20.0
    admin_token_file: str | None = None
    docs: bool = False
    name: str | None = None  # the model id clients send (default: the folder's name)

    def __post_init__(self) -> None:
        for n, v in (("--slo-ms", self.slo_ms), ("--tpot-ms", self.tpot_ms)):
            if v is not None:
                _finite(v, n, 0)
        _count(self.max_queue, "--max-queue", 1, 65536)
        _count(self.max_upload_bytes, "--max-upload-mb (in bytes)", 1, 2 ** 40)
        _count(self.threads, "--threads", 1, 1024)
        _count(self.rungs, "rungs", 2, 1024)
        _count(self.profile_tokens, "profile_tokens", 2, 4096)
        _count(self.profile_repeats, "profile_repeats", 1, 1000)
        _finite(self.body_timeout_s, "--body-timeout", 0)

    @property
    def served_name(self) -> str:
        return self.name or Path(self.model).resolve().name


def is_lm_folder(folder: str | Path) -> bool:
    """True when ``folder`` holds a saved :class:`~snnet.families.causal_lm.StitchedLM` (its config's format)."""
    import json

    from ...families.causal_lm import FORMAT

    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def max_context(net: Any) -> int:
    """Tokens (prompt + output) every route can attend over: the fewest positions of any anchor."""
    from ...families.causal_lm import max_positions

    known = [n for n in (max_positions(p.config) for p in net.anchors) if n is not None]
    return min(known) if known else int(net.context)


# =============================================================================== metrics


class LMMetrics:
    """Prometheus metrics of a language-model server (one process: its own registry)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("snnet_lm_requests", "Requests answered, by HTTP status", ["code"], registry=r)
        self.rejected = Counter("snnet_lm_rejected", "Requests refused, by reason", ["reason"], registry=r)
        self.ttft = Histogram("snnet_lm_ttft_seconds", "Time to first token, from arrival (queueing included)",
                              buckets=_SECONDS, registry=r)
        self.tpot = Histogram("snnet_lm_tpot_seconds", "Time per output token after the first, per request",
                              buckets=_TOKEN_SECONDS, registry=r)
        self.latency = Histogram("snnet_lm_request_seconds", "Arrival to last token", buckets=_SECONDS, registry=r)
        self.tokens = Counter("snnet_lm_tokens", "Tokens by the stitch that served them and kind (prompt, completion)",
                              ["stitch", "kind"], registry=r)
        self.generations = Counter("snnet_lm_generations", "Generations by the stitch that ran them", ["stitch"], registry=r)
        self.queue = Gauge("snnet_lm_queue_depth", "Requests waiting for the generation worker", registry=r)
        self.running = Gauge("snnet_lm_running", "Requests generating (0 or 1)", registry=r)
        self.stitch = Gauge("snnet_stitch_id", "Id of the stitch of the last generation started", registry=r)
        self.pinned = Gauge("snnet_stitch_pinned", "1 when the stitch is pinned, 0 when chosen automatically", registry=r)
        self.switches = Counter("snnet_stitch_switches", "Generations started on another stitch than the one before", registry=r)
        self.slowdown = Gauge("snnet_lm_timing_slowdown", "Measured time over the timing table's, by phase", ["phase"], registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# =============================================================================== requests


@dataclass(eq=False)
class Job:
    """One request in the queue: its prompt and options, when it arrived, where its events go."""

    prompt: str
    prompt_tokens: int
    options: Any  # snnet.generate.GenerationOptions
    arrived: float  # time.perf_counter()
    emit: Callable[[Event], None]  # called from the worker thread; must be thread-safe
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Outcome:
    """A finished generation: its text and why it stopped, token counts, the stitch, the times."""

    text: str
    finish: str  # "stop" or "length", as OpenAI names them
    prompt_tokens: int
    completion_tokens: int
    stitch: int
    name: str
    pinned: bool
    ttft_ms: float  # arrival to first token
    first_ms: float  # start of the generation to first token
    tpot_ms: float | None  # per token after the first (None with one token)
    total_ms: float  # arrival to last token

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def snnet(self) -> dict[str, Any]:
        return {"stitch": self.name, "stitch_id": self.stitch, "mode": "pinned" if self.pinned else "auto",
                "ttft_ms": round(self.ttft_ms, 3), "tpot_ms": None if self.tpot_ms is None else round(self.tpot_ms, 3)}


def _held_back(text: str, stops: Sequence[str]) -> tuple[int, bool]:
    """How much of ``text`` may be sent now, and whether a stop string was found: up to the first stop
    string; else all but the longest tail that could begin one, and any unfinished UTF-8 character
    (decoded as U+FFFD until its last byte comes)."""
    hits = [text.find(s) for s in stops if s in text]
    if hits:
        return min(hits), True
    end = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text.endswith(s[:k]):
                end = min(end, len(text) - k)
                break
    while end and text[end - 1] == "\ufffd":
        end -= 1
    return end, False


class _TokenTimes:
    """A transformers streamer that notes when each new token comes (generate() puts the prompt first)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        self.token()

    def token(self) -> None:
        """A new token is in :attr:`ids`."""

    def end(self) -> None:
        pass


class _TextStream(_TokenTimes):
    """The streamer of one request: times every new token and sends the text decoded so far that can
    no longer change (see :func:`_held_back`)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], emit: Callable[[Event], None]) -> None:
        super().__init__()
        self.tok, self.stops, self.emit = tokenizer, tuple(stops), emit
        self.sent = ""
        self._stopped = False

    def token(self) -> None:
        if self._stopped:
            return
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        end, self._stopped = _held_back(text, self.stops)
        if end > len(self.sent) and text.startswith(self.sent):
            self.emit(("text", text[len(self.sent):end]))
            self.sent = text[:end]


class _Cancelled:
    """A stopping criterion: true once the request's client has gone (its event is set)."""

    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device)


# =============================================================================== timings


def time_stitches(net: Any, stitches: Sequence[int], *, tokens: int = 16, repeats: int = 3, lengths: Sequence[int] | None = None,
                  progress: bool = True) -> dict[int, TokenTiming]:
    """Each stitch's :class:`TokenTiming` on this machine, through the call that serves requests
    (:func:`snnet.generate.generate`, so its per-call work counts as it will): greedy generations of
    ``tokens`` tokens (no early end) after prompts of about each of ``lengths`` tokens (default 8
    and as many as the context allows up to 128; random tokens, decoded to text, counted as the
    tokenizer reads the text back), after one warm-up run; the median of ``repeats`` runs."""
    import torch

    from ...generate import GenerationOptions, generate
    from ...report import progress as bar_of

    context = max_context(net)
    tok = net.tokenizer
    if context - tokens < 1:  # room for a prompt of 1 token and the ones generated (else a negative length in torch)
        raise ServeError(f"cannot time generations of {tokens} tokens within the model's context of {context} tokens: "
                         f"give profile_tokens of at most {context - 1}")
    if lengths is None:
        lengths = sorted({min(8, context - tokens), max(1, min(128, context - tokens - 1))})
    gen = torch.Generator().manual_seed(0)
    prompts = {}
    for n in lengths:
        ids = torch.randint(0, net.vocab_size, (n,), generator=gen).tolist()
        while True:  # read back, the text may take more tokens than the ids it came from: trim it to fit
            text = tok.decode(ids, skip_special_tokens=True)
            count = len(tok(text, add_special_tokens=True)["input_ids"]) if text else 0
            if count + tokens <= context or len(ids) <= 1:
                break
            ids = ids[:-1]
        if count < 1 or count + tokens > context:
            raise ServeError(f"cannot time generations of {tokens} tokens after a prompt within the model's context of "
                             f"{context} tokens")
        prompts[count] = text
    options = GenerationOptions(max_new_tokens=tokens)
    bar = bar_of(len(stitches) * (len(prompts) * repeats + 1), "timing stitches", "run", progress)
    out = {}
    try:
        for s in stitches:
            firsts: dict[int, list[float]] = {n: [] for n in prompts}
            per_token: list[float] = []
            runs = [next(iter(prompts))] + [n for n in prompts for _ in range(repeats)]  # a warm-up run first
            for k, n in enumerate(runs):
                times = _TokenTimes()
                t0 = time.perf_counter()
                generate(net, prompts[n], options=options, stitch=s, streamer=times, min_new_tokens=tokens)
                bar.update(1)
                if k:
                    firsts[n].append((times.times[0] - t0) * 1e3)
                    per_token.append((times.times[-1] - times.times[0]) * 1e3 / (len(times.times) - 1))
            out[int(net.stitch(s).id)] = TokenTiming(tuple((n, statistics.median(v)) for n, v in firsts.items()),
                                                     statistics.median(per_token))
    finally:
        bar.close()
    return out


# =============================================================================== the engine


class LMEngine:
    """The network, its controller, the queue and the one generation worker (see the module)."""

    def __init__(self, config: LMServeConfig, net: Any, timing: Mapping[int, TokenTiming] | None = None,
                 say: Callable[[str], Any] = log.info, rows: Sequence[Any] | None = None) -> None:
        if net.tokenizer is None:
            raise ServeError(f"{config.model} has no tokenizer: save the network with its tokenizer "
                             "(create_stitched_lm(..., load_tokenizers=True) or tokenizer=...) to serve text")
        self.config, self.net = config, net
        self.admin_token = read_admin_token(config.admin_token_file)  # PUT /stitch needs it (see .auth)
        self.tokenizer = copy.deepcopy(net.tokenizer)  # the HTTP side's own: the worker's is used only by the worker
        self.context = max_context(net)
        self.rows = read_rows(rows) if rows is not None else net.costs()
        rungs = lm_ladder(self.rows, config.rungs)
        pin = net.stitch(config.stitch) if config.stitch is not None else None
        if timing is None:
            todo = [r.id for r in rungs] + ([pin.id] if pin is not None and pin.id not in {r.id for r in rungs} else [])
            say(f"timing {len(todo)} stitches on this machine ({config.profile_repeats} runs of {config.profile_tokens} tokens "
                "at two prompt lengths each)")
            timing = time_stitches(net, todo, tokens=config.profile_tokens, repeats=config.profile_repeats)
        self.timing = dict(timing)
        self.controller = LMController(rungs, self.timing, LMControllerConfig(config.slo_ms, config.tpot_ms))
        if pin is not None:
            self.controller.pin(pin.id, pin.name)
        self.metrics = LMMetrics()
        self.metrics.pinned.set(1 if pin is not None else 0)
        self._queue: deque[Job] = deque()
        self._arrivals: deque[float] = deque(maxlen=ARRIVALS)
        self._cond = threading.Condition()
        self._stopping = False
        self._running: Job | None = None
        self._thread: threading.Thread | None = None
        self.generations = 0

    @classmethod
    def load(cls, config: LMServeConfig, say: Callable[[str], Any] = log.info) -> "LMEngine":
        """Load the saved network of ``config.model`` and time its ladder. Bad input fails here, in one line."""
        from ...families.causal_lm import StitchedLM
        from ...results import merge_rows, read_rows

        try:
            net = StitchedLM.from_pretrained(config.model).eval()
        except SnnetError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ServeError(f"cannot load the language model in {config.model} ({type(e).__name__}: {first_line(e)})") from e
        rows = net.costs()
        if config.results:
            rows = merge_rows(rows, read_rows(config.results), "the results")
        import torch

        torch.set_num_threads(config.threads)
        return cls(config, net, say=say, rows=rows)

    # ------------------------------------------------------------------ the HTTP side
    def count_tokens(self, prompt: str) -> int:
        """Tokens of ``prompt`` as generation will read it (special tokens added as the tokenizer adds them)."""
        return len(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def submit(self, job: Job) -> int:
        """Queue ``job`` (it waits for :meth:`start` if the worker has not started); the number of
        requests now waiting. A full queue, a stopped server or a dead worker: 503."""
        with self._cond:
            if self._stopping or (self._thread is not None and not self._thread.is_alive()):
                raise Rejected(503, "the generation worker is not running: try again later", "stopped")
            if len(self._queue) >= self.config.max_queue:
                raise Rejected(503, f"{len(self._queue)} requests are waiting (--max-queue): try again later", "queue_full",
                               {"Retry-After": str(max(1, math.ceil(self._backlog_s())))})
            self._queue.append(job)
            self._arrivals.append(job.arrived)
            self.metrics.queue.set(len(self._queue))
            self._cond.notify()
            return len(self._queue)

    def _backlog_s(self) -> float:
        """Seconds the waiting requests need on the cheapest rung by the table (for Retry-After)."""
        rung = self.controller.rungs[0]
        t = self.timing[rung.id]
        return sum(t.first(j.prompt_tokens) + (j.options.max_new_tokens - 1) * t.tpot_ms for j in self._queue) / 1e3

    def rate(self, now: float) -> float | None:
        """Requests per second over the last :data:`ARRIVALS` arrivals, up to ``now`` (so it falls
        when arrivals stop) and over a second at least (a burst of a few is not a rate); None with
        fewer than 3."""
        if len(self._arrivals) < 3:
            return None
        return len(self._arrivals) / max(now - self._arrivals[0], 1.0)

    def cancel(self, job: Job) -> None:
        """The client has gone: drop ``job`` if it waits, stop it at the next token if it runs."""
        job.cancelled.set()
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self.metrics.queue.set(len(self._queue))

    def pin(self, key: int | str) -> dict[str, Any]:
        s = self.net.stitch(key)  # an unknown stitch raises StitchNotFoundError (404 at the app)
        with self._cond:
            self.controller.pin(s.id, s.name)
            self.metrics.pinned.set(1)
            return self.controller.state()

    def auto(self) -> dict[str, Any]:
        with self._cond:
            self.controller.auto()
            self.metrics.pinned.set(0)
            return self.controller.state()

    def state(self) -> dict[str, Any]:
        with self._cond:
            return {**self.controller.state(), "queue": len(self._queue), "running": self._running is not None,
                    "rate": self.rate(time.perf_counter()),
                    "generations": self.generations, "context": self.context}

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ the worker
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="snnet-lm-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = Listen.timeout_graceful_shutdown) -> None:
        """Stop taking requests; those still waiting get an error event; the running one is stopped (waiting
        ``timeout`` at most for it: the server's graceful shutdown)."""
        with self._cond:
            self._stopping = True
            waiting, self._queue = list(self._queue), deque()
            if self._running is not None:
                self._running.cancelled.set()
            self._cond.notify_all()
        for job in waiting:  # never started: 503, as a request arriving now would get (not the model's 500)
            job.emit(("stopped", "the server is shutting down before this request started: send it again"))
        if self._thread is not None:
            self._thread.join(timeout)

    def next_job(self) -> tuple[Job, LMDecision] | None:
        """The next request and its stitch (the controller decides with the whole queue in view); None when stopping."""
        with self._cond:
            while True:
                while self._queue and self._queue[0].cancelled.is_set():
                    self._queue.popleft()
                if self._queue or self._stopping:
                    break
                self._cond.wait()
            if self._stopping:
                return None
            now = time.perf_counter()
            decision = self.controller.decide(now, [Waiting(j.prompt_tokens, j.options.max_new_tokens, j.arrived)
                                                     for j in self._queue if not j.cancelled.is_set()], self.rate(now))
            job = self._running = self._queue.popleft()
            self.metrics.queue.set(len(self._queue))
            return job, decision

    def _loop(self) -> None:
        import torch

        torch.set_num_threads(self.config.threads)
        while True:
            taken = self.next_job()
            if taken is None:
                return
            try:
                self.run(*taken)
            finally:
                with self._cond:
                    self._running = None

    def run(self, job: Job, decision: LMDecision) -> Outcome | None:
        """Generate ``job`` on the decided stitch, sending its events; the outcome (None on failure)."""
        from transformers import StoppingCriteriaList

        from ...generate import generate

        m = self.metrics
        m.running.set(1)
        m.stitch.set(decision.stitch)
        m.switches.inc(decision.switched)
        job.emit(("start", decision))
        stream = _TextStream(self.net.tokenizer, job.options.stop, job.emit)
        t0 = time.perf_counter()
        try:
            g = generate(self.net, job.prompt, options=job.options, stitch=decision.stitch, streamer=stream,
                         stopping_criteria=StoppingCriteriaList([_Cancelled(job.cancelled)]))
        except Exception as e:  # noqa: BLE001 -- one request failed; the worker goes on
            log.exception("generation failed")
            job.emit(("error", f"the model failed on this request ({type(e).__name__}: {first_line(e)}); the server goes on"))
            return None
        finally:
            m.running.set(0)
        done = time.perf_counter()
        times = stream.times or [done]
        tpot = (times[-1] - times[0]) * 1e3 / (len(times) - 1) if len(times) > 1 else None
        out = Outcome(g.text, g.finish, g.prompt_tokens, len(g.tokens), decision.stitch, decision.name, decision.pinned,
                      (times[0] - job.arrived) * 1e3, (times[0] - t0) * 1e3, tpot, (done - job.arrived) * 1e3)
        if g.text.startswith(stream.sent) and len(g.text) > len(stream.sent):
            job.emit(("text", g.text[len(stream.sent):]))
        with self._cond:
            self.controller.observe(decision.stitch, out.prompt_tokens, out.first_ms, out.tpot_ms)
            self.generations += 1
            m.slowdown.labels("prefill").set(self.controller.prefill.value)
            m.slowdown.labels("decode").set(self.controller.decode.value)
        m.ttft.observe(out.ttft_ms / 1e3)
        if tpot is not None:
            m.tpot.observe(tpot / 1e3)
        m.latency.observe(out.total_ms / 1e3)
        m.tokens.labels(decision.name, "prompt").inc(out.prompt_tokens)
        m.tokens.labels(decision.name, "completion").inc(out.completion_tokens)
        m.generations.labels(decision.name).inc()
        job.emit(("done", out))
        return out
