"""Pieces of the metergate benchmark: processes, the nginx upstream, the gateway, wrk, report.

Each module does one thing so the later full suite can add scenarios (streaming, several
workers, other upstream shapes) by composing them instead of copying `run.py`.
"""
