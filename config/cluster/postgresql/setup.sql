-- The cluster's roles and database, run once on the primary as postgres by scripts/cluster:
--   psql -v owner_password=… -v reader_password=… -v replicator_password=… -v customers=N
-- The standby receives all of it by streaming replication (roles, grants, rows).
\set ON_ERROR_STOP on

-- pg_basebackup and the standby's WAL stream connect as this role; it can read no table.
CREATE ROLE replicator LOGIN REPLICATION PASSWORD :'replicator_password';

-- The application: owns the tables and writes them.
CREATE ROLE erp_owner LOGIN PASSWORD :'owner_password';

-- The workers: may only SELECT, are no superuser and own nothing, and default to read-only
-- transactions. On the standby every transaction is read-only anyway; these privileges are
-- the fence if a broker is ever pointed at the primary.
CREATE ROLE pbt_reader LOGIN PASSWORD :'reader_password';
ALTER ROLE pbt_reader SET default_transaction_read_only = on;

CREATE DATABASE erp OWNER erp_owner;
\connect erp
REVOKE ALL ON DATABASE erp FROM PUBLIC;
GRANT CONNECT ON DATABASE erp TO pbt_reader;
GRANT USAGE ON SCHEMA public TO pbt_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE erp_owner IN SCHEMA public GRANT SELECT ON TABLES TO pbt_reader;

SET ROLE erp_owner;
CREATE TABLE customer (
    id integer PRIMARY KEY,
    name text NOT NULL,
    blocked text NOT NULL DEFAULT ''          -- '' = not blocked, else Ship / Invoice / All
);
INSERT INTO customer (id, name, blocked)
SELECT i, 'Customer ' || i, CASE WHEN i % 5 = 0 THEN 'All' ELSE '' END
FROM generate_series(1, :customers) AS i;

-- Replica lag probe: the harness inserts a row here on the primary and a cue on the standby
-- watches for it.
CREATE TABLE lag_probe (
    seq bigint PRIMARY KEY,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
RESET ROLE;
