#!/usr/bin/env python3
"""Fan a customer table out to task workers, one personalised SMS per row.

This is the job of the Swoole task-worker tutorial this project started from
(2 million customers read from MySQL, split into 4 id ranges, chunk i sent to
task worker i with ``$serv->task($data, $i)``, each task writing one
"Dear Mr/Ms ..." line per customer to its own log file), done with
``mqexecutor.MQExecutor`` and SQLite:

1. create, if absent, a SQLite database of ``--rows`` customers
   (id, name, gender, mobile), generated from a fixed random seed;
2. split the id range 1..rows into ``--chunks`` ranges ``lo < id <= hi``;
3. send chunk i to task worker ``i % workers`` with ``submit_to`` (``--mode 2``,
   Swoole's task_ipc_mode 2), or to whichever worker is free with ``submit``
   (``--mode 3``, preemptive);
4. each task reads its rows itself (only the id range travels in the message;
   ``--pass-rows`` sends the rows instead, which then travel through spill
   files because they are larger than one message) and writes one message per
   customer to ``<out>/sms-chunk-NNNN.txt``;
5. print progress, rows per second and per-worker counts, then check that the
   output holds exactly one message per customer; exit 1 if it does not.

Run ``python examples/sms_fanout.py --help`` for the options.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import random
import sqlite3
import sys
import time

from mqexecutor import MQExecutor, Mode, worker_id

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DB = os.path.join(HERE, "customers.sqlite3")
DEFAULT_OUT = os.path.join(HERE, "out")
OUT_PATTERN = "sms-chunk-*.txt"
SEED = 20140710  # any fixed number: the same seed always gives the same table

FIRST_NAMES = {
    0: ["Alice", "Beatrice", "Chloe", "Diana", "Emma", "Fiona", "Grace", "Hannah",
        "Iris", "Julia", "Karen", "Laura", "Maria", "Nina", "Olivia", "Paula",
        "Rosa", "Sofia", "Tina", "Wendy"],
    1: ["Adam", "Brian", "Carl", "David", "Edward", "Frank", "George", "Henry",
        "Ivan", "James", "Kevin", "Louis", "Martin", "Nathan", "Oscar", "Peter",
        "Robert", "Samuel", "Thomas", "Victor"],
}
SURNAMES = ["Smith", "Jones", "Brown", "Taylor", "Wilson", "Evans", "Thomas",
            "Johnson", "Roberts", "Walker", "Wright", "Robinson", "Thompson", "White",
            "Hughes", "Edwards", "Green", "Hall", "Wood", "Harris", "Lewis", "Martin",
            "Jackson", "Clarke", "Clark", "Turner", "Hill", "Scott", "Cooper", "Morris",
            "Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Huang", "Zhao", "Wu", "Zhou"]


# -- the database ---------------------------------------------------------------

def _stored_rows(path: str) -> int | None:
    """Number of customers of a database made by this script, None otherwise."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        rows, seed = con.execute("SELECT rows, seed FROM meta").fetchone()
        return rows if seed == SEED else None
    except (sqlite3.Error, TypeError):
        return None
    finally:
        con.close()


def ensure_database(path: str, rows: int) -> bool:
    """Create the customers table of ``rows`` rows at ``path`` unless a database
    made by this script with that many rows is already there.

    The rows come from ``random.Random(SEED)``, so the table is the same on
    every machine. The file is written under a temporary name and renamed, so an
    interrupted run never leaves a half-filled database behind.

    Returns True when the database was (re)created.
    """
    if os.path.exists(path) and _stored_rows(path) == rows:
        return False
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        os.unlink(tmp)
    rng = random.Random(SEED)
    con = sqlite3.connect(tmp)
    try:
        con.executescript("""
            PRAGMA journal_mode = OFF;
            PRAGMA synchronous = OFF;
            CREATE TABLE customers (
                id     INTEGER PRIMARY KEY,
                name   TEXT    NOT NULL,
                gender INTEGER NOT NULL,   -- 0: woman (Ms), 1: man (Mr), as the seed
                mobile TEXT    NOT NULL
            );
            CREATE TABLE meta (rows INTEGER NOT NULL, seed INTEGER NOT NULL);
        """)

        def generate():
            for cid in range(1, rows + 1):
                gender = rng.randrange(2)
                name = f"{rng.choice(FIRST_NAMES[gender])} {rng.choice(SURNAMES)}"
                mobile = f"1{rng.choice('3456789')}{rng.randrange(10 ** 9):09d}"
                yield cid, name, gender, mobile

        con.executemany("INSERT INTO customers VALUES (?, ?, ?, ?)", generate())
        con.execute("INSERT INTO meta VALUES (?, ?)", (rows, SEED))
        con.commit()
    finally:
        con.close()
    os.replace(tmp, path)
    return True


def read_rows(db: str, lo: int, hi: int) -> list[tuple]:
    """The customers with ``lo < id <= hi`` (the seed's range query), by id."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT id, gender, name, mobile FROM customers "
                           "WHERE id > ? AND id <= ? ORDER BY id", (lo, hi)).fetchall()
    finally:
        con.close()


# -- the task ---------------------------------------------------------------------

def message(cid: int, gender: int, name: str, mobile: str) -> str:
    """One output line: customer id, mobile, then the personalised SMS."""
    title = "Ms" if gender == 0 else "Mr"
    return (f"{cid}\t{mobile}\tDear {title} {name}, this message was sent to your "
            f"mobile {mobile}: your monthly statement is ready.\n")


def send_chunk(chunk: int, lo: int, hi: int, db: str | None, out_dir: str,
               rows: list[tuple] | None = None) -> dict:
    """Task body, run in a task worker: "send" the SMS of customers lo < id <= hi.

    Reads the rows from SQLite itself unless ``rows`` is given, writes one line
    per customer to its own file and reports who did the work.
    """
    started = time.perf_counter()
    if rows is None:
        rows = read_rows(db, lo, hi)
    path = os.path.join(out_dir, f"sms-chunk-{chunk:04d}.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(message(*row) for row in rows)
    return {"chunk": chunk, "worker": worker_id(), "pid": os.getpid(),
            "rows": len(rows), "path": path,
            "seconds": time.perf_counter() - started}


# -- the driver ---------------------------------------------------------------------

def split(rows: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` id ranges (lo, hi], lo exclusive, covering 1..rows."""
    bounds = [rows * i // chunks for i in range(chunks + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(chunks)]


def check_output(out_dir: str, rows: int) -> tuple[bool, str]:
    """Exactly one message per customer id 1..rows across all output files?"""
    lines = 0
    seen: set[int] = set()
    bad = 0
    for path in sorted(glob.glob(os.path.join(out_dir, OUT_PATTERN))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                lines += 1
                cid, _, rest = line.partition("\t")
                if not cid.isdigit() or not rest.count("\tDear "):
                    bad += 1
                    continue
                seen.add(int(cid))
    expected = set(range(1, rows + 1))
    ok = lines == rows and seen == expected and bad == 0
    detail = (f"{lines} lines, {len(seen)} distinct customer ids, {bad} malformed, "
              f"{len(expected - seen)} customers without a message "
              f"(expected {rows} of each)")
    return ok, detail


class Progress:
    """tqdm when it is installed, else one plain line per finished chunk."""

    def __init__(self, total_chunks: int, total_rows: int):
        self.total_chunks = total_chunks
        self.total_rows = total_rows
        self.done_rows = 0
        self.done_chunks = 0
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total_rows, unit="rows", unit_scale=True,
                            desc="sending", file=sys.stderr)

    def update(self, result: dict) -> None:
        self.done_rows += result["rows"]
        self.done_chunks += 1
        if self.bar is not None:
            self.bar.update(result["rows"])
            return
        width = len(str(self.total_chunks))
        pct = 100.0 * self.done_rows / self.total_rows if self.total_rows else 100.0
        print(f"  [{self.done_chunks:{width}}/{self.total_chunks}] chunk "
              f"{result['chunk']:{width}} done by worker {result['worker']}: "
              f"{result['rows']} rows in {result['seconds']:.2f}s "
              f"({self.done_rows}/{self.total_rows} rows, {pct:.0f}%)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def parse_key(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a SysV key (decimal or 0x hex)") from None


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Send one personalised SMS per customer through mqexecutor task "
                    "workers (the Swoole task-worker tutorial's job).")
    parser.add_argument("--rows", type=positive, default=200_000,
                        help="customers in the database (default: 200000)")
    parser.add_argument("--workers", type=positive, default=None,
                        help="task worker processes (default: usable CPUs)")
    parser.add_argument("--mode", type=int, choices=(2, 3), default=2,
                        help="2: targeted, chunk i goes to worker i %% workers "
                             "(submit_to); 3: preemptive, any free worker takes the "
                             "next chunk (submit). Default: 2")
    parser.add_argument("--chunks", type=positive, default=None,
                        help="id ranges to split the table into "
                             "(default: 4 per worker)")
    parser.add_argument("--db", default=DEFAULT_DB,
                        help="SQLite database, created if absent "
                             "(default: examples/customers.sqlite3)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="directory of the output files (default: examples/out/)")
    parser.add_argument("--key", type=parse_key, default=None,
                        help="SysV key of the task queue, decimal or 0x hex; the "
                             "queue is created if absent and kept afterwards "
                             "(default: a private queue removed at the end)")
    parser.add_argument("--pass-rows", action="store_true",
                        help="read the rows in this process and send them with the "
                             "task (they travel through spill files) instead of "
                             "sending only the id range")
    args = parser.parse_args(argv)

    workers = args.workers or default_workers()
    chunks = args.chunks or 4 * workers
    db = os.path.abspath(args.db)
    out_dir = os.path.abspath(args.out)
    mode = Mode(args.mode)

    t0 = time.perf_counter()
    created = ensure_database(db, args.rows)
    print(f"database {db}: {args.rows} customers "
          f"({'created' if created else 'already there'} in "
          f"{time.perf_counter() - t0:.2f}s)")
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, OUT_PATTERN)):
        os.unlink(stale)

    ranges = split(args.rows, chunks)
    per_worker: dict[int, list[int]] = {}  # worker id -> [chunks, rows]
    misrouted = []
    failed = 0
    started = time.perf_counter()
    ex = MQExecutor(key=args.key, max_workers=workers, mode=mode)
    print(f"{mode.name.lower()} mode (task_ipc_mode {int(mode)}), {workers} task "
          f"workers, task queue key 0x{ex.key & 0xFFFFFFFF:08x}, {chunks} chunks of "
          f"~{args.rows // chunks} rows, {'rows' if args.pass_rows else 'id ranges'} "
          f"sent to the workers")
    progress = Progress(chunks, args.rows)
    try:
        futures = {}
        for i, (lo, hi) in enumerate(ranges):
            rows = read_rows(db, lo, hi) if args.pass_rows else None
            task_args = (i, lo, hi, db, out_dir, rows)
            if mode == Mode.TARGETED:
                fut = ex.submit_to(i % workers, send_chunk, *task_args)
            else:
                fut = ex.submit(send_chunk, *task_args)
            futures[fut] = i
            del rows
        for fut in concurrent.futures.as_completed(futures):
            i = futures[fut]
            try:
                result = fut.result()
            except Exception as exc:  # noqa: BLE001 - report every failed chunk
                failed += 1
                print(f"chunk {i} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            progress.update(result)
            counts = per_worker.setdefault(result["worker"], [0, 0])
            counts[0] += 1
            counts[1] += result["rows"]
            if mode == Mode.TARGETED and result["worker"] != i % workers:
                misrouted.append((i, result["worker"]))
    except KeyboardInterrupt:
        progress.close()
        print("interrupted: cancelling the chunks no worker has taken yet",
              file=sys.stderr)
        ex.shutdown(wait=True, cancel_futures=True)
        return 130
    finally:
        progress.close()
        ex.shutdown(wait=True)
    elapsed = time.perf_counter() - started

    sent = sum(c[1] for c in per_worker.values())
    print(f"sent {sent} messages in {elapsed:.2f}s: "
          f"{sent / elapsed if elapsed else 0:,.0f} rows/s")
    for wid in sorted(per_worker):
        n_chunks, n_rows = per_worker[wid]
        print(f"  worker {wid}: {n_chunks} chunks, {n_rows} rows")
    if args.key is not None:
        print(f"the queue of key 0x{args.key & 0xFFFFFFFF:08x} is kept (explicit key); "
              f"remove it with: ipcrm -Q 0x{args.key & 0xFFFFFFFF:08x}")

    ok, detail = check_output(out_dir, args.rows)
    problems = []
    if failed:
        problems.append(f"{failed} chunks failed")
    if misrouted:
        problems.append("chunks run by the wrong worker (chunk, worker): "
                        f"{misrouted[:10]}")
    if not ok:
        problems.append(detail)
    if problems:
        for p in problems:
            print(f"CHECK FAILED: {p}", file=sys.stderr)
        return 1
    print(f"check ok: {detail} in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
