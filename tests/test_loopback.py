"""Single-node multi-process runs listen on loopback only (workloads.torchrun; a real run is sampled in
tests/test_tp.py); bad node flags are refused."""

import socket
from argparse import Namespace

import psutil
import pytest
from support import ONE_THREAD, btune

from tuner.cli import main as btune_main
from tuner.launch import Nodes, build_config, valid_endpoint
from workloads.options import Machine

#: One thread a rank, and no interface variables: the launcher is what sets them.
ENV = {**ONE_THREAD, "GLOO_SOCKET_IFNAME": None, "NCCL_SOCKET_IFNAME": None}
LOOPBACK = {"127.0.0.1", "::1"}
CPU = Machine(reason="no GPUs in this test")


def listeners(root: psutil.Process) -> tuple[set[tuple[str, str, int]], dict[int, dict[str, str]]]:
    """(role, ip, port) of every listening TCP socket in the process tree, and each rank's environment."""
    found: set[tuple[str, str, int]] = set()
    envs: dict[int, dict[str, str]] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            cmd = " ".join(proc.cmdline())
            role = "launcher" if "workloads.torchrun" in cmd else "rank" if "workloads.dense" in cmd else "console"
            if role == "rank":
                envs[proc.pid] = proc.environ()
            found |= {(role, c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # a process that ended between the listing and the look
            continue
    return found, envs


# A real --tp 2 run listening on loopback only: tests/test_tp.py (it samples that module's TP=2 run).


def test_one_node_goes_through_the_loopback_launcher_and_several_through_torchrun():
    one = build_config("dense", ["--preset", "tiny-llama", "--tp", "2"], python="py", machine=CPU)
    assert one.argv[:6] == ("py", "-m", "workloads.torchrun", "--standalone", "--nproc-per-node", "2")
    two = build_config("dense", ["--preset", "tiny-llama", "--tp", "2"], python="py", machine=CPU,
                       nodes=Nodes(2, 1, "[::1]:29400"))
    assert two.argv[1:3] == ("-m", "torch.distributed.run")
    assert "workloads.torchrun" not in two.argv and "[::1]:29400" in two.argv


@pytest.mark.parametrize("endpoint", ["node-1:29400", "10.0.0.7:1", "[::1]:65535", "[fe80::1]:29400",
                                      "n.example.com:80"])
def test_good_endpoints_pass(endpoint):
    assert valid_endpoint(endpoint)


@pytest.mark.parametrize("endpoint", ["node-1", "node-1:", ":29400", "node-1:0", "node-1:65536", "node-1:port",
                                      "node-1:+1", "::1:29400", "[::1]", "[zz]:1", "[fe80::1%eth0]:1", "a b:1",
                                      "node-1:29400 "])
def test_malformed_endpoint_is_refused_in_one_line(tmp_path, capsys, endpoint):
    code = btune_main(["run", "dense", "--tp", "2", "--nnodes", "2", "--rdzv-endpoint", endpoint,
                       "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: --rdzv-endpoint {endpoint!r}: expected HOST:PORT"), err
    assert not list(tmp_path.iterdir()), "nothing was launched"


@pytest.mark.parametrize("nnodes", ["0", "-1"])
def test_nnodes_below_one_has_its_own_message(tmp_path, capsys, nnodes):
    code = btune_main(["run", "dense", "--tp", "2", "--nnodes", nnodes, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: --nnodes must be >= 1\n", err


@pytest.mark.slow
def test_the_btune_command_refuses_a_bad_endpoint_without_a_traceback(tmp_path):
    res = btune("run", "dense", "--tp", "2", "--nnodes", "2", "--rdzv-endpoint", "host:99999", "--out", str(tmp_path),
                env=ENV, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--rdzv-endpoint" in res.stderr, res.stderr


# -- the launcher's pieces, in process --------------------------------------------------------------
def test_standalone_becomes_a_loopback_rendezvous():
    from workloads import torchrun

    args = torchrun.loopback_args(Namespace(standalone=True, rdzv_backend="static", rdzv_endpoint="",
                                            rdzv_id="none", local_addr=None))
    assert (args.standalone, args.rdzv_backend, args.rdzv_endpoint, args.local_addr) == (
        False, "c10d", "127.0.0.1:0", "127.0.0.1")
    assert torchrun.loopback_args(Namespace(standalone=True, local_addr="10.1.2.3", rdzv_backend="",
                                            rdzv_endpoint="", rdzv_id="")).local_addr == "10.1.2.3"


def test_interface_variables_are_set_only_where_unset():
    from workloads import torchrun

    env = {"NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": ""}
    torchrun.loopback_env(env)
    assert env["NCCL_SOCKET_IFNAME"] == "ib0", "the user's choice stays"
    assert env["GLOO_SOCKET_IFNAME"] == torchrun.loopback_interface()


def _listening(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_loopback_store_listens_on_its_host_alone(host):
    from workloads import torchrun

    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    store = torchrun.LoopbackTCPStore(host, 0, is_master=True, wait_for_workers=False)
    store.set("k", "v")
    assert store.get("k") == b"v"
    assert _listening(store.port) == {host}


def test_torchrun_builds_loopback_stores_only_inside_the_context():
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend as c10d

    from workloads import torchrun

    original = dist.TCPStore
    with torchrun.loopback_stores():
        assert dist.TCPStore is c10d.TCPStore is torchrun.LoopbackTCPStore
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        assert _listening(store.port) == {"127.0.0.1"}
        other = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)  # a name: torch's own
        assert _listening(other.port) - LOOPBACK, "not a loopback IP: left as torch binds it"
    assert dist.TCPStore is c10d.TCPStore is original
