"""The multi-process DP/EP runtime: one process per DP rank in lockstep (``dp_worker``), the front
that feeds them from the server (``dp_client``) and the offline driver for tests and benches
(``dp_offline``)."""
