"""``make bench``: every otpy speed figure in one run, as JSON lines, then a table.

Each group runs in a fresh Python process (so memory is measured cleanly and one
group's garbage does not slow the next); this script passes their JSON lines through,
adds its own, and ends with a table of measured figures beside the targets of issues
#2 and #3 (and of #14's HTTP and dashboard) and the Erlang/OTP and triotp figures
those issues quote.

The machine is noisy, so the rate benchmarks run interleaved in rounds (every
benchmark once per round) and report the best round, and ratios are paired within a
round; restart latencies pool the samples of several alternating processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import LOGGING_NOTE, emit, percentile, python_info

HERE = Path(__file__).resolve().parent

RATE_ROUNDS = 10
RESTART_ROUNDS = 3
RESTART_SAMPLES = 20_000
DURABLE_ROUNDS = 5


def run_group(*args: str) -> list[dict[str, Any]]:
    """Run one bench module in a fresh process; pass its JSON lines through."""
    proc = subprocess.run(
        [sys.executable, str(HERE / args[0]), *args[1:]],
        capture_output=True, text=True, cwd=HERE, check=False,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"bench group {' '.join(args)} failed (exit {proc.returncode})")
    records = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            print(line, flush=True)
            records.append(json.loads(line))
    return records


def restart_pooled(siblings: int, rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Pool the medians/p99s of several processes: report the median of each."""
    tag = f"{siblings // 1000}k" if siblings >= 1000 else str(siblings)
    out = []
    for stat in ("median", "p99"):
        values = sorted(r["value"] for rs in rounds for r in rs
                        if r["bench"] == f"restart_{stat}_{tag}")
        out.append(emit(f"restart_{stat}_{tag}_pooled", percentile(values, 0.5), "us",
                        what=f"restart {stat}, median of {len(values)} processes "
                             f"({siblings:,} siblings)", all=values, siblings=siblings))
    return out


# -- the table -----------------------------------------------------------------------

ERLANG = "Erlang/OTP 25"
TRIOTP = "triotp"


def _si(x: float) -> str:
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


Row = tuple[str, str, str, str, str, str]


def table(r: dict[str, dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []

    def row(label: str, key: str, fmt: Callable[[float], str], target: str,
            ok: Callable[[float], bool] | None, erlang: str = "", triotp: str = "") -> None:
        rec = r.get(key)
        if rec is None:
            rows.append((label, "(not run)", target, erlang, triotp, ""))
            return
        value = rec["value"]
        status = "" if ok is None else ("ok" if ok(value) else "MISSED")
        rows.append((label, fmt(value), target, erlang, triotp, status))

    def rate(v: float) -> str:
        return f"{_si(v)}/s"

    def ratio(v: float) -> str:
        return f"{v:.2f}x"

    def nbytes(v: float) -> str:
        return f"{v:.0f} B"

    def usec(v: float) -> str:
        return f"{v:.1f} µs"

    base = r.get("checkpoint", {}).get("value", float("nan"))
    paired = r.get("call_ratio", {}).get("paired_median", float("nan"))
    row("trio checkpoint (baseline)", "checkpoint", rate, "-", None)
    row("await node.call, sequential", "call", rate, f"0.75x base = {_si(0.75 * base)}/s",
        None, "363-444k/s", "~10k/s")
    row("  node.call / checkpoint", "call_ratio", ratio, ">= 0.75x", lambda v: v >= 0.75)
    rows.append(("  ... median of paired rounds", f"{paired:.2f}x", ">= 0.75x", "", "",
                 "ok" if paired >= 0.75 else "MISSED"))
    row("  node.call, prebuilt Reply", "call_prebuilt", rate, "(info)", None)
    row("  ... / checkpoint", "call_prebuilt_ratio", ratio, "(info)", None)
    row("self.call inside a callback", "self_call", rate, ">= 800k/s",
        lambda v: v >= 800e3, "363-444k/s")
    row("  self.call, prebuilt Reply", "self_call_prebuilt", rate, "(info)", None)
    row("node.cast (idle server)", "cast", rate, ">= 1M/s", lambda v: v >= 1e6,
        "4.2M/s", "~31k/s")
    row("node.cast, suspended: enqueue", "cast_suspended_enqueue", rate, "-", None)
    row("  ... drain after resume", "cast_suspended_drain", rate, "-", None)
    row("  ... end to end", "cast_suspended_total", rate, "(>= 1M/s)", lambda v: v >= 1e6)
    row("self.cast (queued): enqueue", "cast_callback_enqueue", rate, "-", None)
    row("  ... end to end", "cast_callback_total", rate, "(>= 1M/s)", lambda v: v >= 1e6)
    row("100 concurrent clients", "concurrent_call", rate, ">= 100k/s",
        lambda v: v >= 100e3)
    row("  vs 100 checkpointing tasks", "concurrent_ratio", ratio, "-", None)
    for n in ("100000", "1000000"):
        k = f"{int(n):,}"
        row(f"bytes/idle server, {k} (RSS)", f"mem_per_server_with_spec_plain_rss_{n}",
            nbytes, "<= 600 B", lambda v: v <= 600, "2.6 KB", "5.7 KB")
        row("  ... runtime only (no spec)", f"mem_per_server_plain_rss_{n}", nbytes,
            "<= 600 B", lambda v: v <= 600)
        row(f"µs/start, {k} servers", f"start_us_plain_rss_{n}", usec, "<= 10 µs",
            lambda v: v <= 10, "7-17 µs")
    row("bytes/idle server, 100,000 (tracemalloc)",
        "mem_per_server_with_spec_plain_tracemalloc_100000", nbytes, "<= 600 B",
        lambda v: v <= 600)
    row("building a Child spec", "spec_us_plain_rss_1000000", usec, "-", None)
    for tag, sib in (("0", "0"), ("100k", "100,000")):
        row(f"restart median, {sib} siblings", f"restart_median_{tag}_pooled", usec,
            "<= 25 µs", lambda v: v <= 25, "5-8 µs",
            "0.64-0.93 ms" if tag == "0" else "22-28 ms (50k)")
        row(f"restart p99, {sib} siblings", f"restart_p99_{tag}_pooled", usec,
            "<= 200 µs", lambda v: v <= 200, "40-160 µs")
    row("start_child(sup of 1M): per child", "sup_start_us_1000000", usec, "<= 10 µs",
        lambda v: v <= 10)
    row("  ... incl. building its specs", "sup_total_us_1000000", usec, "-", None)
    for n in ("10000", "100000"):
        k = f"{int(n):,}"
        limit = (lambda v: v <= 60) if n == "10000" else None
        for d in ("upgrade", "downgrade"):
            rec = r.get(f"{d}_{n}_servers", {})
            row(f"{d} {k} servers, 4 clients calling", f"{d}_{n}_servers",
                lambda v: f"{v:.0f} ms", "<= 60 ms" if n == "10000" else "(report)",
                limit, "114-128 ms" if n == "10000" else "")
            stall = rec.get("worst_stall_ms", float("nan"))
            lossless = rec.get("lost") == 0 and rec.get("failed") == 0
            rows.append(("  ... worst call stall, lost, failed",
                         f"{stall:.0f} ms, {rec.get('lost')}, {rec.get('failed')}",
                         "<= 20 ms, 0, 0" if n == "10000" else "(report), 0, 0",
                         "84-188 ms, 0" if n == "10000" else "", "",
                         "ok" if lossless and (stall <= 20 or n != "10000") else "MISSED"))
    for mode, what in (("sequential", "1 connection, sequential"),
                       ("pipelined", "1 connection, 64 in flight"),
                       ("connections", "16 connections")):
        row(f"wire: {what}", f"wire_{mode}_otpy", rate, "(report)", None)
        row("  ... bare trio echo, same run", f"wire_{mode}_echo", rate, "-", None)
        row("  ... otpy / echo (best over best)", f"wire_{mode}_ratio", ratio,
            ">= 0.50x" if mode == "pipelined" else "(report)",
            (lambda v: v >= 0.5) if mode == "pipelined" else None)
        pairs = r.get(f"wire_{mode}_ratio", {}).get("paired", [])
        if pairs:
            rows.append(("  ... each round's pair", " ".join(f"{p:.2f}" for p in pairs),
                         "(info)", "", "", ""))
    for load, what, natspy, erl in (("seq", "sequential", "2.5-2.7k/s", "10.8-12k/s"),
                                    ("c64", "64 in flight", "29-35k/s", "42k/s")):
        for shape in ("local", "split"):
            row(f"NATS req/reply, {what}, {shape}", f"nats_otpy_{load}_{shape}", rate,
                f"> nats-py ({natspy} quoted)", None, erl)
            row("  ... / nats-py (same run)", f"nats_otpy_vs_natspy_{load}_{shape}", ratio,
                "(report)", None)
            row("  ... / nats-py via trio-asyncio", f"nats_otpy_vs_natspy_trio_{load}_{shape}",
                ratio, "(report)", None)
    row("  NATS round trip p50 (sequential)", "nats_otpy_rtt_direct_p50", usec, "(report)",
        None)
    for load, what, natspy, erl in (("seq", "sequential", "2.5-2.7k/s", "10.8-12k/s"),
                                    ("c64", "64 in flight", "29-35k/s", "42k/s")):
        row(f"cluster: remote node.call, {what}", f"cluster_remote_{load}", rate,
            f"(nats-py bare echo {natspy} quoted)", None, erl)
        row("  ... bare NATS request, same run", f"cluster_bare_{load}", rate, "-", None)
        row("  ... remote / bare (best over best)", f"cluster_remote_vs_bare_{load}", ratio,
            ">= 0.6x (aim 0.85x)", lambda v: v >= 0.6)
        pairs = r.get(f"cluster_remote_vs_bare_{load}", {}).get("paired", [])
        if pairs:
            rows.append(("  ... each round's pair", " ".join(f"{p:.2f}" for p in pairs),
                         "(info)", "", "", ""))
        for end in ("caller", "callee"):
            rec = r.get(f"cluster_remote_{load}", {})
            bare = r.get(f"cluster_bare_{load}", {})
            if rec and bare:
                rows.append((f"  ... {end} CPU per call, remote / bare",
                             f"{rec[f'{end}_cpu_us']:.0f} / {bare[f'{end}_cpu_us']:.0f} µs",
                             "(info)", "", "", ""))
    row("cluster: 2 nodes on 2 cores, own shards", "cluster_aggregate_two", rate, "-", None)
    row("  ... 1 node, same work", "cluster_aggregate_one", rate, "-", None)
    row("  ... 2 nodes / 1 node", "cluster_aggregate_ratio", ratio, ">= 1.5x (aim 1.8x)",
        lambda v: v >= 1.5)
    rows.append(("  ... cores used: 2 nodes / 1 node",
                 " / ".join(" ".join(f"{c:.2f}" for c in r.get(f"cluster_aggregate_{k}", {})
                                     .get("cores_used", [])) for k in ("two", "one")),
                 "(info: 2.0 / 1.0 on an idle machine)", "", "", ""))
    row("  ... calls per CPU second, 2 nodes / 1", "cluster_aggregate_cpu_ratio", ratio,
        "(info: ~1.0)", None)
    row("  ... 2 nodes, any shard (half remote) / 1", "cluster_aggregate_any_ratio", ratio,
        "(info)", None)
    for op, what in (("call", "await node.call"), ("self_call", "self.call")):
        row(f"cluster: local {what}, clustered node", f"cluster_local_{op}_clustered", rate,
            "-", None)
        row("  ... unclustered node, same run", f"cluster_local_{op}_plain", rate, "-", None)
        row("  ... clustered / unclustered", f"cluster_local_{op}_ratio", ratio, ">= 0.97x",
            lambda v: v >= 0.97)
        row("  ... the same per CPU second", f"cluster_local_{op}_cpu_ratio", ratio,
            ">= 0.97x", lambda v: v >= 0.97)
    rec = r.get("cluster_kill_down_ms", {})
    row("cluster: SIGKILL -> ServerDown (median)", "cluster_kill_down_ms",
        lambda v, rec=rec: f"{v:.0f} ms (max {rec.get('max', 0):.0f})", "<= 100 ms",
        lambda v, rec=rec: rec.get("max", v) <= 100)
    ms = lambda v: f"{v:.0f} ms"  # noqa: E731
    for key, per_node in ((k, k.rsplit("x", 1)[1]) for k in r
                          if k.startswith("cluster_upgrade_3x")):
        rec = r[key]
        row(f"cluster upgrade, 3 nodes x {int(per_node):,}, under load", key,
            lambda v, rec=rec: f"{v:.0f} ms (down {rec.get('downgrade_ms', 0):.0f} ms)",
            "(report)", None)
        row("  ... worst call stall, upgrade / downgrade", key,
            lambda v, rec=rec: f"{rec.get('worst_stall_ms', 0):.0f} / "
                               f"{rec.get('downgrade_stall_ms', 0):.0f} ms "
                               f"(no release: {rec.get('baseline_stall_ms', 0):.0f})",
            "(report)", None)
        row("  ... calls failed during both", key,
            lambda v, rec=rec: f"{rec.get('failed', '?')} of {rec.get('calls', '?'):,}",
            "0", lambda v, rec=rec: rec.get("failed") == 0)
    for key in sorted(k for k in r if k.startswith("cluster_failover_")):
        count = int(key.rsplit("_", 1)[1])
        kind = "durable " if "durable" in key else ""
        row(f"cluster failover: {count:,} {kind}servers after SIGKILL", key, ms, "<= 2 s",
            lambda v: v <= 2000)
    row("cluster: durable call (KV) / not durable", "cluster_durable_call_ratio", ratio,
        "(report)", None)
    for conns in ("1", "16"):
        row(f"http: POST /call, {conns} keep-alive conn.", f"http_otpy_call_c{conns}", rate,
            "(report)", None)
        row("  ... uvicorn bare 200, same run", f"http_uvicorn_c{conns}", rate, "-", None)
        row("  ... call / uvicorn bare", f"http_otpy_call_c{conns}_vs_uvicorn", ratio,
            ">= 0.50x (aim 1x)", lambda v: v >= 0.5)
        row("  ... server CPU per call", f"http_otpy_call_c{conns}_cpu_us", usec, "(info)",
            None)
        row("  ... uvicorn's CPU per bare 200", f"http_uvicorn_c{conns}_cpu_us", usec,
            "(info)", None)
        for stack in ("otpy_bare", "trio_httptools", "trio_h11", "hypercorn_trio"):
            row(f"  ... {stack} (bare 200) / uvicorn", f"http_{stack}_c{conns}_vs_uvicorn",
                ratio, "(info)", None)
    row("http: JSON share of a call", "http_json_share", lambda v: f"{v * 100:.1f} %",
        "(info)", None)
    for key, label, limit in (
            ("maps_one_request", "attack: RSS, empty maps in one request", 10.0),
            ("maps_25_connections", "attack: RSS, 25 conns x unfinished maps", 10.0),
            ("string_25_connections", "attack: RSS, 25 conns x unfinished string", 40.0),
            ("maps_admin_auth", "attack: RSS, empty maps in admin auth", 10.0)):
        rec = r.get(f"attack_rss_{key}", {})
        row(label, f"attack_rss_{key}",
            lambda v, rec=rec: f"{v:.1f} MB ({rec.get('sent_mb', '?')} MB sent)",
            f"<= {limit:.0f} MB", lambda v, limit=limit: v <= limit)
    for tag, servers in (("1k", "1,000"), ("100k", "100,000")):
        rec = r.get(f"attack_latency_unknown_{tag}", {})
        row(f"attack: others' worst latency, unknown-name burst, {servers} servers",
            f"attack_latency_unknown_{tag}",
            lambda v, rec=rec: f"{v:.1f} ms (p99 {rec.get('p99_ms', 0):.1f}, quiet "
                               f"{rec.get('quiet_worst_ms', 0):.1f})",
            "<= 10 ms", lambda v: v <= 10)
    rec = r.get("attack_idle_connections", {})
    row("attack: 1,100 idle sockets, ulimit -n 1024: client, admin get in",
        "attack_idle_connections",
        lambda v, rec=rec: f"client {rec.get('client')}, admin {rec.get('admin')}",
        "both", lambda v: v == 2)
    row("dashboard open, 100k servers: node.call", "dashboard_call_ratio", ratio,
        ">= 0.95x", lambda v: v >= 0.95)
    row("  ... worst loop hold by its views", "dashboard_worst_stall_ms",
        lambda v: f"{v:.1f} ms", "<= 20 ms", lambda v: v <= 20)
    row("  ... loop time per rebuild", "dashboard_build_ms", lambda v: f"{v:.0f} ms",
        "(info)", None)
    row("  ... 1 ms sleeper's worst lateness", "dashboard_probe_stall_ms",
        lambda v: f"{v:.1f} ms", "(info)", None)
    row("  ... the same, no page open", "dashboard_probe_stall_closed_ms",
        lambda v: f"{v:.1f} ms", "(info)", None)
    row("step statistics on: node.call", "step_stats_call_ratio", ratio, ">= 0.97x",
        lambda v: v >= 0.97)
    row("step watchdog: node.call on/off", "watchdog_call_ratio", ratio, "(info: ~1.0)",
        None)
    row("  ... node.cast on/off", "watchdog_cast_ratio", ratio, "(info: ~1.0)", None)
    for b in ("20", "200"):
        rec = r.get(f"watchdog_overshoot_{b}ms", {})
        row(f"  ... cut {b} ms budget: late by (median)", f"watchdog_overshoot_{b}ms",
            lambda v, rec=rec: f"{v:.0f} ms (worst {rec.get('worst_ms', 0):.0f})",
            "(info)", None)
    row("monitor + demonitor in a callback (#12)", "monitor_demonitor", rate, "(report)",
        None)
    row("ServerDown after a crash (median)", "server_down_latency_median", usec,
        "(report)", None)
    row("node.call by pid / by name", "call_pid_vs_name", ratio, "(info: ~1.0)", None)
    secs = lambda v: f"{v:.2f} s"  # noqa: E731
    row("durable call, fsync never (issue #13)", "durable_call", rate, "(report)", None)
    row("  ... the same server, not durable", "durable_call_plain", rate, "-", None)
    row("  ... durable / not durable (paired)", "durable_call_ratio", ratio,
        ">= 0.25x (aim 0.5x)", lambda v: v >= 0.25)
    row("durable 10k-key dict, 1 key per call", "durable_big_patch", rate, ">= 20k/s",
        lambda v: v >= 20e3)
    row("  ... without self.changed (whole state)", "durable_big_whole", rate, "(info)",
        None)
    row("durable fsync=group, 64 clients", "durable_group_64", rate, ">= 20k/s",
        lambda v: v >= 20e3)
    row("  ... / the disk's ceiling, same round", "durable_group_64_vs_ceiling", ratio,
        "(info)", None)
    row("start of 100k durable servers (stored)", "durable_start_100k", secs, "<= 2 s",
        lambda v: v <= 2)
    row("  ... first start (empty store)", "durable_first_start_100k", secs, "(info)", None)
    row("  ... 100k servers, not durable", "durable_plain_start_100k", secs, "-", None)
    row("  ... raw: store open + load 100k", "raw_store_load_100k", secs, "-", None)
    row("  raw: os.write of 54 bytes", "raw_append_54", usec, "-", None)
    row("  raw: SqliteStore.put, small state", "raw_store_put_small", usec, "-", None)
    row("  raw: SQLite WAL NORMAL, 1 txn per row", "raw_sqlite_wal_normal_txn", usec, "-",
        None)
    row("  raw: 64 writes + 1 fdatasync, per rec.", "raw_append_fdatasync_64", usec, "-",
        None)
    ms = lambda v: f"{v:.0f} ms"  # noqa: E731
    row("loading a release: loop stall, thread", "release_load_loop_stall_thread_ms", ms,
        "~20 ms", None)
    row("  ... the same on the loop (old path)", "release_load_loop_stall_on_loop_ms", ms,
        "-", None)
    row("  ... nothing loading (baseline)", "release_load_loop_stall_idle_ms", ms, "-",
        None)
    return rows


def print_table(rows: list[Row]) -> None:
    head = ("measurement", "measured", "target", f"{ERLANG}*", f"{TRIOTP}*", "")
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    print()
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip())
    print(line)
    for x in rows:
        print("  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip())
    print(line)
    print(f"* {ERLANG} and {TRIOTP} columns are QUOTED from issues #2 and #3 (measured on "
          f"this machine when the issues were filed), NOT measured by this run.")
    print("  Targets from issues #2 and #3 (upgrades: #4, wire: #5, attacks: #11, pids: "
          "#12, durable: #13, http: #14, cluster: #15, cluster releases and failover: "
          "#16); '(>= 1M/s)' on queued casts is the plain cast target, shown for "
          "comparison only.")
    print("  cluster rows: node B (and the bare responder) in a process of their own, "
          "each measurement a fresh process; 'own shards': each node's tasks call only its "
          "own counters (bench_cluster.py's docstring says exactly what is measured).")
    print("  http rows: wrk -t1 against a server in its own process (2 cores: one each), "
          "best of 3 interleaved rounds; the call is a full POST /call with a JSON body.")
    print(f"  Logging: {LOGGING_NOTE}.")
    print("  Rates: best of the interleaved rounds; node.call/checkpoint: best over best "
          "(and the median of per-round pairs).")
    print("  'prebuilt Reply' rows: the handler returns one Reply made in advance, which "
          "shows what building otpy.Reply(...) costs (info, no target).")
    print("  Bytes per server include its Child spec unless marked 'runtime only'; "
          "restarts: median over processes of each process's median / p99.")


def main() -> None:
    t0 = time.perf_counter()
    emit("info", 0, "-", note=LOGGING_NOTE, **python_info())
    results: list[dict[str, Any]] = []
    results += run_group("bench_node.py", "rates", str(RATE_ROUNDS))
    results += run_group("bench_node.py", "memory", "100000")
    results += run_group("bench_node.py", "memory", "100000", "--tracemalloc")
    results += run_group("bench_node.py", "memory", "1000000")
    rounds: dict[int, list[list[dict[str, Any]]]] = {0: [], 100_000: []}
    for _ in range(RESTART_ROUNDS):
        for siblings in rounds:
            rounds[siblings].append(
                run_group("bench_supervisor.py", "restart", str(siblings),
                          str(RESTART_SAMPLES)))
    for siblings, rs in rounds.items():
        results += restart_pooled(siblings, rs)
    sup = run_group("bench_supervisor.py", "start_sup", "1000000")
    results += sup
    results += run_group("bench_release.py", "10000", "100000")
    results += run_group("bench_watchdog.py")
    results += run_group("bench_wire.py")
    results += run_group("bench_release_load.py")
    results += run_group("bench_durable.py", "rates", str(DURABLE_ROUNDS))
    results += run_group("bench_durable.py", "start", "100000")
    results += run_group("bench_nats.py")
    results += run_group("bench_cluster.py")
    results += run_group("bench_cluster_ops.py")
    results += run_group("bench_processes.py")
    results += run_group("bench_http.py")
    results += run_group("bench_attack.py")
    results += run_group("bench_dashboard.py")
    by = {x["bench"]: x for x in results}
    results.append(emit("sup_total_us_1000000",
                        by["sup_start_us_1000000"]["value"] + by["sup_spec_us_1000000"]["value"],
                        "us", what="supervisor of 1M: specs built + started, µs per child"))
    results.append(emit("bench_seconds", time.perf_counter() - t0, "s"))
    print_table(table({x["bench"]: x for x in results}))


if __name__ == "__main__":
    main()
