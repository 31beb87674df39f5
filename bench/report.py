"""Markdown tables, goal checks and PNG plots from one bench run."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _med(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _fmt(triple: tuple[float, float, float], digits: int = 0) -> str:
    med, lo, hi = triple
    if lo == hi:
        return f"{med:,.{digits}f}"
    return f"{med:,.{digits}f} [{lo:,.{digits}f}–{hi:,.{digits}f}]"


def summarise(results: dict) -> dict[str, dict[str, Any]]:
    out = {}
    for name, runs in results["throughput"].items():
        if not runs:
            continue
        a = [r["A"] for r in runs]
        b = [r["B"] for r in runs]
        out[name] = {
            "a_rps": _med([x["rps"] for x in a]),
            "a_p50": _med([x["p50_ms"] for x in a]),
            "a_p99": _med([x["p99_ms"] for x in a]),
            "a_cpu_us": _med([x["server_cpu_per_req_us"] for x in a]),
            "a_cores": _med([x["server_cpu_s"] / x["seconds"] for x in a]),
            "a_wrk_cores": _med([x["client_cpu_s"] / x["seconds"] for x in a]),
            "b_cores": _med([x["server_cpu_s"] / x["seconds"] for x in b]),
            "b_wrk_cores": _med([x["client_cpu_s"] / x["seconds"] for x in b]),
            "b_rps": _med([x["rps"] for x in b]),
            "b_p99": _med([x["p99_ms"] for x in b]),
            "b_cpu_us": _med([x["server_cpu_per_conn_us"] for x in b]),
            "resumed": _med([x["resumed_share"] * 100 for x in b]),
            "tls": b[0]["tls_version"],
            "kx": _kx(runs[0].get("tls")),
            "errors": sum(x["socket_errors"] + x["non_2xx"] for x in a + b),
            "rss": _med([x["rss_worker_mib"] for x in a]),
            "pss": _med([x["pss_worker_mib"] for x in a]),
            "pss_total": _med([x["pss_total_mib"] for x in a]),
        }
    return out


def _kx(facts: dict | None) -> str:
    """Key exchange group / certificate signature, as `openssl s_client` saw them."""
    if not facts:
        return "?"
    return f"{facts.get('group', '?')} / {facts.get('signature', '?')}"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def goals(s: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    if "zion" in s and "uvicorn" in s:
        z, u = s["zion"], s["uvicorn"]
        ka = z["a_rps"][0] / u["a_rps"][0]
        nc = z["b_rps"][0] / u["b_rps"][0]
        mem = z["pss_total"][0] / u["pss_total"][0]
        lines.append(f"- keep-alive vs uvicorn: **{ka:.2f}×** (goal ≥ 1.4×) — {_met(ka >= 1.4)}")
        lines.append(f"- keep-alive p99: zion **{z['a_p99'][0]:.2f} ms**, uvicorn "
                     f"{u['a_p99'][0]:.2f} ms (goal ≤ uvicorn's) — "
                     f"{_met(z['a_p99'][0] <= u['a_p99'][0])}")
        lines.append(f"- new connections vs uvicorn: **{nc:.2f}×** (goal ≥ 1.3×) — "
                     f"{_met(nc >= 1.3)}")
        lines.append(f"- whole process tree PSS vs uvicorn: **{mem:.2f}×** "
                     f"({z['pss_total'][0]:.0f} vs {u['pss_total'][0]:.0f} MiB; goal ≤ 1.1×) — "
                     f"{_met(mem <= 1.1)}")
    if "zion" in s and "uvloop-floor" in s:
        z, f = s["zion"], s["uvloop-floor"]
        per_conn = z["b_cpu_us"][0] / f["b_cpu_us"][0]
        lines.append(f"- server CPU per new connection vs the bare uvloop floor: **{per_conn:.2f}×"
                     f"** ({z['b_cpu_us'][0]:.0f} vs {f['b_cpu_us'][0]:.0f} µs; goal ≤ 1.15×) — "
                     f"{_met(per_conn <= 1.15)}")
    if "zion" in s:
        z = s["zion"]
        lines.append(f"- resumed handshakes across workers: **{z['resumed'][0]:.0f} %** "
                     f"(goal ≥ 95 %) — {_met(z['resumed'][0] >= 95)}")
    if "zion" in s and "zion-before" in s:
        z, b = s["zion"], s["zion-before"]
        ratio = z["a_rps"][0] / b["a_rps"][0]
        lines.append(f"- keep-alive, this commit vs zion-before: **{ratio:.2f}×** "
                     f"req/s; server CPU per request {z['a_cpu_us'][0]:.1f} µs vs "
                     f"{b['a_cpu_us'][0]:.1f} µs")
    if "zion" in s and "zion-nodemux" in s:
        over = 1 - s["zion"]["a_rps"][0] / s["zion-nodemux"]["a_rps"][0]
        lines.append(f"- demux overhead, keep-alive req/s vs no demux: **{over * 100:+.1f} %** "
                     f"(goal ≤ 1 %; negative = faster; run-to-run noise here is ±5–15 %)")
    return lines


def round_ratios(results: dict, key: str, ref: str) -> dict[str, tuple[float, float, float]]:
    """Each server's A or B req/s over `ref`'s in the same round (rounds
    interleave the servers, so both saw the same machine), as median [min-max]."""
    rows = results.get("throughput") or {}
    base = rows.get(ref) or []
    out = {}
    for name, runs in rows.items():
        pairs = [r[key]["rps"] / b[key]["rps"] for r, b in zip(runs, base, strict=False)
                 if b[key]["rps"]]
        if pairs:
            out[name] = _med(pairs)
    return out


def ratios_text(results: dict) -> list[str]:
    """What `bench/run.sh --quick` prints: every server against the floor and
    uvicorn, keep-alive (A) and new connections (B)."""
    s = summarise(results)
    if not s:
        return ["no throughput runs: nothing to compare"]
    meta = results["meta"]
    load = meta.get("loadavg_1m") or [float("nan")]
    refs = [r for r in ("uvloop-floor", "uvicorn") if r in s]
    ratio = {(key, ref): round_ratios(results, key, ref) for key in "AB" for ref in refs}
    cols = [("keep-alive req/s", 16)] + [(f"A ×{_short(r)}", 18) for r in refs] + [
        ("µs CPU/req", 10), ("new conn/s", 10)] + [(f"B ×{_short(r)}", 18) for r in refs] + [
        ("µs CPU/conn", 11)]
    lines = [
        f"zion bench, {meta['mode']}: {meta['rounds']} interleaved round(s) of "
        f"{meta['seconds_per_run']:.0f} s per run, commit {meta['commit']}, "
        f"{meta['machine']['cpus']} CPUs, 1-min load average {min(load):.1f}–{max(load):.1f} "
        "after the runs.",
        "Ratios are taken within each round, then the median [min–max]; on a shared "
        "machine the absolute figures move with other work, the ratios less.",
        "",
        f"{'server':<16}" + "".join(f"  {c:>{w}}" for c, w in cols),
    ]
    for name, v in s.items():
        cells = [f"{v['a_rps'][0]:,.0f}"]
        cells += [_ratio(ratio[("A", r)].get(name)) for r in refs]
        cells += [f"{v['a_cpu_us'][0]:.1f}", f"{v['b_rps'][0]:,.0f}"]
        cells += [_ratio(ratio[("B", r)].get(name)) for r in refs]
        cells += [f"{v['b_cpu_us'][0]:.0f}"]
        lines.append(f"{name:<16}" + "".join(f"  {c:>{w}}" for c, (_, w) in zip(cells, cols,
                                                                                 strict=True)))
    return lines


def _short(name: str) -> str:
    return "floor" if name == "uvloop-floor" else name


def _ratio(triple: tuple[float, float, float] | None) -> str:
    if triple is None:
        return "–"
    med, lo, hi = triple
    return f"{med:.2f}" if lo == hi else f"{med:.2f} [{lo:.2f}–{hi:.2f}]"


def _scenario(rows: dict | None, title: str, method: str, columns: list[str],
              cells: Callable[[dict], list[Any]]) -> list[str]:
    """One scenario's section: title, how it was measured, a row per server."""
    if not rows:
        return []
    out = [f"## {title}", "", method, "", "| server | " + " | ".join(columns) + " |",
           "|---|" + "---|" * len(columns)]
    out += [f"| {name} | " + " | ".join(str(c) for c in cells(v)) + " |"
            for name, v in rows.items()]
    return [*out, ""]


def write(results: dict, outdir: Path, stamp: str) -> Path:
    s = summarise(results)
    meta = results["meta"]
    base = s.get("uvicorn")
    lines = [
        f"# zion bench — {meta['date']} ({meta['mode']}, {meta['rounds']} round(s), "
        f"{meta['seconds_per_run']:.0f} s per run)",
        "",
        f"Machine: {meta['machine']['cpus']} vCPU {meta['machine']['cpu']}, kernel "
        f"{meta['machine']['kernel']}, Python {meta['machine']['python']}, commit "
        f"{meta['commit']}. wrk -t1 runs on the same cores as the server."
        + (f" Load average (1 min) after the throughput runs: "
           f"{min(meta['loadavg_1m']):.1f}–{max(meta['loadavg_1m']):.1f}."
           if meta.get("loadavg_1m") else ""),
        "",
        "## Throughput (2 workers, HTTPS, ECDSA P-256)",
        "",
        "A = `wrk -t1 -c64` keep-alive; B = `wrk -t1 -c32 -H 'Connection: close'` (a new "
        "TCP+TLS connection per request, wrk offering its last session ticket). Median "
        "[min–max]. CPU is the server's whole process tree, from /proc.",
        "",
        "| server | A req/s | A ×uvicorn | A p50 ms | A p99 ms | CPU µs/req | A server/wrk "
        "cores | B conn/s | B ×uvicorn | B p99 ms | CPU µs/conn | B server/wrk cores | "
        "resumed % | TLS | group / cert | errors | worker RSS / PSS MiB | all processes PSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in s.items():
        ra = f"{v['a_rps'][0] / base['a_rps'][0]:.2f}" if base else "–"
        rb = f"{v['b_rps'][0] / base['b_rps'][0]:.2f}" if base else "–"
        lines.append(
            f"| {name} | {_fmt(v['a_rps'])} | {ra} | {_fmt(v['a_p50'], 2)} | "
            f"{_fmt(v['a_p99'], 2)} | {_fmt(v['a_cpu_us'], 1)} | "
            f"{v['a_cores'][0]:.2f} / {v['a_wrk_cores'][0]:.2f} | {_fmt(v['b_rps'])} | {rb} | "
            f"{_fmt(v['b_p99'], 2)} | {_fmt(v['b_cpu_us'])} | "
            f"{v['b_cores'][0]:.2f} / {v['b_wrk_cores'][0]:.2f} | {_fmt(v['resumed'])} | "
            f"{v['tls']} | {v['kx']} | {v['errors']} | {v['rss'][0]:.1f} / {v['pss'][0]:.1f} | "
            f"{v['pss_total'][0]:.1f} |")
    lines += ["", "### Against the floor and uvicorn", "", "```", *ratios_text(results), "```"]
    lines += ["", "### Goals", "", *goals(s), ""]
    lines += _scenario(
        results.get("stalled"), "One of 4 workers stopped (SIGSTOP) for 2 s under load",
        "Open loop: 400 new TLS connections/s, each one request, 5 s client timeout; a "
        "connection queued behind the stopped worker waits until it resumes.",
        ["connections", "failed", "slow > 1 s", "p99 ms", "max ms"],
        lambda v: [v["connections"], v["failed"], v["slow_over_1s"], f"{v['p99_ms']:.1f}",
                   f"{v['max_ms']:.0f}"])
    lines += _scenario(
        results.get("mixed"), "Mixed load: 5 % of requests hold their worker for 200 ms "
        "(4 workers)", "Open loop: 150 new TLS connections/s, one request each.",
        ["light requests", "light p50 ms", "light p99 ms", "failed"],
        lambda v: [v["light_requests"], f"{v['light_p50_ms']:.1f}", f"{v['light_p99_ms']:.1f}",
                   v["failed"]])
    lines += _scenario(
        results.get("reload"), "Reloads under load (reload signal, new connection per "
        "request)", "Open loop: 300 new TLS connections/s; reloads evenly spaced.",
        ["reloads", "requests", "failed", "server alive after"],
        lambda v: [v["reloads"], v["requests"], v["failed"],
                   "yes" if v["server_survived"] else "NO"])
    lines += _websocket(results.get("websocket"))
    lines += _http3(results.get("http3"))
    lines += _files(results.get("files"), "TLS")
    lines += _files(results.get("files-plain"), "plain HTTP/1.1")
    lines += ["## Non-default settings", ""]
    lines += [f"- {k}: {v}" for k, v in meta["non_defaults"].items()]
    lines += ["", "## Exact commands", ""]
    for name, runs in results["throughput"].items():
        if runs:
            lines.append(f"- {name}: `{' '.join(runs[0]['argv'])}`")
    first = next((runs for runs in results["throughput"].values() if runs), None)
    if first:
        lines += ["- load: `" + " ".join(first[0]["A"]["argv"])
                  + "` and the same with `-c32 -H 'Connection: close'`", ""]
    plots = _plots(results, s, outdir, stamp)
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    md = outdir / f"{stamp}-{meta['mode']}.md"
    md.write_text("\n".join(lines) + "\n")
    (outdir / "latest.md").write_text("\n".join(lines).replace(
        f"]({stamp}", f"](bench/results/{stamp}") + "\n")
    return md


def _websocket(rows: dict | None) -> list[str]:
    if not rows:
        return []
    out = ["## WebSocket echo (2 workers, wss, 16 connections, one message in flight each)", "",
           "Client: the `websockets` library in one asyncio process (it shares the 2 cores, "
           "so msgs/s is client-bound; server CPU per message is the comparable figure). "
           "Median [min–max] over rounds.", "",
           "| server | 64 B msgs/s | 64 B server CPU µs/msg | 64 B p99 ms | 16 KiB msgs/s | "
           "16 KiB server CPU µs/msg | errors |", "|---|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        ok = [r for r in runs if "unsupported" not in r and r["64"]["messages"] > 0]
        if not ok:
            out.append(f"| {name} | no WebSocket: every handshake refused | – | – | – | – | "
                       f"{sum(r.get('64', {}).get('errors', 0) for r in runs)} |")
            continue
        small = [r["64"] for r in ok]
        big = [r["16384"] for r in ok]
        out.append(
            f"| {name} | {_fmt(_med([x['msgs_per_s'] for x in small]))} | "
            f"{_fmt(_med([x['server_cpu_per_msg_us'] for x in small]), 1)} | "
            f"{_fmt(_med([x['p99_ms'] for x in small]), 2)} | "
            f"{_fmt(_med([x['msgs_per_s'] for x in big]))} | "
            f"{_fmt(_med([x['server_cpu_per_msg_us'] for x in big]), 1)} | "
            f"{sum(x['errors'] for x in small + big)} |")
    return [*out, ""]


def _http3(rows: dict | None) -> list[str]:
    if not rows:
        return []
    out = ["## HTTP/3 (1 worker, QUIC on the TCP port's number, both on aioquic)", "",
           "Client: aioquic's, pure Python, in the bench's process (4 connections x 10 "
           "streams, an iteration's requests coalesced): req/s is client-bound, server CPU "
           "per request (whole process tree, /proc) is the comparable figure. Median "
           "[min–max] over rounds.", "",
           "| server | req/s | server CPU µs/req | server / client cores | "
           "datagrams to the client per req | failed | load (1 min) |",
           "|---|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        out.append(
            f"| {name} | {_fmt(_med([r['rps'] for r in runs]))} | "
            f"{_fmt(_med([r['server_cpu_per_req_us'] for r in runs]))} | "
            f"{statistics.median(r['server_cpu_s'] / r['seconds'] for r in runs):.2f} / "
            f"{statistics.median(r['client_cpu_s'] / r['seconds'] for r in runs):.2f} | "
            f"{_fmt(_med([r.get('datagrams_per_req', 0.0) for r in runs]), 2)} | "
            f"{sum(r['failed'] + r['errors'] for r in runs)} | "
            f"{_fmt(_med([r['loadavg_1m'] for r in runs]), 1)} |")
    zion, peer = rows.get("zion-h3"), rows.get("hypercorn-h3")
    if zion and peer:  # ratios within each round (the rounds interleave), then the median
        pairs = list(zip(zion, peer, strict=False))
        rps = _med([z["rps"] / p["rps"] for z, p in pairs])
        cpu = _med([z["server_cpu_per_req_us"] / p["server_cpu_per_req_us"] for z, p in pairs])
        out += ["", f"zion-h3 / hypercorn-h3 within each round: req/s **{_fmt(rps, 2)}×**, "
                f"server CPU per request **{_fmt(cpu, 2)}×** (below 1: zion spends less)."]
    return [*out, ""]


def _files(rows: dict | None, over: str) -> list[str]:
    if not rows:
        return []
    out = [f"## Files over {over} (2 workers, keep-alive)", "",
           "`wrk -t1` GET of a 1 MiB file (16 connections) and a 100 MiB one (4 connections). "
           "The app sends `http.response.pathsend` where the server advertises it (column "
           "pathsend); nginx serves the file itself. CPU is the server's process tree. "
           "Median [min–max] over rounds.", "",
           "| server | pathsend | 1 MiB req/s | 1 MiB server CPU ms/req | 100 MiB req/s | "
           "100 MiB MiB/s | 100 MiB server CPU ms/req | errors |",
           "|---|---|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        small = [r["1m.bin"] for r in runs]
        big = [r["100m.bin"] for r in runs]
        out.append(
            f"| {name} | {runs[0].get('pathsend', '?')} | "
            f"{_fmt(_med([x['rps'] for x in small]))} | "
            f"{_fmt(_med([x['server_cpu_per_req_ms'] for x in small]), 2)} | "
            f"{_fmt(_med([x['rps'] for x in big]), 1)} | "
            f"{_fmt(_med([x['mib_per_s'] for x in big]))} | "
            f"{_fmt(_med([x['server_cpu_per_req_ms'] for x in big]))} | "
            f"{sum(x['socket_errors'] + x['non_2xx'] for x in small + big)} |")
    return [*out, ""]


def _plots(results: dict, s: dict, outdir: Path, stamp: str) -> list[Path]:
    if not s:
        return []
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    names = list(s)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, key, title in ((axes[0], "a_rps", "keep-alive req/s"),
                           (axes[1], "b_rps", "new connections/s"),
                           (axes[2], "a_p99", "keep-alive p99 ms")):
        meds = [s[n][key][0] for n in names]
        errs = [[s[n][key][0] - s[n][key][1] for n in names],
                [s[n][key][2] - s[n][key][0] for n in names]]
        colors = ["#2a7" if n.startswith("zion") else "#888" for n in names]
        ax.bar(names, meds, yerr=errs, color=colors, capsize=3)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    path = outdir / f"{stamp}-throughput.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    made.append(path)
    if results.get("stalled"):
        stalled = results["stalled"]
        cols = 4
        rows = -(-len(stalled) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(16, 3.2 * rows), sharey=True,
                                 squeeze=False)
        for ax, (name, v) in zip(axes.flat, stalled.items(), strict=False):
            pts = v["timeline"]
            ax.scatter([p[0] for p in pts], [p[1] if p[2] else 5000 for p in pts], s=3,
                       color="#2a7" if name.startswith("zion") else "#555")
            ax.axvspan(1.0, 3.0, color="#f55", alpha=0.12)
            ax.set_yscale("log")
            ax.set_title(f"{name}: {v['slow_over_1s']} slow, {v['failed']} failed", fontsize=10)
        for ax in axes.flat[len(stalled):]:
            ax.axis("off")
        for ax in axes[:, 0]:
            ax.set_ylabel("latency ms")
        fig.suptitle("one of 4 workers SIGSTOPped from 1 s to 3 s (red): latency of every new "
                     "connection, by start time")
        fig.tight_layout()
        path = outdir / f"{stamp}-stalled.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        made.append(path)
    return made
