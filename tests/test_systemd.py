"""The systemd unit and the sd_notify protocol, checked with a real datagram socket."""
import os
import re
import shutil
import socket
import subprocess
import time

import pytest

from daemon.notify import Notifier
from daemon.replay import fold
from tests.conftest import (REPO, DaemonProcess, classification_csv, drop_job, events_of, seed_job,
                            wait_for_status, wait_until)

UNIT = REPO / "systemd" / "epochd.service"
needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


def runnable_unit(tmp_path):
    """The unit with ExecStart pointing at this checkout's epochd, which verify requires to exist."""
    text = UNIT.read_text().replace("/opt/epochd/.venv/bin/epochd", str(REPO / ".venv" / "bin" / "epochd"))
    path = tmp_path / "epochd.service"
    path.write_text(text)
    return path


@needs_systemd
def test_the_unit_passes_systemd_analyze_verify_silently(tmp_path):
    result = subprocess.run(["systemd-analyze", "verify", str(runnable_unit(tmp_path))],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""


@needs_systemd
def test_the_units_security_exposure_stays_low(tmp_path):
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(runnable_unit(tmp_path))],
                            capture_output=True, text=True)
    exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout).group(1))
    assert exposure <= 1.5  # README reports the figure; GPU access keeps it above 1


def test_the_unit_asks_for_what_the_daemon_provides():
    text = UNIT.read_text()
    for line in ("Type=notify", "KillMode=mixed", "OOMPolicy=continue", "Restart=on-failure",
                 "WatchdogSec=", "TimeoutStopSec=90", "DeviceAllow=char-nvidia-frontend rw"):
        assert line in text
    assert re.search(r"^ExecStart=\S+/epochd serve --spool ", text, re.M)


class NotifySocket:
    def __init__(self, tmp_path):
        self.path = str(tmp_path / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, needle: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                if needle in m:
                    return m
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                pass
        raise AssertionError(f"no {needle!r} in {self.messages}")


def test_notifier_speaks_the_datagram_protocol(tmp_path):
    sock = NotifySocket(tmp_path)
    n = Notifier({"NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": "4000000"})
    assert n.watchdog_seconds == 2.0
    n.ready("idle")
    assert "READY=1" in sock.wait_for("READY=1") and f"MAINPID={os.getpid()}" in sock.messages[0]
    assert Notifier({}).send("READY=1") is False  # outside systemd: a no-op


def test_ready_after_recovery_then_watchdog_then_stopping(tmp_path, spool):
    """READY=1 comes only once startup recovery is on record; WATCHDOG=1 pings follow; SIGTERM
    brings STOPPING=1 and exit 0."""
    data = classification_csv(tmp_path / "train.csv")
    first = DaemonProcess(spool, "--max-jobs", "1")
    drop_job(spool, "r.json", seed_job(data, epochs=200, batch_size=4))
    wait_for_status(spool, "r", "running")
    first.kill()  # the daemon dies; its worker is killed too, as a crash would
    worker = fold(events_of(spool, "r")).run["pid"]
    os.kill(worker, 9)
    wait_until(lambda: not os.path.exists(f"/proc/{worker}") or
               open(f"/proc/{worker}/stat").read().split()[2] == "Z", 30, what="the worker to die")
    sock = NotifySocket(tmp_path)
    d = DaemonProcess(spool, env={"NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": "1000000"})
    sock.wait_for("READY=1")
    interrupted = [r for r in events_of(spool, "r") if r["type"] == "interrupted"]
    assert interrupted and interrupted[0]["reason"] == "crash detected at startup"
    sock.wait_for("WATCHDOG=1")
    d.proc.send_signal(15)
    sock.wait_for("STOPPING=1")
    assert d.proc.wait(60) == 0
    d.stderr.close()
    assert fold(events_of(spool, "r")).status in ("interrupted", "completed")
