-- Users, tokens, rooms, messages and the analytics tables.

CREATE TABLE users (
    id            uuid PRIMARY KEY,
    username      text NOT NULL UNIQUE CHECK (username ~ '^[A-Za-z0-9_.-]{1,64}$'),
    password_hash text NOT NULL,          -- scrypt, see app/auth.py
    is_admin      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE auth_tokens (
    token_hash  bytea PRIMARY KEY,        -- sha256 of the token; the token itself is never stored
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz
);
CREATE INDEX auth_tokens_user ON auth_tokens (user_id);

CREATE TABLE rooms (
    name        text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.-]{1,64}$'),
    is_private  boolean NOT NULL DEFAULT false,
    last_seq    bigint NOT NULL DEFAULT 0,  -- row lock on this column makes seq gap-free
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE room_members (
    room     text NOT NULL REFERENCES rooms (name) ON DELETE CASCADE,
    user_id  uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    PRIMARY KEY (room, user_id)
);

CREATE TABLE messages (
    id             uuid PRIMARY KEY,
    room           text NOT NULL REFERENCES rooms (name) ON DELETE CASCADE,
    seq            bigint NOT NULL CHECK (seq > 0),
    sender         text NOT NULL,
    client_msg_id  text NOT NULL,
    content        text,                -- plaintext when encryption at rest is off
    content_enc    bytea,               -- AES-GCM blob when it is on
    flags          text[] NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL,
    UNIQUE (room, seq),
    UNIQUE (sender, client_msg_id),
    CHECK (content IS NULL OR content_enc IS NULL)
);
-- UNIQUE (room, seq) already gives the btree that serves history by (room, seq).

CREATE TABLE error_events (
    id           bigserial PRIMARY KEY,
    ts           timestamptz NOT NULL DEFAULT now(),
    category     text NOT NULL,
    code         text NOT NULL,
    severity     text NOT NULL,
    component    text NOT NULL,
    endpoint     text,
    device_type  text,
    trace_id     text,
    message      text NOT NULL          -- sanitized: never content, secrets or SQL
);
CREATE INDEX error_events_ts ON error_events (ts);

CREATE TABLE connection_events (
    id         bigserial PRIMARY KEY,
    ts         timestamptz NOT NULL DEFAULT now(),
    component  text NOT NULL,           -- database, redis or upstream:<name>
    state      text NOT NULL,
    previous   text,
    attempt    integer,
    detail     text
);
CREATE INDEX connection_events_ts ON connection_events (ts);
