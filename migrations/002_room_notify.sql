-- Room changes notify channel hearth_rooms with the room's name, so that every server's
-- in-memory room directory reloads just that room. Delivered on commit, once per room and
-- transaction. Updates of last_seq (one per publish) deliberately notify nobody.

CREATE FUNCTION notify_room_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- TG_ARGV[0] names the column holding the room: name in rooms, room in room_members.
    PERFORM pg_notify(
        'hearth_rooms',
        to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END) ->> TG_ARGV[0]
    );
    RETURN NULL;
END
$$;

CREATE TRIGGER rooms_notify_insert_delete
    AFTER INSERT OR DELETE ON rooms
    FOR EACH ROW EXECUTE FUNCTION notify_room_change('name');

CREATE TRIGGER rooms_notify_privacy
    AFTER UPDATE OF is_private ON rooms
    FOR EACH ROW WHEN (OLD.is_private IS DISTINCT FROM NEW.is_private)
    EXECUTE FUNCTION notify_room_change('name');

CREATE TRIGGER room_members_notify
    AFTER INSERT OR DELETE ON room_members
    FOR EACH ROW EXECUTE FUNCTION notify_room_change('room');
