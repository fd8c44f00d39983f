-- Held until the transaction ends: two starts never both pass the overlap check. Readers are not blocked.
LOCK TABLE experiments IN SHARE ROW EXCLUSIVE MODE
