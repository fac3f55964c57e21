-- Failover readiness, as the relay sees it from the primary every few seconds: whether promoting
-- the standby now would keep the replication slot (NULL: no standby is configured for it).
ALTER TABLE outbox.relay_status
    ADD COLUMN failover_ready  boolean,
    ADD COLUMN failover_detail text,
    ADD COLUMN standby_lag_bytes bigint;
