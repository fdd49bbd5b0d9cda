"""Benchmarks against real peers (issue 5): ``make bench`` / ``make bench-quick``.

Every process here talks over loopback only. ``bench.run`` is the harness; the other
modules are the processes it starts (the upstream driver, load generators, peers).
"""
