-- One row that POST /api/v1/diagnostics/test {operation: write|transaction} rewrites, so an
-- operator can prove a write reaches PostgreSQL without touching anyone's data.
CREATE TABLE diagnostic_probe (
    id integer PRIMARY KEY CHECK (id = 1),
    written_at timestamptz NOT NULL,
    trace_id text
);
