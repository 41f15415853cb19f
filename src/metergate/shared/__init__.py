"""Fleet-wide shared state in Redis: budgets, rate limits and the response cache.

Absent `redis:` in the config, everything stays in process (exact within one process).
With it, every process and replica sharing the Redis shares the counters: budgets and
rate limits stay exact across the fleet, and a cached answer serves every gateway.

Modules: `redis` (the link: pool, health, reconnection), `scripts` (Lua), `counters`
(budgets and rate limits), `cache` (cached answers), `state` (what a Plan holds).
"""
