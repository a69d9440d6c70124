"""deploy/mosquitto.conf with deploy/mosquitto.acl, run by a real Mosquitto: each user can do its
job and nothing more. A gateway cannot spoof a (retained) fault event or send a command.

The broker runs the shipped config itself; only what must differ in a test is replaced: the
port, the folders (persistence, password file, log) and, as root, the user to run as.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from faultwatch.runtime.devtools.broker import MosquittoBroker, find_mosquitto, find_passwd_tool
from helpers import wait_for

pytestmark = pytest.mark.broker

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
USERS = {"faultwatch": "daemon-pw", "gateway": "gateway-pw", "homeassistant": "ha-pw", "operator": "op-pw"}


class DeployedBroker(MosquittoBroker):
    """Mosquitto with deploy/mosquitto.conf and deploy/mosquitto.acl, paths moved into ``data_dir``."""

    def _write_config(self) -> None:
        passwd = self.data_dir / "passwd"
        passwd.unlink(missing_ok=True)
        for i, (user, password) in enumerate(USERS.items()):
            create = ["-c"] if i == 0 else []
            subprocess.run([find_passwd_tool(), *create, "-b", str(passwd), user, password],
                           check=True, capture_output=True, stdin=subprocess.DEVNULL)
        replace = {
            "listener 1883 127.0.0.1": f"listener {self.port} {self.host}",
            "password_file /etc/mosquitto/passwd": f"password_file {passwd}",
            "acl_file /etc/mosquitto/faultwatch.acl": f"acl_file {DEPLOY / 'mosquitto.acl'}",
            "persistence_location /var/lib/mosquitto/": f"persistence_location {self.data_dir}/",
            "log_dest syslog": f"log_dest file {self.log_path}",
        }
        text = (DEPLOY / "mosquitto.conf").read_text()
        for shipped, here in replace.items():
            assert f"\n{shipped}\n" in text, f"deploy/mosquitto.conf no longer has the line {shipped!r}"
            text = text.replace(f"\n{shipped}\n", f"\n{here}\n")
        if os.geteuid() == 0:
            text += "user root\n"  # else mosquitto drops to its own user, who can't read tmp_path
        self.config_path.write_text(text)


class Client:
    """A logged-in MQTT v5 client that records what it receives and the reason codes of its PUBACKs."""

    def __init__(self, broker: MosquittoBroker, user: str, subscribe: str | None = None):
        self.received: list[tuple[str, bytes, bool]] = []
        self.acks: dict[int, int] = {}  # mid -> PUBACK reason code
        self.subscribed = subscribe is None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"acl-{user}",
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(user, USERS[user])
        self.client.on_message = lambda c, u, m: self.received.append((m.topic, m.payload, m.retain))
        self.client.on_publish = lambda c, u, mid, rc, p: self.acks.__setitem__(mid, rc.value)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: setattr(self, "subscribed", True)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if subscribe is not None:
            self.client.subscribe(subscribe, qos=1)
        wait_for(lambda: self.subscribed and self.client.is_connected(), timeout=30,
                 message=f"{user} did not connect and subscribe")

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """Publish with QoS 1; returns the PUBACK reason code (0, or 16 "no matching subscribers",
        when accepted; 135 = not authorized)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        wait_for(lambda: info.mid in self.acks, timeout=30, message=f"no PUBACK for {topic}")
        return self.acks[info.mid]

    def got(self, topic: str) -> list[bytes]:
        return [payload for t, payload, _ in self.received if t == topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


NOT_AUTHORIZED = 135
ACCEPTED = (0, 16)  # success, and success with no subscriber for the topic


def test_the_shipped_acl_lets_each_user_do_its_job_and_no_more(tmp_path):
    broker = DeployedBroker(tmp_path / "mosquitto", binary=find_mosquitto()).start()
    clients: list[Client] = []
    try:
        daemon = Client(broker, "faultwatch", subscribe="sensors/#")
        ha = Client(broker, "homeassistant", subscribe="faultwatch/#")
        gateway = Client(broker, "gateway")
        operator = Client(broker, "operator")
        clients += [daemon, ha, gateway, operator]

        # A gateway spoofs a retained fault event and a reload command: both refused.
        spoof = b'{"state": "raised"}'
        assert gateway.publish("faultwatch/pump-1/fault", spoof, retain=True) == NOT_AUTHORIZED
        assert gateway.publish("faultwatch/command/reload", b"") == NOT_AUTHORIZED
        assert ha.publish("faultwatch/command/reload", b"") == NOT_AUTHORIZED
        # ...while its readings reach the daemon, and the daemon's fault events reach Home Assistant.
        assert gateway.publish("sensors/pump-1", b'{"current": 1.0}') in ACCEPTED
        assert daemon.publish("faultwatch/pump-1/fault", b'{"state": "cleared"}', retain=True) in ACCEPTED
        assert daemon.publish("homeassistant/binary_sensor/faultwatch_pump-1/fault/config", b"{}") in ACCEPTED
        assert operator.publish("faultwatch/command/reload", b"") in ACCEPTED
        assert gateway.publish("homeassistant/binary_sensor/x/fault/config", b"{}") == NOT_AUTHORIZED
        wait_for(lambda: daemon.got("sensors/pump-1") and ha.got("faultwatch/pump-1/fault")
                 and ha.got("faultwatch/command/reload"), timeout=30,
                 message="allowed messages not delivered")
        # Home Assistant saw the daemon's event only; what the broker refused never reached anyone.
        assert ha.got("faultwatch/pump-1/fault") == [b'{"state": "cleared"}']
        assert ha.got("faultwatch/command/reload") == [b""]  # the operator's, not the gateway's or HA's
        # A newcomer reads the retained fault state: the daemon's, not the spoof.
        late = Client(broker, "homeassistant", subscribe="faultwatch/+/fault")
        clients.append(late)
        wait_for(lambda: late.got("faultwatch/pump-1/fault"), timeout=30, message="no retained fault state")
        assert late.got("faultwatch/pump-1/fault") == [b'{"state": "cleared"}']
        # An anonymous client is not let in at all.
        anonymous = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        assert anonymous.connect(broker.host, broker.port) == 0
        codes: list[int] = []
        anonymous.on_connect = lambda c, u, f, rc, p: codes.append(rc.value)
        anonymous.loop_start()
        try:
            wait_for(lambda: codes, timeout=30, message="no CONNACK for an anonymous client")
        finally:
            anonymous.loop_stop()
        assert codes[0] != 0
    finally:
        for client in clients:
            client.close()
        broker.stop()
