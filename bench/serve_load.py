"""The served QA model under load and bad input: ``mlflow models serve`` on 127.0.0.1, concurrent clients.

Serves a registered model (``--model-uri`` with ``--tracking-uri``, e.g. the champion after ``make demo``), or
registers a QA model directory first (``--model-dir``, default: the shipped MiniLM with a fresh QA head: its answers
mean nothing, its speed is that of a 6-layer 384-wide BERT) in a temporary SQLite store. A directory registered here
serves with the windows, span search and precision its run recorded in it (``fineprune_evaluation`` in its
config.json, as a registered version of it would), the serving defaults where it records none, and the flags given
over both; it serves through PyTorch (no ONNX export is made), while a sweep's registered versions serve through ONNX
Runtime: time those with ``--model-uri``. Then:

1. load: ``--requests`` one-record requests of real SQuAD dev questions from ``--clients`` concurrent clients,
   ``--bad-fraction`` of them malformed (empty, null and 200,000-word fields); counts answered requests,
   expected 400s (a one-line message naming the record and the field), everything else, requests/s and latency;
2. batching: records/s with 1 and with 32 records per request, from one client, the two interleaved round by
   round, on the same records (and whether both give the same answers);
3. ``/ping`` still answers; the server is stopped.

The last line is ``serve_load ok = A/B bad_rejected = C/D other = E rps = X.X p99_ms = Y``.

    python bench/serve_load.py                                     # the shipped MiniLM, 300 requests, 8 clients
    python bench/serve_load.py --model-uri models:/fineprune-minilm-squad@champion --tracking-uri sqlite:///mlflow.db
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pruning import atomic, squad
from pruning.checkpoint import read_evaluation, read_precision
from pruning.errors import error_line
from pruning.resources import resolve_data, resolve_model
from workflows.logged_model import log_qa_model, serve_settings
from workflows.record import ALIAS, sqlite_database
from workflows.served_model import SERVE_DEFAULTS
from workflows.serving import ModelServer, invoke, ping, run_load

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_input import one_line_errors  # noqa: E402

logger = logging.getLogger("serve_load")


def registered_problem(model_uri: str, tracking_uri: str) -> str | None:
    """Why ``model_uri`` (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``) cannot be served from the store
    ``tracking_uri``, in one line; None when it can. A ``sqlite:///`` store that does not exist is not made."""
    from mlflow.exceptions import MlflowException

    ref = model_uri.removeprefix("models:/")
    name, alias = ref.split("@", 1) if "@" in ref else (ref, None)
    name, _, version = name.partition("/") if alias is None else (name, "", "")
    if ref == model_uri or not name or not (alias or version):
        return f"--model-uri {model_uri}: write models:/NAME/VERSION or models:/NAME@ALIAS"
    database = sqlite_database(tracking_uri)
    if database is not None and not database.is_file():
        return f"--tracking-uri {tracking_uri}: no MLflow database at {database}"
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        if alias:
            client.get_model_version_by_alias(name, alias)
        else:
            client.get_model_version(name, version)
    except MlflowException as err:
        return f"--model-uri {model_uri}: not in {tracking_uri} ({error_line(err)})"
    return None


def register_dir(model_dir: Path, root: Path, settings: dict[str, int | str]) -> tuple[str, str]:
    """Log ``model_dir`` as the QA pyfunc in a new SQLite store under ``root`` and register it: (model URI,
    tracking URI)."""
    tracking_uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.create_experiment("serve-load", artifact_location=(root / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        info = log_qa_model(model_dir, settings)
    client.create_registered_model("serve-load")
    version = client.create_model_version("serve-load", source=info.model_uri, run_id=run.info.run_id,
                                          model_id=info.model_id)
    client.set_registered_model_alias("serve-load", ALIAS, version.version)
    return f"models:/serve-load@{ALIAS}", tracking_uri


# What a write answers where the disk or the directory takes no more (full, over quota, read-only, no permission).
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def write_failure(err: BaseException) -> str | None:
    """Why ``err`` (as MLflow raises it: its own exception, SQLAlchemy's, or the OSError it gathered into one) is a
    write the disk refused, in a few words, or None when it is something else."""
    stack, seen = [err], set()
    while stack:
        error = stack.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_ROOM:
            return os.strerror(error.errno)
        found = re.search(r"\[Errno (\d+)\]", str(error))
        if found and int(found.group(1)) in _NO_ROOM:
            return os.strerror(int(found.group(1)))
        found = re.search(r"database or disk is full|attempt to write a readonly database|unable to open database "
                          r"file", str(error))
        if found:
            return found.group(0)
        stack += [error.__cause__, error.__context__, getattr(error, "orig", None)]
    return None


def dir_settings(model_dir: Path, given: dict[str, int | None]) -> dict[str, int | str]:
    """The served settings of ``model_dir``: the windows, span search and precision it records of its run's
    evaluations (:func:`pruning.checkpoint.read_evaluation`, :func:`~pruning.checkpoint.read_precision`), the serving
    defaults for those it lacks, and each of ``given`` that is not None over both."""
    settings: dict[str, int | str] = dict(serve_settings({}, read_evaluation(model_dir)))
    precision = read_precision(model_dir)
    if precision is not None:
        settings["precision"] = precision
    settings.update({key: value for key, value in given.items() if value is not None})
    return settings


def batching(url: str, records: list[dict], per_request: int, rounds: int) -> dict[str, float]:
    """Records/s with 1 and ``per_request`` records per request over the same records, interleaved."""
    chunk = records[:per_request]
    rates: dict[int, list[float]] = {1: [], per_request: []}
    same = True
    for r in range(rounds):
        for size in ((1, per_request) if r % 2 == 0 else (per_request, 1)):
            start = time.perf_counter()
            if size == 1:
                replies = [invoke(url, [record]) for record in chunk]
            else:
                replies = [invoke(url, chunk)]
            seconds = time.perf_counter() - start
            if any(reply.status != 200 for reply in replies):
                bad = next(reply for reply in replies if reply.status != 200)
                raise RuntimeError(f"batching: a request failed with {bad.status}: {str(bad.body)[:300]}")
            answers = [p["answer"] for reply in replies for p in reply.body["predictions"]]
            if size == 1:
                single = answers
            else:
                batched = answers
            rates[size].append(len(chunk) / seconds)
        same = same and single == batched
    return {"one": statistics.median(rates[1]), "many": statistics.median(rates[per_request]), "same": same}


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (``timeout``, ``kill``, a job scheduler) raised as Ctrl-C is, so that the model server, which leads a
    session of its own and gets neither, is stopped on the way out as on Ctrl-C; its default ends the script at once
    and leaves the server running."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@one_line_errors("serve_load")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-uri", help="a registered model (needs --tracking-uri)")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--model-dir", default="minilm", help="register this QA model directory first")
    recorded = "default: what --model-dir records, else {}"
    parser.add_argument("--max-seq-length", type=int, help=recorded.format(SERVE_DEFAULTS["max_seq_length"]))
    parser.add_argument("--doc-stride", type=int, help=recorded.format(SERVE_DEFAULTS["doc_stride"]))
    parser.add_argument("--max-windows", type=int, help=f"default: {SERVE_DEFAULTS['max_windows']}")
    parser.add_argument("--batch-size", type=int, help=f"default: {SERVE_DEFAULTS['batch_size']}")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--bad-fraction", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--threads", type=int, help="torch threads of the server (OMP_NUM_THREADS); default: torch's")
    parser.add_argument("--per-request", type=int, default=32, help="records per request in the batching phase")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the batching phase (0: skip)")
    parser.add_argument("--data", default="dev")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.model_uri and not args.tracking_uri:
        parser.error("--model-uri needs --tracking-uri")
    # Before the server starts (a minute), not after it has served the load.
    if min(args.requests, args.clients, args.workers, args.per_request) < 1 or args.rounds < 0:
        parser.error("--requests, --clients, --workers and --per-request must be >= 1, --rounds >= 0")
    if args.rounds and args.per_request < 2:
        parser.error(f"--per-request {args.per_request}: the batching phase compares one record per request with "
                     "more; give 2 or more (or --rounds 0 to skip it)")
    if not 0 <= args.bad_fraction <= 1:
        parser.error(f"--bad-fraction {args.bad_fraction}: a fraction from 0 to 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    for flag in ("max_seq_length", "doc_stride", "max_windows", "batch_size"):  # else the server fails to start
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")

    if args.model_uri:  # else the server starts, and stops on MLflow's traceback (a missing store made empty)
        problem = registered_problem(args.model_uri, args.tracking_uri)
        if problem:
            parser.error(problem)

    settings = None
    if not args.model_uri:  # the directory's record read before the server starts
        model_dir = resolve_model(args.model_dir)
        settings = dir_settings(model_dir, {"max_seq_length": args.max_seq_length, "doc_stride": args.doc_stride,
                                            "max_windows": args.max_windows, "batch_size": args.batch_size})
        logger.info("serving %s with %s", model_dir, ", ".join(f"{k} {v}" for k, v in sorted(settings.items())))
    examples = squad.load_squad(resolve_data(args.data), limit=max(args.requests, args.per_request))
    records = [{"question": ex.question, "context": ex.context} for ex in examples]
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="serve_load-") as tmp:
        root = Path(tmp)
        if settings is None:
            model_uri, tracking_uri = args.model_uri, args.tracking_uri
        else:
            try:
                model_uri, tracking_uri = register_dir(model_dir, root, settings)
            except Exception as err:
                reason = write_failure(err)
                if reason is None:
                    raise
                raise atomic.WriteError(f"{root.parent}: cannot register {model_dir} in a temporary store there "
                                        f"({reason}); set TMPDIR to a directory with room for a copy of it") from None
        env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
        with ModelServer(model_uri, tracking_uri, root / "serve.log", workers=args.workers, env=env) as server:
            for record in records[:3]:  # warm-up
                invoke(server.url, [record])
            result = run_load(server.url, records, requests=args.requests, clients=args.clients,
                              bad_fraction=args.bad_fraction, seed=args.seed)
            rates = batching(server.url, records, args.per_request, args.rounds) if args.rounds else None
            alive = ping(server.url)
    for problem in result.problems[:20]:
        logger.info("other: %s", problem)
    print(f"model {model_uri}, {args.requests} requests from {args.clients} clients, {result.bad} malformed, "
          f"{args.workers} server worker(s), {args.threads or 'default'} torch threads")
    print(f"ok {result.ok}/{result.valid}  bad_rejected {result.bad_rejected}/{result.bad}  other {result.other}  "
          f"5xx/no answer {result.server_errors}  /ping after: {'ok' if alive else 'FAILED'}")
    print(f"{result.rps:.1f} requests/s over {result.seconds:.1f} s; latency p50 {result.percentile_ms(50):.0f} ms, "
          f"p99 {result.percentile_ms(99):.0f} ms, max {1000 * max(result.latencies):.0f} ms")
    by_kind: dict[str, list[float]] = {}
    for kind, seconds in zip(result.kinds, result.latencies):
        by_kind.setdefault(kind, []).append(seconds)
    print("median latency by kind of request: " + ", ".join(
        f"{kind} {1000 * statistics.median(values):.0f} ms ({len(values)})"
        for kind, values in sorted(by_kind.items())))
    if rates:
        print(f"batching: {rates['one']:.1f} records/s at 1 record per request, {rates['many']:.1f} records/s at "
              f"{args.per_request} per request ({rates['many'] / rates['one']:.2f}x; median of {args.rounds} "
              f"interleaved rounds; same answers: {'yes' if rates['same'] else 'no'})")
    print(f"serve_load ok = {result.ok}/{result.valid} bad_rejected = {result.bad_rejected}/{result.bad} "
          f"other = {result.other} rps = {result.rps:.1f} p99_ms = {result.percentile_ms(99):.0f}")
    return 0 if result.other == 0 and alive else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stop:
        name = str(stop) or "SIGINT"
        print(f"serve_load: interrupted by {name}; the model server is stopped", file=sys.stderr)
        sys.exit(128 + signal.Signals[name].value)
