"""bench/mode_bench.py without root: its arguments and its report (the runs need namespaces)."""

from __future__ import annotations

import pytest

from bench.mode_bench import FIGURES, MODES, Figure, Measured, Results, parse_args, render


def test_quick_is_one_round_of_one_second_windows() -> None:
    args = parse_args(["--quick"])
    assert (args.seconds, args.rounds, args.endpoints) == (1.0, 1, 2)
    assert parse_args([]).rounds == 2


def test_zero_rounds_is_refused() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "0"])


def _window(mb: float = 0.0, ops: int = 0, latencies: tuple[int, ...] = (10,)) -> Measured:
    return Measured(
        ops=ops,
        bytes=int(mb * 1e6),
        errors=0,
        wall=1.0,
        latencies_us=list(latencies),
        client_cpu=0.5,
        server_cpu=0.5,
        relay_cpu=0.25,
        machine_busy=1.0,
    )


def test_the_report_takes_each_modes_best_round_and_prints_every_rounds_ratio() -> None:
    bulk = Figure("bulk", 1)
    results: Results = {(mode, f): [_window(ops=100)] for mode in MODES for f in FIGURES}
    results[("direct", bulk)] = [_window(mb=3000)]
    results[("iptables", bulk)] = [_window(mb=1000), _window(mb=2000)]
    results[("userspace", bulk)] = [_window(mb=600), _window(mb=900)]
    rows = render(results)
    line = next(r for r in rows if r.startswith("bulk TCP, 1 client MB/s"))
    assert line.split()[-6:] == ["3000.0", "2000.0", "900.0", "0.45", "0.60", "0.45"]
    # 0.25 of a core for 900 MB in one second: 278 us of relay CPU per MB
    cpu_table = rows[rows.index("") :]
    cpu = next(r for r in cpu_table if r.strip().startswith("bulk TCP, 1 client "))
    assert cpu.endswith("relay 278 us/MB")


def test_added_latency_is_counted_from_the_direct_path() -> None:
    persistent = Figure("persistent", 1)
    results: Results = {(mode, f): [_window(ops=100)] for mode in MODES for f in FIGURES}
    for mode, lat in (("direct", 20), ("iptables", 25), ("userspace", 80)):
        results[(mode, persistent)] = [_window(ops=100, latencies=(lat,) * 100)]
    rows = render(results)
    at = rows.index(next(r for r in rows if r.startswith("persistent req/reply, 1 client")))
    assert rows[at + 1].strip().startswith("round trip p50 us")
    assert rows[at + 1].endswith("added: iptables +5 us, userspace +60 us")
