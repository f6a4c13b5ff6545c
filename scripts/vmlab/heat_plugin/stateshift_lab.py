"""Nova, Neutron and Cinder for stateshift's VM lab, as Heat resource plugins.

scripts/openstack.sh installs this file into Heat's plugin_dirs; the test environment
scripts/vmlab/env.yaml maps the OpenStack types our templates use onto these:

    OS::Nova::Server            -> StateShiftLab::Nova::Server
    OS::Neutron::Port           -> StateShiftLab::Neutron::Port
    OS::Neutron::SecurityGroup  -> StateShiftLab::Neutron::SecurityGroup
    OS::Cinder::Volume          -> StateShiftLab::Cinder::Volume
    OS::Cinder::VolumeAttachment-> StateShiftLab::Cinder::VolumeAttachment

A server is a real QEMU VM booting the lab image (scripts/vmlab.sh image) with a NoCloud
seed that carries the user_data Heat resolved for it (RAW, or a software config's
content), the key pair's public key and the port's fixed IP: what Nova's metadata service
and Neutron's DHCP would give it. Everything else stays real Heat: parameters,
constraints, intrinsic functions, WaitConditions, outputs, updates, deletes.

The lab network is the bridge br0 in the namespace scripts/vmlab.sh made. Ports get the
lowest free address, as Neutron may hand a freed address to the next port. Security
groups are enforced on the bridge for new TCP connections (nftables, stateless: the
kernel here has no bridge conntrack, so SYNs are filtered and replies pass). Volumes are
sparse files hot-plugged into the VM over QMP, with the volume id as the disk's serial
(as libvirt does: /dev/disk/by-id/virtio-<first 20 characters>).

State lives in the lab directory ($STATESHIFT_VMLAB_DIR, default /tmp/stateshift-vmlab):
lab.json (written by scripts/vmlab.sh up), ports/, secgroups/, volumes/, vms/<id>/
(disk, seed, console.log, qemu.pid, qmp.sock). A VM dies with its stack, with
`scripts/vmlab.sh down`, or after $STATESHIFT_VMLAB_VM_LIFETIME seconds (default 3 h).
"""

import base64
import fcntl
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid

from oslo_log import log as logging

from heat.common import exception
from heat.common.i18n import _
from heat.engine import attributes
from heat.engine import properties
from heat.engine import resource
from heat.engine import support
from heat.rpc import api as rpc_api

LOG = logging.getLogger(__name__)

LAB_DIR = os.environ.get("STATESHIFT_VMLAB_DIR", "/tmp/stateshift-vmlab")
LIFETIME = int(os.environ.get("STATESHIFT_VMLAB_VM_LIFETIME", "10800"))
# name: (vcpus, memory MiB, disk GiB)
FLAVORS = {
    "m1.tiny": (1, 512, 4),
    "m1.small": (1, 1024, 10),
    "m1.medium": (2, 2048, 20),
    "m1.large": (2, 4096, 40),
}


class LabError(exception.Error):
    pass


def _lab():
    path = os.path.join(LAB_DIR, "lab.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise LabError(_("the VM lab is not up (%(p)s: %(e)s); run scripts/vmlab.sh up")
                       % {"p": path, "e": e})


def _run(args, check=True, input=None):
    p = subprocess.run(args, input=input, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=120)
    out = p.stdout.decode("utf-8", "replace")
    if check and p.returncode != 0:
        raise LabError("%s: exit %d: %s" % (" ".join(args[:6]), p.returncode, out.strip()[-800:]))
    return out


def _ns(lab):
    return ["ip", "netns", "exec", lab["netns"]]


class _Locked(object):
    def __init__(self, name):
        self.path = os.path.join(LAB_DIR, name)

    def __enter__(self):
        # Never a blocking flock: heat-engine runs resources as green threads of one
        # process, and a thread blocked in flock would stop the one holding the lock.
        self.f = open(self.path, "a")
        while True:
            try:
                fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                time.sleep(0.05)  # green under heat-engine's eventlet

    def __exit__(self, *a):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _pid_alive(pidfile):
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ security groups

def _apply_firewall(lab):
    """Rewrite the lab's bridge filter from every port and security group (atomically)."""
    ports = []
    for name in sorted(os.listdir(os.path.join(LAB_DIR, "ports"))):
        if name.endswith(".json"):
            try:
                ports.append(_read_json(os.path.join(LAB_DIR, "ports", name)))
            except (OSError, ValueError):
                continue
    lines = ["table bridge stateshift_lab {",
             "  chain filter {"]
    syn = "tcp flags & (syn | ack) == syn"
    for p in ports:
        if p.get("security_groups") is None:
            continue  # no groups: open (a lab simplification; our templates always set them)
        for sg in p["security_groups"]:
            try:
                rules = _read_json(os.path.join(LAB_DIR, "secgroups", sg + ".json"))["rules"]
            except (OSError, ValueError):
                rules = []
            for r in rules:
                if r.get("direction", "ingress") != "ingress" or r.get("protocol") not in ("tcp", None):
                    continue
                lo = r.get("port_range_min") or 1
                hi = r.get("port_range_max") or 65535
                cidr = r.get("remote_ip_prefix") or "0.0.0.0/0"
                lines.append("    ip daddr %s ip saddr %s tcp dport %d-%d %s accept"
                             % (p["ip"], cidr, int(lo), int(hi), syn))
        lines.append("    ip daddr %s %s drop" % (p["ip"], syn))
    lines += ["  }",
              "  chain forward { type filter hook forward priority 0; policy accept; jump filter; }",
              "  chain output { type filter hook output priority 0; policy accept; jump filter; }",
              "}"]
    script = "table bridge stateshift_lab\ndelete table bridge stateshift_lab\n" + "\n".join(lines) + "\n"
    _run(_ns(lab) + ["nft", "-f", "-"], input=script.encode())


class SecurityGroup(resource.Resource):
    """OS::Neutron::SecurityGroup in the lab: its ingress TCP rules filter the ports."""

    support_status = support.SupportStatus(version="19.0.0")
    PROPERTIES = (NAME, DESCRIPTION, RULES) = ("name", "description", "rules")
    properties_schema = {
        NAME: properties.Schema(properties.Schema.STRING, update_allowed=True),
        DESCRIPTION: properties.Schema(properties.Schema.STRING, update_allowed=True),
        RULES: properties.Schema(properties.Schema.LIST, default=[], update_allowed=True,
                                 schema=properties.Schema(properties.Schema.MAP)),
    }

    def _store(self, rules):
        _write_json(os.path.join(LAB_DIR, "secgroups", self.resource_id + ".json"),
                    {"rules": rules or []})
        with _Locked("net.lock"):
            _apply_firewall(_lab())

    def handle_create(self):
        os.makedirs(os.path.join(LAB_DIR, "secgroups"), exist_ok=True)
        self.resource_id_set(str(uuid.uuid4()))
        self._store(self.properties[self.RULES])

    def handle_update(self, json_snippet, tmpl_diff, prop_diff):
        if self.RULES in prop_diff:
            self._store(prop_diff[self.RULES])

    def handle_delete(self):
        if self.resource_id:
            try:
                os.remove(os.path.join(LAB_DIR, "secgroups", self.resource_id + ".json"))
            except FileNotFoundError:
                pass


# ------------------------------------------------------------------ ports

class Port(resource.Resource):
    """OS::Neutron::Port in the lab: a fixed IP on the lab network and a MAC address."""

    support_status = support.SupportStatus(version="19.0.0")
    PROPERTIES = (NETWORK, SECURITY_GROUPS, NAME, FIXED_IPS) = (
        "network", "security_groups", "name", "fixed_ips")
    ATTRIBUTES = (FIXED_IPS_ATTR, MAC_ADDRESS, NETWORK_ID, NAME_ATTR, STATUS) = (
        "fixed_ips", "mac_address", "network_id", "name", "status")
    properties_schema = {
        NETWORK: properties.Schema(properties.Schema.STRING, required=True),
        SECURITY_GROUPS: properties.Schema(properties.Schema.LIST, update_allowed=True),
        NAME: properties.Schema(properties.Schema.STRING, update_allowed=True),
        FIXED_IPS: properties.Schema(properties.Schema.LIST,
                                     schema=properties.Schema(properties.Schema.MAP)),
    }
    attributes_schema = {
        FIXED_IPS_ATTR: attributes.Schema(_("Fixed IPs."), type=attributes.Schema.LIST),
        MAC_ADDRESS: attributes.Schema(_("MAC address."), type=attributes.Schema.STRING),
        NETWORK_ID: attributes.Schema(_("Network."), type=attributes.Schema.STRING),
        NAME_ATTR: attributes.Schema(_("Name."), type=attributes.Schema.STRING),
        STATUS: attributes.Schema(_("Status."), type=attributes.Schema.STRING),
    }

    def _path(self):
        return os.path.join(LAB_DIR, "ports", self.resource_id + ".json")

    def handle_create(self):
        lab = _lab()
        net = ipaddress.ip_network("%s/%s" % (lab["gateway"], lab["prefix"]), strict=False)
        wanted = [f.get("ip_address") for f in (self.properties[self.FIXED_IPS] or [])
                  if f.get("ip_address")]
        port_id = str(uuid.uuid4())
        with _Locked("net.lock"):
            used = set()
            for name in os.listdir(os.path.join(LAB_DIR, "ports")):
                if name.endswith(".json"):
                    try:
                        used.add(_read_json(os.path.join(LAB_DIR, "ports", name))["ip"])
                    except (OSError, ValueError, KeyError):
                        pass
            if wanted:
                ip = wanted[0]
                if ip in used:
                    raise LabError("IP address %s is already allocated" % ip)
            else:
                ip = None
                for n in range(lab["first_ip"], lab["last_ip"] + 1):
                    cand = str(net.network_address + n)
                    if cand not in used:
                        ip = cand
                        break
                if ip is None:
                    raise LabError("no free IP address left on the lab network")
            mac = "fa:16:3e:%02x:%02x:%02x" % tuple(random.randrange(256) for _ in range(3))
            sgs = self.properties[self.SECURITY_GROUPS]
            self.resource_id_set(port_id)
            _write_json(self._path(), {"id": port_id, "ip": ip, "mac": mac,
                                       "prefix": lab["prefix"], "gateway": lab["gateway"],
                                       "security_groups": sgs})
            _apply_firewall(lab)

    def handle_update(self, json_snippet, tmpl_diff, prop_diff):
        if self.SECURITY_GROUPS in prop_diff:
            with _Locked("net.lock"):
                data = _read_json(self._path())
                data["security_groups"] = prop_diff[self.SECURITY_GROUPS]
                _write_json(self._path(), data)
                _apply_firewall(_lab())

    def handle_delete(self):
        if not self.resource_id:
            return
        with _Locked("net.lock"):
            try:
                os.remove(self._path())
            except FileNotFoundError:
                return
            try:
                _apply_firewall(_lab())
            except LabError as e:
                LOG.warning("lab firewall not rewritten: %s", e)

    def _resolve_attribute(self, name):
        if not self.resource_id:
            return None
        try:
            data = _read_json(self._path())
        except (OSError, ValueError):
            return None
        if name == self.FIXED_IPS_ATTR:
            return [{"ip_address": data["ip"], "subnet_id": "lab-subnet"}]
        if name == self.MAC_ADDRESS:
            return data["mac"]
        if name == self.NETWORK_ID:
            return self.properties[self.NETWORK]
        if name == self.NAME_ATTR:
            return self.properties[self.NAME] or self.physical_resource_name()
        if name == self.STATUS:
            return "ACTIVE"


# ------------------------------------------------------------------ servers

def _qmp(sock_path, *commands, timeout=30.0):
    """Run QMP commands on a VM; returns their results (raises on an error reply)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock_path)
    f = s.makefile("rw")
    json.loads(f.readline())  # greeting
    results = []
    for cmd in (({"execute": "qmp_capabilities"},) + commands):
        f.write(json.dumps(cmd) + "\n")
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if "event" in reply:
                continue
            break
        if "error" in reply:
            raise LabError("QMP %s: %s" % (cmd["execute"], reply["error"].get("desc")))
        results.append(reply.get("return"))
    s.close()
    return results[1:]


class Server(resource.Resource):
    """OS::Nova::Server in the lab: a QEMU VM that boots what Heat rendered."""

    support_status = support.SupportStatus(version="19.0.0")
    PROPERTIES = (
        NAME, IMAGE, FLAVOR, KEY_NAME, NETWORKS, USER_DATA_FORMAT, USER_DATA,
        USER_DATA_UPDATE_POLICY, METADATA, CONFIG_DRIVE, SOFTWARE_CONFIG_TRANSPORT,
    ) = (
        "name", "image", "flavor", "key_name", "networks", "user_data_format", "user_data",
        "user_data_update_policy", "metadata", "config_drive", "software_config_transport",
    )
    ATTRIBUTES = (FIRST_ADDRESS, NETWORKS_ATTR, NAME_ATTR, CONSOLE_LOG, INSTANCE_NAME) = (
        "first_address", "networks", "name", "console_log", "instance_name")
    properties_schema = {
        NAME: properties.Schema(properties.Schema.STRING, update_allowed=True),
        IMAGE: properties.Schema(properties.Schema.STRING, required=True),
        FLAVOR: properties.Schema(properties.Schema.STRING, required=True),
        KEY_NAME: properties.Schema(properties.Schema.STRING),
        NETWORKS: properties.Schema(properties.Schema.LIST, default=[],
                                    schema=properties.Schema(properties.Schema.MAP)),
        USER_DATA_FORMAT: properties.Schema(properties.Schema.STRING, default="HEAT_CFNTOOLS"),
        USER_DATA: properties.Schema(properties.Schema.STRING, default="", update_allowed=True),
        USER_DATA_UPDATE_POLICY: properties.Schema(properties.Schema.STRING, default="REPLACE",
                                                   update_allowed=True),
        METADATA: properties.Schema(properties.Schema.MAP, update_allowed=True),
        CONFIG_DRIVE: properties.Schema(properties.Schema.BOOLEAN),
        SOFTWARE_CONFIG_TRANSPORT: properties.Schema(properties.Schema.STRING),
    }
    attributes_schema = {
        FIRST_ADDRESS: attributes.Schema(_("First address."), type=attributes.Schema.STRING),
        NETWORKS_ATTR: attributes.Schema(_("Addresses by network."), type=attributes.Schema.MAP),
        NAME_ATTR: attributes.Schema(_("Name."), type=attributes.Schema.STRING),
        CONSOLE_LOG: attributes.Schema(_("The end of the serial console."),
                                       type=attributes.Schema.STRING),
        INSTANCE_NAME: attributes.Schema(_("The VM's directory in the lab."),
                                         type=attributes.Schema.STRING),
    }

    def _dir(self):
        return os.path.join(LAB_DIR, "vms", self.resource_id)

    def _server_name(self):
        return self.properties[self.NAME] or self.physical_resource_name()

    def _user_data(self):
        fmt = self.properties[self.USER_DATA_FORMAT]
        ud = self.properties[self.USER_DATA] or ""
        if fmt not in ("RAW", "SOFTWARE_CONFIG"):
            raise LabError("user_data_format %s is not supported by the lab (RAW, SOFTWARE_CONFIG)" % fmt)
        try:
            uuid.UUID(ud)
            is_id = True
        except ValueError:
            is_id = False
        if is_id:
            with self.rpc_client().ignore_error_by_name("NotFound"):
                sc = self.rpc_client().show_software_config(self.context, ud)
                return sc[rpc_api.SOFTWARE_CONFIG_CONFIG]
        return ud

    def _ports(self, lab):
        ports = []
        for n in self.properties[self.NETWORKS]:
            pid = n.get("port")
            if not pid:
                raise LabError("the lab needs every network of a server given as a port")
            try:
                ports.append(_read_json(os.path.join(LAB_DIR, "ports", pid + ".json")))
            except OSError:
                raise LabError("port %s does not exist in the lab" % pid)
        if not ports:
            raise LabError("a lab server needs a port")
        return ports

    def handle_create(self):
        lab = _lab()
        flavor = self.properties[self.FLAVOR]
        if flavor not in FLAVORS:
            raise exception.StackValidationFailed(
                message="flavor %s not found (the lab has %s)" % (flavor, ", ".join(sorted(FLAVORS))))
        vcpus, mem, disk_gb = FLAVORS[flavor]
        image = self.properties[self.IMAGE]
        image_dir = lab["images"].get(image)
        if not image_dir or not os.path.exists(os.path.join(image_dir, "disk.img")):
            raise LabError("image %s not found (the lab has %s)" % (image, ", ".join(sorted(lab["images"]))))
        keys = []
        if self.properties[self.KEY_NAME]:
            kp = os.path.join(LAB_DIR, "keypairs", self.properties[self.KEY_NAME] + ".pub")
            try:
                with open(kp) as f:
                    keys = [l.strip() for l in f if l.strip()]
            except OSError:
                raise LabError("key pair %s not found" % self.properties[self.KEY_NAME])
        ports = self._ports(lab)
        user_data = self._user_data()
        # Nova refuses user_data over 65535 bytes once base64-encoded; so does the lab.
        if len(base64.b64encode(user_data.encode("utf-8"))) > 65535:
            raise LabError("user_data is %d bytes after base64, over Nova's 65535"
                           % len(base64.b64encode(user_data.encode("utf-8"))))
        server_id = str(uuid.uuid4())
        self.resource_id_set(server_id)
        d = self._dir()
        os.makedirs(os.path.join(d, "seed"))
        name = self._server_name()
        with open(os.path.join(d, "name"), "w") as f:
            f.write(name)
        with open(os.path.join(d, "ip"), "w") as f:
            f.write(ports[0]["ip"])
        seed = os.path.join(d, "seed")
        with open(os.path.join(seed, "user-data"), "w") as f:
            f.write(user_data)
        meta = ["instance-id: %s" % server_id, "local-hostname: %s" % json.dumps(name)]
        if keys:
            meta.append("public-keys:")
            meta += ["  - %s" % json.dumps(k) for k in keys]
        with open(os.path.join(seed, "meta-data"), "w") as f:
            f.write("\n".join(meta) + "\n")
        eths = {}
        for i, p in enumerate(ports):
            e = {"match": {"macaddress": p["mac"]}, "set-name": "eth%d" % i,
                 "addresses": ["%s/%s" % (p["ip"], p["prefix"])]}
            if i == 0:
                e["gateway4"] = p["gateway"]
            eths["eth%d" % i] = e
        with open(os.path.join(seed, "network-config"), "w") as f:
            json.dump({"version": 2, "ethernets": eths}, f)
        _run(["genisoimage", "-quiet", "-output", os.path.join(d, "seed.iso"), "-volid", "cidata",
              "-joliet", "-rock", os.path.join(seed, "user-data"), os.path.join(seed, "meta-data"),
              os.path.join(seed, "network-config")])
        os.chmod(os.path.join(d, "seed.iso"), 0o600)
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.join(image_dir, "disk.img"),
              "-F", "raw", os.path.join(d, "disk.qcow2"), "%dG" % disk_gb])
        ns = _ns(lab)
        args = ["qemu-system-x86_64", "-name", name, "-machine", "pc", "-m", str(mem),
                "-smp", str(vcpus), "-nographic", "-no-reboot",
                "-kernel", os.path.join(image_dir, "vmlinuz"),
                "-initrd", os.path.join(image_dir, "initrd.img"),
                "-append", "root=/dev/vda rw console=ttyS0",
                "-drive", "file=%s,if=virtio,format=qcow2" % os.path.join(d, "disk.qcow2"),
                "-drive", "file=%s,if=virtio,format=raw,readonly=on" % os.path.join(d, "seed.iso"),
                "-serial", "file:%s" % os.path.join(d, "console.log"),
                "-qmp", "unix:%s,server=on,wait=off" % os.path.join(d, "qmp.sock"),
                "-monitor", "none", "-display", "none",
                "-pidfile", os.path.join(d, "qemu.pid")]
        if lab.get("accel") == "kvm":
            args += ["-enable-kvm", "-cpu", "host"]
        else:
            args += ["-accel", "tcg", "-cpu", "max"]
        for i, p in enumerate(ports):
            tap = "t%s%d" % (server_id.replace("-", "")[:11], i)
            _run(ns + ["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
            _run(ns + ["ip", "link", "set", tap, "master", lab["bridge"], "up"])
            args += ["-netdev", "tap,id=n%d,ifname=%s,script=no,downscript=no" % (i, tap),
                     "-device", "virtio-net-pci,netdev=n%d,mac=%s" % (i, p["mac"])]
        with open(os.path.join(d, "taps"), "w") as f:
            f.write("\n".join("t%s%d" % (server_id.replace("-", "")[:11], i) for i in range(len(ports))))
        with open(os.path.join(d, "qemu.out"), "ab") as out:
            # setsid -f: QEMU is nobody's child here (no zombie in heat-engine); timeout
            # bounds its life even if the stack is never deleted.
            subprocess.run(["setsid", "-f", "timeout", "-k", "10", str(LIFETIME)] + ns + args,
                           stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=True)
        return server_id

    def check_create_complete(self, server_id):
        d = self._dir()
        if _pid_alive(os.path.join(d, "qemu.pid")):
            return True  # ACTIVE: the hypervisor runs it (the guest boots from here)
        if not hasattr(self, "_started"):
            self._started = time.time()
        if time.time() - self._started > 30:
            try:
                with open(os.path.join(d, "qemu.out")) as f:
                    tail = f.read()[-800:]
            except OSError:
                tail = ""
            raise LabError("QEMU did not start: %s" % tail.strip())
        return False

    def handle_update(self, json_snippet, tmpl_diff, prop_diff):
        if self.USER_DATA in prop_diff:
            policy = prop_diff.get(self.USER_DATA_UPDATE_POLICY,
                                   self.properties[self.USER_DATA_UPDATE_POLICY])
            if policy == "REPLACE":
                raise resource.UpdateReplace(self.name)
        # IGNORE, metadata and name: nothing to do for a running VM.

    def needs_replace_with_prop_diff(self, changed_properties_set, after_props, before_props):
        return bool(changed_properties_set & {self.IMAGE, self.FLAVOR, self.KEY_NAME,
                                              self.NETWORKS, self.USER_DATA_FORMAT})

    def handle_delete(self):
        if not self.resource_id:
            return
        d = self._dir()
        pid = _pid_alive(os.path.join(d, "qemu.pid"))
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        return self.resource_id

    def check_delete_complete(self, server_id):
        if not server_id:
            return True
        d = os.path.join(LAB_DIR, "vms", server_id)
        pidfile = os.path.join(d, "qemu.pid")
        pid = _pid_alive(pidfile)
        if pid:
            if not hasattr(self, "_deleting"):
                self._deleting = time.time()
            if time.time() - self._deleting > 10:
                os.kill(pid, signal.SIGKILL)
            return False
        try:
            lab = _lab()
            with open(os.path.join(d, "taps")) as f:
                for tap in f.read().split():
                    _run(_ns(lab) + ["ip", "link", "del", tap], check=False)
        except (OSError, LabError):
            pass
        shutil.rmtree(d, ignore_errors=True)
        return True

    def _resolve_attribute(self, name):
        if not self.resource_id:
            return None
        d = self._dir()
        if name == self.NAME_ATTR:
            return self._server_name()
        if name == self.INSTANCE_NAME:
            return d
        if name == self.CONSOLE_LOG:
            try:
                with open(os.path.join(d, "console.log"), errors="replace") as f:
                    return f.read()[-4000:]
            except OSError:
                return ""
        try:
            with open(os.path.join(d, "ip")) as f:
                ip = f.read().strip()
        except OSError:
            return None
        if name == self.FIRST_ADDRESS:
            return ip
        if name == self.NETWORKS_ATTR:
            return {"lab": [ip]}


class RenderOnly(Server):
    """OS::Nova::Server for template tests: resolves the server exactly as the lab does
    (user_data, size limit, key pair, image, flavor) and shows the user_data it would boot
    with as the attribute `user_data`, without starting a VM. Test environments only: the
    attribute shows secrets."""

    ATTRIBUTES = Server.ATTRIBUTES + ("user_data",)
    attributes_schema = dict(Server.attributes_schema, user_data=attributes.Schema(
        _("The user_data the server would boot with."), type=attributes.Schema.STRING))

    def handle_create(self):
        lab = _lab()
        if self.properties[self.FLAVOR] not in FLAVORS:
            raise LabError("flavor %s not found" % self.properties[self.FLAVOR])
        if self.properties[self.IMAGE] not in lab["images"]:
            raise LabError("image %s not found" % self.properties[self.IMAGE])
        ud = self._user_data()
        if len(base64.b64encode(ud.encode("utf-8"))) > 65535:
            raise LabError("user_data is %d bytes after base64, over Nova's 65535"
                           % len(base64.b64encode(ud.encode("utf-8"))))
        self.resource_id_set(str(uuid.uuid4()))
        self.data_set("user_data", ud, redact=True)

    def check_create_complete(self, server_id):
        return True

    def handle_delete(self):
        return None

    def check_delete_complete(self, server_id):
        return True

    def _resolve_attribute(self, name):
        if name == "user_data":
            return self.data().get("user_data")
        if name == self.NAME_ATTR:
            return self._server_name()
        return None


# ------------------------------------------------------------------ volumes

class Volume(resource.Resource):
    """OS::Cinder::Volume in the lab: a sparse file that outlives the servers."""

    support_status = support.SupportStatus(version="19.0.0")
    PROPERTIES = (SIZE, NAME, DESCRIPTION, VOLUME_TYPE) = ("size", "name", "description", "volume_type")
    ATTRIBUTES = (SIZE_ATTR, STATUS, DISPLAY_NAME) = ("size", "status", "display_name")
    properties_schema = {
        SIZE: properties.Schema(properties.Schema.INTEGER, required=True),
        NAME: properties.Schema(properties.Schema.STRING, update_allowed=True),
        DESCRIPTION: properties.Schema(properties.Schema.STRING, update_allowed=True),
        VOLUME_TYPE: properties.Schema(properties.Schema.STRING),
    }
    attributes_schema = {
        SIZE_ATTR: attributes.Schema(_("Size in GiB."), type=attributes.Schema.INTEGER),
        STATUS: attributes.Schema(_("Status."), type=attributes.Schema.STRING),
        DISPLAY_NAME: attributes.Schema(_("Name."), type=attributes.Schema.STRING),
    }

    def handle_create(self):
        os.makedirs(os.path.join(LAB_DIR, "volumes"), exist_ok=True)
        vid = str(uuid.uuid4())
        self.resource_id_set(vid)
        with open(os.path.join(LAB_DIR, "volumes", vid + ".img"), "wb") as f:
            f.truncate(int(self.properties[self.SIZE]) * 1024 ** 3)

    def handle_delete(self):
        if self.resource_id:
            try:
                os.remove(os.path.join(LAB_DIR, "volumes", self.resource_id + ".img"))
            except FileNotFoundError:
                pass

    def _resolve_attribute(self, name):
        if name == self.SIZE_ATTR:
            return self.properties[self.SIZE]
        if name == self.STATUS:
            return "available"
        if name == self.DISPLAY_NAME:
            return self.properties[self.NAME]


class VolumeAttachment(resource.Resource):
    """OS::Cinder::VolumeAttachment in the lab: hot-plugged over QMP, serial = volume id."""

    support_status = support.SupportStatus(version="19.0.0")
    PROPERTIES = (INSTANCE_ID, VOLUME_ID, MOUNTPOINT) = ("instance_uuid", "volume_id", "mountpoint")
    properties_schema = {
        INSTANCE_ID: properties.Schema(properties.Schema.STRING, required=True, update_allowed=True),
        VOLUME_ID: properties.Schema(properties.Schema.STRING, required=True, update_allowed=True),
        MOUNTPOINT: properties.Schema(properties.Schema.STRING, update_allowed=True),
    }

    @staticmethod
    def _node(volume_id):
        return "vol" + volume_id.replace("-", "")[:12]

    def _attach(self, server_id, volume_id):
        qmp = os.path.join(LAB_DIR, "vms", server_id, "qmp.sock")
        img = os.path.join(LAB_DIR, "volumes", volume_id + ".img")
        if not os.path.exists(img):
            raise LabError("volume %s not found" % volume_id)
        node = self._node(volume_id)
        _qmp(qmp,
             {"execute": "blockdev-add", "arguments": {
                 "driver": "raw", "node-name": node,
                 "file": {"driver": "file", "filename": img}}},
             {"execute": "device_add", "arguments": {
                 "driver": "virtio-blk-pci", "drive": node, "id": "dev-" + node,
                 "serial": volume_id[:20]}})

    def _detach(self, server_id, volume_id):
        qmp = os.path.join(LAB_DIR, "vms", server_id, "qmp.sock")
        if not _pid_alive(os.path.join(LAB_DIR, "vms", server_id, "qemu.pid")):
            return  # the server is gone: nothing holds the volume
        node = self._node(volume_id)
        try:
            _qmp(qmp, {"execute": "device_del", "arguments": {"id": "dev-" + node}})
        except LabError as e:
            if "not found" not in str(e):
                raise
        # The guest releases the device (ACPI hot-unplug); then the block node goes.
        for _ in range(100):
            devs = _qmp(qmp, {"execute": "query-block"})[0]
            if not any(b.get("qdev", "").endswith("dev-" + node) or b.get("device") == "dev-" + node
                       for b in devs):
                break
            time.sleep(0.2)
        try:
            _qmp(qmp, {"execute": "blockdev-del", "arguments": {"node-name": node}})
        except LabError:
            pass

    def handle_create(self):
        server_id = self.properties[self.INSTANCE_ID]
        volume_id = self.properties[self.VOLUME_ID]
        self._attach(server_id, volume_id)
        self.resource_id_set("%s:%s" % (server_id, volume_id))

    def handle_update(self, json_snippet, tmpl_diff, prop_diff):
        old_server, old_volume = self.resource_id.split(":")
        new_server = prop_diff.get(self.INSTANCE_ID, old_server)
        new_volume = prop_diff.get(self.VOLUME_ID, old_volume)
        self._detach(old_server, old_volume)
        self._attach(new_server, new_volume)
        self.resource_id_set("%s:%s" % (new_server, new_volume))

    def handle_delete(self):
        if self.resource_id:
            server_id, volume_id = self.resource_id.split(":")
            self._detach(server_id, volume_id)


def resource_mapping():
    return {
        "StateShiftLab::Nova::Server": Server,
        "StateShiftLab::Nova::RenderOnly": RenderOnly,
        "StateShiftLab::Neutron::Port": Port,
        "StateShiftLab::Neutron::SecurityGroup": SecurityGroup,
        "StateShiftLab::Cinder::Volume": Volume,
        "StateShiftLab::Cinder::VolumeAttachment": VolumeAttachment,
    }
