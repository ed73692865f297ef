-- When the lease sweeper last ran: a broker that starts after a long stop extends running
-- jobs' leases by the time nobody swept, and only then (a rolling restart extends nothing).
CREATE TABLE sweeps (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_sweep_ms INTEGER NOT NULL
);
