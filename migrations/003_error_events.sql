-- error_events as app/analytics.py's ErrorRecorder writes it: one row per error answered to
-- a client, over HTTP or WebSocket, with the sanitized context the dashboard groups by.
-- Rows are written in batches while PostgreSQL is up, so each carries a client-made
-- event_id: a batch retried after a timeout (whose COMMIT may have landed) adds nothing.
-- Older columns stay, so a writer of the 001 shape keeps working; rows past 7 days are
-- pruned by the recorder.

ALTER TABLE error_events RENAME COLUMN ts TO at;
ALTER INDEX error_events_ts RENAME TO error_events_at;
ALTER TABLE error_events
    ALTER COLUMN severity DROP NOT NULL,
    ALTER COLUMN component DROP NOT NULL,
    ADD COLUMN event_id     uuid UNIQUE,
    ADD COLUMN status       smallint,
    ADD COLUMN method       text,
    ADD COLUMN transport    text,           -- http or ws
    ADD COLUMN user_agent   text,           -- truncated
    ADD COLUMN user_id      text;
