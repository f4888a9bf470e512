#!/usr/bin/env python3
"""Tests for jp_importer, lb_dump_exporter and jp_upload_files.

Standard library unittest only.

Run:   python3 test_all.py            everything
       python3 test_all.py -v         verbose
       python3 test_all.py TestPKI    one class (or Class.test_name)
       python3 test_all.py --demo     the end-to-end demonstration

Needs the `openssl` command (the test PKI is made at run time).  The real
peers (vsftpd, globus-gridftp-server) are started when installed; without
them those tests skip with a reason, and JP_TEST_REQUIRE_PEERS=1 turns every
such skip into a failure (CI sets it).
"""

import base64
import contextlib
import errno
import gzip
import hashlib
import http.server
import io
import os
import queue
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import unittest
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

JP_IMPORTER = os.path.join(HERE, "jp_importer.py")
LB_DUMP_EXPORTER = os.path.join(HERE, "lb_dump_exporter.py")
JP_UPLOAD_FILES = os.path.join(HERE, "jp_upload_files.py")
SHARED = os.path.join(os.path.dirname(HERE), "shared")
REFERENCE = os.path.join(SHARED, "reference")

TIMEOUT = 30.0          # upper bound for any single wait in a test
REQUIRE_PEERS = os.environ.get("JP_TEST_REQUIRE_PEERS") == "1"
VERBOSE = "-v" in sys.argv or "--verbose" in sys.argv

# X509_V_FLAG_ALLOW_PROXY_CERTS: ssl.VERIFY_ALLOW_PROXY_CERTS only from 3.10.
VERIFY_ALLOW_PROXY_CERTS = 0x40

CA_SUBJECT = "/O=Grid/OU=Test/CN=Test CA"
HOST_SUBJECT = "/O=Grid/OU=Test/CN=localhost"
USER_SUBJECT = "/O=Grid/OU=Test/CN=Test User"
ROGUE_CA_SUBJECT = "/O=Rogue/CN=Rogue CA"
ROGUE_USER_SUBJECT = "/O=Rogue/CN=Mallory"

NS_SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
NS_XSI = "http://www.w3.org/2001/XMLSchema-instance"
NS_JPSRV = "http://glite.org/wsdl/services/jp"
NS_JPTYPE = "http://glite.org/wsdl/types/jp"
NS_JPELEM = "http://glite.org/wsdl/elements/jp"


def skip_or_fail(reason):
    """Skip a test for a missing peer, or fail under JP_TEST_REQUIRE_PEERS."""
    if REQUIRE_PEERS:
        raise AssertionError("required peer unavailable: " + reason)
    raise unittest.SkipTest(reason)


def wait_for(predicate, timeout=TIMEOUT, interval=0.02, what="condition"):
    """Poll predicate() until it returns a true value; return that value.

    Raises AssertionError naming `what` when the deadline passes.  This is
    how tests wait for events: never a bare sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0fs waiting for %s"
                                 % (timeout, what))
        time.sleep(interval)


def run(cmd, **kwargs):
    """Run a command, return CompletedProcess with text stdout/stderr."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("universal_newlines", True)
    kwargs.setdefault("timeout", 120)
    return subprocess.run(cmd, **kwargs)


def free_port():
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# Test PKI, made with the openssl command
# ---------------------------------------------------------------------------

class PKI:
    """A throwaway grid PKI in one directory.

    Attributes (all file paths):
      ca_dir        CA directory laid out like /etc/grid-security/certificates
                    (ca.pem, <hash>.0 links for both hash kinds,
                    <hash>.signing_policy)
      ca_cert, ca_key
      host_cert, host_key   CN=localhost, SAN DNS:localhost, IP:127.0.0.1
      user_cert, user_key   CN=Test User, clientAuth only (like IGTF)
      proxy         RFC 3820 proxy of the user (cert, key, user cert)
      rogue_cert, rogue_key a user certificate from an untrusted CA
      rogue_ca_cert
    and the subjects host_dn, user_dn, proxy_dn (slash form).
    """

    def __init__(self, directory):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.ca_dir = self.path("certificates")
        os.makedirs(self.ca_dir, exist_ok=True)
        self.serial = 100
        self.ca_cert, self.ca_key = self._make_ca("ca", CA_SUBJECT)
        self._install_ca(self.ca_cert, CA_SUBJECT, "/O=Grid/OU=Test/*")
        self.host_cert, self.host_key = self.issue(
            "host", HOST_SUBJECT, "serverAuth,clientAuth",
            san="DNS:localhost,IP:127.0.0.1")
        self.user_cert, self.user_key = self.issue(
            "user", USER_SUBJECT, "clientAuth")
        self.proxy = self.make_proxy("proxy.pem")
        self.host_dn = HOST_SUBJECT
        self.user_dn = USER_SUBJECT
        self.proxy_dn = self.proxy_subject
        self.rogue_ca_cert, rogue_ca_key = self._make_ca(
            "rogue-ca", ROGUE_CA_SUBJECT)
        self.rogue_cert, self.rogue_key = self.issue(
            "rogue", ROGUE_USER_SUBJECT, "clientAuth",
            ca=(self.rogue_ca_cert, rogue_ca_key))

    def path(self, *names):
        return os.path.join(self.dir, *names)

    def openssl(self, *args, stdin=None):
        proc = subprocess.run(("openssl",) + args, input=stdin,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=self.dir, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError("openssl %s failed: %s"
                               % (args[0], proc.stderr.decode(errors="replace")))
        return proc.stdout.decode()

    def _next_serial(self):
        self.serial += 1
        return str(self.serial)

    def _extfile(self, name, text):
        path = self.path(name + ".ext")
        with open(path, "w") as f:
            f.write("[ext]\n" + text)
        return path

    def _make_ca(self, name, subject):
        cert, key = self.path(name + ".pem"), self.path(name + ".key")
        ext = self._extfile(name, "basicConstraints=critical,CA:TRUE\n"
                            "keyUsage=critical,keyCertSign,cRLSign\n"
                            "subjectKeyIdentifier=hash\n")
        self.openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes",
                     "-keyout", key, "-out", cert, "-days", "3650",
                     "-subj", subject, "-sha256",
                     "-config", ext, "-extensions", "ext",
                     "-set_serial", self._next_serial())
        return cert, key

    def _write_req_config(self, name):
        # `openssl req` needs a [req] section with distinguished_name.
        path = self.path(name + ".cnf")
        with open(path, "w") as f:
            f.write("[req]\ndistinguished_name=dn\n[dn]\n")
        return path

    def _install_ca(self, cert, subject, policy_subjects):
        """Put a CA into ca_dir the way /etc/grid-security/certificates is."""
        shutil.copy(cert, os.path.join(self.ca_dir, "ca.pem"))
        for kind in ("-subject_hash", "-subject_hash_old"):
            h = self.openssl("x509", "-noout", kind, "-in", cert).strip()
            link = os.path.join(self.ca_dir, h + ".0")
            if not os.path.lexists(link):
                os.symlink("ca.pem", link)
            with open(os.path.join(self.ca_dir, h + ".signing_policy"),
                      "w") as f:
                f.write("access_id_CA   X509   '%s'\n"
                        "pos_rights     globus CA:sign\n"
                        "cond_subjects  globus '\"%s\"'\n"
                        % (subject, policy_subjects))

    def issue(self, name, subject, eku, san=None, ca=None, days=825,
              start=None, end=None):
        """Make key + certificate `name` signed by the CA; return paths.

        start/end ("YYYYMMDDHHMMSSZ") make certificates that are expired or
        not yet valid; they go through `openssl ca`, which can backdate.
        """
        ca_cert, ca_key = ca or (self.ca_cert, self.ca_key)
        cert, key, csr = (self.path(name + ".pem"), self.path(name + ".key"),
                          self.path(name + ".csr"))
        self.openssl("req", "-new", "-newkey", "rsa:2048", "-nodes",
                     "-keyout", key, "-out", csr, "-subj", subject,
                     "-config", self._write_req_config(name))
        os.chmod(key, 0o600)
        text = ("basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=%s\n" % eku)
        if san:
            text += "subjectAltName=%s\n" % san
        ext = self._extfile(name, text)
        if start or end:
            self._sign_dated(csr, cert, ca_cert, ca_key, ext, start, end)
        else:
            self.openssl("x509", "-req", "-in", csr, "-CA", ca_cert,
                         "-CAkey", ca_key, "-set_serial", self._next_serial(),
                         "-days", str(days), "-sha256", "-out", cert,
                         "-extfile", ext, "-extensions", "ext")
        return cert, key

    def _sign_dated(self, csr, cert, ca_cert, ca_key, ext, start, end):
        # `openssl x509 -req` cannot backdate; `openssl ca` can.
        db = self.path("ca-db")
        os.makedirs(db, exist_ok=True)
        index = os.path.join(db, "index.txt")
        open(index, "a").close()
        with open(os.path.join(db, "serial"), "w") as f:
            f.write("%04X\n" % int(self._next_serial()))
        conf = self.path("ca-dated.cnf")
        with open(conf, "w") as f:
            f.write("[ca]\ndefault_ca=x\n[x]\ndatabase=%s\n"
                    "new_certs_dir=%s\nserial=%s\ndefault_md=sha256\n"
                    "policy=p\nunique_subject=no\n[p]\n"
                    % (index, db, os.path.join(db, "serial")))
        self.openssl("ca", "-batch", "-config", conf, "-in", csr,
                     "-out", cert, "-cert", ca_cert, "-keyfile", ca_key,
                     "-startdate", start or "20200101000000Z",
                     "-enddate", end or "20991231000000Z",
                     "-extfile", ext, "-extensions", "ext", "-notext",
                     "-preserveDN")

    def make_proxy(self, filename, days=1, issuer=None, start=None,
                   end=None):
        """Make an RFC 3820 impersonation proxy file; return its path.

        The file is the Globus layout: proxy cert, proxy key, issuer cert.
        """
        issuer_cert, issuer_key = issuer or (self.user_cert, self.user_key)
        base = os.path.splitext(filename)[0]
        serial = self._next_serial()
        subject = USER_SUBJECT + "/CN=" + serial
        key, csr, cert = (self.path(base + ".key"), self.path(base + ".csr"),
                          self.path(base + ".crt"))
        self.openssl("req", "-new", "-newkey", "rsa:2048", "-nodes",
                     "-keyout", key, "-out", csr, "-subj", subject,
                     "-config", self._write_req_config(base))
        ext = self._extfile(base, "basicConstraints=critical,CA:FALSE\n"
                            "keyUsage=critical,digitalSignature,"
                            "keyEncipherment\n"
                            "proxyCertInfo=critical,"
                            "language:id-ppl-inheritAll\n")
        if start or end:
            self._sign_dated(csr, cert, issuer_cert, issuer_key, ext,
                             start, end)
        else:
            self.openssl("x509", "-req", "-in", csr, "-CA", issuer_cert,
                         "-CAkey", issuer_key, "-set_serial", serial,
                         "-days", str(days), "-sha256", "-out", cert,
                         "-extfile", ext, "-extensions", "ext")
        out = self.path(filename)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            for part in (cert, key, issuer_cert):
                with open(part) as p:
                    f.write(p.read())
        self.proxy_subject = subject
        return out

    def server_context(self, cert=None, key=None, require_client=True):
        """TLS server context: host cert, client certs (proxies too)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert or self.host_cert, key or self.host_key)
        ctx.load_verify_locations(cafile=self.ca_cert)
        ctx.verify_mode = (ssl.CERT_REQUIRED if require_client
                           else ssl.CERT_NONE)
        ctx.verify_flags |= VERIFY_ALLOW_PROXY_CERTS
        return ctx

    def client_context(self, cert=None, key=None):
        """TLS client context: trusts the test CA, checks host names."""
        ctx = ssl.create_default_context(cafile=self.ca_cert)
        ctx.load_cert_chain(cert or self.user_cert,
                            key or (None if cert else self.user_key))
        return ctx


_PKI = None
_PKI_DIR = None


def pki():
    """The module's PKI, made on first use and removed at exit."""
    global _PKI, _PKI_DIR
    if _PKI is None:
        if not shutil.which("openssl"):
            raise unittest.SkipTest("the openssl command is not installed")
        _PKI_DIR = tempfile.mkdtemp(prefix="jp-test-pki-")
        os.chmod(_PKI_DIR, 0o755)     # peers running as other users read it
        _PKI = PKI(_PKI_DIR)
    return _PKI


def tearDownModule():
    if _PKI_DIR:
        shutil.rmtree(_PKI_DIR, ignore_errors=True)


# ---------------------------------------------------------------------------
# JPPS fixture: the JP primary storage SOAP service, as the WSDL defines it
# ---------------------------------------------------------------------------

JPPS_CLASSES = {                     # file-type plugins of a stock JPPS
    "urn:org.glite.jp.primary:lb": "lb",
    "urn:org.glite.jp.primary:isb": "sandbox",
    "urn:org.glite.jp.primary:classad": "classad",
}
# Children of each request wrapper, in WSDL order: (name, min, max).
JPPS_REQUESTS = {
    "RegisterJob": [("job", 1, 1), ("owner", 1, 1)],
    "StartUpload": [("job", 1, 1), ("class", 1, 1), ("name", 1, 1),
                    ("commitBefore", 1, 1), ("contentType", 1, 1)],
    "CommitUpload": [("destination", 1, 1)],
    "GetJobAttributes": [("jobid", 1, 1), ("attributes", 1, None)],
}
REGTIME_ATTR = "http://egee.cesnet.cz/en/Schema/JP/System:regtime"
DATETIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
# RFC 2253-ish long names that getpeercert() returns -> slash-form keys.
DN_KEYS = {"countryName": "C", "stateOrProvinceName": "ST",
           "localityName": "L", "organizationName": "O",
           "organizationalUnitName": "OU", "commonName": "CN",
           "emailAddress": "emailAddress", "domainComponent": "DC"}


def slash_dn(name):
    """getpeercert() subject/issuer tuple -> '/O=Grid/CN=x' string."""
    return "".join("/%s=%s" % (DN_KEYS.get(k, k), v)
                   for rdn in name for k, v in rdn)


def peer_identity(cert):
    """The grid identity of a verified peer certificate (dict form).

    For an RFC 3820 proxy (subject = issuer + one more CN) the identity is
    the issuer's, as Globus and the real JPPS see it.
    """
    subject, issuer = slash_dn(cert["subject"]), slash_dn(cert["issuer"])
    if subject.startswith(issuer + "/CN=") and "/" not in \
            subject[len(issuer) + 4:]:
        return issuer
    return subject


def soap_datetime(t):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def xml_text(value):
    return (value.replace("&", "&amp;").replace("<", "&lt;")
            .replace(">", "&gt;"))


class SoapClientError(Exception):
    """A request the JPPS refuses before running the operation."""


class JPPSFault(Exception):
    """An operation failure, sent back as a genericFault chain."""

    def __init__(self, code, description, source, reason=None):
        Exception.__init__(self, code, description)
        self.code, self.description = code, description
        self.source, self.reason = source, reason


class JPPSCall:
    """One recorded call: op, fields (dict of lists), identity, result."""

    def __init__(self, op, fields, identity):
        self.op, self.fields, self.identity = op, fields, identity
        self.result = None          # "ok", an errno, or "client-error"
        self.time = time.time()

    def get(self, name):
        values = self.fields.get(name)
        return values[0] if values else None

    def __repr__(self):
        return "<JPPSCall %s %r -> %r>" % (self.op, self.fields, self.result)


class _TLSHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, fixture):
        self.fixture = fixture
        http.server.HTTPServer.__init__(self, ("127.0.0.1", 0),
                                        _JPPSHandler)

    def get_request(self):
        sock, addr = self.socket.accept()
        # gSOAP sends a response in one buffer; without NODELAY the body
        # would wait for the client's delayed ACK (40 ms per call).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The handshake runs in the handler's thread, not in accept().
        return (self.fixture.context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False), addr)

    def handle_error(self, request, client_address):
        pass                        # dropped connections are expected here


class _JPPSHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, like gSOAP
    server_version = "gSOAP/2.7"
    timeout = 60                    # idle keep-alive connections end

    def setup(self):
        self.request.settimeout(30)
        try:
            self.request.do_handshake()
            self.identity = peer_identity(self.request.getpeercert())
        except (ssl.SSLError, OSError, ValueError):
            self.identity = None
            self.close_connection = True
            self.fixture.refused_handshakes += 1
        http.server.BaseHTTPRequestHandler.setup(self)

    @property
    def fixture(self):
        return self.server.fixture

    def handle(self):
        if self.identity is None:
            return
        http.server.BaseHTTPRequestHandler.handle(self)

    def log_message(self, fmt, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self.fixture.handle_post(self, body)

    def reply(self, status, body, close=False):
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", "text/xml; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()


class JPPSFixture:
    """A JP primary storage speaking the SOAP contract of SPEC section 5.

    HTTP/1.1 keep-alive over TLS, client certificate required (RFC 3820
    proxies accepted), document/literal SOAP 1.1 checked strictly against
    the WSDL (wrapper in the elements namespace, unqualified children in
    WSDL order, required ones present, dateTime in UTC, Content-Type and
    SOAPAction), with the server semantics of SPEC 5.6: trusted peers,
    EEXIST on a second RegisterJob, ENOENT for an unknown job, one file per
    class per job, destinations under `dest_base`, commitBefore = now +
    `upload_deadline`, CommitUpload by exact destination and identity.

    Tests read `calls` (a list of JPPSCall), `jobs`, `files`, and inject
    trouble with inject(kind, op=None, count=1, **kw); kinds:
      fault     answer a genericFault: code=errno, description=text
      http500   HTTP 500 with a non-SOAP body
      garbage   HTTP 200 with a body that is not XML
      truncated HTTP 200 with a cut envelope
      drop      close the connection without answering
      drop_mid  send half of the response, then close
      hang      answer nothing until release() (or `seconds`), then drop
                the connection, or answer normally with answer=True
      doctype   HTTP 200 with a DOCTYPE/entity declaration in the body
    `name` of StartUpload: absent, xsi:nil or text.  The WSDL declares it
    minOccurs=1, but the original client sent a NULL name and the real
    server treats absent and nil alike as "no name" (SPEC 5.5, 9); every
    other element is required as declared.
    """

    def __init__(self, pki, dest_base="ftp://localhost:2811/jpps",
                 local_root=None, trusted=None, upload_deadline=300,
                 fault_form="typed"):
        self.pki = pki
        self.dest_base = dest_base.rstrip("/")
        self.local_root = local_root
        self.trusted = set(trusted if trusted is not None
                           else (pki.host_dn, pki.user_dn))
        self.upload_deadline = upload_deadline
        self.fault_form = fault_form        # "typed" (gSOAP 2.7.9+) or "elem"
        self.context = pki.server_context()
        self.calls = []
        self.jobs = {}       # unique -> {"jobid", "owner", "regtime"}
        self.files = {}      # (unique, filename) -> dict
        self.committed = {}  # destination -> sha256 of the file at commit
        self.refused_handshakes = 0
        self.lock = threading.Lock()
        self.injections = []
        self.released = threading.Event()
        self.server = None

    # -- lifetime ---------------------------------------------------------

    def start(self):
        self.server = _TLSHTTPServer(self)
        self.port = self.server.server_address[1]
        self.url = "https://localhost:%d" % self.port
        self.hostport = "localhost:%d" % self.port
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05})
        self.thread.daemon = True
        self.thread.start()
        return self

    def stop(self):
        self.released.set()
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(TIMEOUT)
            self.server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- test controls ----------------------------------------------------

    def inject(self, kind, op=None, count=1, **kw):
        with self.lock:
            self.injections.append({"kind": kind, "op": op, "count": count,
                                    "kw": kw})

    def release(self):
        self.released.set()

    def ops(self, op=None, result=None):
        with self.lock:
            return [c for c in self.calls
                    if (op is None or c.op == op)
                    and (result is None or c.result == result)]

    def local_path(self, destination):
        """Where the upload for `destination` lands on this machine."""
        prefix = self.dest_base.split("://", 1)[1]
        path = destination.split("://", 1)[1][len(prefix.split("/", 1)[0]):]
        return os.path.join(self.local_root, path.lstrip("/"))

    def register(self, jobid, owner):
        """Register a job directly (test set-up)."""
        unique = jobid.rsplit("/", 1)[1].split("?")[0]
        self.jobs[unique] = {"jobid": jobid, "owner": owner,
                             "regtime": time.time()}

    # -- request handling -------------------------------------------------

    def _take_injection(self, op):
        with self.lock:
            for inj in self.injections:
                if inj["op"] in (None, op) and inj["count"] > 0:
                    inj["count"] -= 1
                    if inj["count"] == 0:
                        self.injections.remove(inj)
                    return inj
        return None

    def handle_post(self, handler, body):
        try:
            op, fields = self.parse_request(handler, body)
        except SoapClientError as exc:
            call = JPPSCall(None, {}, handler.identity)
            call.result = "client-error"
            call.error = str(exc)
            with self.lock:
                self.calls.append(call)
            handler.reply(500, self.client_fault(str(exc)))
            return
        call = JPPSCall(op, fields, handler.identity)
        with self.lock:
            self.calls.append(call)
        inj = self._take_injection(op)
        if inj and self._misbehave(handler, inj, call):
            return
        try:
            with self.lock:
                response = getattr(self, "op_" + op)(call)
            call.result = "ok"
            handler.reply(200, self.envelope(response))
        except JPPSFault as fault:
            call.result = fault.code
            handler.reply(500, self.fault_envelope(fault))

    def _misbehave(self, handler, inj, call):
        kind, kw = inj["kind"], inj["kw"]
        call.result = "injected-" + kind
        if kind == "fault":
            call.result = kw.get("code", errno.EIO)
            handler.reply(500, self.fault_envelope(JPPSFault(
                call.result, kw.get("description", "injected fault"),
                "jpps_fixture")))
        elif kind == "http500":
            handler.reply(500, b"<html>Internal Server Error</html>")
        elif kind == "garbage":
            handler.reply(200, b"this is not XML \x00\xff")
        elif kind == "truncated":
            handler.reply(200, self.envelope(
                "<jpelem:RegisterJobResponse>")[:80])
        elif kind == "doctype":
            handler.reply(200, '<?xml version="1.0"?><!DOCTYPE x ['
                          '<!ENTITY a "aaaaaaaaaa">]><x>&a;</x>')
        elif kind in ("drop", "drop_mid", "hang"):
            if kind == "hang":
                self.released.wait(kw.get("seconds", TIMEOUT))
                if kw.get("answer"):
                    call.result = None
                    return False
            elif kind == "drop_mid":
                data = self.envelope("<jpelem:%sResponse></jpelem:%sResponse>"
                                     % (call.op, call.op)).encode()
                handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d"
                                    b"\r\n\r\n" % len(data) + data[:40])
                handler.wfile.flush()
            handler.close_connection = True
            try:
                handler.request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        else:
            raise ValueError("unknown injection " + kind)
        return True

    def parse_request(self, handler, body):
        """Check HTTP and SOAP framing strictly; return (op, fields)."""
        ctype = handler.headers.get("Content-Type", "")
        if ctype.replace(" ", "").lower() != "text/xml;charset=utf-8":
            raise SoapClientError("Content-Type must be text/xml; "
                                  "charset=utf-8, got %r" % ctype)
        if handler.headers.get("SOAPAction") != '""':
            raise SoapClientError("SOAPAction must be \"\", got %r"
                                  % handler.headers.get("SOAPAction"))
        if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
            raise SoapClientError("DTDs are not allowed")
        try:
            root = ET.fromstring(body)
        except ET.ParseError as exc:
            raise SoapClientError("not well-formed XML: %s" % exc)
        if root.tag != "{%s}Envelope" % NS_SOAP:
            raise SoapClientError("root is %s, not a SOAP 1.1 Envelope"
                                  % root.tag)
        bodies = [e for e in root if e.tag == "{%s}Body" % NS_SOAP]
        if len(bodies) != 1 or len(bodies[0]) != 1:
            raise SoapClientError("Envelope needs one Body with one element")
        wrapper = bodies[0][0]
        ns, _, op = wrapper.tag[1:].partition("}")
        if ns != NS_JPELEM or op not in JPPS_REQUESTS:
            raise SoapClientError("unknown operation element %s"
                                  % wrapper.tag)
        fields, children = {}, list(wrapper)
        for name, low, high in JPPS_REQUESTS[op]:
            values = []
            while children and children[0].tag == name:
                child = children.pop(0)
                if len(child):
                    raise SoapClientError("<%s> must be a simple string"
                                          % name)
                nil = child.get("{%s}nil" % NS_XSI) in ("true", "1")
                values.append(None if nil else (child.text or ""))
            if op == "StartUpload" and name == "name":
                values = values or [None]          # see the class docstring
            if len(values) < low or (high and len(values) > high):
                raise SoapClientError("%s: element <%s> expected %d..%s "
                                      "times, got %d" % (op, name, low,
                                                         high or "n",
                                                         len(values)))
            if name != "name" and None in values:
                raise SoapClientError("%s: <%s> is not nillable"
                                      % (op, name))
            fields[name] = values
        if children:
            raise SoapClientError("%s: unexpected element %s (qualified "
                                  "children or wrong order?)"
                                  % (op, children[0].tag))
        if op == "StartUpload" and not DATETIME_RE.match(
                fields["commitBefore"][0]):
            raise SoapClientError("commitBefore %r is not an xsd:dateTime "
                                  "in UTC" % fields["commitBefore"][0])
        return op, fields

    def _authorize_trusted(self, call, source):
        if call.identity not in self.trusted:
            raise JPPSFault(errno.EPERM, "you are not a trusted peer", source)

    @staticmethod
    def _unique(jobid, source):
        if "/" not in jobid:
            raise JPPSFault(errno.EINVAL, "Malformed jobid", source)
        return jobid.rsplit("/", 1)[1].split("?")[0]

    def op_RegisterJob(self, call):
        src = "glite_jppsbe_register_job"
        self._authorize_trusted(call, src)
        unique = self._unique(call.get("job"), src)
        if unique in self.jobs:
            raise JPPSFault(errno.EEXIST, "Job already registered", src)
        self.jobs[unique] = {"jobid": call.get("job"),
                             "owner": call.get("owner"),
                             "regtime": time.time()}
        return "<jpelem:RegisterJobResponse></jpelem:RegisterJobResponse>"

    def op_StartUpload(self, call):
        src = "glite_jppsbe_start_upload"
        self._authorize_trusted(call, src)
        short = JPPS_CLASSES.get(call.get("class"))
        if short is None:
            raise JPPSFault(errno.ENOENT, "unknown file class", src)
        unique = self._unique(call.get("job"), src)
        job = self.jobs.get(unique)
        if job is None:
            raise JPPSFault(errno.ENOENT, "No such job registered", src)
        now = time.time()
        for key in [k for k, f in self.files.items()
                    if k[0] == unique and f["state"] == "uploading"
                    and f["deadline"] < now]:
            del self.files[key]                  # expired uploads go first
        name = call.get("name")
        filename = short + ("." + name if name is not None else "")
        if (unique, filename) in self.files:
            raise JPPSFault(errno.EEXIST,
                            "File already stored or upload in progress", src)
        destination = "%s/data/%s/%d/%s/%s" % (
            self.dest_base, hashlib.md5(job["owner"].encode()).hexdigest(),
            int(job["regtime"]) // 604800, unique, filename)
        self.files[(unique, filename)] = {
            "state": "uploading", "destination": destination,
            "deadline": now + self.upload_deadline,
            "uploader": call.identity, "class": call.get("class"),
            "contentType": call.get("contentType")}
        return ("<jpelem:StartUploadResponse><destination>%s</destination>"
                "<commitBefore>%s</commitBefore></jpelem:StartUploadResponse>"
                % (xml_text(destination),
                   soap_datetime(now + self.upload_deadline)))

    def op_CommitUpload(self, call):
        src = "glite_jppsbe_commit_upload"
        self._authorize_trusted(call, src)
        destination = call.get("destination")
        for key, f in self.files.items():
            if f["destination"] == destination and f["state"] == "uploading":
                break
        else:
            raise JPPSFault(errno.ENOENT, "No such upload in progress", src)
        if f["uploader"] != call.identity:
            raise JPPSFault(errno.EPERM,
                            "Upload started by client with different "
                            "identity", src)
        f["state"] = "committed"
        if self.local_root:
            path = self.local_path(destination)
            with open(path, "rb") as data:
                self.committed[destination] = hashlib.sha256(
                    data.read()).hexdigest()
        return "<jpelem:CommitUploadResponse></jpelem:CommitUploadResponse>"

    def op_GetJobAttributes(self, call):
        src = "glite_jpps_get_attrs"
        unique = self._unique(call.get("jobid"), src)
        job = self.jobs.get(unique)
        if job is None:
            raise JPPSFault(errno.ENOENT, "Cannot retrieve job info", src,
                            reason=JPPSFault(errno.ENOENT,
                                             "No records for this job",
                                             "get_job_info"))
        if job["owner"] != call.identity:
            raise JPPSFault(errno.EPERM, "you are not a job owner",
                            "glite_jpps_authz")
        values = "".join(
            "<attrValues><name>%s</name><value><string>%d</string></value>"
            "<timestamp>%s</timestamp><origin>SYSTEM</origin></attrValues>"
            % (xml_text(a), int(job["regtime"]), soap_datetime(job["regtime"]))
            for a in call.fields["attributes"])
        return ("<jpelem:GetJobAttributesResponse>%s"
                "</jpelem:GetJobAttributesResponse>" % values)

    # -- envelopes --------------------------------------------------------

    @staticmethod
    def envelope(body):
        return ('<?xml version="1.0" encoding="UTF-8"?>'
                '<SOAP-ENV:Envelope xmlns:SOAP-ENV="%s" xmlns:SOAP-ENC='
                '"http://schemas.xmlsoap.org/soap/encoding/" xmlns:xsi="%s" '
                'xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:jpsrv='
                '"%s" xmlns:jptype="%s" xmlns:jpelem="%s"><SOAP-ENV:Body>%s'
                '</SOAP-ENV:Body></SOAP-ENV:Envelope>'
                % (NS_SOAP, NS_XSI, NS_JPSRV, NS_JPTYPE, NS_JPELEM, body))

    @staticmethod
    def _generic_fault(fault):
        text = os.strerror(fault.code) if isinstance(fault.code, int) else ""
        inner = ("<reason>%s</reason>" % JPPSFixture._generic_fault(
            fault.reason) if fault.reason else "")
        return ("<source>%s</source><code>%d</code><text>%s</text>"
                "<description>%s</description>%s"
                % (xml_text(fault.source), fault.code, xml_text(text),
                   xml_text(fault.description), inner))

    def fault_envelope(self, fault):
        if self.fault_form == "typed":
            detail = ('<fault xsi:type="jptype:genericFault">%s</fault>'
                      % self._generic_fault(fault))
        else:
            detail = ('<jpelem:genericFault>%s</jpelem:genericFault>'
                      % self._generic_fault(fault))
        return self.envelope(
            "<SOAP-ENV:Fault><faultcode>SOAP-ENV:Server</faultcode>"
            "<faultstring>Oh, shit!</faultstring><detail>%s</detail>"
            "</SOAP-ENV:Fault>" % detail)

    def client_fault(self, text):
        return self.envelope(
            "<SOAP-ENV:Fault><faultcode>SOAP-ENV:Client</faultcode>"
            "<faultstring>%s</faultstring></SOAP-ENV:Fault>" % xml_text(text))


# ---------------------------------------------------------------------------
# Tests: the PKI itself
# ---------------------------------------------------------------------------

class TestPKI(unittest.TestCase):

    def test_proxy_verifies_as_rfc3820(self):
        p = pki()
        out = run(["openssl", "verify", "-allow_proxy_certs", "-CApath",
                   p.ca_dir, "-untrusted", p.user_cert, p.path("proxy.crt")],
                  env=dict(os.environ, OPENSSL_ALLOW_PROXY_CERTS="1"))
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)

    def test_ca_dir_has_hash_links_and_signing_policy(self):
        p = pki()
        names = os.listdir(p.ca_dir)
        self.assertEqual(len([n for n in names if n.endswith(".0")]), 2)
        self.assertEqual(
            len([n for n in names if n.endswith(".signing_policy")]), 2)

    def test_host_cert_names_localhost(self):
        p = pki()
        text = run(["openssl", "x509", "-noout", "-text", "-in",
                    p.host_cert]).stdout
        self.assertIn("DNS:localhost", text)
        self.assertIn("IP Address:127.0.0.1", text)



def raw_soap(fixture, body, cert=None, key=None, headers=None):
    """POST one raw envelope to the fixture; return (status, root element).

    A reference client independent of jp_importer, for fixture tests.
    """
    import http.client
    p = fixture.pki
    ctx = p.client_context(cert, key)
    conn = http.client.HTTPSConnection("localhost", fixture.port,
                                       context=ctx, timeout=TIMEOUT)
    try:
        hdrs = {"Content-Type": "text/xml; charset=utf-8",
                "SOAPAction": '""'}
        hdrs.update(headers or {})
        conn.request("POST", "/", body=JPPSFixture.envelope(body).encode(),
                     headers=hdrs)
        resp = conn.getresponse()
        return resp.status, ET.fromstring(resp.read())
    finally:
        conn.close()


def fault_of(root):
    """(faultcode, faultstring, detail code or None) of a fault envelope."""
    fault = root.find(".//{%s}Fault" % NS_SOAP)
    if fault is None:
        return None
    code = fault.find(".//detail//code")
    return (fault.findtext("faultcode"), fault.findtext("faultstring"),
            int(code.text) if code is not None else None)


class TestJPPSFixture(unittest.TestCase):

    JOB = "https://lb.example.org:9000/rReV1TpJ5oY0Z1_M4NBfHw"

    def setUp(self):
        self.jpps = JPPSFixture(pki()).start()
        self.addCleanup(self.jpps.stop)

    def register(self, job=None, ns=NS_JPELEM, children=None):
        children = children or ("<job>%s</job><owner>%s</owner>"
                                % (job or self.JOB, USER_SUBJECT))
        return raw_soap(self.jpps, '<x:RegisterJob xmlns:x="%s">%s'
                        '</x:RegisterJob>' % (ns, children))

    def test_register_then_eexist(self):
        status, root = self.register()
        self.assertEqual(status, 200)
        self.assertIsNotNone(root.find(".//{%s}RegisterJobResponse"
                                       % NS_JPELEM))
        status, root = self.register()
        self.assertEqual(status, 500)
        self.assertEqual(fault_of(root), ("SOAP-ENV:Server", "Oh, shit!",
                                          errno.EEXIST))

    def test_rejects_wrong_namespace(self):
        status, root = self.register(ns="http://glite.org/wsdl/services/jp")
        self.assertEqual(status, 500)
        self.assertEqual(fault_of(root)[0], "SOAP-ENV:Client")
        self.assertEqual(self.jpps.jobs, {})

    def test_rejects_qualified_children(self):
        status, root = self.register(children=(
            '<x:job>%s</x:job><x:owner>o</x:owner>' % self.JOB))
        self.assertEqual(fault_of(root)[0], "SOAP-ENV:Client")

    def test_rejects_missing_element(self):
        status, root = self.register(children="<job>%s</job>" % self.JOB)
        self.assertEqual(status, 500)
        self.assertIn("owner", fault_of(root)[1])
        self.assertEqual(self.jpps.jobs, {})

    def test_rejects_wrong_order_and_bad_datetime(self):
        self.register()
        for commit in ("2010-06-21 09:30:28", "2010-06-21T09:30:28+01:00"):
            status, root = raw_soap(self.jpps, (
                '<x:StartUpload xmlns:x="%s"><job>%s</job><class>'
                'urn:org.glite.jp.primary:lb</class><commitBefore>%s'
                '</commitBefore><contentType>text/lb</contentType>'
                '</x:StartUpload>') % (NS_JPELEM, self.JOB, commit))
            self.assertEqual(fault_of(root)[0], "SOAP-ENV:Client", commit)
        status, root = raw_soap(self.jpps, (
            '<x:StartUpload xmlns:x="%s"><class>urn:org.glite.jp.primary:lb'
            '</class><job>%s</job><commitBefore>2010-06-21T09:30:28Z'
            '</commitBefore><contentType>text/lb</contentType>'
            '</x:StartUpload>') % (NS_JPELEM, self.JOB))
        self.assertEqual(fault_of(root)[0], "SOAP-ENV:Client")

    def test_rejects_wrong_content_type_and_soapaction(self):
        for headers in ({"Content-Type": "application/soap+xml"},
                        {"SOAPAction": "RegisterJob"}):
            status, root = raw_soap(
                self.jpps, '<x:RegisterJob xmlns:x="%s"><job>%s</job><owner>'
                'o</owner></x:RegisterJob>' % (NS_JPELEM, self.JOB),
                headers=headers)
            self.assertEqual(fault_of(root)[0], "SOAP-ENV:Client", headers)
        self.assertEqual(self.jpps.jobs, {})

    def test_rejects_untrusted_client_certificate(self):
        p = pki()
        with self.assertRaises((ssl.SSLError, OSError)):
            raw_soap(self.jpps, "<x/>", cert=p.rogue_cert, key=p.rogue_key)
        wait_for(lambda: self.jpps.refused_handshakes, what="refusal")
        self.assertEqual(self.jpps.calls, [])

    def test_proxy_identity_is_the_user(self):
        self.jpps.trusted = {USER_SUBJECT}
        status, _ = raw_soap(self.jpps, '<x:RegisterJob xmlns:x="%s"><job>%s'
                             '</job><owner>o</owner></x:RegisterJob>'
                             % (NS_JPELEM, self.JOB), cert=pki().proxy)
        self.assertEqual(status, 200)
        self.assertEqual(self.jpps.calls[0].identity, USER_SUBJECT)

    def test_untrusted_peer_gets_eperm(self):
        self.jpps.trusted = {HOST_SUBJECT}
        status, root = self.register()
        self.assertEqual(fault_of(root)[2], errno.EPERM)

    def test_upload_semantics(self):
        self.register()
        start = ('<x:StartUpload xmlns:x="%s"><job>%s</job><class>'
                 'urn:org.glite.jp.primary:lb</class><commitBefore>'
                 '2010-06-21T09:30:28Z</commitBefore><contentType>text/lb'
                 '</contentType></x:StartUpload>' % (NS_JPELEM, self.JOB))
        status, root = raw_soap(self.jpps, start)
        self.assertEqual(status, 200)
        dest = root.findtext(".//destination")
        self.assertTrue(dest.startswith(self.jpps.dest_base + "/data/"))
        self.assertTrue(dest.endswith("/rReV1TpJ5oY0Z1_M4NBfHw/lb"), dest)
        commit = root.findtext(".//{%s}StartUploadResponse/commitBefore"
                               % NS_JPELEM)
        self.assertRegex(commit, DATETIME_RE)
        status, root = raw_soap(self.jpps, start)          # one per class
        self.assertEqual(fault_of(root)[2], errno.EEXIST)
        status, root = raw_soap(self.jpps, '<x:CommitUpload xmlns:x="%s">'
                                '<destination>%s/x</destination>'
                                '</x:CommitUpload>' % (NS_JPELEM, dest))
        self.assertEqual(fault_of(root)[2], errno.ENOENT)
        status, root = raw_soap(self.jpps, '<x:CommitUpload xmlns:x="%s">'
                                '<destination>%s</destination>'
                                '</x:CommitUpload>' % (NS_JPELEM, dest))
        self.assertEqual(status, 200)
        self.assertEqual(self.jpps.ops("CommitUpload", "ok")[0]
                         .get("destination"), dest)

    def test_start_upload_unknown_job_and_class(self):
        body = ('<x:StartUpload xmlns:x="%s"><job>%s</job><class>%s</class>'
                '<commitBefore>2010-06-21T09:30:28Z</commitBefore>'
                '<contentType>text/lb</contentType></x:StartUpload>')
        status, root = raw_soap(self.jpps, body % (
            NS_JPELEM, self.JOB, "urn:org.glite.jp.primary:lb"))
        self.assertEqual(fault_of(root)[2], errno.ENOENT)
        self.register()
        status, root = raw_soap(self.jpps, body % (
            NS_JPELEM, self.JOB, "urn:bogus"))
        self.assertEqual(fault_of(root)[2], errno.ENOENT)

    def test_get_job_attributes(self):
        body = ('<x:GetJobAttributes xmlns:x="%s"><jobid>%s</jobid>'
                '<attributes>%s</attributes></x:GetJobAttributes>'
                % (NS_JPELEM, self.JOB, REGTIME_ATTR))
        status, root = raw_soap(self.jpps, body)
        self.assertEqual(fault_of(root)[2], errno.ENOENT)
        self.register()                        # owner = the user
        status, root = raw_soap(self.jpps, body)
        self.assertEqual(status, 200)
        self.assertEqual(root.findtext(".//attrValues/name"), REGTIME_ATTR)
        self.jpps.jobs["rReV1TpJ5oY0Z1_M4NBfHw"]["owner"] = "/CN=other"
        status, root = raw_soap(self.jpps, body)
        self.assertEqual(fault_of(root)[2], errno.EPERM)

    def test_fault_detail_shape(self):
        self.register()
        status, root = self.register()
        fault = root.find(".//detail/fault")
        self.assertEqual(fault.get("{%s}type" % NS_XSI),
                         "jptype:genericFault")
        self.assertEqual([c.tag for c in fault],
                         ["source", "code", "text", "description"])


if __name__ == "__main__":
    unittest.main()
