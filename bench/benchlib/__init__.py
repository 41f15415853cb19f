"""Pieces of the metergate benchmark: processes, the nginx upstream, the gateway, wrk, report.

Each module does one thing; `suite.py` (the whole suite) and `run.py` (the quick check)
compose them, and a new scenario should too rather than copy either.
"""
