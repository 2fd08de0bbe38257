"""The load check of test_server_e2e against a server whose EPLB rebalances synchronously: every
sampling feature gives the one-by-one answer while expert weights move between the ranks."""

from __future__ import annotations

import os
import signal

import pytest

from test_server_e2e import Server, _procs_in_session, check_load_equals_one_by_one, make_tiny_model


@pytest.fixture(scope="module")
def sync_server(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("tiny_moe_sync"))
    srv = Server(model, tmp_path_factory.mktemp("server_sync") / "server.log",
                 eplb_config={"window_size": 4, "step_interval": 4, "use_async": False})
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()
        for pid in _procs_in_session(srv.proc.pid):
            os.kill(pid, signal.SIGKILL)


def test_features_equal_one_by_one_during_sync_rebalances(sync_server):
    check_load_equals_one_by_one(sync_server, 100, 8)
