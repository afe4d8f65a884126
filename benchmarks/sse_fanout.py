"""One campaign to N customers, each on their own live SSE stream of one gateway process.

The gateway (Runtime, uvicorn on loopback, SQLite) runs here; the N clients run in worker
processes (asyncio, raw sockets, ~500 connections each) so their work does not sit on the
server's loop. Once every stream is live, N notifications (one per profile) are committed in one
transaction and dispatched; ``fanout_s`` runs from the start of the dispatch (the first send) to
the last receipt in any client. Goal: 2,000 clients in <= 1 s.

    .venv/bin/python benchmarks/sse_fanout.py [--clients 2000] [--workers 4] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _notify_common import bench_settings, enrol_many, free_port, open_streams, raise_fd_limit


def worker(port: int, tokens: list[str], conn: Connection) -> None:
    raise_fd_limit(len(tokens) + 256)

    async def run() -> dict[str, Any]:
        streams, tasks = await open_streams(port, tokens)
        failed = [s.failed for s in streams if s.failed]
        conn.send({"ready": len(streams) - len(failed), "failed": failed[:3]})
        await asyncio.wait(tasks, timeout=30)
        for s in streams:
            s.close()
        times = [t for s in streams for t, _ in s.events]
        return {"received": len(times), "first": min(times, default=None), "last": max(times, default=None)}

    conn.send(asyncio.run(run()))


async def bench(clients: int, workers: int) -> dict[str, Any]:
    from sqlalchemy import insert

    from gateway.runtime import Runtime
    from gateway.storage.models import Notification

    raise_fd_limit(2 * clients + 1024)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        rt = Runtime(bench_settings(Path(tmp), port), on_outcome=None, tick_s=3600)
        await rt.start()
        try:
            now = time.time()
            pids = enrol_many(rt.db, clients, now, beacons=False)
            tokens = [rt.service.issue_token(pid)[0] for pid in pids]
            ctx = mp.get_context("spawn")
            pipes, procs = [], []
            for w in range(workers):
                ours, theirs = ctx.Pipe()
                p = ctx.Process(target=worker, args=(port, tokens[w::workers], theirs), daemon=True)
                p.start()
                pipes.append(ours)
                procs.append(p)
            ready = [await asyncio.to_thread(c.recv) for c in pipes]
            live = sum(r["ready"] for r in ready)
            if live != clients:
                raise SystemExit(f"only {live} of {clients} streams connected: {[r['failed'] for r in ready]}")
            while sum(rt.hub.listeners(pid) for pid in pids) < clients:  # each stream subscribed server-side
                await asyncio.sleep(0.01)

            t_commit = time.time()
            with rt.db.session() as s:
                ids = list(s.execute(insert(Notification).returning(Notification.id), [
                    {"profile_id": pid, "campaign_id": "bench-broadcast", "purpose": "offers",
                     "dedup_key": f"bench-broadcast:{pid}:1", "title": "Flash sale", "body": "20 % off for 1 h",
                     "data": {"offer": {"code": "FLASH20"}}, "created_at": t_commit, "status": "pending"}
                    for pid in pids]).scalars())
            t0 = time.time()
            await rt.dispatcher.dispatch(ids, t0)
            t_dispatched = time.time()
            results = [await asyncio.to_thread(c.recv) for c in pipes]
            for p in procs:
                p.join(timeout=10)
        finally:
            await rt.stop()
    received = sum(r["received"] for r in results)
    last = max(r["last"] for r in results if r["last"] is not None)
    return {"clients": clients, "workers": workers, "received": received,
            "commit_s": round(t0 - t_commit, 4), "dispatch_s": round(t_dispatched - t0, 4),
            "fanout_s": round(last - t0, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="100 clients, 1 worker")
    args = parser.parse_args()
    clients, workers = (100, 1) if args.quick else (args.clients, args.workers)
    result = asyncio.run(bench(clients, workers))
    print(f"{result['received']}/{clients} clients got the campaign; dispatch {result['dispatch_s'] * 1000:.0f} ms, "
          f"first send to last receipt {result['fanout_s'] * 1000:.0f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
