"""Versioned schema migrations, applied in order at open, each exactly once.

DDL is written once; `{pk}` becomes the dialect's auto-increment primary key. Running
processes may start together: the whole check-and-apply runs under a write lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from metergate.storage.database import Database

_LOCK_KEY = 0x6D657465  # "mete": PostgreSQL advisory lock id for migrations
_PK = {"sqlite": "INTEGER PRIMARY KEY", "postgresql": "BIGSERIAL PRIMARY KEY"}
# A ledger row's hour, floor(ts / 3600), as `metering.hourly` reads it (ts >= h * 3600):
# the division can round a row a hair before an hour's start up into that hour, so the
# quotient is checked against the row's time (exact: an integer times 3600).
_QUOTIENT = {
    "sqlite": "CAST(ts / 3600 AS INTEGER)",
    "postgresql": "CAST(FLOOR(ts / 3600) AS BIGINT)",
}
HOUR_OF_TS = {
    dialect: f"CASE WHEN {q} * 3600 > ts THEN {q} - 1 ELSE {q} END"
    for dialect, q in _QUOTIENT.items()
}
# A latency's bin, as `metering.hourly.latency_bin` computes it: floor(8 * log2(ms)), with
# anything under 2**-10 ms in the lowest bin (-80). (LN: SQLite's math functions, which
# `storage.database` provides where the library was built without them.)
LATENCY_BIN = {
    "sqlite": "CAST(FLOOR(8 * LN(MAX({x}, 0.0009765625)) / LN(2)) AS INTEGER)",
    "postgresql": "CAST(FLOOR(8 * LN(GREATEST({x}, 0.0009765625)) / LN(2)) AS INTEGER)",
}


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "keys and usage ledger",
        (
            """CREATE TABLE keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            hint TEXT NOT NULL,
            models TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            revoked_at DOUBLE PRECISION
        )""",
            "CREATE UNIQUE INDEX keys_active_name ON keys (name) WHERE revoked_at IS NULL",
            """CREATE TABLE requests (
            id {pk},
            ts DOUBLE PRECISION NOT NULL,
            request_id TEXT NOT NULL,
            key_name TEXT NOT NULL,
            model TEXT NOT NULL,
            upstream TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            input_tokens INTEGER NOT NULL,
            cached_input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            cost_nano BIGINT NOT NULL,
            saved_nano BIGINT NOT NULL,
            duration_ms DOUBLE PRECISION NOT NULL,
            ttft_ms DOUBLE PRECISION,
            outcome TEXT NOT NULL,
            status INTEGER NOT NULL,
            cache_hit INTEGER NOT NULL,
            stream INTEGER NOT NULL
        )""",
            "CREATE INDEX requests_ts ON requests (ts)",
            "CREATE INDEX requests_key_ts ON requests (key_name, ts)",
            "CREATE INDEX requests_model_ts ON requests (model, ts)",
        ),
    ),
    Migration(2, "per-key max_tokens cap", ("ALTER TABLE keys ADD COLUMN max_tokens_cap INTEGER",)),
    Migration(
        3,
        "config history, rollouts, leases",
        (
            """CREATE TABLE config_versions (
                id {pk},
                hash TEXT NOT NULL,
                source TEXT NOT NULL,
                body TEXT NOT NULL,
                applied_at DOUBLE PRECISION NOT NULL,
                note TEXT NOT NULL
            )""",
            """CREATE TABLE rollouts (
                name TEXT PRIMARY KEY,
                state TEXT NOT NULL,
                stage INTEGER NOT NULL,
                stage_started_at DOUBLE PRECISION NOT NULL,
                failures INTEGER NOT NULL,
                last_judgment TEXT NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL
            )""",
            """CREATE TABLE rollout_events (
                id {pk},
                ts DOUBLE PRECISION NOT NULL,
                rollout TEXT NOT NULL,
                event TEXT NOT NULL,
                stage INTEGER NOT NULL,
                detail TEXT NOT NULL
            )""",
            "CREATE INDEX rollout_events_rollout ON rollout_events (rollout, ts)",
            """CREATE TABLE leases (
                name TEXT PRIMARY KEY,
                holder TEXT NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL
            )""",
        ),
    ),
    Migration(
        4,
        "usage estimated by the gateway",
        ("ALTER TABLE requests ADD COLUMN usage_estimated INTEGER NOT NULL DEFAULT 0",),
    ),
    Migration(
        5,
        "api of each request; stored Responses API answers",
        (
            "ALTER TABLE requests ADD COLUMN api TEXT NOT NULL DEFAULT 'chat'",
            """CREATE TABLE stored_responses (
                id TEXT PRIMARY KEY,
                key_id TEXT NOT NULL,
                previous_id TEXT,
                created_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL,
                size INTEGER NOT NULL,
                input TEXT NOT NULL,
                response TEXT NOT NULL
            )""",
            "CREATE INDEX stored_responses_created ON stored_responses (created_at)",
            "CREATE INDEX stored_responses_expires ON stored_responses (expires_at)",
        ),
    ),
    Migration(
        6,
        "teams, tags, request log",
        (
            """CREATE TABLE teams (
                name TEXT PRIMARY KEY,
                description TEXT NOT NULL,
                tags TEXT,
                budgets TEXT NOT NULL,
                rpm INTEGER,
                tpm INTEGER,
                created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL
            )""",
            "ALTER TABLE keys ADD COLUMN team TEXT",
            "ALTER TABLE keys ADD COLUMN tags TEXT",
            "ALTER TABLE requests ADD COLUMN team TEXT",
            "ALTER TABLE requests ADD COLUMN tags TEXT",
            "CREATE INDEX requests_team_ts ON requests (team, ts)",
            """CREATE TABLE request_log (
                id {pk},
                ts DOUBLE PRECISION NOT NULL,
                request_id TEXT NOT NULL,
                key_name TEXT NOT NULL,
                outcome TEXT NOT NULL,
                record TEXT NOT NULL
            )""",
            "CREATE INDEX request_log_request ON request_log (request_id, ts)",
            "CREATE INDEX request_log_ts ON request_log (ts)",
        ),
    ),
    Migration(
        7,
        "rollout row versions",
        # Every change of a rollout is a compare-and-set on its version, so two actions
        # (of any processes) checked against the same state cannot both be saved.
        ("ALTER TABLE rollouts ADD COLUMN version BIGINT NOT NULL DEFAULT 1",),
    ),
    Migration(
        8,
        "key change numbers",
        # Each change of a key takes the next number of one counter (its row lock orders
        # concurrent changes), so gateways reload only the keys changed since they last
        # looked instead of every key every two seconds (`storage.keys.keys_changed`).
        (
            "ALTER TABLE keys ADD COLUMN change_seq BIGINT NOT NULL DEFAULT 0",
            "CREATE INDEX keys_change_seq ON keys (change_seq)",
            "CREATE TABLE key_changes (id INTEGER PRIMARY KEY, seq BIGINT NOT NULL)",
            "INSERT INTO key_changes (id, seq) VALUES (1, 0)",
        ),
    ),
    Migration(
        9,
        "key expiry",
        # A key refused from a given time on (a contractor's, a trial's) without anyone
        # having to remember to revoke it; NULL: never.
        ("ALTER TABLE keys ADD COLUMN expires_at DOUBLE PRECISION",),
    ),
    Migration(
        10,
        "key budget limits",
        # A key's own limits of the config's budgets for each key (a plan above the
        # default): a JSON object of budget name -> USD as a decimal string; NULL: none.
        ("ALTER TABLE keys ADD COLUMN budget_limits TEXT",),
    ),
    Migration(
        11,
        "key rate limits",
        # A key's own requests and tokens per minute (its plan): NULL, the config's.
        ("ALTER TABLE keys ADD COLUMN rpm INTEGER", "ALTER TABLE keys ADD COLUMN tpm INTEGER"),
    ),
    Migration(
        12,
        "sums by hour",
        # What budgets and the console read instead of every row of a period
        # (`metering.hourly`), kept by the ledger writer in each batch's transaction;
        # filled here from the rows so far (~30 s for 6,000,000 rows on SQLite, once). A
        # team is '' for none. NUMERIC: a sum past 2**63 (absurd prices) must not fail
        # the batch that carries its rows (PostgreSQL keeps it exact; SQLite turns it into
        # a float). Latencies are counted in bins an eighth of a power of two wide;
        # retries are the attempts beyond each request's first.
        (
            """CREATE TABLE key_spend_hours (
                hour BIGINT NOT NULL,
                key_name TEXT NOT NULL,
                team TEXT NOT NULL,
                model TEXT NOT NULL,
                requests NUMERIC NOT NULL,
                cost_nano NUMERIC NOT NULL,
                PRIMARY KEY (hour, key_name, team, model)
            )""",
            "CREATE INDEX key_spend_hours_key ON key_spend_hours (key_name, hour)",
            """CREATE TABLE usage_hours (
                hour BIGINT NOT NULL,
                team TEXT NOT NULL,
                model TEXT NOT NULL,
                upstream TEXT NOT NULL,
                outcome TEXT NOT NULL,
                requests NUMERIC NOT NULL,
                input_tokens NUMERIC NOT NULL,
                cached_input_tokens NUMERIC NOT NULL,
                output_tokens NUMERIC NOT NULL,
                cost_nano NUMERIC NOT NULL,
                saved_nano NUMERIC NOT NULL,
                retries NUMERIC NOT NULL,
                PRIMARY KEY (hour, team, model, upstream, outcome)
            )""",
            """CREATE TABLE latency_hours (
                hour BIGINT NOT NULL,
                model TEXT NOT NULL,
                upstream TEXT NOT NULL,
                kind INTEGER NOT NULL,
                bin INTEGER NOT NULL,
                requests NUMERIC NOT NULL,
                PRIMARY KEY (hour, model, upstream, kind, bin)
            )""",
            """INSERT INTO key_spend_hours (hour, key_name, team, model, requests, cost_nano)
            SELECT {hour}, key_name, COALESCE(team, ''), model, COUNT(*), SUM(cost_nano)
            FROM requests GROUP BY 1, 2, 3, 4""",
            """INSERT INTO usage_hours (hour, team, model, upstream, outcome, requests,
                input_tokens, cached_input_tokens, output_tokens, cost_nano, saved_nano, retries)
            SELECT {hour}, COALESCE(team, ''), model, upstream, outcome, COUNT(*),
                SUM(input_tokens), SUM(cached_input_tokens), SUM(output_tokens),
                SUM(cost_nano), SUM(saved_nano),
                SUM(CASE WHEN attempts > 1 THEN attempts - 1 ELSE 0 END)
            FROM requests GROUP BY 1, 2, 3, 4, 5""",
            """INSERT INTO latency_hours (hour, model, upstream, kind, bin, requests)
            SELECT {hour}, model, upstream, 0, {bin:duration_ms}, COUNT(*) FROM requests
            GROUP BY 1, 2, 3, 4, 5""",
            """INSERT INTO latency_hours (hour, model, upstream, kind, bin, requests)
            SELECT {hour}, model, upstream, 1, {bin:ttft_ms}, COUNT(*) FROM requests
            WHERE ttft_ms IS NOT NULL GROUP BY 1, 2, 3, 4, 5""",
        ),
    ),
    Migration(
        13,
        "rollout announcements kept with the lease",
        # How far the rollout controller's lease holders have announced the rollout
        # events (the last id announced), so that a new holder goes on from there:
        # each event is announced once, whichever process holds the lease and however
        # often it changes hands or the gateway restarts. A ledger that already has
        # events starts after them (its gateways announced them, or long ago chose not
        # to); a new one at 0, so every event is announced, the CLI's before a first
        # `serve` included.
        (
            "ALTER TABLE leases ADD COLUMN announced BIGINT NOT NULL DEFAULT 0",
            "UPDATE leases SET announced = (SELECT COALESCE(MAX(id), 0) FROM rollout_events)"
            " WHERE name = 'rollout-controller'",
            "INSERT INTO leases (name, holder, expires_at, announced)"
            " SELECT 'rollout-controller', '', 0, (SELECT COALESCE(MAX(id), 0) FROM rollout_events)"
            " WHERE NOT EXISTS (SELECT 1 FROM leases WHERE name = 'rollout-controller')",
        ),
    ),
)


async def migrate(database: Database) -> list[int]:
    """Apply pending migrations; return the versions applied now."""
    await database.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
    )
    applied_now: list[int] = []
    for migration in MIGRATIONS:
        done = await database.fetch(
            "SELECT 1 FROM schema_migrations WHERE version = ?", (migration.version,)
        )
        if done:
            continue
        statements = [_for_dialect(s, database.dialect) for s in migration.statements]
        record = (
            "INSERT INTO schema_migrations (version, name, applied_at) "
            f"SELECT {migration.version}, '{migration.name}', {time.time()} "
            f"WHERE NOT EXISTS (SELECT 1 FROM schema_migrations "
            f"WHERE version = {migration.version})"
        )
        try:
            await database.script([*statements, record], _LOCK_KEY)
        except Exception:
            # Another process applied it between our check and our lock: that is fine.
            if not await database.fetch(
                "SELECT 1 FROM schema_migrations WHERE version = ?", (migration.version,)
            ):
                raise
            continue
        applied_now.append(migration.version)
    return applied_now


def _for_dialect(statement: str, dialect: str) -> str:
    statement = statement.replace("{pk}", _PK[dialect]).replace("{hour}", HOUR_OF_TS[dialect])
    for column in ("duration_ms", "ttft_ms"):
        statement = statement.replace(f"{{bin:{column}}}", LATENCY_BIN[dialect].format(x=column))
    return statement


def latest_version() -> int:
    return MIGRATIONS[-1].version
