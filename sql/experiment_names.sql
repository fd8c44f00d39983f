SELECT name FROM experiments ORDER BY starts_at DESC, name
