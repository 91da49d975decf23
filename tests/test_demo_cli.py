"""`make demo`'s program (toist_ros.demo): what it refuses before starting anything, what it
removes from its output folder, and that a stop signal takes its node process with it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _demo(*args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "toist_ros.demo", "--device", "cpu", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, **(env or {})), **kwargs)


@pytest.mark.parametrize("args, env, message", [
    (["--rate", "0"], {}, "argument --rate: '0': frames per second, above 0"),   # was a ZeroDivisionError
    (["--rate", "-5"], {}, "argument --rate: '-5': frames per second"),   # was an RCLError
    (["--frames", "-1"], {}, "argument --frames: '-1': an integer >= 0"),   # ran for 2 minutes first
    ([], {"ROS_DOMAIN_ID": "300"}, "ROS_DOMAIN_ID='300': a domain id is a whole number 0..232"),
    # (An empty ROS_DOMAIN_ID is rcl's default domain, not an error: a random one is taken.)
    (["--task", "15"], {"ROS_DOMAIN_ID": ""}, "error: task '15' looks like a task id but the COCO-Tasks vocabulary"),
])
def test_bad_settings_are_refused_before_the_node_starts_and_nothing_is_removed(tmp_path, args, env, message):
    """A user's PNGs in --out were deleted, even by a run refused at once."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "holiday.png").write_bytes(b"mine")
    process = _demo("--out", str(out), *args, env=env)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2, output[-2000:]
    assert message in output and "starting the node" not in output, output[-2000:]
    assert (out / "holiday.png").read_bytes() == b"mine"


def test_the_out_folder_takes_only_a_demo_runs_files(tmp_path):
    """Every run deleted all frame_*.png / oneshot_*.png in --out, whoever wrote them, and
    replaced report.md there; --out naming a file was a FileExistsError traceback."""
    from toist_ros import demo

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "frame_holiday.png").write_bytes(b"mine")
    assert "holds files no demo run wrote (frame_holiday.png); nothing was removed" in demo._out_problem(mine)
    (tmp_path / "afile").write_text("x")
    assert demo._out_problem(tmp_path / "afile").endswith("afile: a file, not a folder")
    assert demo._out_problem(tmp_path / "new") == "" and demo._out_problem(mine / "..") != ""
    # An earlier run's folder: its recorded files go, anything else stays.
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    demo._record_written(earlier, *demo.REPORT_FILES, fresh=True)
    demo._record_written(earlier, "frame_00_coffee.png")
    (earlier / "frame_00_coffee.png").write_bytes(b"overlay")
    (earlier / "frame_holiday.png").write_bytes(b"mine")
    assert demo._out_problem(earlier) == ""
    assert demo._written_before(earlier) == ["report.md", "report.json", "node.log", "frame_00_coffee.png"]
    # A folder of a demo from before the record: the overlays its report.json lists.
    older = tmp_path / "older"
    older.mkdir()
    (older / "report.json").write_text('{"frames": [{"overlay": "frame_00_a.png"}], "one_shots": '
                                       '[{"overlay": "oneshot_00_b.png"}, {"overlay": "../escape.png"}]}')
    assert demo._out_problem(older) == "" and demo._written_before(older) == ["frame_00_a.png", "oneshot_00_b.png"]
    # A user's own report.json / report.md (not a demo's report): their folder, refused; the
    # next run had deleted both.
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "report.json").write_text('{"experiment": 3}')
    (notes / "report.md").write_text("my notes")
    assert ("holds files no demo run wrote (report.json, report.md); nothing was removed"
            in demo._out_problem(notes))
    assert demo._written_before(notes) == []


@pytest.mark.parametrize("args, message", [
    (["--out", "{tmp}/holiday.png"], "a file, not a folder"),
    (["--out", "{tmp}"], "holds files no demo run wrote"),
])
def test_an_out_folder_that_is_not_the_demos_is_refused_before_the_node_starts(tmp_path, args, message):
    (tmp_path / "holiday.png").write_bytes(b"mine")
    process = _demo(*[arg.format(tmp=tmp_path) for arg in args])
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2 and message in output and "starting the node" not in output, output[-2000:]
    assert (tmp_path / "holiday.png").read_bytes() == b"mine"


def _running(pattern: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [pid for pid in found if pid != str(os.getpid())]


@pytest.mark.parametrize("args, message", [
    (["--rate", "0"], "argument --rate: '0': frames per second, above 0"),          # was a ZeroDivisionError
    (["--rate", "1e-10"], "argument --rate: '1e-10': frames per second, at least 0.001"),   # a TypeError of rclpy
    (["--count", "0"], "argument --count: '0': an integer >= 1"),
    (["--encoding", "16UC1"], "argument --encoding: invalid choice: '16UC1'"),      # was a ValueError traceback
    (["--photos", "nosuch"], "--photos: scikit-image has no sample image 'nosuch'"),
])
def test_the_camera_stand_in_refuses_bad_options_by_name(args, message):
    result = subprocess.run([sys.executable, "-m", "toist_ros.camera_standin", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("args, message", [
    (["--timeout", "nan", "set-task", "2"], "argument --timeout: 'nan': seconds, a number above 0"),  # spun for ever
    (["set-task", "2", "--timeout", "-5"], "argument --timeout: '-5': seconds"),
    (["instances", "--count", "0"], "argument --count: '0': an integer >= 1"),
])
def test_the_dev_client_refuses_bad_numbers_by_name(args, message):
    result = subprocess.run([sys.executable, "-m", "toist_ros.client", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_sigterm_stops_the_node_it_started(tmp_path):
    """The demo ended on SIGTERM (exit 143) and left its perception node running, orphaned."""
    out = tmp_path / "out"
    process = _demo("--out", str(out), "--scenes", "1")
    namespace = f"__ns:=/toist_demo_{process.pid}"   # on the node's command line: this run's node only
    deadline = time.monotonic() + 120
    while not _running(namespace) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert _running(namespace), "the demo did not start its node"
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert not _running(namespace), "the node outlived the demo"


def test_a_demo_killed_outright_stops_its_node(tmp_path):
    """SIGKILL runs none of the demo's clean-up: its node ran on, orphaned. The node process is
    started by the demo's own function; a stand-in program records the signal it gets."""
    got = tmp_path / "signal.txt"
    node = ("import signal, sys, time\n"
            f"signal.signal(signal.SIGTERM, lambda n, f: (open({str(got)!r}, 'w').write(str(n)), sys.exit(0)))\n"
            "print('ready', flush=True)\n"
            "time.sleep(120)\n")
    demo = ("import sys, time\n"
            "from toist_ros.demo import _start_node\n"
            f"node = _start_node([sys.executable, '-c', {node!r}], open({str(tmp_path / 'node.log')!r}, 'w'))\n"
            "print(node.pid, flush=True)\n"
            "time.sleep(120)\n")
    process = subprocess.Popen([sys.executable, "-c", demo], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    node_pid = int(process.stdout.readline())
    deadline = time.monotonic() + 30
    while "ready" not in (tmp_path / "node.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()
    process.wait()
    deadline = time.monotonic() + 10
    # Until the handler's write is in (the file exists, empty, from its open on: a fresh-clone run read it then).
    while not (got.exists() and got.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got.exists() and got.read_text() == str(int(signal.SIGTERM)), "the node outlived the demo"


def test_a_call_ends_at_once_when_the_server_process_has_exited():
    """The node killed mid-run: the demo waited out its 120 s timeout and blamed the service."""
    from toist_ros.service_call import ServerGone, call_service

    class Absent:
        srv_name = "/toist_demo_1/segment_image"

        def wait_for_service(self, timeout_sec):
            time.sleep(timeout_sec)
            return False

    class Silent(Absent):
        def wait_for_service(self, timeout_sec):
            return True

        def call_async(self, request):
            return type("Pending", (), {"done": lambda self: False})()

    exited = iter([None, None, "the node exited with code -9 before answering"])
    for client in (Absent(), Silent()):
        gone = (lambda: next(exited, "the node exited with code -9 before answering"))
        started = time.monotonic()
        with pytest.raises(ServerGone, match=r"/toist_demo_1/segment_image: the node exited with code -9"):
            call_service(client, object(), timeout=120, server_gone=gone)
        assert time.monotonic() - started < 5
    with pytest.raises(TimeoutError, match="no service /toist_demo_1/segment_image within 1 s"):
        call_service(Absent(), object(), timeout=1, server_gone=lambda: None)


def test_a_call_given_up_is_withdrawn_from_the_client():
    """A timed-out call stayed among the client's pending requests; its late answer was kept."""
    from toist_ros.service_call import call_service

    class Silent:
        srv_name = "/toist_demo_1/segment_image"
        withdrawn = []

        def wait_for_service(self, timeout_sec):
            return True

        def call_async(self, request):
            return type("Pending", (), {"done": lambda self: False})()

        def remove_pending_request(self, future):
            self.withdrawn.append(future)

    client = Silent()
    with pytest.raises(TimeoutError, match="/toist_demo_1/segment_image did not answer within 0.2 s"):
        call_service(client, object(), timeout=0.2)
    assert len(client.withdrawn) == 1


@pytest.mark.parametrize("domain", ["²", "٣", "7.0", "-1", "233"])
def test_a_domain_id_dds_cannot_use_is_refused_by_name(monkeypatch, domain):
    """Not ASCII digits ('²' was int()'s "invalid literal" message; '٣' read as 3, which rcl
    does not) or out of range: the variable and its value named."""
    from toist_ros import demo

    monkeypatch.setenv("ROS_DOMAIN_ID", domain)
    with pytest.raises(ValueError, match=f"ROS_DOMAIN_ID={domain!r}: a domain id is a whole number 0..232"):
        demo._ros_environment()


def test_the_nodes_text_parameters_reach_it_whole(tmp_path, monkeypatch):
    """A checkpoint path with " #" reached the node cut at the '#' (rcl reads -p values as YAML),
    one with ": " did not parse, a task with a quote broke its quoting: read back here through
    rcl's own parsing of the demo's command line."""
    import argparse

    import rclpy
    from rclpy.node import Node

    from toist_ros import demo

    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    checkpoint = str(tmp_path / "run #1 😀" / "a: b é\x7f\x85\x9b")
    args = argparse.Namespace(device="cpu", checkpoint=checkpoint, text_encoder="/models/roberta #2")
    command = demo._node_command(args, 0, start_task="open a bottle of beer with 'it' \"now\"")
    context = rclpy.Context()
    rclpy.init(args=command, context=context)
    try:
        node = Node("demo_args_probe", context=context, automatically_declare_parameters_from_overrides=True,
                    cli_args=command[command.index("--ros-args"):])
        got = {name: node.get_parameter(name).value for name in ("checkpoint", "text_encoder", "task")}
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
    assert got == {"checkpoint": checkpoint, "text_encoder": "/models/roberta #2",
                   "task": "open a bottle of beer with 'it' \"now\""}
