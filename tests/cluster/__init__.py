"""The scale-out topology on one machine: ``scripts/cluster up|test|down|status``.

::

                      client host 10.77.0.2 (the scenarios, the application)
                                   │ TCP, AuthToken
                                   ▼
                     HAProxy 10.77.0.10:7085  (mode tcp, balance leastconn, health checks)
                          │                        │
                          ▼                        ▼
            broker b1 10.77.0.11:7085      broker b2 10.77.0.12:7085    pbt-server run
             workers ──┐                    workers ──┐
                       │   SELECT-only role (pbt_reader)
                       ▼                              ▼
          PostgreSQL hot standby 10.77.0.22:5432  ◀── WAL stream ──  primary 10.77.0.21:5432
                                                                       ▲
                                          the application's writes ────┘ (erp_owner)

Each box is a network namespace (``netns``); the configuration is ``config/cluster/``. A
parent session is one TCP connection, so HAProxy keeps it on one broker; a child session
only reads, so its worker reads the standby, which refuses writes at the engine level.

This package is test infrastructure, apart from the product (it is not installed with
``pbt_server``): it builds the topology from Debian's ``haproxy`` and ``postgresql`` with
their own tools, and runs the scenarios against it. Modules: ``topology`` (the fixed facts),
``netns``, ``postgres``, ``haproxy``, ``brokers``, ``cluster`` (up/down/status),
``codeunits`` (what the brokers run), ``load`` (drivers and the ledger), ``measure``,
``report``, ``scenarios`` (the runner) and the scenarios themselves: ``basics``,
``performance``, ``database_outage``, ``broker_outage``.
"""
