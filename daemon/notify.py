"""sd_notify: READY, STOPPING, WATCHDOG and STATUS messages for a `Type=notify` unit.

The protocol is one datagram to the AF_UNIX socket named by $NOTIFY_SOCKET (a leading "@"
means the abstract namespace); no library needed. Outside systemd the variable is unset and
every call is a no-op.
"""
import os
import socket


class Notifier:
    def __init__(self, env: dict | None = None):
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        # ping at half the interval systemd allows, as sd_watchdog_enabled(3) advises
        self.watchdog_seconds = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else None

    def send(self, message: str) -> bool:
        if not self.address:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), self.address)
        return True

    def ready(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def stopping(self, status: str) -> None:
        self.send(f"STOPPING=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")
