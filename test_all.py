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

Contents, in file order (a helper used by one class only sits just above
that class):

  Fixtures and helpers
    skip_or_fail, wait_for, run (and TranscriptResult, which shows a
    failing test's command output), free_port
    the test PKI               PKI, pki()
    the JPPS                   JPPSFixture, JPPSCall, raw_soap, fault_of
    maildirs, the importer     make_maildir, drop_message, listing,
                               registration, ImporterHarness
    FTPS and the real peers    FTPSFixture, VsftpdPeer, GridFTPPeer,
                               payloads, upload_harness, write_dump,
                               dump_message, sandbox_message, FTPSCase
    a JPPS built with gSOAP    GSoapJPPSPeer
    LB dumps, the exporter     ulm_line, generated_dump, ExporterRun
    the fixtures' own tests    TestHelpers, TestPKI, TestJPPSFixture
  jp_importer
    in-process                 TestImporterMessages, TestImporterSoapParsing,
                               TestImporterMaildir, TestQueueQuarantine
    the daemon, end to end     TestImporterRegistrations, TestMigration,
                               TestImporterUploads, TestGSoapJPPSPeer,
                               TestImporterProcesses, TestFaultsClear
  Transports                   TestFTPSTransport, TestGridFTPUpload,
                               TestConnectionReuse, TestTransportLimits
  lb_dump_exporter             TestDumpExporter, TestOnATerminal,
                               TestExporterHostileInput,
                               TestExporterSpeedPaths
  jp_upload_files              TestUploadFiles
  Operators                    TestOperatorRunning, TestOriginalCommandLines,
                               TestOperatorWatching
  Reliability
    kills                      TestKillsLoseNothing
    bad input in bulk (soak)   TestBadInputInBulk
    security                   TestTLSAndSecrets, TestCredentialsHardening
  The demonstration            run_demo()
"""

import atexit
import contextlib
import errno
import fcntl
import ftplib
import gzip
import hashlib
import http.server
import io
import json
import logging
import os
import pty
import random
import re
import select
import shlex
import shutil
import signal
import socket
import socketserver
import ssl
import stat
import subprocess
import sys
import tarfile
import tempfile
import termios
import threading
import time
import unittest
import zlib
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

JP_IMPORTER = os.path.join(HERE, "jp_importer.py")
LB_DUMP_EXPORTER = os.path.join(HERE, "lb_dump_exporter.py")
JP_UPLOAD_FILES = os.path.join(HERE, "jp_upload_files.py")
# The project's own test data: WSDL, message examples, LB dump samples.
TESTDATA = os.path.join(HERE, "testdata")

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

import jp_importer      # noqa: E402  (the tools are modules beside this file)
import lb_dump_exporter  # noqa: E402
import jp_upload_files  # noqa: E402

if not VERBOSE:     # in-process tests: the importer's log lines only with -v
    jp_importer.log.addHandler(logging.NullHandler())
    jp_importer.log.propagate = False


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


# What the commands of the running test wrote to stderr: a failing test
# shows it (TranscriptResult), since a rare failure in CI is seen once.
TRANSCRIPT = []
TRANSCRIPT_TAIL = 4000          # characters kept of each command's stderr


def run(cmd, **kwargs):
    """Run a command, return CompletedProcess with text stdout/stderr."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("universal_newlines", True)
    kwargs.setdefault("timeout", 120)
    proc = subprocess.run(cmd, **kwargs)
    err = proc.stderr
    if isinstance(err, bytes):
        err = err.decode("utf-8", "replace")
    if err:
        TRANSCRIPT.append("$ %s  (exit %s)\n%s" % (
            " ".join(os.path.basename(str(a)) if i < 2 else str(a)
                     for i, a in enumerate(cmd)),
            proc.returncode, err[-TRANSCRIPT_TAIL:]))
    return proc


class TranscriptResult(unittest.TextTestResult):
    """A test result whose failures and errors end with what the test's
    commands (run through run()) and importer daemons (started by
    ImporterHarness.start) wrote to stderr."""

    def startTest(self, test):
        del TRANSCRIPT[:]
        super().startTest(test)

    def _with_transcript(self, outcomes):
        if TRANSCRIPT:
            # An entry is text, or a callable that reads a daemon's log.
            texts = [t() if callable(t) else t for t in TRANSCRIPT]
            test, text = outcomes[-1]
            outcomes[-1] = (test, text + "\nstderr of the test's commands:"
                            "\n" + "\n".join(texts))

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._with_transcript(self.failures)

    def addError(self, test, err):
        super().addError(test, err)
        self._with_transcript(self.errors)


class DaemonLog:
    """A transcript entry: the end of an ImporterHarness daemon's log,
    read when the failure is reported, or, under Pythons that report it
    after the cleanups removed the file (before 3.11), as snapshot() saw
    it during those cleanups."""

    def __init__(self, harness):
        self.harness, self.text = harness, None

    def snapshot(self):
        try:
            self.text = self.harness.output()[-TRANSCRIPT_TAIL:]
        except OSError:
            pass

    def __call__(self):
        self.snapshot()
        return "$ jp_importer.py -g ... (its log)\n%s" % (
            self.text if self.text is not None else "(not kept)")


class TranscriptRunner(unittest.TextTestRunner):
    resultclass = TranscriptResult


def free_port():
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# Fixtures: the test PKI, made with the openssl command
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
        # atexit, not tearDownModule: bench.py and CI scripts use it too.
        # Forked children leave with os._exit and do not run it.
        atexit.register(shutil.rmtree, _PKI_DIR, True)
        _PKI = PKI(_PKI_DIR)
    return _PKI


# ---------------------------------------------------------------------------
# Fixtures: the JP primary storage (JPPS) SOAP service, as the WSDL
# defines it, and a reference client for it
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

    def __init__(self, op, fields, identity, raw=b""):
        self.op, self.fields, self.identity = op, fields, identity
        self.raw = raw                # the request body as received
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

    def __init__(self, fixture, port=0):
        self.fixture = fixture
        http.server.HTTPServer.__init__(self, ("127.0.0.1", port),
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
    """A JP primary storage speaking the SOAP contract of the real JPPS.

    HTTP/1.1 keep-alive over TLS, client certificate required (RFC 3820
    proxies accepted), document/literal SOAP 1.1 checked strictly against
    the WSDL (wrapper in the elements namespace, unqualified children in
    WSDL order, required ones present, dateTime in UTC, Content-Type and
    SOAPAction), with the server semantics of the real JPPS: trusted peers,
    EEXIST on a second RegisterJob, ENOENT for an unknown job, one file per
    class per job, destinations under `dest_base`, commitBefore = now +
    `upload_deadline`, CommitUpload by exact destination and identity.

    Tests read `calls` (a list of JPPSCall), `jobs`, `files`, make time
    pass for open uploads with expire_uploads(), and inject trouble with
    inject(kind, op=None, count=1, **kw); kinds:
      fault     answer a genericFault: code=errno, description=text
      http500   HTTP 500 with a non-SOAP body
      garbage   HTTP 200 with a body that is not XML
      truncated HTTP 200 with a cut envelope
      drop      close the connection without answering
      drop_mid  send half of the response, then close
      hang      answer nothing until release() (or `seconds`), then drop
                the connection, or answer normally with answer=True
      doctype   HTTP 200 with a DOCTYPE/entity declaration in the body
      lose      run the operation, then close without answering (the
                client cannot know whether it happened)
    `name` of StartUpload: xsi:nil or text, or absent.  The WSDL declares
    it minOccurs=1 (our client sends xsi:nil), but the original client
    sent a NULL name that some gSOAP versions omitted, and the real server
    reads absent and nil alike as "no name"; every other
    element is required as declared.
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

    def start(self, port=0):
        """Serve on `port` (default: a free one); stop() then start(port)
        brings the same JPPS back after an outage."""
        self.released.clear()
        self.server = _TLSHTTPServer(self, port)
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

    def expire_uploads(self):
        """Let every upload never committed pass its deadline, as time
        does at the real JPPS (which then forgets it)."""
        with self.lock:
            for f in self.files.values():
                if f["state"] == "uploading":
                    f["deadline"] = 0

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
        call = JPPSCall(op, fields, handler.identity, body)
        with self.lock:
            self.calls.append(call)
        inj = self._take_injection(op)
        if inj and inj["kind"] != "lose" and \
                self._misbehave(handler, inj, call):
            return
        try:
            with self.lock:
                response = getattr(self, "op_" + op)(call)
            call.result = "ok"
            status, body = 200, self.envelope(response)
        except JPPSFault as fault:
            call.result = fault.code
            status, body = 500, self.fault_envelope(fault)
        call.response = body
        if inj and inj["kind"] == "lose":
            call.result = "lost-%s" % call.result
            call.response = body
            handler.close_connection = True
            handler.request.shutdown(socket.SHUT_RDWR)
            return
        handler.reply(status, body)

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
            # The right answer but for its DTD: only the DTD refuses it.
            handler.reply(200, self.envelope(
                "<jpelem:%sResponse>&a;</jpelem:%sResponse>"
                % (call.op, call.op)).replace(
                    "?>", '?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">]>', 1))
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


# ---------------------------------------------------------------------------
# Fixtures: maildirs and the jp_importer harness
# ---------------------------------------------------------------------------

MAILDIR_SUBDIRS = ("tmp", "new", "work", "post", "undeliverable")
_message_counter = [0]


def make_maildir(root):
    for sub in ("",) + MAILDIR_SUBDIRS:
        os.makedirs(os.path.join(root, sub), mode=0o700, exist_ok=True)
    return root


def drop_message(root, data, name=None, age=0):
    """Write a message the way the LB server does (tmp, link into new)."""
    _message_counter[0] += 1
    name = name or "%d_%06d.test" % (time.time(), _message_counter[0])
    tmp = os.path.join(root, "tmp", name)
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    if age:
        os.utime(tmp, (time.time() - age, time.time() - age))
    os.link(tmp, os.path.join(root, "new", name))
    return name


def listing(root, sub):
    try:
        return sorted(os.listdir(os.path.join(root, sub)))
    except FileNotFoundError:
        return []


def read_text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def unlink_if_there(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def child_pids(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def daemon_stopper(case, pid):
    """stop() of the daemon `pid` (SIGTERM, then wait until it is gone),
    also run when the test `case` ends."""
    def stop():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        wait_for(lambda: not os.path.exists("/proc/%d" % pid),
                 what="the daemon to exit")
    case.addCleanup(stop)
    return stop


def registration(n, owner=USER_SUBJECT):
    return ("https://lb.example.org:9000/job%05d\n%s" % (n, owner)).encode()


class ImporterHarness:
    """Maildirs, a JPPS fixture and ways to run jp_importer against them."""

    def __init__(self, case, **jpps_kw):
        self.case = case
        self.dir = tempfile.mkdtemp(prefix="jp-importer-test-")
        os.chmod(self.dir, 0o700)
        case.addCleanup(shutil.rmtree, self.dir, True)
        self.reg = make_maildir(self.path("reg"))
        self.dump = make_maildir(self.path("dump"))
        self.sandbox = make_maildir(self.path("sandbox"))
        self.pki = pki()
        self.jpps = JPPSFixture(self.pki, **jpps_kw).start()
        case.addCleanup(self.jpps.stop)
        self.pidfile = self.path("importer.pid")
        self.logfile = self.path("importer.log")
        self.cert, self.key = self.pki.host_cert, self.pki.host_key
        self.daemon_log = None      # its transcript entry, once started

    def path(self, *names):
        return os.path.join(self.dir, *names)

    def args(self, *extra):
        # --timeout: a test that wants a limit to pass gives its own; this
        # one only bounds a stuck run, and must not fire when a busy CI
        # machine holds up a call of a test that expects a delivery.
        return ["-c", self.cert, "-k", self.key, "-C", self.pki.ca_dir,
                "-p", self.jpps.url, "-r", self.reg, "-d", self.dump,
                "-s", self.sandbox, "-i", self.pidfile, "-t", "0.05",
                "--timeout", "20", "--retry", "0"] + list(extra)

    def once(self, *extra, **kw):
        proc = run([sys.executable, JP_IMPORTER, "--once"]
                   + self.args(*extra), **kw)
        if VERBOSE:
            sys.stderr.write(proc.stderr)
        return proc

    def start(self, *extra, **kw):
        """Run the importer in the foreground (-g) as a child process."""
        out = open(self.path("stderr.log"), "ab")
        proc = subprocess.Popen([sys.executable, JP_IMPORTER, "-g"]
                                + self.args(*extra), stdout=out,
                                stderr=subprocess.STDOUT, **kw)
        out.close()
        if self.daemon_log is None:
            self.daemon_log = DaemonLog(self)
            TRANSCRIPT.append(self.daemon_log)
            self.case.addCleanup(self.daemon_log.snapshot)  # after the kill

        def cleanup():
            if proc.poll() is None:
                proc.kill()
            proc.wait(TIMEOUT)
        self.case.addCleanup(cleanup)
        return proc

    def output(self):
        with open(self.path("stderr.log"), errors="replace") as f:
            return f.read()

    def stop(self, proc, sig=signal.SIGTERM):
        proc.send_signal(sig)
        return proc.wait(TIMEOUT)

    def workers(self, proc, count):
        return wait_for(lambda: len(child_pids(proc.pid)) == count and
                        child_pids(proc.pid), what="%d workers" % count)

    def state(self, maildir, name):
        return jp_importer.Maildir(maildir).read_state(name)


# ---------------------------------------------------------------------------
# Fixtures: FTPS (explicit FTP over TLS, as vsftpd behaves for our
# client), the real vsftpd and GridFTP peers, files to upload
# ---------------------------------------------------------------------------

class FTPSFixture:
    """An FTP-over-TLS server on 127.0.0.1 storing uploads under `root`.

    Explicit TLS (AUTH TLS), PBSZ/PROT, client certificate required and
    verified against the test CA (RFC 3820 proxies accepted), and, like
    vsftpd with require_ssl_reuse=YES, a PROT P data connection must
    resume the control connection's TLS session (else 522).  Commands:
    USER PASS AUTH PBSZ PROT TYPE MODE PWD CWD MKD PASV EPSV STOR SIZE
    FEAT NOOP QUIT.  Tests inject trouble with inject(kind, count=1,
    **kw); kinds:
      refuse_login  530 to PASS
      full          452 to STOR (the disk is full)
      drop_data     close the data connection after `after` bytes of a
                    STOR, answer 426
      stall         stop answering at command `command` (default STOR)
                    until release()
      short         store one byte less than received (SIZE differs)
      trickle       at command `command` (default STOR) send an endless
                    multi-line reply, one byte every `interval` s, until
                    release() or the client goes
      stall_data    stop reading a STOR's data after `after` bytes until
                    release()
    `stores` counts completed STORs, `connections` control connections,
    `commands` lists every command line received (PASS arguments as
    "***"), `logins` the (user, password) pairs tried.  With tls=False
    the server has no TLS, as vsftpd with ssl_enable=NO; `users` maps
    the only user names accepted to their passwords.  With `idle` (s), a
    session silent that long is ended with 421, as vsftpd's
    idle_session_timeout does; `idle_closed` counts them.
    """

    def __init__(self, pki, root, require_reuse=True, cert=None,
                 implicit=False, tls=True, users=None, idle=None):
        self.pki, self.root = pki, root
        self.idle, self.idle_closed = idle, 0
        self.require_reuse = require_reuse
        self.implicit = implicit          # TLS from the first byte
        self.tls, self.users = tls, users
        self.commands, self.logins = [], []
        self.context = pki.server_context(*(cert or ()))
        self.lock = threading.Lock()
        self.injections = []
        self.released = threading.Event()
        self.stores = 0
        self.connections = 0
        self.sock = None

    def start(self):
        self.released.clear()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept,
                                       args=(self.sock,))
        self.thread.daemon = True
        self.thread.start()
        return self

    def stop(self):
        self.released.set()
        if self.sock is not None:
            # close() alone would leave the port listening while accept()
            # is blocked on it; shutdown() ends both, as a stopped server.
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
            self.sock = None

    def url(self, path):
        return "%s://localhost:%d/%s" % ("ftps" if self.implicit else "ftp",
                                         self.port, path.lstrip("/"))

    def inject(self, kind, count=1, **kw):
        with self.lock:
            self.injections.append({"kind": kind, "count": count, "kw": kw})

    def release(self):
        self.released.set()

    def _take(self, kind):
        with self.lock:
            for inj in self.injections:
                if inj["kind"] == kind and inj["count"] > 0:
                    inj["count"] -= 1
                    return inj["kw"]
        return None

    def _accept(self, sock):
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            if self.sock is not sock:       # stop() came meanwhile
                conn.close()
                return
            self.connections += 1
            t = threading.Thread(target=self._session, args=(conn,))
            t.daemon = True
            t.start()

    def local(self, path, cwd="/"):
        full = os.path.normpath(os.path.join(cwd, path))
        return os.path.join(self.root, full.lstrip("/")), full

    def _session(self, conn):
        conn.settimeout(self.idle or TIMEOUT)
        state = {"conn": conn, "tls": None, "prot": "C", "cwd": "/",
                 "pasv": None, "user": None}
        try:
            if self.implicit:
                try:
                    conn = self.context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    return
                state.update(conn=conn, tls=conn, prot="P")
            self._reply(state, "220 FTPS fixture ready")
            reader = conn.makefile("rb")
            while True:
                try:
                    line = reader.readline()
                except socket.timeout:
                    if self.idle:
                        with self.lock:
                            self.idle_closed += 1
                        self._reply(state, "421 Timeout.")
                    return
                if not line:
                    return
                cmd, _, arg = line.decode("utf-8", "replace").rstrip(
                    "\r\n").partition(" ")
                cmd = cmd.upper()
                stall = None
                with self.lock:
                    self.commands.append(cmd + (" ***" if cmd == "PASS"
                                                else " " + arg).rstrip())
                    for inj in self.injections:
                        if inj["kind"] in ("stall", "trickle") and \
                                inj["count"] > 0 and \
                                inj["kw"].get("command", "STOR") == cmd:
                            inj["count"] -= 1
                            stall = inj
                if stall is not None and stall["kind"] == "trickle":
                    self._trickle(state, stall["kw"].get("interval", 0.1))
                    return
                if stall is not None:
                    self.released.wait(TIMEOUT)
                    return
                if cmd == "AUTH" and not self.tls:
                    self._reply(state, "530 Please login with USER and "
                                "PASS.")
                    continue
                if cmd == "AUTH":
                    if arg.upper() not in ("TLS", "TLS-C", "SSL"):
                        self._reply(state, "504 AUTH TLS only")
                        continue
                    self._reply(state, "234 Proceed with negotiation.")
                    try:
                        tls = self.context.wrap_socket(conn, server_side=True)
                    except (ssl.SSLError, OSError):
                        return
                    state["tls"] = conn = tls
                    state["conn"] = tls
                    reader = tls.makefile("rb")
                    continue
                if state["tls"] is None and self.tls and \
                        cmd not in ("QUIT", "FEAT"):
                    self._reply(state, "530 Non-anonymous sessions must use "
                                "encryption.")
                    continue
                handler = getattr(self, "_cmd_" + cmd, None)
                if handler is None:
                    self._reply(state, "502 Command not implemented.")
                    continue
                if handler(state, arg) == "quit":
                    return
        except (OSError, ssl.SSLError):
            return
        finally:
            for sock in (state["pasv"], conn):
                try:
                    if sock is not None:
                        sock.close()
                except OSError:
                    pass

    def _reply(self, state, text):
        state["conn"].sendall((text + "\r\n").encode())

    def _trickle(self, state, interval):
        # Never a whole reply, always another byte: no read times out.
        line = b"150-Still working on it\r\n"
        give_up = time.monotonic() + TIMEOUT     # a client that never ends
        while time.monotonic() < give_up:
            for i in range(len(line)):
                state["conn"].sendall(line[i:i + 1])
                if self.released.wait(interval):
                    return

    def _cmd_FEAT(self, state, arg):
        self._reply(state, "211-Features:\r\n AUTH TLS\r\n PBSZ\r\n PROT\r\n"
                    " SIZE\r\n EPSV\r\n PASV\r\n211 End")

    def _cmd_PBSZ(self, state, arg):
        self._reply(state, "200 PBSZ set to 0.")

    def _cmd_PROT(self, state, arg):
        if arg.upper() not in ("C", "P"):
            self._reply(state, "536 PROT C or P only")
            return
        state["prot"] = arg.upper()
        self._reply(state, "200 PROT now %s." % ("Private" if arg.upper()
                                                 == "P" else "Clear"))

    def _cmd_USER(self, state, arg):
        state["user"] = arg
        self._reply(state, "331 Please specify the password.")

    def _cmd_PASS(self, state, arg):
        with self.lock:
            self.logins.append((state["user"], arg))
        if self._take("refuse_login") is not None or (
                self.users is not None and
                self.users.get(state["user"]) != arg):
            self._reply(state, "530 Login incorrect.")
            return
        self._reply(state, "230 Login successful.")

    def _cmd_TYPE(self, state, arg):
        self._reply(state, "200 Switching to Binary mode.")

    def _cmd_MODE(self, state, arg):
        if arg.upper() == "S":
            self._reply(state, "200 Mode set to S.")
        else:
            self._reply(state, "504 Bad MODE command.")

    def _cmd_NOOP(self, state, arg):
        self._reply(state, "200 NOOP ok.")

    def _cmd_PWD(self, state, arg):
        self._reply(state, '257 "%s" is the current directory' %
                    state["cwd"])

    def _cmd_CWD(self, state, arg):
        local, full = self.local(arg, state["cwd"])
        if os.path.isdir(local):
            state["cwd"] = full
            self._reply(state, "250 Directory successfully changed.")
        else:
            self._reply(state, "550 Failed to change directory.")

    def _cmd_MKD(self, state, arg):
        local, full = self.local(arg, state["cwd"])
        try:
            os.mkdir(local)
            self._reply(state, '257 "%s" created' % full)
        except OSError:
            self._reply(state, "550 Create directory operation failed.")

    def _cmd_SIZE(self, state, arg):
        local, _ = self.local(arg, state["cwd"])
        if os.path.isfile(local):
            self._reply(state, "213 %d" % os.path.getsize(local))
        else:
            self._reply(state, "550 Could not get file size.")

    def _cmd_PASV(self, state, arg):
        self._listen(state)
        port = state["pasv"].getsockname()[1]
        self._reply(state, "227 Entering Passive Mode (127,0,0,1,%d,%d)."
                    % (port >> 8, port & 255))

    def _cmd_EPSV(self, state, arg):
        self._listen(state)
        self._reply(state, "229 Entering Extended Passive Mode (|||%d|)"
                    % state["pasv"].getsockname()[1])

    def _listen(self, state):
        if state["pasv"] is not None:
            state["pasv"].close()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(TIMEOUT)
        state["pasv"] = listener

    def _cmd_STOR(self, state, arg):
        local, _ = self.local(arg, state["cwd"])
        if state["pasv"] is None:
            self._reply(state, "425 Use PORT or PASV first.")
            return
        if self._take("full") is not None:
            state["pasv"].close()
            state["pasv"] = None
            self._reply(state, "452 Insufficient storage space.")
            return
        if not os.path.isdir(os.path.dirname(local)):
            self._reply(state, "553 Could not create file.")
            return
        self._reply(state, "150 Ok to send data.")
        data, _ = state["pasv"].accept()
        state["pasv"].close()
        state["pasv"] = None
        data.settimeout(TIMEOUT)
        try:
            if state["prot"] == "P":
                try:
                    data = self.context.wrap_socket(data, server_side=True)
                except (ssl.SSLError, OSError):
                    self._reply(state, "522 SSL connection failed.")
                    return
                if self.require_reuse and not data.session_reused:
                    self._reply(state, "522 SSL connection failed; session "
                                "reuse required: see require_ssl_reuse "
                                "option in vsftpd.conf man page")
                    return
            drop = self._take("drop_data")
            short = self._take("short")
            stall = self._take("stall_data")
            received = 0
            with open(local, "wb") as out:
                while True:
                    if stall is not None and \
                            received >= stall.get("after", 0):
                        self.released.wait(TIMEOUT)
                        return
                    block = data.recv(65536)
                    if not block:
                        if isinstance(data, ssl.SSLSocket):
                            data.unwrap()       # as vsftpd: close_notify
                        break
                    if drop is not None and received + len(block) > \
                            drop.get("after", 0):
                        out.write(block[:drop.get("after", 0) - received])
                        data.close()
                        self._reply(state, "426 Failure reading network "
                                    "stream.")
                        return
                    out.write(block)
                    received += len(block)
                if short is not None and received:
                    out.truncate(received - 1)
        finally:
            data.close()
        with self.lock:
            self.stores += 1
        self._reply(state, "226 Transfer complete.")

    def _cmd_QUIT(self, state, arg):
        self._reply(state, "221 Goodbye.")
        return "quit"


class VsftpdPeer:
    """The real vsftpd on 127.0.0.1: FTPS, client certificate required
    and validated, TLS session reuse required on data connections.

    Anonymous uploads (no account is created) into `root`/incoming,
    which url() addresses.  Needs root (vsftpd drops to the `ftp`
    account, which the Debian package creates).  Variants: tls=False
    (ssl_enable=NO), validate_cert=False (a client certificate is still
    required, but proxies pass), cert=(cert, key) of the server, idle
    (idle_session_timeout, s).  The protocol log is `log`.
    """

    def __init__(self, pki, tls=True, validate_cert=True, cert=None,
                 idle=300):
        if not shutil.which("vsftpd"):
            skip_or_fail("vsftpd is not installed")
        if os.geteuid() != 0:
            skip_or_fail("vsftpd needs root to run")
        try:
            import pwd
            ftp_user = pwd.getpwnam("ftp")
        except KeyError:
            skip_or_fail("the ftp account (made by the vsftpd package) is "
                         "missing")
        self.dir = tempfile.mkdtemp(prefix="jp-vsftpd-")
        os.chmod(self.dir, 0o755)
        self.root = os.path.join(self.dir, "anon")
        os.mkdir(self.root, 0o755)           # vsftpd refuses a writable root
        incoming = os.path.join(self.root, "incoming")
        os.mkdir(incoming, 0o755)
        os.chown(incoming, ftp_user.pw_uid, ftp_user.pw_gid)
        empty = os.path.join(self.dir, "empty")
        os.mkdir(empty, 0o755)
        self.port = free_port()
        self.log = os.path.join(self.dir, "vsftpd.log")
        pasv = free_port()
        conf = os.path.join(self.dir, "vsftpd.conf")
        cert, key = cert or (pki.host_cert, pki.host_key)
        with open(conf, "w") as f:
            f.write("\n".join([
                "listen=YES", "listen_ipv6=NO", "listen_address=127.0.0.1",
                "listen_port=%d" % self.port, "background=NO",
                "seccomp_sandbox=NO", "secure_chroot_dir=" + empty,
                "local_enable=NO", "write_enable=YES",
                "anonymous_enable=YES", "anon_root=" + self.root,
                "anon_upload_enable=YES", "anon_mkdir_write_enable=YES",
                "anon_umask=022", "no_anon_password=YES",
                "pasv_enable=YES", "pasv_address=127.0.0.1",
                # A range: parallel uploads each need a data port.
                "pasv_min_port=%d" % pasv,
                "pasv_max_port=%d" % min(pasv + 100, 65535),
                "ssl_enable=%s" % ("YES" if tls else "NO"),
                "ssl_tlsv1=YES", "ssl_sslv2=NO",
                "ssl_sslv3=NO", "allow_anon_ssl=YES",
                "force_anon_logins_ssl=YES", "force_anon_data_ssl=YES",
                "require_ssl_reuse=YES",
                "rsa_cert_file=" + cert, "rsa_private_key_file=" + key,
                "ca_certs_file=" + pki.ca_cert,
                "ssl_request_cert=YES", "require_cert=YES",
                "validate_cert=%s" % ("YES" if validate_cert else "NO"),
                "log_ftp_protocol=YES", "xferlog_enable=YES",
                "idle_session_timeout=%d" % idle,
                "vsftpd_log_file=" + self.log, ""]))
        self.proc = subprocess.Popen(["vsftpd", conf],
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        try:
            wait_for(self._listening, what="vsftpd on port %d" % self.port)
        except AssertionError:
            self.stop()
            raise

    def _listening(self):
        if self.proc.poll() is not None:
            raise AssertionError("vsftpd exited: %s" % self.proc.stderr.read())
        with contextlib.closing(socket.socket()) as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def url(self, path):
        return "ftp://localhost:%d/incoming/%s" % (self.port,
                                                   path.lstrip("/"))

    def local(self, path):
        return os.path.join(self.root, "incoming", path.lstrip("/"))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(TIMEOUT)
        self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class GridFTPPeer:
    """The real globus-gridftp-server on 127.0.0.1 with GSI.

    The host credential of the test PKI; a grid-mapfile mapping the host
    and user DNs to the existing `nobody` account (no account is made);
    uploads go to `root`, a temporary directory owned by nobody, which
    url() addresses.  Needs root (the server setuids per connection).
    encrypt_data: started with -encrypt-data (DCAU A and PROT P only).
    """

    def __init__(self, pki, encrypt_data=False, extra=(), cert=None):
        if not shutil.which("globus-gridftp-server"):
            skip_or_fail("globus-gridftp-server is not installed")
        if os.geteuid() != 0:
            skip_or_fail("globus-gridftp-server needs root to run")
        import pwd
        nobody = pwd.getpwnam("nobody")
        self.dir = tempfile.mkdtemp(prefix="jp-gridftp-")
        os.chmod(self.dir, 0o755)
        self.root = os.path.join(self.dir, "storage")
        os.mkdir(self.root, 0o755)
        os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
        gridmap = os.path.join(self.dir, "grid-mapfile")
        with open(gridmap, "w") as f:
            f.write('"%s" nobody\n"%s" nobody\n' % (pki.user_dn, pki.host_dn))
        self.port = free_port()
        self.log = os.path.join(self.dir, "gridftp.log")
        cert, key = cert or (pki.host_cert, pki.host_key)
        if encrypt_data:
            extra = ["-encrypt-data"] + list(extra)
        env = dict(os.environ, X509_CERT_DIR=pki.ca_dir,
                   X509_USER_CERT=cert, X509_USER_KEY=key,
                   GRIDMAP=gridmap, GLOBUS_TCP_PORT_RANGE="50000,50100")
        env.pop("X509_USER_PROXY", None)
        self.proc = subprocess.Popen(
            ["globus-gridftp-server", "-c", "/dev/null", "-p",
             str(self.port), "-control-interface", "127.0.0.1",
             "-data-interface", "127.0.0.1", "-port-range", "50000,50100",
             "-d", "ALL", "-l", self.log] + list(extra), env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(self._listening, what="globus-gridftp-server on %d"
                     % self.port)
        except AssertionError:
            self.stop()
            raise

    def _listening(self):
        if self.proc.poll() is not None:
            raise AssertionError("globus-gridftp-server exited with %d"
                                 % self.proc.returncode)
        with contextlib.closing(socket.socket()) as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def url(self, path):
        return "gsiftp://localhost:%d%s/%s" % (self.port, self.root,
                                               path.lstrip("/"))

    def sessions(self):
        """The pids of the per-connection server processes."""
        return child_pids(self.proc.pid)

    def log_text(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def stop(self):
        for pid in self.sessions():         # stopped ones too
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(TIMEOUT)
        shutil.rmtree(self.dir, ignore_errors=True)


def payloads(directory, sizes):
    """Files of the given sizes (random bytes); [(size, path, sha256)]."""
    out = []
    for size in sizes:
        path = os.path.join(directory, "payload-%d" % size)
        digest = hashlib.sha256()
        with open(path, "wb") as f:
            left = size
            while left:
                block = os.urandom(min(left, 1 << 20))
                f.write(block)
                digest.update(block)
                left -= len(block)
        out.append((size, path, digest.hexdigest()))
    return out


UPLOAD_SIZES = (0, 1, 5000, 3 * 1024 * 1024, 64 * 1024 * 1024)


def upload_harness(case, ftps_class=None, **jpps_kw):
    """An ImporterHarness whose JPPS hands out destinations on a fresh
    FTPS fixture (of `ftps_class`, default FTPSFixture); the fixture is
    h.ftps, its root h.ftp_root."""
    root = tempfile.mkdtemp(prefix="jp-ftp-root-")
    case.addCleanup(shutil.rmtree, root, True)
    ftps = (ftps_class or FTPSFixture)(pki(), root).start()
    case.addCleanup(ftps.stop)
    h = ImporterHarness(case, dest_base=ftps.url("jpps"), local_root=root,
                        **jpps_kw)
    h.ftps, h.ftp_root = ftps, root
    return h


def write_dump(h, n, owner=USER_SUBJECT, size=5000):
    """An LB dump file of job n in the harness directory; (jobid, path)."""
    jobid = "https://lb.example.org:9000/dump%05d" % n
    os.makedirs(h.path("lbexport"), mode=0o700, exist_ok=True)
    path = h.path("lbexport", "dump%05d.1795350000_000001" % n)
    line = ('DG.ARRIVED=20261122120000.000000 DATE=20261122120000.000001 '
            'HOST="lb.example.org" PROG=edg-wms LVL=SYSTEM DG.PRIORITY=0 '
            'DG.SOURCE="UserInterface" DG.SRC_INSTANCE="" DG.EVNT="RegJob" '
            'DG.JOBID="%s" DG.SEQCODE="UI=000001" DG.USER="%s" '
            'DG.REGJOB.JDL="%s" \n' % (jobid, owner.replace('"', '\\"'),
                                       "x" * size))
    with open(path, "w") as f:
        f.write(line)
    return jobid, path


def dump_message(jobid, path, jpps=None):
    data = "jobid  %s\nfile   %s\n" % (jobid, path)
    if jpps:
        data += "jpps   %s\n" % jpps
    return data.encode()


def sandbox_message(jobid, path, proxy):
    return ("jobid\t%s\nfile\t%s\nproxy\t%s\n" % (jobid, path, proxy)
            ).encode()


def write_archive(path, size):
    """A sandbox tarball at `path`: one member of `size` random bytes.
    (The importer sends only tar archives from sandbox messages.)"""
    member = tarfile.TarInfo("sandbox/out.bin")
    member.size = size
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(member, io.BytesIO(os.urandom(size)))
    return path


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def untrusting_credentials(p, directory, cert, key):
    """Credentials `cert`/`key` whose CA directory (made in `directory`)
    holds only the rogue CA: no server of the test PKI is trusted."""
    ca_dir = os.path.join(directory, "other-ca")
    os.mkdir(ca_dir)
    shutil.copy(p.rogue_ca_cert, os.path.join(ca_dir, "x.0"))
    return jp_importer.Credentials(cert, key, ca_dir)


def other_host_cert(p, name, usage="serverAuth"):
    """(certificate, key) of the test CA for other.example, not for the
    localhost the servers are reached by."""
    return p.issue(name, "/O=Grid/OU=Test/CN=other.example", usage,
                   san="DNS:other.example")


def queue_dump(h, n, **kw):
    """write_dump(h, n, **kw), the job registered with the JPPS fixture
    and a message for the dump in the harness's dump maildir; (jobid,
    dump path, message name)."""
    jobid, path = write_dump(h, n, **kw)
    h.jpps.register(jobid, USER_SUBJECT)
    return jobid, path, drop_message(h.dump, dump_message(jobid, path))


def queue_dump_and_sandbox(h, dump_size, archive_size):
    """A registered job with a dump and a sandbox archive, and a message
    for each in the harness's maildirs; (dump path, archive path, sorted
    sha256 digests of both)."""
    jobid, path, _ = queue_dump(h, 1, size=dump_size)
    archive = h.path("sandbox", "spool", "1.tar")
    os.makedirs(os.path.dirname(archive), mode=0o700)
    write_archive(archive, archive_size)
    drop_message(h.sandbox, sandbox_message(jobid, archive, h.pki.proxy))
    return path, archive, sorted([sha256_of(path), sha256_of(archive)])


class FTPSCase(unittest.TestCase):
    """What the ftp:// transport tests share: a directory, the host
    credential, fresh FTPS fixtures."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="jp-ftps-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.pki = pki()
        self.host = jp_importer.Credentials(self.pki.host_cert,
                                            self.pki.host_key,
                                            self.pki.ca_dir)

    def fixture(self, **kw):
        root = tempfile.mkdtemp(prefix="root-", dir=self.dir)
        ftps = FTPSFixture(self.pki, root, **kw).start()
        self.addCleanup(ftps.stop)
        return ftps


# ---------------------------------------------------------------------------
# Fixtures: a JPPS built with gSOAP from the project's WSDL
# ---------------------------------------------------------------------------

GSOAP_SERVICE = os.path.join(TESTDATA, "jpps_gsoap.c")
GSOAP_WSDL = os.path.join(TESTDATA, "wsdl", "JobProvenancePS.wsdl")
# wsdl2h's prefixes for the WSDL's namespaces: those of the real JPPS.
GSOAP_TYPEMAP = ('jp = "%s"\njptype = "%s"\njpelem = "%s"\n'
                 % (NS_JPSRV, NS_JPTYPE, NS_JPELEM))
_GSOAP_BUILD = {}


def gsoap_jpps_binary():
    """Build testdata/jpps_gsoap.c once per run, its SOAP layer generated
    from the project's WSDL by wsdl2h and soapcpp2 (nothing generated is
    kept); return the program's path."""
    if "path" in _GSOAP_BUILD:
        return _GSOAP_BUILD["path"]
    for tool in ("wsdl2h", "soapcpp2", "gcc", "pkg-config"):
        if not shutil.which(tool):
            skip_or_fail("%s is not installed (gsoap, libgsoap-dev, gcc, "
                         "pkg-config)" % tool)
    flags = run(["pkg-config", "--cflags", "--libs", "gsoapssl"])
    if flags.returncode != 0:
        skip_or_fail("gSOAP with OpenSSL (libgsoap-dev) is not installed")
    build = tempfile.mkdtemp(prefix="jp-gsoap-build-")
    atexit.register(shutil.rmtree, build, True)
    typemap = os.path.join(build, "typemap.dat")
    with open(typemap, "w") as f:
        f.write(GSOAP_TYPEMAP)
    program = os.path.join(build, "jpps_gsoap")
    # The -D flags of pkg-config must be used as given: they change the
    # layout of struct soap, which the library was built with.
    for cmd in (["wsdl2h", "-c", "-t", typemap, "-o",
                 os.path.join(build, "jpps.h"), GSOAP_WSDL],
                ["soapcpp2", "-c", "-S", "-L", "-x", "-d", build,
                 os.path.join(build, "jpps.h")],
                ["gcc", "-O2", "-o", program, "-I", build, GSOAP_SERVICE,
                 os.path.join(build, "soapC.c"),
                 os.path.join(build, "soapServer.c")]
                + flags.stdout.split() + ["-lssl", "-lcrypto", "-lpthread"]):
        proc = run(cmd, cwd=build)
        if proc.returncode != 0:
            raise AssertionError("building the gSOAP JPPS failed: %s: %s"
                                 % (" ".join(cmd[:2]),
                                    (proc.stderr + proc.stdout)[-2000:]))
    _GSOAP_BUILD["path"] = program
    return program


class GSoapJPPSPeer:
    """A JPPS served by gSOAP, as the real one: testdata/jpps_gsoap.c.

    A real-speed peer (one C process, a thread per keep-alive HTTPS
    connection, strict WSDL validation of every request) for the
    benchmark and for a check of our wire format by a second, independent
    SOAP stack; the Python JPPSFixture stays for fault injection.
    Destinations are under `dest_base`.  calls(op, result) reads the
    peer's log: one JPPSCall per operation that reached the service,
    fields "a", "b", "c" the request's (job, owner), (job, class, name)
    or (destination), result "ok" or an errno.  log=False: no log (the
    benchmark's setting).
    """

    def __init__(self, pki, dest_base="ftp://localhost:2811/jpps",
                 cert=None, log=True):
        binary = gsoap_jpps_binary()
        self.pki = pki
        self.dir = tempfile.mkdtemp(prefix="jp-gsoap-")
        self.log = os.path.join(self.dir, "calls.log") if log else None
        cert, key = cert or (pki.host_cert, pki.host_key)
        self.proc = subprocess.Popen(
            [binary, cert, key, pki.ca_dir, dest_base]
            + ([self.log] if log else []),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            ready = select.select([self.proc.stdout], [], [], TIMEOUT)[0]
            line = self.proc.stdout.readline() if ready else b""
            if not line.strip().isdigit():
                raise AssertionError("the gSOAP JPPS did not start: %s"
                                     % self.proc.stderr.read(2000)
                                     if self.proc.poll() is not None
                                     else "no port within %ds" % TIMEOUT)
        except BaseException:
            self.stop()
            raise
        self.port = int(line)
        self.url = "https://localhost:%d" % self.port

    def calls(self, op=None, result=None):
        out = []
        with open(self.log, errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split("\t")
                call = JPPSCall(fields[0], {"a": [fields[3]],
                                            "b": [fields[4]],
                                            "c": [fields[5]]}, fields[2])
                call.result = (fields[1] if fields[1] == "ok"
                               else int(fields[1]))
                if op in (None, call.op) and result in (None, call.result):
                    out.append(call)
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(TIMEOUT)
        self.proc.stdout.close()
        self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# Fixtures: LB dumps and lb_dump_exporter runs
# ---------------------------------------------------------------------------

SAMPLES = os.path.join(TESTDATA, "samples")
MAKE_SAMPLES = os.path.join(TESTDATA, "make_samples.py")
ULM_LINE = ('DG.ARRIVED=20261122120000.%06d DATE=20261122120000.%06d '
            'HOST="lb.example.org" PROG=edg-wms LVL=SYSTEM DG.PRIORITY=0 '
            'DG.SOURCE="LogMonitor" DG.SRC_INSTANCE="" DG.EVNT="Running" '
            'DG.JOBID="%s" DG.SEQCODE="UI=000001" DG.USER="/O=Grid/CN=u" '
            'DG.RUNNING.NODE="wn%d \\"quoted\\" %s" \n')


def ulm_line(jobid, n, pad=0):
    return (ULM_LINE % (n % 1000000, n % 1000000, jobid, n, "p" * pad)
            ).encode()


def generated_dump(jobs, per_job=5, interleave=1, pad=100):
    """[(jobid, [lines])] and the dump bytes; interleave > 1 mixes the
    lines of that many consecutive jobs."""
    table = [("https://lb.example.org:9000/gen%05d" % j,
              [ulm_line("https://lb.example.org:9000/gen%05d" % j,
                        j * per_job + i, pad) for i in range(per_job)])
             for j in range(jobs)]
    out = []
    for first in range(0, jobs, interleave):
        block = table[first:first + interleave]
        for i in range(per_job):
            out.extend(lines[i] for _, lines in block)
    return table, b"".join(out)


class ExporterRun:
    """A store and a maildir, and ways to run lb_dump_exporter on them."""

    def __init__(self, case):
        self.case = case
        self.dir = tempfile.mkdtemp(prefix="jp-exporter-test-")
        os.chmod(self.dir, 0o700)
        case.addCleanup(shutil.rmtree, self.dir, True)
        self.store = os.path.join(self.dir, "lbexport")
        self.maildir = os.path.join(self.dir, "jpdump")

    def args(self, *extra):
        return [sys.executable, LB_DUMP_EXPORTER, "-s", self.store,
                "-m", self.maildir] + list(extra)

    def run(self, *extra, **kw):
        return run(self.args(*extra), **kw)

    def dump_file(self, data, name="dump"):
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def messages(self):
        """{jobid: (fields, message name)} of every message in new/;
        fails on two messages of one job."""
        found = {}
        for name in listing(self.maildir, "new"):
            with open(os.path.join(self.maildir, "new", name), "rb") as f:
                data = f.read()
            fields = jp_importer.parse_keyed(data)
            self.case.assertNotIn(fields["jobid"], found, "two messages")
            found[fields["jobid"]] = (fields, name, data)
        return found

    def assert_exported(self, table, complete=True):
        """Each message names a file holding exactly its job's lines."""
        messages = self.messages()
        expected = dict((jobid, b"".join(lines)) for jobid, lines in table)
        for jobid, (fields, name, _) in messages.items():
            with open(fields["file"], "rb") as f:
                self.case.assertEqual(f.read(), expected[jobid], jobid)
            self.case.assertEqual(os.path.dirname(fields["file"]),
                                  self.store)
        if complete:
            self.case.assertEqual(sorted(messages), sorted(expected))
            data_files = [n for n in os.listdir(self.store)
                          if not n.startswith((".", "lb_dump_exporter."))]
            self.case.assertEqual(len(data_files), len(expected))
            # No copy in tmp/ without its link in new/: the importer
            # would queue it after a day, a second upload of its job.
            tmp = os.path.join(self.maildir, "tmp")
            self.case.assertEqual([n for n in os.listdir(tmp) if os.stat(
                os.path.join(tmp, n)).st_nlink < 2], [])
        return messages

    def rejects(self):
        names = [n for n in os.listdir(self.store) if n.endswith(".rejects")]
        if not names:
            return b""
        with open(os.path.join(self.store, names[0]), "rb") as f:
            return f.read()


# ---------------------------------------------------------------------------
# The fixtures' own tests: the helpers, the PKI, the JPPS fixture
# ---------------------------------------------------------------------------

class TestHelpers(unittest.TestCase):
    """The suite's own plumbing: a failure shows what the failing test's
    commands and importer daemons wrote to stderr, and only that test's."""

    def test_a_failure_ends_with_its_commands_stderr(self):
        class Failing(unittest.TestCase):
            def test_one(self):
                run([sys.executable, "-c", "import sys; "
                     "sys.stderr.write('the first one\\n')"])
                run([sys.executable, "-c", "import sys; "
                     "sys.stderr.write('why it failed\\n'); sys.exit(3)"])
                self.fail("as planned")

            def test_two(self):
                raise RuntimeError("an error")

            def test_three(self):
                h = ImporterHarness(self)
                proc = h.start()
                wait_for(lambda: "started:" in h.output(), what="start")
                h.stop(proc)
                self.fail("after a daemon")

        ours = TRANSCRIPT[:]
        result = TranscriptRunner(stream=io.StringIO()).run(
            unittest.TestSuite([Failing("test_one"), Failing("test_two"),
                                Failing("test_three")]))
        TRANSCRIPT[:] = ours
        (_, failure), (_, daemon) = result.failures
        # A daemon's log too, though its directory is gone by now.
        self.assertRegex(daemon, r"\$ jp_importer.py -g \.\.\. \(its log\)"
                         r"\n[\s\S]* INFO started: 3 workers [\s\S]* INFO stopped\n")
        self.assertIn("AssertionError: as planned", failure)
        self.assertRegex(failure, r"\$ python\S* -c .*\(exit 0\)\n"
                         r"the first one\n")
        self.assertRegex(failure, r"\(exit 3\)\nwhy it failed\n$")
        # The next test starts with an empty transcript.
        (_, error), = result.errors
        self.assertIn("RuntimeError: an error", error)
        self.assertNotIn("why it failed", error)


class TestPKI(unittest.TestCase):
    """The throwaway PKI looks like a grid node's: a CA directory with hash
    links and a signing policy, a host certificate for localhost, an RFC
    3820 proxy that openssl verifies as one."""


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


class TestJPPSFixture(unittest.TestCase):
    """The JPPS fixture keeps the real contract, since it is all we have of
    the JPPS: strict SOAP as the WSDL says (namespaces, unqualified
    children in order, required elements, xsd:dateTime, Content-Type and
    SOAPAction), client certificates (proxies as their user), EEXIST,
    ENOENT and EPERM where the JPPS answers them, one file per class per
    job, and faults in the genericFault shape."""


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


# ---------------------------------------------------------------------------
# jp_importer: messages, maildir engine, SOAP parsing (in-process)
# ---------------------------------------------------------------------------

class TestImporterMessages(unittest.TestCase):
    """Message parsing in-process: jobids normalised with port 9000, the
    registration format, the keyed formats every writer (ours, the
    original exporter with its broken -j, the original upload library)
    produces, and what is malformed."""


    def test_jobid_normalised_with_default_port(self):
        self.assertEqual(jp_importer.parse_jobid("https://lb.example.org/x"),
                         "https://lb.example.org:9000/x")
        self.assertEqual(jp_importer.parse_jobid(
            "https://[::1]:9001/a/b?i"), "https://[::1]:9001/a/b?i")
        for bad in ("http://lb/x", "https://lb/", "https:///x",
                    "https://lb/x y", "https://lb:0/x", "https://lb:99999/x",
                    "https://lb/x\ty", "https://l b/x", "https://lb/\x01"):
            with self.assertRaises(ValueError, msg=bad):
                jp_importer.parse_jobid(bad)

    def test_registration_format(self):
        self.assertEqual(jp_importer.parse_registration(
            b"https://lb:9000/x\n/C=CZ/CN=John Doe"),
            ("https://lb:9000/x", "/C=CZ/CN=John Doe"))
        with open(os.path.join(TESTDATA, "messages", "jpreg_message.bin"),
                  "rb") as f:
            jobid, owner = jp_importer.parse_registration(f.read())
        self.assertEqual(jobid, "https://lb.example.org:9000/"
                         "hDQ85r7YMkuGV3mHYQiaQY")
        self.assertEqual(owner, "/C=XX/O=Example Grid/CN=Jane Roe")

    def test_keyed_formats_of_every_writer(self):
        for name in ("jpdump_message.bin", "jpsandbox_message.bin"):
            with open(os.path.join(TESTDATA, "messages", name), "rb") as f:
                fields = jp_importer.parse_keyed(f.read())
            self.assertEqual(fields["jobid"], "https://lb.example.org:9000/"
                             "hDQ85r7YMkuGV3mHYQiaQY")
            self.assertTrue(fields["file"].startswith("/"))
        # The original exporter with -j wrote no newline before jpps.
        with open(os.path.join(TESTDATA, "messages",
                               "jpdump_message_original_j.bin"), "rb") as f:
            fields = jp_importer.parse_keyed(f.read())
        self.assertEqual(fields["jpps"], "jp.example.org:8901")
        self.assertTrue(fields["file"].endswith(".1767261600_4242"))
        fields = jp_importer.parse_keyed(
            b"jobid  https://lb/x\nfile   /a b\njpps   jp:8901\n")
        self.assertEqual(fields, {"jobid": "https://lb:9000/x",
                                  "file": "/a b", "jpps": "jp:8901"})

    def test_malformed_messages(self):
        cases = {
            b"jobid\thttps://lb/x\n": "no 'file'",
            b"file\t/x\n": "no 'jobid'",
            b"jobid\thttps://lb/x\nfile\t/x\0\n": "NUL",
            b"jobid\thttps://lb/x\nfile\t/x\xff\n": "not UTF-8",
            b"jobid\thttps://lb/x y\nfile\t/x\n": "invalid jobid",
            b"jobid\thttps://lb/x\nfile\n": "without a value",
            b"jobid\thttps://lb/x\nfile\t/x\nfile\t/y\n": "twice",
            b"jobid\thttps://lb/x\nfile\trelative\n": "absolute",
        }
        for data, reason in cases.items():
            with self.assertRaises(jp_importer.MalformedMessageError,
                                   msg=data) as cm:
                jp_importer.parse_keyed(data)
            self.assertIn(reason, str(cm.exception))
        for data, reason in ((b"https://lb/x", "newline"),
                             (b"https://lb/x\n", "owner"),
                             (b"https://lb/x\na\nb", "several lines"),
                             (b"nonsense\nowner", "jobid")):
            with self.assertRaises(jp_importer.MalformedMessageError) as cm:
                jp_importer.parse_registration(data)
            self.assertIn(reason, str(cm.exception))


class TestImporterSoapParsing(unittest.TestCase):
    """The SOAP layer in-process: fault chains in both shapes and without
    detail, hostile answers (a DTD, over 1 MiB, wrong namespaces) refused
    before parsing, and request envelopes the strict fixture accepts."""


    def envelope(self, body):
        return JPPSFixture.envelope(body).encode()

    def test_fault_chain_both_shapes(self):
        detail = ("<source>a</source><code>2</code><text>No such file"
                  "</text><description>No such job registered</description>"
                  "<reason><source>b</source><code>5</code><text>x</text>"
                  "</reason>")
        for wrapper in ('<fault xsi:type="jptype:genericFault">%s</fault>',
                        '<jpelem:genericFault>%s</jpelem:genericFault>'):
            body = self.envelope(
                "<SOAP-ENV:Fault><faultcode>SOAP-ENV:Server</faultcode>"
                "<faultstring>Oh, shit!</faultstring><detail>%s</detail>"
                "</SOAP-ENV:Fault>" % (wrapper % detail))
            with self.assertRaises(jp_importer.JPPSFaultError) as cm:
                jp_importer.parse_soap_response("StartUpload", body)
            self.assertEqual(cm.exception.code, errno.ENOENT)
            self.assertEqual([c[0] for c in cm.exception.chain], ["a", "b"])
            self.assertIn("No such job registered", str(cm.exception))

    def test_fault_without_detail(self):
        body = self.envelope("<SOAP-ENV:Fault><faultcode>SOAP-ENV:Server"
                             "</faultcode><faultstring>boom</faultstring>"
                             "</SOAP-ENV:Fault>")
        with self.assertRaises(jp_importer.JPPSFaultError) as cm:
            jp_importer.parse_soap_response("RegisterJob", body)
        self.assertIsNone(cm.exception.code)

    def test_hostile_responses_refused(self):
        # A well-formed answer but for its DTD: only the DTD refuses it.
        answer = self.envelope("<jpelem:RegisterJobResponse>&b;"
                               "</jpelem:RegisterJobResponse>")
        with_dtd = answer.replace(b"?>", b'?><!DOCTYPE x [<!ENTITY a "aa">'
                                  b'<!ENTITY b "&a;&a;">]>', 1)
        with self.assertRaisesRegex(jp_importer.TransientError, "DTD"):
            jp_importer.parse_soap_response("RegisterJob", with_dtd)
        bombs = [b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aa">'
                 b'<!ENTITY b "&a;&a;">]><x>&b;</x>',
                 b"x" * (jp_importer.MAX_RESPONSE + 1),
                 b"not xml", self.envelope("")[:60],
                 b'<Envelope xmlns="urn:wrong"><Body/></Envelope>',
                 self.envelope('<x:RegisterJobResponse xmlns:x="urn:wrong"/>')]
        for body in bombs:
            with self.assertRaises(jp_importer.TransientError,
                                   msg=body[:40]):
                jp_importer.parse_soap_response("RegisterJob", body)

    def test_request_envelope_is_what_the_fixture_accepts(self):
        h = ImporterHarness(self)
        creds = jp_importer.Credentials(h.cert, h.key, h.pki.ca_dir).load()
        client = jp_importer.JPPSClient(h.jpps.hostport, creds, timeout=5)
        client.register_job("https://lb:9000/a<&>", "/CN=x&y")
        dest, commit = client.start_upload("https://lb:9000/a<&>",
                                           jp_importer.CLASS_LB, "text/lb")
        client.commit_upload(dest)
        with self.assertRaises(jp_importer.JPPSFaultError) as cm:
            client.get_job_attributes("https://lb:9000/a<&>",
                                      [REGTIME_ATTR])
        self.assertEqual(cm.exception.code, errno.EPERM)  # not the owner
        self.assertEqual([c.result for c in h.jpps.calls],
                         ["ok", "ok", "ok", errno.EPERM])
        self.assertEqual(h.jpps.calls[0].get("owner"), "/CN=x&y")
        self.assertIsNone(h.jpps.calls[1].get("name"))
        self.assertEqual(h.jpps.calls[0].identity, HOST_SUBJECT)
        client.close()


class TestImporterMaildir(unittest.TestCase):
    """The maildir engine in-process: an exclusive claim that sees a dead
    owner, postponing with backoff and giving up, --requeue, lone tmp/
    copies queued again, symlinked messages not followed, shared
    directories refused, orphan spool archives removed."""


    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="jp-maildir-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.root = make_maildir(os.path.join(self.dir, "md"))
        self.md = jp_importer.Maildir(self.root).init()

    def test_claim_is_exclusive_and_dead_owner_is_detected(self):
        name = drop_message(self.root, registration(1))
        msg = self.md.claim("new", name)
        self.assertEqual(listing(self.root, "work"), [name])
        # Another process cannot take it while we hold it ...
        pid = os.fork()
        if pid == 0:
            os._exit(0 if self.md.claim("work", name) is None else 1)
        self.assertEqual(os.waitpid(pid, 0)[1], 0)
        # ... but can once we are gone (as after a SIGKILL).
        msg.release()
        again = self.md.claim("work", name)
        self.assertIsNotNone(again)
        self.assertEqual(again.read(), registration(1))
        again.done()
        self.assertEqual(listing(self.root, "tmp"), [])
        self.assertEqual(listing(self.root, "work"), [])

    def test_postpone_backoff_and_give_up(self):
        name = drop_message(self.root, registration(1))
        delays = []
        for attempt in range(1, 9):
            msg = self.md.claim("new" if attempt == 1 else "post", name)
            now = time.time()
            delays.append(msg.postpone("boom", 300, 86400, now=now) - now)
            state = self.md.read_state(name)
            self.assertEqual(state["attempts"], str(attempt))
            self.assertEqual(state["last_error"], "boom")
        for attempt, delay in enumerate(delays, 1):
            expected = min(3600, 300 * 2 ** (attempt - 1))
            self.assertTrue(expected * 0.8 <= delay <= expected * 1.2,
                            (attempt, delay))
        # Old enough and failing again: undeliverable, reason kept.
        os.utime(os.path.join(self.root, "post", name),
                 (time.time() - 90000,) * 2)
        msg = self.md.claim("post", name)
        self.assertIsNone(msg.postpone("still down", 300, 86400))
        self.assertEqual(listing(self.root, "undeliverable"), [name])
        self.assertIn("still down", self.md.read_state(name)["reason"])
        self.assertEqual(listing(self.root, "tmp"), [])

    def test_requeue_restarts_the_give_up_clock(self):
        name = drop_message(self.root, registration(1), age=7 * 86400)
        self.assertIsNone(self.md.claim("new", name).postpone(
            "down", 300, 86400))
        self.assertEqual(self.md.requeue_undeliverable(), [name])
        self.assertEqual(listing(self.root, "tmp"), [name])
        msg = self.md.claim("new", name)
        self.assertIsNotNone(msg.postpone("still down", 300, 86400))
        self.assertEqual(listing(self.root, "post"), [name])

    def test_stale_tmp_copy_is_queued_again(self):
        name = drop_message(self.root, registration(1), age=2 * 86400)
        os.unlink(os.path.join(self.root, "new", name))
        young = drop_message(self.root, registration(2))
        os.unlink(os.path.join(self.root, "new", young))
        self.assertEqual(self.md.requeue_stale_tmp(), 1)
        self.assertEqual(listing(self.root, "new"), [name])

    def test_symlinked_message_is_not_followed(self):
        os.symlink("/etc/passwd", os.path.join(self.root, "new", "evil"))
        self.assertIsNone(self.md.claim("new", "evil"))
        self.assertEqual(listing(self.root, "undeliverable"), ["evil"])
        self.assertIn("symbolic link", self.md.read_state("evil")["reason"])

    def test_shared_directories_refused(self):
        os.chmod(os.path.join(self.root, "new"), 0o777)
        with self.assertRaises(jp_importer.ConfigError) as cm:
            jp_importer.Maildir(self.root).init()
        self.assertIn("writable by group or others", str(cm.exception))
        jp_importer.Maildir(self.root).init(allow_shared=True)

    def test_orphan_archives_in_the_spool_are_removed(self):
        spool = os.path.join(self.root, "spool")
        os.mkdir(spool, 0o700)
        archives = {}
        for what in ("queued", "quarantined", "orphan", "fresh orphan"):
            path = os.path.join(spool, what.replace(" ", "-") + ".tar")
            with open(path, "wb") as f:
                f.write(b"tar")
            if what != "fresh orphan":
                os.utime(path, (time.time() - 2 * 86400,) * 2)
            archives[what] = path
        drop_message(self.root, ("jobid\thttps://lb.example.org:9000/a\n"
                                 "file\t%s\n" % archives["queued"]).encode())
        name = drop_message(self.root, (
            "jobid\thttps://lb.example.org:9000/b\nfile\t%s\nfile\tx\n"
            % archives["quarantined"]).encode())
        os.rename(os.path.join(self.root, "new", name),
                  os.path.join(self.root, "undeliverable", name))
        self.assertEqual(self.md.remove_orphan_archives(), 1)
        self.assertEqual(sorted(os.listdir(spool)), [
            "fresh-orphan.tar", "quarantined.tar", "queued.tar"])


class TestQueueQuarantine(unittest.TestCase):
    """What is not a message, or not a sane one, goes aside and the queue
    goes on; no name, DN or server text reaches a log line or --status raw
    (it could forge lines or drive the terminal)."""

    RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\ud800-\udfff]")

    def status(self, h):
        proc = run([sys.executable, JP_IMPORTER, "--status"] + h.args(),
                   timeout=TIMEOUT)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        self.assertIsNone(self.RAW_CONTROL.search(proc.stdout),
                          ascii(proc.stdout))
        return proc.stdout

    def assert_log_lines(self, text):
        """No raw control character but the line ends, and every line is
        one the importer began (none forged by a name or a DN)."""
        self.assertNotIn("Traceback", text)
        self.assertIsNone(self.RAW_CONTROL.search(text), ascii(text))
        for line in text.splitlines():
            self.assertRegex(line, r"^\d{4}-\d\d-\d\d [\d:,]+ jp_importer\[")

    def test_what_is_not_a_regular_file_goes_aside(self):
        h = ImporterHarness(self)
        new = os.path.join(h.reg, "new")
        bad = {"1_000001.socket": "a socket", "1_000002.fifo": "a FIFO",
               "1_000003.dir": "a directory",
               "1_000004.link": "a symbolic link",
               "1_000005.fifo": "a FIFO", "1_000006.dir": "a directory"}
        listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(listener.close)
        listener.bind(os.path.join(new, "1_000001.socket"))
        os.mkfifo(os.path.join(new, "1_000002.fifo"), 0o600)
        os.mkdir(os.path.join(new, "1_000003.dir"), 0o700)
        os.symlink("/etc/passwd", os.path.join(new, "1_000004.link"))
        # Left in post/ and work/ too (by a writer, or before a crash).
        os.mkfifo(os.path.join(h.reg, "post", "1_000005.fifo"), 0o600)
        os.mkdir(os.path.join(h.reg, "work", "1_000006.dir"), 0o700)
        good = [drop_message(h.reg, registration(n)) for n in range(5)]
        proc = h.once("--log", h.logfile, timeout=TIMEOUT)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        self.assertEqual(len(h.jpps.ops("RegisterJob", "ok")), len(good))
        for sub in ("new", "work", "post"):
            self.assertEqual(listing(h.reg, sub), [], sub)
        self.assertEqual(listing(h.reg, "undeliverable"), sorted(bad))
        log_text = read_text(h.logfile)
        self.assert_log_lines(log_text)
        status = self.status(h)
        for name, kind in bad.items():
            reason = h.state(h.reg, name)["reason"]
            self.assertIn("is %s" % kind, reason)
            self.assertIn("undeliverable %s ?: %s" % (name, reason), status)
            self.assertIn("%s; moved to undeliverable/" % reason, log_text)
        # Sent back by --requeue (which links them into tmp/), they go
        # aside again, the links with them.
        run([sys.executable, JP_IMPORTER, "--requeue"] + h.args())
        self.assertEqual(len(listing(h.reg, "new")), len(bad))
        self.assertEqual(h.once(timeout=TIMEOUT).returncode, 0)
        self.assertEqual(listing(h.reg, "undeliverable"), sorted(bad))
        self.assertEqual(listing(h.reg, "tmp"), [])

    def test_unreadable_file_goes_aside(self):
        root = make_maildir(tempfile.mkdtemp(prefix="jp-quarantine-test-"))
        self.addCleanup(shutil.rmtree, root, True)
        jp_importer.Maildir(root).init()
        unreadable = drop_message(root, registration(1))
        os.chmod(os.path.join(root, "new", unreadable), 0)
        good = drop_message(root, registration(2))
        nobody = 65534
        if os.geteuid() == 0:       # root reads anything: claim as nobody
            for where, dirs, files in os.walk(root):
                for entry in [where] + [os.path.join(where, f)
                                        for f in files]:
                    os.chown(entry, nobody, nobody)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                if os.geteuid() == 0:
                    os.setgroups([])
                    os.setgid(nobody)
                    os.setuid(nobody)
                md = jp_importer.Maildir(root)
                claimed = [md.claim("new", name) for name in md.names("new")]
                code = 0 if [m.name for m in claimed if m] == [good] else 2
            finally:
                os._exit(code)
        self.assertEqual(os.waitpid(pid, 0)[1], 0)
        self.assertEqual(listing(root, "undeliverable"), [unreadable])
        self.assertEqual(listing(root, "work"), [good])
        self.assertIn("cannot be read: Permission denied",
                      jp_importer.Maildir(root).read_state(unreadable)
                      ["reason"])

    def test_a_name_taken_in_undeliverable_is_not_overwritten(self):
        root = make_maildir(tempfile.mkdtemp(prefix="jp-quarantine-test-"))
        self.addCleanup(shutil.rmtree, root, True)
        md = jp_importer.Maildir(root).init()
        name = drop_message(root, b"no newline")
        md.claim("new", name).give_up("malformed message: first")
        os.mkfifo(os.path.join(root, "new", name), 0o600)
        self.assertIsNone(md.claim("new", name))
        self.assertEqual(listing(root, "new"), [])
        aside = [n for n in listing(root, "undeliverable") if n != name]
        self.assertEqual(len(aside), 1)
        self.assertTrue(aside[0].startswith(name + "."), aside)
        self.assertIn("is a FIFO", md.read_state(aside[0])["reason"])
        self.assertEqual(md.read_state(name)["reason"],
                         "malformed message: first")
        with open(os.path.join(root, "undeliverable", name), "rb") as f:
            self.assertEqual(f.read(), b"no newline")

    def test_owner_with_a_control_character_is_malformed(self):
        for owner in ("/CN=a\x01b", "/CN=a\rb", "/CN=\x1b[31m", "/CN=\x7f"):
            with self.assertRaises(jp_importer.MalformedMessageError) as cm:
                jp_importer.parse_registration(
                    ("https://lb/x\n" + owner).encode())
            self.assertIn("control character", str(cm.exception))
        self.assertEqual(jp_importer.parse_registration(
            b"https://lb/x\n/CN=a b\r\n")[1], "/CN=a b")
        h = ImporterHarness(self)
        name = drop_message(h.reg, registration(1, owner="/CN=a\x01b"))
        proc = h.once()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(listing(h.reg, "post"), [])
        self.assertEqual(listing(h.reg, "undeliverable"), [name])
        self.assertIn("malformed message: registration owner '/CN=a\\x01b'"
                      " has a control character",
                      h.state(h.reg, name)["reason"])
        self.assertEqual(h.jpps.ops("RegisterJob"), [])

    def test_log_and_status_show_control_characters_escaped(self):
        h = ImporterHarness(self)
        forged = "1_000001.x\n2030-01-01 00:00:00,000 jp_importer[1] " \
            "FORGED\x1b[31m"
        drop_message(h.reg, b"no newline here", name=forged)
        drop_message(h.reg, b"no newline either", name="1_000002.\udcff")
        drop_message(h.reg, registration(1, owner="/CN=x\x1b]0;owned\x07"))
        h.jpps.inject("fault", "RegisterJob", code=errno.EIO,
                      description="disk full\nFORGED line \x9b31m")
        drop_message(h.reg, registration(2))
        proc = h.once("--log", h.logfile, "--retry", "600", timeout=TIMEOUT)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(len(listing(h.reg, "undeliverable")), 3)
        self.assertEqual(len(listing(h.reg, "post")), 1)
        log_text = read_text(h.logfile)
        self.assert_log_lines(log_text)
        status = self.status(h)
        for text in (log_text, status):
            self.assertIn("1_000001.x\\n2030-01-01 00:00:00,000 jp_importer"
                          "[1] FORGED\\x1b[31m", text)
            self.assertIn("1_000002.\\xff", text)
            self.assertIn("/CN=x\\x1b]0;owned\\x07", text)
        self.assertIn("FORGED line \\x9b31m", log_text)
        self.assertNotIn("Traceback", proc.stderr)


# ---------------------------------------------------------------------------
# jp_importer: the daemon, end to end
# ---------------------------------------------------------------------------

class TestImporterRegistrations(unittest.TestCase):
    """Registrations through the daemon and --once against the fixture:
    delivered or quarantined, a JPPS down, hung or misbehaving (500,
    garbage, truncated, a DTD, dropped) is retried, giving up only after
    a failed attempt past the age, --status and --requeue."""


    def test_once_delivers_and_quarantines(self):
        h = ImporterHarness(self)
        for n in range(20):
            drop_message(h.reg, registration(n))
        h.jpps.register("https://lb.example.org:9000/job00000", "/CN=x")
        bad = {drop_message(h.reg, data): reason for data, reason in (
            (b"https://lb.example.org:9000/x", "newline"),
            (b"https://lb.example.org:9000/x\0\nowner", "NUL"),
            (b"https://lb.example.org:9000/x\n\xff\xfe", "UTF-8"),
            (b"https://lb.example.org:9000/x y\nowner", "invalid jobid"),
            (b"x" * 70000, "larger than"))}
        proc = h.once()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(len(h.jpps.ops("RegisterJob")), 20)
        self.assertEqual(len(h.jpps.ops("RegisterJob", "ok")), 19)
        self.assertEqual(h.jpps.ops("RegisterJob", errno.EEXIST)[0]
                         .get("job"), "https://lb.example.org:9000/job00000")
        for sub in ("new", "work", "post", "tmp"):
            self.assertEqual(listing(h.reg, sub), [], sub)
        self.assertEqual(listing(h.reg, "undeliverable"), sorted(bad))
        for name, reason in bad.items():
            self.assertIn(reason, h.state(h.reg, name)["reason"])
        self.assertIn("already registered", proc.stderr)
        # Each good message registered its own job for its owner (job 0
        # was there already, with the owner the JPPS had before).
        self.assertEqual(sorted((j["jobid"], j["owner"])
                                for j in h.jpps.jobs.values()),
                         [("https://lb.example.org:9000/job%05d" % n,
                           "/CN=x" if n == 0 else USER_SUBJECT)
                          for n in range(20)])

    def test_jpps_down_then_back(self):
        h = ImporterHarness(self)
        port = h.jpps.port
        h.jpps.stop()
        for n in range(3):
            drop_message(h.reg, registration(n))
        proc = h.once()
        self.assertEqual(proc.returncode, 0)
        self.assertEqual(len(listing(h.reg, "post")), 3)
        state = h.state(h.reg, listing(h.reg, "post")[0])
        self.assertEqual(state["attempts"], "1")
        self.assertIn("Connection refused", state["last_error"])
        # The JPPS returns on the same port; the retries deliver everything.
        h.jpps.start(port)
        proc = h.once()
        self.assertEqual(len(h.jpps.ops("RegisterJob", "ok")), 3)
        for sub in ("new", "work", "post", "undeliverable", "tmp", "state"):
            self.assertEqual(listing(h.reg, sub), [], sub)

    def test_hung_jpps_times_out_then_retries(self):
        h = ImporterHarness(self)
        h.jpps.inject("hang", "RegisterJob", seconds=30)
        name = drop_message(h.reg, registration(1))
        started = time.monotonic()
        proc = h.once("--timeout", "1")
        self.assertLess(time.monotonic() - started, 15)
        self.assertIn("within 1s", h.state(h.reg, name)["last_error"])
        h.jpps.release()
        h.once()
        self.assertEqual(len(h.jpps.ops("RegisterJob", "ok")), 1)
        self.assertEqual(listing(h.reg, "post"), [])
        self.assertEqual(proc.returncode, 0)

    def test_server_misbehaviour_is_retried(self):
        h = ImporterHarness(self)
        kinds = ["http500", "garbage", "truncated", "drop", "drop_mid",
                 "doctype", "fault"]
        for kind in kinds:
            h.jpps.inject(kind, "RegisterJob")
        for n in range(len(kinds)):
            drop_message(h.reg, registration(n))
        h.once()
        self.assertEqual(len(listing(h.reg, "post")), len(kinds))
        self.assertEqual(listing(h.reg, "undeliverable"), [])
        h.once()
        self.assertEqual(len(h.jpps.ops("RegisterJob", "ok")), len(kinds))
        self.assertEqual(listing(h.reg, "post"), [])

    def test_give_up_only_after_a_failed_attempt(self):
        h = ImporterHarness(self)
        old = drop_message(h.reg, registration(1), age=7 * 86400)
        h.jpps.inject("fault", "RegisterJob", code=errno.EIO)
        h.once()
        self.assertEqual(listing(h.reg, "undeliverable"), [old])
        reason = h.state(h.reg, old)["reason"]
        self.assertIn("given up after 1 attempts", reason)
        # An equally old message that works is simply delivered: a
        # backlog older than the give-up age still gets its attempt.
        drop_message(h.reg, registration(2), age=7 * 86400)
        h.once()
        self.assertEqual(len(h.jpps.ops("RegisterJob", "ok")), 1)

    def test_status_and_requeue(self):
        h = ImporterHarness(self)
        drop_message(h.reg, b"no newline here")
        h.jpps.inject("fault", "RegisterJob", code=errno.EIO)
        drop_message(h.reg, registration(7))
        h.once("--retry", "600")
        proc = run([sys.executable, JP_IMPORTER, "--status"] + h.args())
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("new 0  work 0  post 1  undeliverable 1", proc.stdout)
        self.assertIn("next retry:", proc.stdout)
        self.assertIn("registration without a newline", proc.stdout)
        self.assertEqual(len(listing(h.reg, "post")), 1)   # unchanged
        proc = run([sys.executable, JP_IMPORTER, "--requeue"] + h.args())
        self.assertIn("1 message(s) requeued", proc.stdout)
        self.assertEqual(len(listing(h.reg, "new")), 1)
        self.assertEqual(listing(h.reg, "undeliverable"), [])


class TestMigration(unittest.TestCase):
    """Maildirs as the original C importer leaves them, and beside it."""

    def original_failed(self, root, name):
        """What the original does on a failure: the work/ link goes, the
        master copy is linked into post/ (ctime now: its retry clock)."""
        os.unlink(os.path.join(root, "new", name))
        os.link(os.path.join(root, "tmp", name),
                os.path.join(root, "post", name))

    def start_original(self, h):
        """A process named like the original importer, on h's maildirs
        (the dump maildir relative to its working directory)."""
        link = h.path(jp_importer.ORIGINAL_IMPORTER)
        os.symlink(sys.executable, link)
        proc = subprocess.Popen([link, "-c", "import time; time.sleep(600)",
                                 "-r", h.reg, "--dump-mdir", "dump",
                                 "-s", h.sandbox, "-g"], cwd=h.dir)

        def cleanup():
            proc.kill()
            proc.wait(TIMEOUT)
        self.addCleanup(cleanup)
        return proc

    def worker(self, h, kind, root):
        """An in-process worker, to run passes one by one."""
        worker = jp_importer.Worker(
            kind, jp_importer.Maildir(root).init(),
            jp_importer.parse_args(h.args()),
            jp_importer.Credentials(h.cert, h.key, h.pki.ca_dir).load())
        self.addCleanup(worker.close)
        return worker

    def test_requeue_what_the_original_gave_up(self):
        h = ImporterHarness(self)
        names = []
        for n in range(2):
            name = drop_message(h.reg, registration(n), age=7 * 86400)
            self.original_failed(h.reg, name)
            # Its give-up: post/ -> undeliverable/, the master unlinked.
            os.rename(os.path.join(h.reg, "post", name),
                      os.path.join(h.reg, "undeliverable", name))
            os.unlink(os.path.join(h.reg, "tmp", name))
            names.append(name)
        self.assertFalse(os.path.exists(os.path.join(h.reg, "state")))
        proc = run([sys.executable, JP_IMPORTER, "--requeue"] + h.args())
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("%s: 2 message(s) requeued" % h.reg, proc.stdout)
        self.assertIn("%s: 0 message(s) requeued" % h.dump, proc.stdout)
        self.assertEqual(listing(h.reg, "new"), names)
        self.assertEqual(listing(h.reg, "tmp"), names)
        # A week old and failing again: postponed, not given up, as the
        # requeue restarted the give-up clock (5 days).
        h.jpps.inject("fault", "RegisterJob", code=errno.EIO)
        h.once()
        self.assertEqual(len(listing(h.reg, "post")), 1)
        self.assertEqual(listing(h.reg, "undeliverable"), [])
        h.once()
        self.assertEqual(len(h.jpps.ops("RegisterJob", "ok")), 2)
        for sub in ("new", "work", "post", "undeliverable", "tmp", "state"):
            self.assertEqual(listing(h.reg, sub), [], sub)

    def test_status_shows_when_the_original_retries(self):
        h = ImporterHarness(self)
        due = {}
        for root, retry in ((h.reg, 300), (h.dump, 360)):
            name = drop_message(root, registration(1), age=1000)
            self.original_failed(root, name)
            due[root] = os.stat(os.path.join(root, "post",
                                             name)).st_ctime + retry
        status = [sys.executable, JP_IMPORTER, "--status", "-r", h.reg,
                  "-d", h.dump, "-s", h.sandbox]
        proc = run(status)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        for root in (h.reg, h.dump):
            self.assertIn("next retry: %s (in " % jp_importer.format_time(
                due[root]), proc.stdout)
        self.assertNotIn("(due)", proc.stdout)
        # The retry delay the workers would apply: with --retry 0, now.
        proc = run(status + ["--retry", "0"])
        self.assertEqual(proc.stdout.count("(due)"), 2, proc.stdout)
        self.assertFalse(os.path.exists(os.path.join(h.reg, "state")))

    def test_work_of_a_running_original_is_left_to_it(self):
        h = ImporterHarness(self)
        original = self.start_original(h)
        wait_for(lambda: jp_importer.original_importers(h.reg) ==
                 [original.pid], what="the original seen")
        self.assertEqual(jp_importer.original_importers(h.dump),
                         [original.pid])
        self.assertEqual(jp_importer.original_importers(
            make_maildir(h.path("elsewhere"))), [])
        # In the original's hands: renamed from new/ to work/, no lock.
        name = drop_message(h.reg, registration(1))
        work = os.path.join(h.reg, "work", name)
        os.rename(os.path.join(h.reg, "new", name), work)
        proc = h.once()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(listing(h.reg, "work"), [name])
        self.assertEqual(h.jpps.calls, [])
        self.assertIn("the original importer (pid %d) runs" % original.pid,
                      proc.stderr)
        self.assertIn("work/%s may be in the hands of the original"
                      % name, proc.stderr)
        # Older than the original's longest message, it is abandoned:
        # delivered.  (The bound shortened: a ctime cannot be set back.)
        self.addCleanup(setattr, jp_importer, "ORIGINAL_BUSY",
                        jp_importer.ORIGINAL_BUSY)
        jp_importer.ORIGINAL_BUSY = time.time() - os.stat(work).st_ctime + 3
        worker = self.worker(h, jp_importer.KIND_REG, h.reg)
        self.assertEqual(worker.run_pass(), 0)
        self.assertEqual(listing(h.reg, "work"), [name])
        wait_for(worker.run_pass, what="the message taken over")
        self.assertEqual(len(h.jpps.ops("RegisterJob", "ok")), 1)
        for sub in ("work", "tmp"):
            self.assertEqual(listing(h.reg, sub), [], sub)
        # What a killed original left in work/ is delivered at once.
        original.kill()
        original.wait(TIMEOUT)
        name = drop_message(h.reg, registration(2))
        os.rename(os.path.join(h.reg, "new", name),
                  os.path.join(h.reg, "work", name))
        proc = h.once()
        self.assertEqual(len(h.jpps.ops("RegisterJob", "ok")), 2)
        self.assertEqual(listing(h.reg, "work"), [])


class TestImporterUploads(unittest.TestCase):
    """Dumps and sandboxes through StartUpload, the FTPS fixture and
    CommitUpload: files removed or stored, the failsafe registration with
    the dump's owner, files that must not be uploaded (and one swapped
    after the check), and every crash or lost answer between the steps
    ending delivered once."""


    def assert_drained(self, maildir):
        for sub in ("new", "work", "post", "undeliverable", "tmp", "state"):
            self.assertEqual(listing(maildir, sub), [], sub)

    def test_dumps_delivered_and_files_removed(self):
        h = upload_harness(self)
        digests = {}
        for n in range(3):
            jobid, path, _ = queue_dump(h, n, size=n * 40000)
            digests[jobid] = sha256_of(path)
        proc = h.once()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(sorted(h.jpps.committed.values()),
                         sorted(digests.values()))
        for call in h.jpps.ops("StartUpload", "ok"):
            self.assertEqual((call.get("class"), call.get("contentType")),
                             ("urn:org.glite.jp.primary:lb", "text/lb"))
        self.assertEqual(os.listdir(h.path("lbexport")), [])
        self.assert_drained(h.dump)

    def test_store_keeps_dumps_across_filesystems(self):
        h = upload_harness(self)
        # /dev/shm is a tmpfs: another filesystem than the temp dir, so
        # the move is a copy, fsync and unlink, where it exists.
        base = "/dev/shm" if os.path.isdir("/dev/shm") else h.dir
        store = tempfile.mkdtemp(prefix="jp-store-", dir=base)
        self.addCleanup(shutil.rmtree, store, True)
        _, path, _ = queue_dump(h, 1)
        digest = sha256_of(path)
        h.once("-S", store)
        kept = os.path.join(store, os.path.basename(path))
        self.assertEqual(sha256_of(kept), digest)
        self.assertFalse(os.path.exists(path))
        self.assertEqual(os.listdir(store), [os.path.basename(path)])

    def test_failsafe_registration_uses_the_dump_owner(self):
        h = upload_harness(self)
        owner = '/O=Grid/OU=Test/CN=Owner "Quoted" Name'
        jobid, path = write_dump(h, 2, owner=owner)
        drop_message(h.dump, dump_message(jobid, path))
        h.once()
        self.assertEqual([c.op for c in h.jpps.calls], [
            "StartUpload", "GetJobAttributes", "RegisterJob", "StartUpload",
            "CommitUpload"])
        self.assertEqual(h.jpps.ops("RegisterJob")[0].get("owner"), owner)
        self.assertEqual(len(h.jpps.committed), 1)
        self.assert_drained(h.dump)

    def test_missing_file_is_undeliverable_with_reason(self):
        h = upload_harness(self)
        jobid, path = write_dump(h, 3)
        os.unlink(path)
        name = drop_message(h.dump, dump_message(jobid, path))
        h.once()
        self.assertEqual(listing(h.dump, "undeliverable"), [name])
        self.assertIn("no longer exists", h.state(h.dump, name)["reason"])
        self.assertEqual(h.jpps.calls, [])

    def test_files_that_must_not_be_uploaded(self):
        """A message may only name a regular file of its writer's, with one
        link, reached through directories and links no other user
        controls, and of its own queue and job; --files-in narrows it."""
        h = upload_harness(self)
        outside = tempfile.mkdtemp(prefix="jp-outside-")
        self.addCleanup(shutil.rmtree, outside, True)
        secret = os.path.join(outside, "shadow")
        with open(secret, "w") as f:
            f.write("root:secret\n")
        jobid, path = write_dump(h, 4)
        other_job, other_dump = write_dump(h, 5)
        link = path + ".link"
        os.symlink(secret, link)
        # Files of another user (uid 65534): only root can make them.
        as_root = os.geteuid() == 0
        other = path + ".other"
        shutil.copy(path, other)
        if as_root:
            os.chown(other, 65534, 65534)
        fifo = path + ".fifo"
        os.mkfifo(fifo)
        hard = path + ".hard"
        shutil.copy(path, hard)
        os.link(hard, hard + "2")
        # A directory on the way that others may write to, not sticky.
        open_dir = os.path.join(outside, "open")
        os.mkdir(open_dir)
        os.chmod(open_dir, 0o777)
        shutil.copy(path, os.path.join(open_dir, "d"))
        # A link on the way, planted by another user in a sticky /tmp.
        sticky = os.path.join(outside, "sticky")
        os.mkdir(sticky)
        os.chmod(sticky, 0o1777)
        planted = os.path.join(sticky, "planted")
        os.symlink(h.path("lbexport"), planted)
        if as_root:
            os.lchown(planted, 65534, 65534)
        archive = write_archive(h.path("lbexport", "x.tar"), 100)
        cases = {secret: "does not hold the events of job",
                 "/dev/null": "not a regular file",
                 "/etc/passwd": "does not hold the events of job"
                 if as_root else "owned by uid 0, not by the writer",
                 h.path("..", os.path.basename(h.dir) + "-x", "f"):
                     "no longer exists",
                 link: "symbolic link", other: "owned by uid 65534",
                 fifo: "not a regular file", hard: "has 2 links",
                 other_dump: "does not hold the events of job %s" % jobid,
                 os.path.join(open_dir, "d"): "writable by group or others",
                 os.path.join(planted, os.path.basename(path)):
                     "symbolic link owned by uid 65534",
                 archive: "does not hold the events"}
        if not as_root:
            del cases[other], cases[os.path.join(planted,
                                                  os.path.basename(path))]
        names = dict((drop_message(h.dump, dump_message(jobid, target)),
                      reason) for target, reason in cases.items())
        # A sandbox message naming a pending dump (of its own job even).
        names[drop_message(h.sandbox, sandbox_message(
            jobid, path, h.pki.proxy))] = "not a tar archive"
        proc = h.once()
        self.assertNotIn("Traceback", proc.stderr)
        self.assertEqual(sorted(listing(h.dump, "undeliverable") +
                                listing(h.sandbox, "undeliverable")),
                         sorted(names))
        for name, reason in names.items():
            maildir = h.dump if name in listing(h.dump, "undeliverable") \
                else h.sandbox
            self.assertIn(reason, h.state(maildir, name)["reason"], name)
        self.assertEqual(h.jpps.calls, [])
        self.assertTrue(os.path.exists(path))
        # --files-in narrows: the good dump outside it is refused...
        name = drop_message(h.dump, dump_message(jobid, path))
        h.once("--files-in", outside)
        self.assertIn("outside the directories files may come from",
                      h.state(h.dump, name)["reason"])
        # ...and, without it, the same dump goes through, and so does one
        # reached through a link that root or we own.
        h.jpps.register(jobid, USER_SUBJECT)
        h.jpps.register(other_job, USER_SUBJECT)
        ours = os.path.join(sticky, "ours")
        os.symlink(h.path("lbexport"), ours)
        drop_message(h.dump, dump_message(jobid, path))
        drop_message(h.dump, dump_message(other_job, os.path.join(
            ours, os.path.basename(other_dump))))
        proc = h.once()
        self.assertEqual(len(h.jpps.committed), 2, proc.stderr)
        self.assertFalse(os.path.exists(path))
        self.assertFalse(os.path.exists(other_dump))
        if not as_root:
            self.skipTest("needs root: files and links of another user "
                          "(chown) not tried; the rest passed")

    def test_file_swapped_after_the_check_is_never_read(self):
        """The file is opened once, before StartUpload: a symlink to a
        secret or a FIFO swapped in during the call is never read."""
        h = upload_harness(self)
        secret = h.path("secret")
        with open(secret, "w") as f:
            f.write("root:secret\n")
        for n, swap in ((1, "symlink"), (2, "fifo")):
            jobid, path = write_dump(h, n)
            h.jpps.register(jobid, USER_SUBJECT)
            digest = sha256_of(path)
            h.jpps.inject("hang", "StartUpload", answer=True)
            drop_message(h.dump, dump_message(jobid, path))
            importer = subprocess.Popen(
                [sys.executable, JP_IMPORTER, "--once"] + h.args(),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                universal_newlines=True)
            self.addCleanup(lambda p=importer: p.poll() is None and p.kill())
            wait_for(lambda: h.jpps.ops("StartUpload"), what="StartUpload")
            os.rename(path, path + ".aside")
            if swap == "symlink":
                os.symlink(secret, path)
            else:
                os.mkfifo(path)
            h.jpps.released.set()
            _, err = importer.communicate(timeout=TIMEOUT)
            h.jpps.released.clear()
            h.jpps.calls[:] = []
            self.assertEqual(importer.returncode, 0, err)
            self.assertIn(digest, h.jpps.committed.values(), err)
            self.assertEqual(len(h.jpps.committed), n, err)
            self.assertIn("left in place", err)
        self.assertNotIn(sha256_of(secret), h.jpps.committed.values())

    def test_sandbox_start_upload_fault_is_retried(self):
        h = upload_harness(self)
        jobid = "https://lb.example.org:9000/sandbox1"
        h.jpps.register(jobid, USER_SUBJECT)
        archive = h.path("sandbox", "spool", "1.tar")
        os.makedirs(os.path.dirname(archive), mode=0o700)
        write_archive(archive, 8000)
        h.jpps.inject("fault", "StartUpload", code=errno.EIO)
        name = drop_message(h.sandbox, sandbox_message(jobid, archive,
                                                       h.pki.proxy))
        h.once()
        self.assertEqual(listing(h.sandbox, "post"), [name])
        self.assertIn("EIO", h.state(h.sandbox, name)["last_error"])
        h.once()
        self.assertEqual(len(h.jpps.committed), 1)
        self.assertFalse(os.path.exists(archive))
        self.assert_drained(h.sandbox)

    def test_lost_commit_answer_ends_delivered_once(self):
        h = upload_harness(self)
        jobid, path, name = queue_dump(h, 4)
        # The JPPS commits, then the connection drops before the answer.
        # The client sends it again on a new connection (or, where the
        # drop looks like a TLS error, in the next attempt) and gets
        # ENOENT, which well within the upload deadline proves the commit.
        h.jpps.inject("lose", "CommitUpload")
        output = h.once().stderr
        if listing(h.dump, "post"):
            self.assertTrue(h.state(h.dump, name).get("destination"))
            output += h.once().stderr
        self.assertEqual([c.result for c in h.jpps.ops("CommitUpload")],
                         ["lost-ok", errno.ENOENT])
        # One outcome line reports the message delivered, and says why.
        delivered = [line for line in output.splitlines()
                     if "%s: delivered" % jobid in line]
        self.assertEqual(len(delivered), 1, output)
        self.assertIn("the JPPS had the commit already", delivered[0])
        self.assertEqual(len(h.jpps.ops("StartUpload")), 1)
        self.assertEqual(len(h.jpps.committed), 1)
        self.assertFalse(os.path.exists(path))
        self.assert_drained(h.dump)

    def test_commit_enoent_after_the_deadline_starts_over(self):
        h = upload_harness(self)
        _, _, name = queue_dump(h, 6)
        # As if a crash had left an upload recorded long ago: ENOENT
        # then proves nothing, so the message starts over.
        m = jp_importer.Maildir(h.dump).init()
        m.write_state(name, {"destination": h.ftps.url("jpps/stale"),
                             "upload_started": str(time.time() - 3600),
                             "attempts": "1"})
        h.once()
        self.assertEqual(listing(h.dump, "post"), [name])
        self.assertNotIn("destination", h.state(h.dump, name))
        h.once()
        self.assertEqual(len(h.jpps.committed), 1)
        self.assert_drained(h.dump)

    def test_upload_refused_then_accepted(self):
        h = upload_harness(self)
        _, path, name = queue_dump(h, 5)
        h.ftps.inject("full")
        h.once()
        self.assertEqual(listing(h.dump, "post"), [name])
        self.assertIn("452", h.state(h.dump, name)["last_error"])
        self.assertTrue(os.path.exists(path))
        # The JPPS holds the upload open until its deadline: the next
        # attempt sends the file again to the same destination (a second
        # StartUpload would meet EEXIST and have to wait the deadline out).
        h.once()
        self.assertEqual(len(h.jpps.ops("StartUpload")), 1)
        self.assertEqual(len(h.jpps.committed), 1)
        self.assert_drained(h.dump)

    def test_unfinished_upload_past_the_deadline_starts_over(self):
        h = upload_harness(self)
        _, _, name = queue_dump(h, 7)
        h.ftps.inject("drop_data", after=100)
        h.once()
        state = h.state(h.dump, name)
        self.assertEqual(state["uploading"], "1")
        # Too late to finish that upload before the JPPS drops it: the
        # attempt starts over with StartUpload, once the JPPS has expired
        # the old upload (until then it answers EEXIST).
        m = jp_importer.Maildir(h.dump).init()
        state["upload_started"] = str(time.time() - 250)
        m.write_state(name, state)
        h.jpps.expire_uploads()
        h.once()
        self.assertEqual(len(h.jpps.ops("StartUpload", "ok")), 2)
        self.assertEqual(len(h.jpps.committed), 1)
        self.assert_drained(h.dump)

    def test_progress_lost_in_a_machine_crash_costs_time_not_the_dump(self):
        h = upload_harness(self)
        jobid, path, _ = queue_dump(h, 8)
        h.once()
        self.assertEqual(len(h.jpps.committed), 1)
        # Progress records are not synced: a crash of the machine right
        # after the commit can leave the message and the file in place
        # with the record empty.  StartUpload then meets EEXIST; once the
        # JPPS upload deadline has passed, EEXIST proves the file stored.
        jobid, path = write_dump(h, 8)
        name = drop_message(h.dump, dump_message(jobid, path))
        open(os.path.join(h.dump, "state", name), "wb").close()
        h.once()
        self.assertEqual(listing(h.dump, "post"), [name])
        state = h.state(h.dump, name)
        self.assertIn("eexist_since", state)
        state["eexist_since"] = str(time.time() - 301)
        state["next_retry"] = str(time.time())
        jp_importer.Maildir(h.dump).init().write_state(name, state)
        output = h.once().stderr
        self.assertIn("already stored", output)
        self.assertEqual(len(h.jpps.ops("StartUpload", "ok")), 1)
        self.assertEqual(len(h.jpps.committed), 1)
        self.assertFalse(os.path.exists(path))
        self.assert_drained(h.dump)


class TestGSoapJPPSPeer(unittest.TestCase):
    """The importer against a JPPS served by gSOAP from our WSDL."""

    def setUp(self):
        self.h = ImporterHarness(self)
        self.root = self.h.path("ftp-root")
        os.mkdir(self.root, 0o700)
        self.ftps = FTPSFixture(self.h.pki, self.root).start()
        self.addCleanup(self.ftps.stop)
        self.peer = GSoapJPPSPeer(self.h.pki,
                                  dest_base=self.ftps.url("jpps"))
        self.addCleanup(self.peer.stop)
        self.h.jpps = self.peer           # -p of h.once() and h.args()

    def assert_drained(self, maildir):
        for sub in ("new", "work", "post", "undeliverable", "tmp", "state"):
            self.assertEqual(listing(maildir, sub), [], sub)

    def test_registrations_and_eexist_are_delivered(self):
        h = self.h
        for n in range(20):
            drop_message(h.reg, registration(n))
        drop_message(h.reg, registration(5))           # EEXIST: done too
        owner = "/O=Grid/CN=Tom & <Jerry> \"q\""        # escaped as XML
        drop_message(h.reg, registration(20, owner))
        proc = h.once()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assert_drained(h.reg)
        self.assertIn("already registered", proc.stderr)
        self.assertEqual(len(self.peer.calls("RegisterJob", "ok")), 21)
        self.assertEqual([c.get("a") for c in self.peer.calls(
            "RegisterJob", errno.EEXIST)],
            ["https://lb.example.org:9000/job00005"])
        last = self.peer.calls("RegisterJob", "ok")[-1]
        self.assertEqual((last.get("a"), last.get("b"), last.identity),
                         ("https://lb.example.org:9000/job00020", owner,
                          HOST_SUBJECT))

    def test_dump_delivered_through_start_and_commit_upload(self):
        h = self.h
        jobid, path = write_dump(h, 1, size=50000)
        digest = sha256_of(path)
        drop_message(h.dump, dump_message(jobid, path))
        proc = h.once()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assert_drained(h.dump)
        # Unknown at first: the failsafe registration with the dump's
        # owner, then the upload to the destination the peer gave.
        self.assertEqual([(c.op, c.result) for c in self.peer.calls()],
                         [("StartUpload", errno.ENOENT),
                          ("GetJobAttributes", errno.ENOENT),
                          ("RegisterJob", "ok"), ("StartUpload", "ok"),
                          ("CommitUpload", "ok")])
        self.assertEqual(self.peer.calls("RegisterJob")[0].get("b"),
                         USER_SUBJECT)
        start = self.peer.calls("StartUpload", "ok")[0]
        self.assertEqual((start.get("b"), start.get("c")),
                         ("urn:org.glite.jp.primary:lb", "(nil)"))
        self.assertEqual(sha256_of(os.path.join(
            self.root, "jpps", "data", "dump00001", "lb")), digest)
        self.assertFalse(os.path.exists(path))

    def test_proxy_client_accepted_untrusted_client_refused(self):
        h = self.h
        h.cert = h.key = h.pki.proxy
        drop_message(h.reg, registration(1))
        proc = h.once()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assert_drained(h.reg)
        self.assertEqual(self.peer.calls("RegisterJob", "ok")[0].identity,
                         h.pki.proxy_subject)
        h.cert, h.key = h.pki.rogue_cert, h.pki.rogue_key
        name = drop_message(h.reg, registration(2))
        h.once()
        # Refused in the handshake (under TLS 1.3 the client may see it
        # only as a broken pipe): postponed, never reaching the service.
        self.assertEqual(listing(h.reg, "post"), [name])
        self.assertIn("localhost", h.state(h.reg, name)["last_error"])
        self.assertEqual(len(self.peer.calls()), 1)

    def test_delivered_messages_leave_no_descriptor_open(self):
        # Their descriptors are closed by background threads (the close
        # that frees an inode can wait for the disk): all of them by the
        # end of the pass, not just the full batches.
        h = self.h
        for n in range(21):
            drop_message(h.reg, registration(n))
        worker = TestMigration.worker(self, h, jp_importer.KIND_REG, h.reg)

        def open_messages():
            fds = os.path.join("/proc", str(os.getpid()), "fd")
            found = []
            for fd in os.listdir(fds):
                try:
                    target = os.readlink(os.path.join(fds, fd))
                except OSError:
                    continue            # the listing's own descriptor
                if target.startswith(h.reg):
                    found.append(target)
            return found
        self.assertEqual(worker.run_pass(), 21)
        self.assertEqual(worker.counts["delivered"], 21)
        self.assertEqual(open_messages(), [])
        self.assert_drained(h.reg)

    def test_strict_validation_and_the_fixtures_fault_shape(self):
        # What the importer's requests pass: gSOAP refuses what breaks
        # the WSDL, so the tests above prove our wire format.
        for body in ("<jpelem:RegisterJob><jpelem:job>https://x/1</jpelem:job>"
                     "<jpelem:owner>o</jpelem:owner></jpelem:RegisterJob>",
                     "<jpelem:RegisterJob><job>https://x/1</job>"
                     "</jpelem:RegisterJob>",
                     "<jptype:RegisterJob><job>https://x/1</job><owner>o"
                     "</owner></jptype:RegisterJob>"):
            status, root = raw_soap(self.peer, body)
            self.assertEqual((status, fault_of(root)[0]),
                             (500, "SOAP-ENV:Client"), body)
        self.assertEqual(self.peer.calls(), [])
        # The Python fixture's fault detail is the one gSOAP writes.
        body = ("<jpelem:RegisterJob><job>https://lb.example.org:9000/f"
                "</job><owner>o</owner></jpelem:RegisterJob>")
        fixture = JPPSFixture(self.h.pki).start()
        self.addCleanup(fixture.stop)
        shapes = []
        for jpps in (self.peer, fixture):
            raw_soap(jpps, body)
            status, root = raw_soap(jpps, body)
            detail = root.find(".//detail")
            shapes.append((status, fault_of(root), [
                (e.tag, e.get("{%s}type" % NS_XSI),
                 [(c.tag, c.text) for c in e]) for e in detail]))
        self.assertEqual(shapes[0], shapes[1])
        self.assertEqual(shapes[0][1][2], errno.EEXIST)


class TestImporterProcesses(unittest.TestCase):
    """The process model: SIGKILL of a worker or the whole daemon loses
    nothing, SIGTERM finishes the message in hand, the pid file lock and
    the real detaching daemon, SIGHUP and a renewed credential, a worker
    that keeps dying under --once, and one-line errors for bad command
    lines and credentials."""


    def test_once_ends_when_a_worker_keeps_dying(self):
        """--once restarts a worker that died ONCE_RESTARTS times, then
        ends with status 1 instead of restarting it forever."""
        h = ImporterHarness(self)
        drop_message(h.reg, registration(1))
        code = ("import os, sys; sys.path.insert(0, %r); import jp_importer; "
                "real = jp_importer.run_worker\n"
                "def run_worker(kind, *args, **kw):\n"
                "    if kind == jp_importer.KIND_DUMP: os._exit(3)\n"
                "    return real(kind, *args, **kw)\n"
                "jp_importer.run_worker = run_worker\n"
                "sys.exit(jp_importer.main(sys.argv[1:]))" % HERE)
        proc = run([sys.executable, "-c", code, "--once"] + h.args(),
                   timeout=TIMEOUT)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertEqual(proc.stderr.count("dump worker (pid"),
                         jp_importer.ONCE_RESTARTS + 1, proc.stderr)
        self.assertIn("not restarted again (--once)", proc.stderr)
        self.assertEqual(len(h.jpps.ops("RegisterJob", "ok")), 1)

    def test_sigkill_of_a_busy_worker_loses_nothing(self):
        h = ImporterHarness(self)
        h.jpps.inject("hang", "RegisterJob")
        name = drop_message(h.reg, registration(1))
        proc = h.start()
        wait_for(lambda: h.jpps.calls, what="the hung call")
        self.assertEqual(listing(h.reg, "work"), [name])
        reg_worker = min(h.workers(proc, 3))       # forked first
        os.kill(reg_worker, signal.SIGKILL)
        h.jpps.release()
        wait_for(lambda: h.jpps.ops("RegisterJob", "ok"),
                 what="delivery by the restarted worker")
        wait_for(lambda: not listing(h.reg, "work"), what="empty work/")
        self.assertEqual(h.stop(proc), 0)
        self.assertIn("died: terminated by SIGKILL", h.output())
        self.assertEqual(listing(h.reg, "tmp"), [])

    def test_sigkill_of_the_whole_daemon_loses_nothing(self):
        h = ImporterHarness(self)
        h.jpps.inject("hang", "RegisterJob")
        drop_message(h.reg, registration(1))
        proc = h.start()
        wait_for(lambda: h.jpps.calls, what="the hung call")
        workers = h.workers(proc, 3)
        for pid in [proc.pid] + workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(TIMEOUT)
        h.jpps.release()
        self.assertEqual(len(listing(h.reg, "work")), 1)
        h.once()
        self.assertEqual(len(h.jpps.ops("RegisterJob", "ok")), 1)
        self.assertEqual(listing(h.reg, "work"), [])

    def test_sigterm_finishes_the_message_in_hand(self):
        h = ImporterHarness(self)
        h.jpps.inject("hang", "RegisterJob", answer=True)
        drop_message(h.reg, registration(1))
        drop_message(h.reg, registration(2))
        proc = h.start()
        wait_for(lambda: h.jpps.calls, what="the hung call")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "terminating on SIGTERM" in h.output(),
                 what="the master's note")
        self.assertIsNone(proc.poll())           # waits for the worker
        h.jpps.release()
        self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertEqual(len(h.jpps.ops("RegisterJob", "ok")), 1)
        self.assertEqual(len(listing(h.reg, "new")), 1)   # not started
        self.assertFalse(os.path.exists(h.pidfile))

    def test_a_signal_while_the_sleep_begins_wakes_it(self):
        """A TERM whose Python handler has not run when select() starts
        (here: it reached another thread) still ends Wakeup.wait() at
        once.  A handler that wrote the wake-up byte itself left the
        master asleep for its whole ten-minute wait."""
        code = (
            "import os, signal, sys, threading, time\n"
            "sys.path.insert(0, %r); import jp_importer\n"
            "wakeup = jp_importer.Wakeup()\n"
            "wakeup.install([signal.SIGTERM])\n"
            "threading.Thread(target=threading.Event().wait,\n"
            "                 daemon=True).start()   # takes the TERM\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])\n"
            "print('ready', flush=True)\n"
            "started = time.monotonic()\n"
            "wakeup.wait(3 * %r)\n"
            "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])\n"
            "print(wakeup.take(), time.monotonic() - started < %r)\n"
            % (HERE, TIMEOUT, TIMEOUT))
        proc = subprocess.Popen([sys.executable, "-c", code],
                                stdout=subprocess.PIPE, universal_newlines=True)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        self.assertEqual(proc.stdout.readline(), "ready\n")
        wchan = "/proc/%d/task/%d/wchan" % (proc.pid, proc.pid)
        wait_for(lambda: "poll_schedule_timeout" in read_text(wchan),
                 what="the main thread asleep in select()")
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.communicate(timeout=TIMEOUT)[0],
                         "[%d] True\n" % signal.SIGTERM)

    def test_pidfile_lock_and_real_daemon(self):
        h = ImporterHarness(self)
        proc = run([sys.executable, JP_IMPORTER, "--log", h.logfile]
                   + h.args())
        self.assertEqual(proc.returncode, 0, proc.stderr)
        pid = wait_for(lambda: read_text(h.pidfile).strip(),
                       what="the pid file")
        pid = int(pid)
        self.addCleanup(lambda: os.kill(pid, signal.SIGKILL)
                        if os.path.exists("/proc/%d" % pid) else None)
        self.assertNotEqual(os.getsid(pid), os.getsid(0))   # own session
        second = h.start()
        self.assertEqual(second.wait(TIMEOUT), 1)
        self.assertIn("another jp_importer is running (pid %d" % pid,
                      h.output())
        drop_message(h.reg, registration(3))
        wait_for(lambda: h.jpps.ops("RegisterJob", "ok"), what="delivery")
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not os.path.exists(h.pidfile),
                 what="pid file removed")
        with open(h.logfile) as f:
            text = f.read()
        self.assertIn("registered (attempt 1", text)
        self.assertIn("stopped", text)

    def test_sighup_reloads_a_renewed_credential(self):
        h = ImporterHarness(self)
        cred = h.path("cred.pem")
        shutil.copy(h.pki.proxy, cred)
        os.chmod(cred, 0o600)
        h.cert = h.key = cred
        proc = h.start()
        drop_message(h.reg, registration(1))
        wait_for(lambda: h.jpps.ops("RegisterJob", "ok"), what="first")
        # A renewed credential with another identity: the host's.
        with open(cred + ".new", "w") as out:
            for part in (h.pki.host_cert, h.pki.host_key):
                with open(part) as f:
                    out.write(f.read())
        os.chmod(cred + ".new", 0o600)
        os.rename(cred + ".new", cred)
        proc.send_signal(signal.SIGHUP)
        # The master and its three workers, each at once (idle or not).
        wait_for(lambda: h.output().count("loaded: " + HOST_SUBJECT) == 4,
                 what="the credential reloaded everywhere")
        drop_message(h.reg, registration(2))
        wait_for(lambda: len(h.jpps.ops("RegisterJob", "ok")) == 2,
                 what="second")
        self.assertEqual([c.identity for c in h.jpps.ops("RegisterJob")],
                         [USER_SUBJECT, HOST_SUBJECT])
        self.assertEqual(h.stop(proc), 0)

    def test_command_line_errors(self):
        for args, text in ((["-D", "0"], "between 1 and 20"),
                           (["-D", "21"], "between 1 and 20"),
                           (["-t", "soon"], "needs a number"),
                           (["--bogus"], "not recognized"),
                           (["stray"], "unexpected argument"),
                           (["--upload", "x"], "FILE and URL"),
                           (["--dcau", "X"], "auto, N or A")):
            proc = run([sys.executable, JP_IMPORTER] + args)
            self.assertEqual(proc.returncode, 2, args)
            self.assertIn(text, proc.stderr)
            self.assertNotIn("Traceback", proc.stderr)
        proc = run([sys.executable, JP_IMPORTER, "-S", "/x", "--store", "/y",
                    "--help"])
        self.assertEqual(proc.returncode, 0)
        self.assertIn("--dump-slaves", proc.stdout)

    def test_bad_credentials_are_clear_errors(self):
        h = ImporterHarness(self)
        expired = h.pki.make_proxy("expired-proxy.pem",
                                   start="20200101000000Z",
                                   end="20210101000000Z")
        for cert, text in ((expired, "expired on"),
                           ("/nonexistent.pem", "/nonexistent.pem"),
                           (h.pki.ca_key, "holds no certificate")):
            h.cert = h.key = cert
            proc = h.once()
            self.assertEqual(proc.returncode, 1, cert)
            self.assertIn(text, proc.stderr)
            self.assertNotIn("Traceback", proc.stderr)
        h.cert, h.key = h.pki.user_cert, h.pki.host_key
        proc = h.once()
        self.assertIn("wrong key", proc.stderr)


class TestFaultsClear(unittest.TestCase):
    """Every fault on the way is retried, bounded in time, and once it
    clears the message is delivered exactly once, through the importer
    (the transport functions alone are tested under Transports)."""

    class QuotaFTPS(FTPSFixture):
        """The FTPS fixture with one more fault, `quota`: 552 to STOR
        (storage allocation exceeded), as a server over quota answers."""

        def _cmd_STOR(self, state, arg):
            if state["pasv"] is not None and self._take("quota") is not None:
                state["pasv"].close()
                state["pasv"] = None
                self._reply(state, "552 Requested file action aborted: "
                            "exceeded storage allocation.")
                return None
            return FTPSFixture._cmd_STOR(self, state, arg)

    # -- set-up -------------------------------------------------------------

    def harness(self):
        """upload_harness() with the quota-capable FTPS fixture."""
        return upload_harness(self, ftps_class=self.QuotaFTPS)

    def queue(self, h, what, n, maildir=None, size=200000):
        """A registered job's dump or sandbox and its message in `maildir`
        (default the harness's); (maildir, name, file, sha256)."""
        if what == "dump":
            maildir = maildir or h.dump
            jobid, path = write_dump(h, n, size=size)
            data = dump_message(jobid, path)
        else:
            maildir = maildir or h.sandbox
            jobid = "https://lb.example.org:9000/sandbox%05d" % n
            os.makedirs(os.path.join(maildir, "spool"), mode=0o700,
                        exist_ok=True)
            path = os.path.join(maildir, "spool", "%d.tar" % n)
            write_archive(path, size)
            data = sandbox_message(jobid, path, h.pki.proxy)
        h.jpps.register(jobid, USER_SUBJECT)
        return maildir, drop_message(maildir, data), path, sha256_of(path)

    def once(self, h, *extra):
        """jp_importer --once; (process, wall time).  Never a traceback."""
        started = time.monotonic()
        proc = h.once(*extra)
        took = time.monotonic() - started
        self.assertNotIn("Traceback", proc.stderr)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return proc, took

    def assert_retried(self, maildir, name, text, attempts=1):
        self.assertEqual(listing(maildir, "post"), [name])
        for sub in ("new", "work", "undeliverable"):
            self.assertEqual(listing(maildir, sub), [], sub)
        state = jp_importer.Maildir(maildir).read_state(name)
        self.assertEqual(state.get("attempts"), str(attempts), state)
        self.assertIn(text, state.get("last_error", ""))

    def assert_delivered_once(self, h, maildir, path, digest, stores=None):
        self.assertEqual(list(h.jpps.committed.values()), [digest])
        self.assertEqual(len(h.jpps.ops("CommitUpload", "ok")), 1)
        if stores is not None:
            self.assertEqual(h.ftps.stores, stores)
        self.assertFalse(os.path.exists(path))
        for sub in MAILDIR_SUBDIRS + ("state", "spool"):
            self.assertEqual(listing(maildir, sub), [], sub)

    def mount(self, *args):
        if os.geteuid() != 0:
            self.skipTest("needs root: mount (a small tmpfs, a read-only "
                          "bind mount)")
        proc = run(["mount"] + list(args))
        self.assertEqual(proc.returncode, 0, proc.stderr)

    def tmpfs(self, directory, size="64k"):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.mount("-t", "tmpfs", "-o", "size=%s,mode=0700" % size,
                   "tmpfs", directory)
        self.addCleanup(run, ["umount", directory])
        return directory

    def fill(self, directory, leave=0):
        """Fill the filesystem of `directory` but `leave` bytes (whole
        pages); return the filler file."""
        filler = os.path.join(directory, "filler")
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with self.assertRaises(OSError) as cm:
                while True:
                    os.write(fd, b"\0" * 4096)
            self.assertEqual(cm.exception.errno, errno.ENOSPC)
        finally:
            os.close(fd)
        if leave:
            os.truncate(filler, os.path.getsize(filler) - leave)
        st = os.statvfs(directory)
        self.assertEqual(st.f_bavail * st.f_frsize, leave)
        return filler

    # -- 1. FTP faults --------------------------------------------------------

    def test_ftp_faults_are_retried_then_delivered_once(self):
        # (fault, its arguments, --timeout, text in last_error)
        faults = [
            ("drop_data", {"after": 60000}, 5, "426 Failure reading"),
            ("stall", {"command": "STOR"}, 1,
             "no answer within the time limit"),
            ("full", {}, 5, "452 Insufficient storage"),
            ("quota", {}, 5, "552 Requested file action aborted"),
        ]
        for n, (fault, kw, timeout, text) in enumerate(faults):
            for what in ("dump", "sandbox"):
                with self.subTest(fault=fault, what=what):
                    h = self.harness()
                    maildir, name, path, digest = self.queue(h, what, n)
                    h.ftps.inject(fault, **kw)
                    proc, took = self.once(h, "--timeout", str(timeout))
                    self.assertLess(took, 3 * timeout + 3, proc.stderr)
                    self.assert_retried(maildir, name, text)
                    self.assertTrue(os.path.exists(path))
                    self.assertEqual(h.jpps.committed, {})
                    self.assertEqual(h.ftps.stores, 0)
                    h.ftps.release()
                    h.jpps.expire_uploads()
                    self.once(h)
                    self.assert_delivered_once(h, maildir, path, digest,
                                               stores=1)

    def test_ftp_login_refused_is_kept_and_delivered_once_after_requeue(self):
        # A refused login is permanent by design (README, Uploads): the
        # message goes to undeliverable/ with the reason, the file stays,
        # and --requeue after the fix delivers it once.
        h = self.harness()
        maildir, name, path, digest = self.queue(h, "dump", 1)
        h.ftps.inject("refuse_login")
        proc, took = self.once(h)
        self.assertLess(took, 3 * 5 + 3)
        self.assertEqual(listing(maildir, "undeliverable"), [name])
        self.assertIn("530 Login incorrect",
                      h.state(maildir, name).get("reason", ""))
        self.assertTrue(os.path.exists(path))
        self.assertEqual(h.ftps.stores, 0)
        proc = run([sys.executable, JP_IMPORTER, "--requeue"] + h.args())
        self.assertEqual(proc.returncode, 0, proc.stderr)
        h.jpps.expire_uploads()
        self.once(h)
        self.assert_delivered_once(h, maildir, path, digest, stores=1)

    # -- 2. JPPS faults in StartUpload and CommitUpload -----------------------

    def test_jpps_faults_in_upload_calls_are_retried_then_delivered_once(self):
        # (fault, arguments, --timeout, text in last_error); a cut answer
        # reads as XML cut short or, on older ssl modules, as a TLS EOF.
        faults = [("http500", {}, 5, "not a SOAP 1.1 envelope"),
                  ("drop_mid", {}, 5, "JPPS localhost:"),
                  ("hang", {"seconds": TIMEOUT}, 1, "within 1s")]
        for op in ("StartUpload", "CommitUpload"):
            for n, (fault, kw, timeout, text) in enumerate(faults):
                what = ("dump", "sandbox")[n % 2]
                with self.subTest(op=op, fault=fault, what=what):
                    h = self.harness()
                    maildir, name, path, digest = self.queue(h, what, n)
                    h.jpps.inject(fault, op, **kw)
                    proc, took = self.once(h, "--timeout", str(timeout))
                    self.assertLess(took, 3 * timeout + 3, proc.stderr)
                    self.assert_retried(maildir, name, text)
                    self.assertEqual(
                        [c.result for c in h.jpps.ops(op)],
                        ["injected-" + fault])
                    self.assertTrue(os.path.exists(path))
                    h.jpps.release()
                    self.once(h)
                    # One upload, one commit: a failed CommitUpload is
                    # resumed without sending the file again.
                    self.assert_delivered_once(h, maildir, path, digest,
                                               stores=1)
                    self.assertEqual(len(h.jpps.ops("StartUpload", "ok")),
                                     1)

    # -- 3. a full disk under the importer's maildirs -------------------------

    def test_full_disk_under_the_maildirs_loses_nothing(self):
        h = self.harness()
        # The registration and dump maildirs each on a small tmpfs (a
        # delivered registration frees a page), filled up with their
        # messages in new/: delivering a dump must record its progress,
        # and a failing registration its failure.
        reg = make_maildir(os.path.join(self.tmpfs(h.path("disk-reg")),
                                        "reg"))
        dump = make_maildir(os.path.join(self.tmpfs(h.path("disk-dump")),
                                         "dump"))
        fails = drop_message(reg, registration(1))
        drop_message(reg, registration(2))
        _, dump_name, path, digest = self.queue(h, "dump", 3, maildir=dump)
        fillers = [self.fill(os.path.dirname(m)) for m in (reg, dump)]
        h.jpps.inject("http500", "RegisterJob")
        args = ("-r", reg, "-d", dump, "--timeout", "2")
        proc, took = self.once(h, *args)
        self.assertLess(took, 3 * 2 + 3, proc.stderr)
        self.assertIn("No space left on device", proc.stderr)
        # Nothing lost, nothing given up, nothing partial left behind: the
        # registration that worked is done (that needs no space), the
        # other two wait in post/ for their retry.
        self.assertEqual([c.get("job") for c in h.jpps.ops("RegisterJob",
                                                           "ok")],
                         ["https://lb.example.org:9000/job00002"])
        self.assertEqual(listing(reg, "post"), [fails])
        self.assertEqual(listing(dump, "post"), [dump_name])
        self.assertEqual(listing(reg, "tmp"), [fails])
        self.assertEqual(listing(dump, "tmp"), [dump_name])
        for maildir in (reg, dump):
            for sub in ("new", "work", "undeliverable", "state"):
                self.assertEqual(listing(maildir, sub), [], (maildir, sub))
        self.assertTrue(os.path.exists(path))
        self.assertEqual(h.jpps.committed, {})
        # Space again: everything is delivered, once.
        for filler in fillers:
            os.unlink(filler)
        h.jpps.expire_uploads()
        self.once(h, *args)
        self.assertEqual(len(h.jpps.ops("RegisterJob", "ok")), 2)
        self.assert_delivered_once(h, dump, path, digest)
        for sub in MAILDIR_SUBDIRS + ("state",):
            self.assertEqual(listing(reg, sub), [], sub)

    # -- 4. a read-only maildir -----------------------------------------------

    def test_read_only_maildir_loses_nothing(self):
        h = ImporterHarness(self)
        # The registration maildir the importer sees (h.reg) is a bind
        # mount of `real`, through which the test writes even while the
        # mount is read-only.
        real = make_maildir(h.path("reg-real"))
        self.mount("--bind", real, h.reg)
        self.addCleanup(run, ["umount", h.reg])
        daemon = h.start()
        wait_for(lambda: "started:" in h.output(), what="the daemon")
        self.mount("-o", "remount,ro,bind", h.reg)
        name = drop_message(real, registration(1))
        wait_for(lambda: "Read-only file system" in h.output(),
                 what="the worker's error")
        # A new start refuses the read-only maildir in one line.
        proc = h.once()
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertEqual(len(proc.stderr.splitlines()), 1, proc.stderr)
        self.assertIn(h.reg, proc.stderr)
        self.assertEqual(listing(real, "new"), [name])
        self.assertEqual(h.jpps.ops("RegisterJob"), [])
        # Writable again: the running daemon delivers it, once.
        self.mount("-o", "remount,rw,bind", h.reg)
        wait_for(lambda: not os.listdir(os.path.join(real, "new")) and
                 not os.listdir(os.path.join(real, "work")),
                 what="the delivery")
        self.assertEqual(h.stop(daemon), 0)
        self.assertEqual([c.result for c in h.jpps.ops("RegisterJob")],
                         ["ok"])
        for sub in MAILDIR_SUBDIRS + ("state",):
            self.assertEqual(listing(real, sub), [], sub)
        output = h.output()
        self.assertNotIn("Traceback", output)
        self.assertNotIn("died", output)

    # -- 5. a full disk under jp_upload_files.py ------------------------------

    def test_upload_files_on_a_full_disk_leaves_nothing(self):
        work = tempfile.mkdtemp(prefix="jp-faults-upload-")
        self.addCleanup(shutil.rmtree, work, True)
        job = os.path.join(work, "stdout.txt")
        with open(job, "wb") as f:
            f.write(os.urandom(20000))
        proxy = os.path.join(work, "x509up")
        with open(proxy, "w") as f:
            f.write("named, not read\n")
        # The size of the archive, from a run on a roomy disk.
        spare = os.path.join(work, "spare")
        proc = run([sys.executable, JP_UPLOAD_FILES, "-j",
                    "https://lb.example.org/abc", "-p", proxy, "-m", spare,
                    job])
        self.assertEqual(proc.returncode, 0, proc.stderr)
        size = sum(os.path.getsize(os.path.join(spare, "spool", n))
                   for n in os.listdir(os.path.join(spare, "spool")))
        pages = -(-size // 4096) * 4096
        disk = self.tmpfs(os.path.join(work, "disk"))
        maildir = os.path.join(disk, "jpsandbox")
        filler = self.fill(disk)

        def request():
            return run([sys.executable, JP_UPLOAD_FILES, "-j",
                        "https://lb.example.org/abc", "-p", proxy, "-m",
                        maildir, job])

        def left_behind():
            return [(top, names) for top, _, names in os.walk(maildir)
                    if names]
        # No room for the archive; then room for it but not the message.
        for leave, what in ((0, "cannot write the archive"),
                            (pages, "cannot write the message")):
            with self.subTest(what=what):
                if leave:
                    os.truncate(filler, os.path.getsize(filler) - leave)
                proc = request()
                self.assertEqual(proc.returncode, 1, proc.stderr)
                self.assertEqual(len(proc.stderr.splitlines()), 1,
                                 proc.stderr)
                self.assertIn(what, proc.stderr)
                self.assertIn("No space left on device", proc.stderr)
                self.assertEqual(left_behind(), [])
        os.unlink(filler)
        proc = request()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(len(listing(maildir, "new")), 1)
        self.assertEqual(len(listing(maildir, "spool")), 1)


# ---------------------------------------------------------------------------
# Transports: ftp:// (the fixture, vsftpd), gsiftp:// (GridFTP), kept
# connections, limits
# ---------------------------------------------------------------------------

class TestFTPSTransport(FTPSCase):
    """The ftp:// transport against the real vsftpd and the fixture:
    client certificates and proxies, session reuse, plain FTP, implicit
    TLS, untrusted or misnamed servers, time limits, QUIT after refusals,
    credentials in the URL, the importer delivering to vsftpd."""

    def vsftpd(self, **kw):
        peer = VsftpdPeer(self.pki, **kw)
        self.addCleanup(peer.stop)
        return peer

    def test_vsftpd_with_session_reuse_and_client_certificates(self):
        peer = self.vsftpd()
        user = jp_importer.Credentials(self.pki.user_cert, self.pki.user_key,
                                       self.pki.ca_dir)
        for size, path, digest in payloads(self.dir, UPLOAD_SIZES):
            for name, creds in (("host", self.host), ("user", user)):
                target = "jpps/data/%s/%d/lb" % (name, size)
                sent = jp_importer.upload_ftp(peer.url(target), path, creds,
                                              30)
                self.assertEqual(sent, size)
                self.assertEqual(sha256_of(peer.local(target)), digest,
                                 (name, size))

    def test_vsftpd_refuses_an_untrusted_client(self):
        peer = self.vsftpd()
        payload = payloads(self.dir, (10,))[0][1]
        rogue = jp_importer.Credentials(self.pki.rogue_cert,
                                        self.pki.rogue_key, self.pki.ca_dir)
        with self.assertRaises(jp_importer.PermanentError) as cm:
            jp_importer.upload_ftp(peer.url("rogue"), payload, rogue, 10)
        self.assertIn("our certificate was refused", str(cm.exception))
        self.assertFalse(os.path.exists(peer.local("rogue")))

    def test_fixture_proxy_and_retry_after_a_dropped_transfer(self):
        ftps = self.fixture()
        proxy = jp_importer.Credentials(self.pki.proxy, self.pki.proxy,
                                        self.pki.ca_dir)
        size, path, digest = payloads(self.dir, (3 * 1024 * 1024,))[0]
        ftps.inject("drop_data", after=1000000)
        with self.assertRaises(jp_importer.TransientError):
            jp_importer.upload_ftp(ftps.url("a/b/lb"), path, proxy, 10)
        self.assertEqual(os.path.getsize(ftps.local("a/b/lb")[0]), 1000000)
        # The next attempt sends the whole file again, from byte 0.
        self.assertEqual(jp_importer.upload_ftp(ftps.url("a/b/lb"), path,
                                                proxy, 10), size)
        self.assertEqual(sha256_of(ftps.local("a/b/lb")[0]), digest)

    def test_implicit_tls_for_ftps_urls(self):
        root = os.path.join(self.dir, "implicit-root")
        os.mkdir(root)
        ftps = FTPSFixture(self.pki, root, implicit=True).start()
        self.addCleanup(ftps.stop)
        size, path, digest = payloads(self.dir, (70000,))[0]
        self.assertTrue(ftps.url("x").startswith("ftps://"))
        self.assertEqual(jp_importer.upload_ftp(ftps.url("i/x"), path,
                                                self.host, 10), size)
        self.assertEqual(sha256_of(os.path.join(root, "i/x")), digest)

    def test_fixture_errors_are_classified(self):
        ftps = self.fixture()
        payload = payloads(self.dir, (1000,))[0][1]
        cases = [("refuse_login", {}, jp_importer.PermanentError, "530"),
                 ("full", {}, jp_importer.TransientError, "452"),
                 ("short", {}, jp_importer.TransientError,
                  "stored 999 bytes of 1000")]
        for kind, kw, error, text in cases:
            ftps.inject(kind, **kw)
            with self.assertRaises(error) as cm:
                jp_importer.upload_ftp(ftps.url("x/" + kind), payload,
                                       self.host, 10)
            self.assertIn(text, str(cm.exception))
        with self.assertRaises(jp_importer.PermanentError) as cm:
            jp_importer.upload_ftp(ftps.url(""), payload, self.host, 10)
        # A server that hangs up at once: said in words (EOFError has
        # none of its own).
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        closer = threading.Thread(target=lambda: listener.accept()[0].close())
        closer.start()
        with self.assertRaises(jp_importer.TransientError) as cm:
            jp_importer.upload_ftp("ftp://localhost:%d/x" % port, payload,
                                   self.host, 10)
        closer.join(TIMEOUT)
        self.assertEqual(str(cm.exception), "ftp localhost:%d: connection "
                         "closed by the server" % port)

    def test_fixture_stall_times_out(self):
        ftps = self.fixture()
        payload = payloads(self.dir, (1000,))[0][1]
        ftps.inject("stall", command="STOR")
        started = time.monotonic()
        with self.assertRaises(jp_importer.TransientError) as cm:
            jp_importer.upload_ftp(ftps.url("stalled"), payload, self.host,
                                   1)
        self.assertLess(time.monotonic() - started, 10)
        self.assertIn("no answer within the time limit", str(cm.exception))
        ftps.release()

    def test_untrusted_server_and_wrong_host_name(self):
        ftps = self.fixture()
        payload = payloads(self.dir, (10,))[0][1]
        untrusting = untrusting_credentials(self.pki, self.dir,
                                            self.pki.host_cert,
                                            self.pki.host_key)
        with self.assertRaises(jp_importer.TransientError) as cm:
            jp_importer.upload_ftp(ftps.url("x"), payload, untrusting, 10)
        self.assertIn("server certificate not accepted", str(cm.exception))
        # A server whose certificate names another host.
        other = self.fixture(cert=other_host_cert(self.pki, "other-host"))
        with self.assertRaises(jp_importer.TransientError) as cm:
            jp_importer.upload_ftp(other.url("x"), payload, self.host, 10)
        self.assertIn("server certificate not accepted", str(cm.exception))
        self.assertIn("localhost", str(cm.exception))
        self.assertEqual(ftps.stores + other.stores, 0)

    def test_reuse_is_what_the_fixture_checks(self):
        ftps = self.fixture()
        payload = payloads(self.dir, (10,))[0][1]
        # Plain ftplib does not resume the session: refused, as by vsftpd.
        ftp = ftplib.FTP_TLS(context=self.host.client_context(), timeout=10)
        self.addCleanup(ftp.close)
        ftp.connect("localhost", ftps.port)
        ftp.auth()
        ftp.prot_p()
        ftp.login()
        with open(payload, "rb") as f:
            with self.assertRaises((ftplib.Error, OSError)):
                ftp.storbinary("STOR plain-ftplib", f)
        self.assertEqual(ftps.stores, 0)
        self.assertEqual(jp_importer.upload_ftp(ftps.url("ours"), payload,
                                                self.host, 10), 10)
        self.assertEqual(ftps.stores, 1)

    def test_operator_upload_command(self):
        ftps = self.fixture()
        size, path, digest = payloads(self.dir, (5000,))[0]
        base = [sys.executable, JP_IMPORTER, "-c", self.pki.host_cert, "-k",
                self.pki.host_key, "-C", self.pki.ca_dir, "--upload", path]
        proc = run(base + [ftps.url("by/hand")])
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("uploaded 5000 bytes to %s" % ftps.url("by/hand"),
                      proc.stdout)
        self.assertEqual(sha256_of(ftps.local("by/hand")[0]), digest)
        ftps.inject("refuse_login")
        proc = run(base + [ftps.url("by/hand2")])
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(len(proc.stderr.strip().splitlines()), 1,
                         proc.stderr)
        self.assertIn("530", proc.stderr)

    def test_importer_delivers_dumps_and_sandboxes_to_vsftpd(self):
        peer = self.vsftpd()
        h = ImporterHarness(self, dest_base=peer.url("jpps"),
                            local_root=peer.root)
        path, archive, digests = queue_dump_and_sandbox(h, 200000, 30000)
        proc = h.once()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(sorted(h.jpps.committed.values()), digests)
        self.assertFalse(os.path.exists(path) or os.path.exists(archive))

    def test_plain_server_needs_allow_plain(self):
        ftps = self.fixture(tls=False)
        size, path, digest = payloads(self.dir, (300000,))[0]
        # Transient: said before TLS, by anyone on the path.
        with self.assertRaises(jp_importer.TransientError) as cm:
            jp_importer.upload_ftp(ftps.url("p/x"), path, self.host, 10)
        self.assertIn("refuses TLS (530", str(cm.exception))
        self.assertIn("--allow-plain-ftp", str(cm.exception))
        self.assertEqual(ftps.commands, ["AUTH TLS", "QUIT"])
        with self.assertLogs("jp_importer", "WARNING") as logs:
            self.assertEqual(jp_importer.upload_ftp(
                ftps.url("p/x"), path, self.host, 10, allow_plain=True), size)
        self.assertIn("the upload is not encrypted", logs.output[0])
        self.assertEqual(sha256_of(ftps.local("p/x")[0]), digest)
        self.assertNotIn("PROT P", ftps.commands)

    def test_vsftpd_without_tls(self):
        peer = self.vsftpd(tls=False)
        size, path, digest = payloads(self.dir, (5000,))[0]
        with self.assertRaises(jp_importer.TransientError) as cm:
            jp_importer.upload_ftp(peer.url("x"), path, self.host, 10)
        self.assertIn("refuses TLS", str(cm.exception))
        self.assertFalse(os.path.exists(peer.local("x")))
        with self.assertLogs("jp_importer", "WARNING"):
            self.assertEqual(jp_importer.upload_ftp(
                peer.url("a/b/x"), path, self.host, 10, allow_plain=True),
                size)
        self.assertEqual(sha256_of(peer.local("a/b/x")), digest)

    def test_vsftpd_and_proxies(self):
        proxy = jp_importer.Credentials(self.pki.proxy, self.pki.proxy,
                                        self.pki.ca_dir)
        files = payloads(self.dir, UPLOAD_SIZES)
        # validate_cert=YES: vsftpd does not allow proxy certificates.
        strict = self.vsftpd()
        with self.assertRaises(jp_importer.PermanentError) as cm:
            jp_importer.upload_ftp(strict.url("px"), files[1][1], proxy, 10)
        self.assertIn("our certificate was refused", str(cm.exception))
        # validate_cert=NO still requires a certificate; proxies pass,
        # and the session must be resumed all the same.
        lax = self.vsftpd(validate_cert=False)
        for size, path, digest in files:
            target = "jpps/data/proxy/%d/lb" % size
            self.assertEqual(jp_importer.upload_ftp(lax.url(target), path,
                                                    proxy, 30), size)
            self.assertEqual(sha256_of(lax.local(target)), digest, size)
        # The price, as the README warns: any certificate will do.
        rogue = jp_importer.Credentials(self.pki.rogue_cert,
                                        self.pki.rogue_key, self.pki.ca_dir)
        jp_importer.upload_ftp(lax.url("rogue"), files[1][1], rogue, 10)
        self.assertTrue(os.path.exists(lax.local("rogue")))

    def test_vsftpd_untrusted_or_misnamed_server(self):
        payload = payloads(self.dir, (10,))[0][1]
        untrusting = untrusting_credentials(self.pki, self.dir,
                                            self.pki.host_cert,
                                            self.pki.host_key)
        peer = self.vsftpd()
        with self.assertRaises(jp_importer.TransientError) as cm:
            jp_importer.upload_ftp(peer.url("u"), payload, untrusting, 10)
        self.assertIn("server certificate not accepted", str(cm.exception))
        self.assertIn("certificate verify failed", str(cm.exception))
        misnamed = self.vsftpd(cert=other_host_cert(self.pki, "vsftpd-other"))
        with self.assertRaises(jp_importer.TransientError) as cm:
            jp_importer.upload_ftp(misnamed.url("m"), payload, self.host, 10)
        self.assertIn("server certificate not accepted", str(cm.exception))
        self.assertIn("localhost", str(cm.exception))
        self.assertFalse(os.path.exists(peer.local("u")) or
                         os.path.exists(misnamed.local("m")))

    def test_trickling_server_meets_the_overall_deadline(self):
        ftps = self.fixture()
        payload = payloads(self.dir, (1000,))[0][1]
        # A byte every 0.1 s never trips the 0.5 s socket timeout.
        ftps.inject("trickle", command="STOR", interval=0.1)
        limit = 3 * 0.5 + 1000.0 / jp_importer.FTP_MIN_RATE
        started = time.monotonic()
        with self.assertRaises(jp_importer.TransientError) as cm:
            jp_importer.upload_ftp(ftps.url("t"), payload, self.host, 0.5)
        took = time.monotonic() - started
        self.assertGreaterEqual(took, limit - 0.05)
        self.assertLess(took, limit + 2)
        self.assertIn("did not finish within 2s", str(cm.exception))

    def test_stalled_data_connection_times_out(self):
        ftps = self.fixture()
        # More than the loopback socket buffers can take in.
        path = payloads(self.dir, (40 * 1024 * 1024,))[0][1]
        ftps.inject("stall_data", after=1000000)
        started = time.monotonic()
        with self.assertRaises(jp_importer.TransientError) as cm:
            jp_importer.upload_ftp(ftps.url("s"), path, self.host, 1)
        self.assertLess(time.monotonic() - started, 1 + 3)
        self.assertIn("no answer within the time limit", str(cm.exception))
        ftps.release()

    def test_quit_after_refusals_and_a_dropped_transfer(self):
        ftps = self.fixture()
        payload = payloads(self.dir, (500000,))[0][1]
        for kind, kw, error in (
                ("refuse_login", {}, jp_importer.PermanentError),
                ("full", {}, jp_importer.TransientError),
                ("drop_data", {"after": 100000}, jp_importer.TransientError)):
            del ftps.commands[:]
            ftps.inject(kind, **kw)
            with self.assertRaises(error) as cm:
                jp_importer.upload_ftp(ftps.url("q/" + kind), payload,
                                       self.host, 10)
            self.assertEqual(ftps.commands[-1], "QUIT", kind)
            if kind == "drop_data":
                # The server's reason, not just "broken pipe".
                self.assertIn("426 Failure reading network stream",
                              str(cm.exception))
        del ftps.commands[:]
        jp_importer.upload_ftp(ftps.url("q/ok"), payload, self.host, 10)
        self.assertEqual(ftps.commands[-3:], ["STOR /q/ok", "SIZE /q/ok",
                                              "QUIT"])
        self.assertEqual(ftps.commands[:3], ["AUTH TLS", "PBSZ 0", "PROT P"])
        self.assertIn("MKD /q", ftps.commands)

    def test_user_and_password_from_the_url(self):
        ftps = self.fixture(users={"jp@site": "p:ss w/rd"})
        size, path, digest = payloads(self.dir, (5000,))[0]
        url = "ftp://jp%%40site:p%%3Ass%%20w%%2Frd@localhost:%d/c/x" % (
            ftps.port)
        self.assertEqual(jp_importer.upload_ftp(url, path, self.host, 10),
                         size)
        self.assertEqual(ftps.logins, [("jp@site", "p:ss w/rd")])
        self.assertEqual(sha256_of(ftps.local("c/x")[0]), digest)
        with self.assertRaises(jp_importer.PermanentError) as cm:
            jp_importer.upload_ftp(url.replace("w%2Frd", "guess"), path,
                                   self.host, 10)
        self.assertIn("530", str(cm.exception))
        self.assertNotIn("guess", str(cm.exception))
        # By hand: the password never reaches the output.
        proc = run([sys.executable, JP_IMPORTER, "-c", self.pki.host_cert,
                    "-k", self.pki.host_key, "-C", self.pki.ca_dir,
                    "--upload", path, url.replace("/c/x", "/c/z")])
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("ftp://jp%40site:****@localhost", proc.stdout)
        self.assertNotIn("ss%20w", proc.stdout + proc.stderr)
        # No user in the URL: anonymous; the certificate is the credential.
        ftps.users = None
        jp_importer.upload_ftp(ftps.url("c/y"), path, self.host, 10)
        self.assertEqual(ftps.logins[-1][0], "anonymous")


class TestGridFTPUpload(unittest.TestCase):
    """The gsiftp:// transport against the real globus-gridftp-server:
    sizes from 0 bytes to 64 MiB with a proxy and a host certificate,
    byte-identical and read back by globus-url-copy; DCAU N, A with
    delegation against -encrypt-data, A with clear data, a client capped
    at TLS 1.2; killed, stalled and silent servers; forbidden
    destinations; untrusted servers and clients; the importer delivering
    through the JPPS fixture."""

    @classmethod
    def setUpClass(cls):
        cls.pki = pki()
        cls.peer = GridFTPPeer(cls.pki)
        try:
            cls.secure = GridFTPPeer(cls.pki, encrypt_data=True)
        except BaseException:
            cls.peer.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.peer.stop()
        cls.secure.stop()

    def setUp(self):
        jp_importer._KEPT.dcau_demands.clear()  # --dcau auto starts with N
        self.dir = tempfile.mkdtemp(prefix="jp-gsiftp-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.proxy = jp_importer.Credentials(self.pki.proxy, self.pki.proxy,
                                             self.pki.ca_dir)
        self.host = jp_importer.Credentials(self.pki.host_cert,
                                            self.pki.host_key,
                                            self.pki.ca_dir)

    def globus_env(self):
        if not shutil.which("globus-url-copy"):
            skip_or_fail("globus-url-copy is not installed")
        return dict(os.environ, X509_USER_PROXY=self.pki.proxy,
                    X509_CERT_DIR=self.pki.ca_dir)

    def test_sizes_with_proxy_and_host_certificate(self):
        for size, path, digest in payloads(self.dir, UPLOAD_SIZES):
            for name, creds in (("proxy", self.proxy), ("host", self.host)):
                target = "jpps/%s/%d/lb" % (name, size)
                sent = jp_importer.upload_gsiftp(self.peer.url(target), path,
                                                 creds, 30)
                self.assertEqual(sent, size)
                self.assertEqual(sha256_of(os.path.join(self.peer.root,
                                                        target)), digest)
        with open(self.peer.log, errors="replace") as f:
            log_text = f.read()
        self.assertIn("[CLIENT]: USER :globus-mapping:", log_text)
        self.assertIn("[CLIENT]: DCAU N", log_text)

    def test_reference_client_reads_back_what_we_wrote(self):
        env = self.globus_env()
        size, path, digest = payloads(self.dir, (3 * 1024 * 1024,))[0]
        jp_importer.upload_gsiftp(self.peer.url("cross/check"), path,
                                  self.proxy, 30)
        copy = os.path.join(self.dir, "copy")
        proc = run(["globus-url-copy", "-nodcau", self.peer.url(
            "cross/check"), "file://" + copy], env=env)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertEqual(sha256_of(copy), digest)

    def test_reference_client_uploads_with_a_proxy(self):
        env = self.globus_env()
        size, path, digest = payloads(self.dir, (5000,))[0]
        proc = run(["globus-url-copy", "-nodcau", "file://" + path,
                    self.peer.url("reference")], env=env)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertEqual(sha256_of(os.path.join(self.peer.root,
                                                "reference")), digest)

    def test_operator_upload_command(self):
        size, path, digest = payloads(self.dir, (5000,))[0]
        proc = run([sys.executable, JP_IMPORTER, "-c", self.pki.proxy,
                    "-C", self.pki.ca_dir, "--dcau", "A", "--upload", path,
                    self.peer.url("by/hand")])
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("uploaded 5000 bytes", proc.stdout)
        self.assertEqual(sha256_of(os.path.join(self.peer.root, "by/hand")),
                         digest)
        proc = run([sys.executable, JP_IMPORTER, "-c", self.pki.proxy,
                    "-C", self.pki.ca_dir, "--dcau", "N", "--upload", path,
                    self.secure.url("by/hand")])
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(len(proc.stderr.strip().splitlines()), 1,
                         proc.stderr)
        self.assertIn("--dcau is N", proc.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.secure.root,
                                                     "by/hand")))

    def fifo_upload(self, peer, target, dcau, timeout):
        """Upload from a FIFO fed by this test: 1 MB, then, once the
        returned event is set, more until the upload stops reading.
        Returns (event, thread, result) when part of the file arrived."""
        fifo = os.path.join(self.dir, "fifo-" + target.replace("/", "-"))
        os.mkfifo(fifo)
        more, result = threading.Event(), []

        def upload():
            try:
                result.append(jp_importer.upload_gsiftp(
                    peer.url(target), fifo, self.proxy, timeout, dcau=dcau))
            except jp_importer.Error as exc:
                result.append(exc)

        def feed():
            try:
                with open(fifo, "wb", buffering=0) as source:
                    source.write(b"x" * 1000000)
                    more.wait(TIMEOUT)
                    for _ in range(200):
                        source.write(b"x" * 1000000)
            except OSError:
                pass                    # EPIPE: the upload gave up
        threads = [threading.Thread(target=upload),
                   threading.Thread(target=feed)]
        for thread in threads:
            thread.daemon = True        # a hung upload fails, not hangs
            thread.start()
        partial = os.path.join(peer.root, target)
        wait_for(lambda: os.path.exists(partial) and
                 os.path.getsize(partial) > 0, what="a partial upload")
        return more, threads[0], result

    def test_dropped_transfer_is_transient_and_retried_whole(self):
        size, path, digest = payloads(self.dir, (3 * 1024 * 1024,))[0]
        for peer, dcau in ((self.peer, "N"), (self.secure, "A")):
            with self.subTest(dcau=dcau):
                target = "dropped-%s/lb" % dcau
                more, thread, result = self.fifo_upload(peer, target, dcau,
                                                        10)
                # The server process of this connection dies mid-transfer.
                for pid in peer.sessions():
                    os.kill(pid, signal.SIGKILL)
                more.set()
                thread.join(TIMEOUT)
                self.assertFalse(thread.is_alive())
                self.assertIsInstance(result[0], jp_importer.TransientError)
                self.assertEqual(jp_importer.upload_gsiftp(
                    peer.url(target), path, self.proxy, 10, dcau=dcau), size)
                self.assertEqual(sha256_of(os.path.join(peer.root, target)),
                                 digest)

    def test_server_stalled_mid_transfer_times_out(self):
        for peer, dcau in ((self.peer, "N"), (self.secure, "A")):
            with self.subTest(dcau=dcau):
                target = "stalled-%s" % dcau
                more, thread, result = self.fifo_upload(peer, target, dcau,
                                                        1)
                stopped = peer.sessions()
                self.assertTrue(stopped)
                for pid in stopped:
                    os.kill(pid, signal.SIGSTOP)
                started = time.monotonic()
                try:
                    more.set()
                    thread.join(TIMEOUT)
                finally:
                    for pid in stopped:
                        os.kill(pid, signal.SIGKILL)
                self.assertFalse(thread.is_alive())
                self.assertLess(time.monotonic() - started, 10)
                self.assertIsInstance(result[0], jp_importer.TransientError)
                self.assertIn("no answer within the time limit",
                              str(result[0]))

    def test_forbidden_destination_is_permanent(self):
        # The server's directory is root's: nobody cannot write there.
        payload = payloads(self.dir, (10,))[0][1]
        for peer, dcau in ((self.peer, "N"), (self.peer, "A"),
                           (self.secure, "auto")):
            with self.subTest(dcau=dcau):
                url = "gsiftp://localhost:%d%s/forbidden" % (peer.port,
                                                             peer.dir)
                with self.assertRaises(jp_importer.PermanentError) as cm:
                    jp_importer.upload_gsiftp(url, payload, self.proxy, 10,
                                              dcau=dcau)
                self.assertIn("Permission denied", str(cm.exception))
                self.assertFalse(os.path.exists(os.path.join(peer.dir,
                                                             "forbidden")))

    def test_stalled_server_times_out(self):
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        payload = payloads(self.dir, (10,))[0][1]
        started = time.monotonic()
        with self.assertRaises(jp_importer.TransientError) as cm:
            jp_importer.upload_gsiftp("gsiftp://localhost:%d/x"
                                      % listener.getsockname()[1], payload,
                                      self.proxy, 1)
        self.assertLess(time.monotonic() - started, 10)
        self.assertIn("no answer within the time limit", str(cm.exception))

    def test_untrusted_server_and_wrong_host_name(self):
        payload = payloads(self.dir, (10,))[0][1]
        untrusting = untrusting_credentials(self.pki, self.dir,
                                            self.pki.proxy, self.pki.proxy)
        with self.assertRaises(jp_importer.TransientError) as cm:
            jp_importer.upload_gsiftp(self.peer.url("untrusted"), payload,
                                      untrusting, 10)
        self.assertIn("server certificate not accepted", str(cm.exception))
        other = GridFTPPeer(self.pki, cert=other_host_cert(
            self.pki, "gridftp-other", "serverAuth,clientAuth"))
        self.addCleanup(other.stop)
        with self.assertRaises(jp_importer.TransientError) as cm:
            jp_importer.upload_gsiftp(other.url("wrong-name"), payload,
                                      self.proxy, 10)
        self.assertIn("server certificate not accepted", str(cm.exception))
        self.assertFalse(os.path.exists(os.path.join(self.peer.root,
                                                     "untrusted")))
        self.assertFalse(os.path.exists(os.path.join(other.root,
                                                     "wrong-name")))

    def test_rogue_client_is_refused(self):
        payload = payloads(self.dir, (10,))[0][1]
        rogue = jp_importer.Credentials(self.pki.rogue_cert,
                                        self.pki.rogue_key, self.pki.ca_dir)
        with self.assertRaises(jp_importer.PermanentError) as cm:
            jp_importer.upload_gsiftp(self.peer.url("rogue"), payload, rogue,
                                      10)
        self.assertIn("GSI authentication refused", str(cm.exception))
        self.assertFalse(os.path.exists(os.path.join(self.peer.root,
                                                     "rogue")))

    def test_dcau_a_with_delegation_against_encrypt_data(self):
        secure = self.secure
        start = len(secure.log_text())
        for size, path, digest in payloads(self.dir, UPLOAD_SIZES):
            for name, creds in (("proxy", self.proxy), ("host", self.host)):
                # auto: DCAU N is refused at PASV (534), then DCAU A.
                target = "enc/%s/%d" % (name, size)
                self.assertEqual(jp_importer.upload_gsiftp(
                    secure.url(target), path, creds, 30), size)
                self.assertEqual(sha256_of(os.path.join(secure.root,
                                                        target)), digest)
        log_text = secure.log_text()[start:]
        # Once refused, DCAU N is not tried again with that server.
        self.assertEqual(log_text.count("534 Data connection auth error"),
                         1)
        self.assertEqual(log_text.count("[CLIENT]: DCAU A"),
                         2 * len(UPLOAD_SIZES))
        self.assertEqual(log_text.count("[CLIENT]: PROT P"),
                         2 * len(UPLOAD_SIZES))
        self.assertEqual(log_text.count("[CLIENT]: QUIT"),
                         2 * len(UPLOAD_SIZES) + 1)
        payload = payloads(self.dir, (10,))[0][1]
        with self.assertRaises(jp_importer.TransientError) as cm:
            jp_importer.upload_gsiftp(secure.url("never"), payload,
                                      self.proxy, 10, dcau="N")
        self.assertIn("--dcau is N", str(cm.exception))

    def test_client_capped_at_tls_1_2(self):
        # Old nodes' OpenSSL: no 0x00 byte after the handshake, the
        # delegation flag follows the server's Finished at once.
        class TLS12Credentials(jp_importer.Credentials):
            def client_context(self):
                context = jp_importer.Credentials.client_context(self)
                if hasattr(ssl, "TLSVersion"):                  # novm
                    context.maximum_version = ssl.TLSVersion.TLSv1_2
                else:
                    context.options |= ssl.OP_NO_TLSv1_3
                return context
        for size, path, digest in payloads(self.dir, (0, 5000, 1 << 20)):
            for name, cert, key in (
                    ("proxy", self.pki.proxy, self.pki.proxy),
                    ("host", self.pki.host_cert, self.pki.host_key)):
                creds = TLS12Credentials(cert, key, self.pki.ca_dir)
                for peer, dcau, prot in ((self.peer, "N", "P"),
                                         (self.secure, "auto", "P"),
                                         (self.peer, "A", "C")):
                    target = "tls12/%s/%s%s/%d" % (name, dcau, prot, size)
                    self.assertEqual(jp_importer.upload_gsiftp(
                        peer.url(target), path, creds, 30, dcau=dcau,
                        prot=prot), size)
                    self.assertEqual(sha256_of(os.path.join(peer.root,
                                                            target)), digest)

    def test_dcau_a_with_clear_data(self):
        for size, path, digest in payloads(self.dir, UPLOAD_SIZES):
            for name, creds in (("proxy", self.proxy), ("host", self.host)):
                target = "clear/%s/%d" % (name, size)
                self.assertEqual(jp_importer.upload_gsiftp(
                    self.peer.url(target), path, creds, 30, dcau="A",
                    prot="C"), size)
                self.assertEqual(sha256_of(os.path.join(self.peer.root,
                                                        target)), digest)
        with open(self.peer.log, errors="replace") as f:
            self.assertIn("[CLIENT]: PROT C", f.read())

    def test_delegated_proxy_verifies_with_openssl(self):
        key = os.path.join(self.dir, "server.key")
        csr = os.path.join(self.dir, "server.csr")
        self.pki.openssl("req", "-new", "-newkey", "rsa:2048", "-nodes",
                         "-keyout", key, "-out", csr, "-outform", "DER",
                         "-subj", "/CN=ignored")
        with open(csr, "rb") as f:
            request = f.read()
        # With the proxy (PKCS#8 key) and with a PKCS#1 copy of the key.
        pkcs1 = os.path.join(self.dir, "proxy-key-pkcs1.pem")
        self.pki.openssl("rsa", "-in", self.pki.proxy, "-traditional",
                         "-out", pkcs1)
        with open(pkcs1) as f:
            self.assertIn("BEGIN RSA PRIVATE KEY", f.read())
        for key_file in (self.pki.proxy, pkcs1):
            proxy = jp_importer.sign_proxy_request(request, self.pki.proxy,
                                                   key_file)
            pem = os.path.join(self.dir, "delegated.pem")
            with open(pem, "w") as f:
                f.write(ssl.DER_cert_to_PEM_cert(proxy))
            chain = os.path.join(self.dir, "chain.pem")
            with open(chain, "w") as f:
                f.write(read_text(self.pki.proxy) + read_text(
                    self.pki.user_cert))
            env = dict(os.environ, OPENSSL_ALLOW_PROXY_CERTS="1")
            proc = run(["openssl", "verify", "-allow_proxy_certs", "-CApath",
                        self.pki.ca_dir, "-untrusted", chain, pem], env=env)
            self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
            text = self.pki.openssl("x509", "-in", pem, "-noout", "-text")
            if isinstance(text, bytes):
                text = text.decode()
            self.assertIn("Proxy Certificate Information", text)
            info = jp_importer.CertInfo(proxy)
            self.assertTrue(info.subject.startswith(self.pki.proxy_dn +
                                                    "/CN="))
            self.assertEqual(info.issuer, self.pki.proxy_dn)

    def test_importer_delivers_dumps_and_sandboxes(self):
        h = ImporterHarness(self, dest_base=self.peer.url("chain"),
                            local_root="/")
        path, archive, digests = queue_dump_and_sandbox(h, 100000, 20000)
        proc = h.once()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(sorted(h.jpps.committed.values()), digests)
        for destination in h.jpps.committed:
            self.assertTrue(destination.startswith("gsiftp://localhost:"))
        self.assertFalse(os.path.exists(path) or os.path.exists(archive))

    def test_importer_with_a_proxy_delivers_to_an_encrypt_data_server(self):
        h = ImporterHarness(self, dest_base=self.secure.url("chain"),
                            local_root="/")
        h.cert = h.key = self.pki.proxy
        _, path, _ = queue_dump(h, 2, size=300000)
        digest = sha256_of(path)
        start = len(self.secure.log_text())
        proc = h.once()                         # --dcau auto
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(list(h.jpps.committed.values()), [digest])
        self.assertIn("demands data channel protection", proc.stderr)
        log_text = self.secure.log_text()[start:]
        self.assertIn("[CLIENT]: DCAU A", log_text)
        self.assertIn("[CLIENT]: PROT P", log_text)
        self.assertFalse(os.path.exists(path))


class TestConnectionReuse(FTPSCase):
    """A worker keeps its upload control connection for the next upload
    to the same server (keep=True), and opens a new one whenever the
    kept one is gone, idle too long, of another credential or process."""

    def setUp(self):
        FTPSCase.setUp(self)
        jp_importer._KEPT.dcau_demands.clear()
        self.addCleanup(jp_importer.close_connections)
        self.payload = payloads(self.dir, (10000,))[0][1]

    def put(self, url, creds=None, **kw):
        return jp_importer.upload(url, self.payload, creds or self.host, 10,
                                  keep=True, **kw)

    def test_worker_uploads_share_one_connection_closed_at_exit(self):
        h = upload_harness(self)
        for n in range(5):
            queue_dump(h, n)
        proc = h.once("-D", "1")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(len(h.jpps.committed), 5)
        self.assertEqual((h.ftps.connections, len(h.ftps.logins),
                          h.ftps.stores), (1, 1, 5))
        self.assertEqual(h.ftps.commands.count("NOOP"), 4)
        self.assertEqual(h.ftps.commands[-1], "QUIT")   # Worker.close

    def test_vsftpd_one_connection_and_its_idle_timeout(self):
        peer = VsftpdPeer(self.pki, idle=1)
        self.addCleanup(peer.stop)
        for n in range(4):
            self.assertEqual(self.put(peer.url("r/%d" % n)), 10000)
        self.assertEqual(read_text(peer.log).count("OK LOGIN"), 1)
        self.assertEqual(sha256_of(peer.local("r/3")),
                         sha256_of(self.payload))
        # vsftpd ends the idle session; the next upload opens another.
        wait_for(lambda: not child_pids(peer.proc.pid),
                 what="vsftpd's idle timeout")
        self.assertEqual(self.put(peer.url("r/after")), 10000)
        self.assertEqual(read_text(peer.log).count("OK LOGIN"), 2)

    def test_server_that_closed_the_idle_connection(self):
        ftps = self.fixture(idle=0.3)
        self.put(ftps.url("i/1"))
        wait_for(lambda: ftps.idle_closed == 1, what="the fixture's 421")
        self.assertEqual(self.put(ftps.url("i/2")), 10000)
        self.assertEqual((ftps.connections, len(ftps.logins), ftps.stores),
                         (2, 2, 2))
        # A server that drops the connection at the check, without a
        # word: also a new connection, and the upload goes through.
        ftps.inject("stall", command="NOOP")
        ftps.release()
        self.assertEqual(self.put(ftps.url("i/3")), 10000)
        self.assertEqual((ftps.connections, ftps.stores), (3, 3))

    def test_idle_bound_credential_change_and_failures_close(self):
        ftps = self.fixture()
        self.put(ftps.url("c/1"))
        self.put(ftps.url("c/2"))
        self.assertEqual(ftps.connections, 1)
        self.addCleanup(setattr, jp_importer, "CONTROL_IDLE",
                        jp_importer.CONTROL_IDLE)
        jp_importer.CONTROL_IDLE = 0
        self.put(ftps.url("c/3"))               # idle > 0 s: a new one
        jp_importer.CONTROL_IDLE = 60
        self.assertEqual(ftps.connections, 2)
        self.assertEqual(ftps.commands.count("QUIT"), 1)
        self.host.load()                        # renewed (SIGHUP)
        self.put(ftps.url("c/4"))
        self.assertEqual((ftps.connections, ftps.commands.count("QUIT")),
                         (3, 2))
        proxy = jp_importer.Credentials(self.pki.proxy, self.pki.proxy,
                                        self.pki.ca_dir)
        self.put(ftps.url("c/5"), proxy)        # another credential
        self.assertEqual(ftps.connections, 4)
        ftps.inject("full")
        with self.assertRaises(jp_importer.TransientError):
            self.put(ftps.url("c/6"), proxy)    # the kept one, then closed
        self.assertEqual(ftps.connections, 4)
        self.put(ftps.url("c/7"), proxy)
        self.assertEqual(ftps.connections, 5)
        jp_importer.close_connections()
        self.assertEqual(ftps.commands.count("QUIT"), 5)

    def test_nothing_reused_across_processes(self):
        ftps = self.fixture()
        self.put(ftps.url("f/parent1"))
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                jp_importer.forget_connections()    # as Master.spawn
                self.put(ftps.url("f/child"))
                jp_importer.close_connections()
                status = 0
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        self.assertEqual(status, 0)
        self.assertEqual((ftps.connections, ftps.stores), (2, 2))
        self.put(ftps.url("f/parent2"))     # the parent's own, intact
        self.assertEqual((ftps.connections, ftps.stores), (2, 3))
        self.assertEqual(ftps.commands.count("QUIT"), 1)   # the child's

    def test_gridftp_reuse_idle_timeout_and_delegation(self):
        peer = GridFTPPeer(self.pki, extra=["-control-idle-timeout", "2"])
        self.addCleanup(peer.stop)
        proxy = jp_importer.Credentials(self.pki.proxy, self.pki.proxy,
                                        self.pki.ca_dir)

        def logins():
            # A session writes its log when it ends.
            wait_for(lambda: not peer.sessions(), what="sessions ended")
            return peer.log_text().count("[CLIENT]: USER")
        for n in range(3):
            self.assertEqual(self.put(peer.url("g/n%d" % n), proxy,
                                      dcau="N"), 10000)
        self.assertEqual(logins(), 1)       # ended by its idle timeout
        self.put(peer.url("g/n3"), proxy, dcau="N")
        # DCAU A: the kept connection carries a proxy made for this
        # host, reused while it has the transfer's limit plus 5 min left.
        for n in range(2):
            self.put(peer.url("g/a%d" % n), proxy, dcau="A",
                     delegate_to=["localhost"])
        with self.assertRaises(jp_importer.TransientError) as cm:
            self.put(peer.url("g/refused"), proxy, dcau="A", delegate_to=[])
        self.assertIn("--delegate-to", str(cm.exception))
        # 3 x 100 s + 300 s: more than the 600 s proxy has left.
        jp_importer.upload(peer.url("g/long"), self.payload, proxy, 100,
                           dcau="A", delegate_to=["localhost"], keep=True)
        jp_importer.close_connections()
        self.assertEqual(logins(), 4)
        self.assertEqual(sha256_of(os.path.join(peer.root, "g/long")),
                         sha256_of(self.payload))


class TestTransportLimits(FTPSCase):
    """What a hostile JPPS, FTP or GridFTP server cannot take: memory (a
    reply is bounded) and time (one deadline per JPPS call and per upload
    phase); what it says before TLS gives no message up; and a URL with
    control characters never reaches a control channel."""

    TIMEOUT = 2.0                   # the --timeout of these tests
    MARGIN = 1.5                    # what a deadline may run over
    FLOOD = 100 * 1024 * 1024       # what a flooding server offers at most

    def setUp(self):
        FTPSCase.setUp(self)
        self.stop = threading.Event()
        self.addCleanup(self.stop.set)
        self.payload = payloads(self.dir, (1000,))[0][1]

    def hostile(self, speak):
        """A server on 127.0.0.1 running speak(conn, send) for every
        connection; returns (port, stats): stats["sent"] counts the bytes
        send(conn, data) got out, stats["connections"] the clients."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        self.addCleanup(listener.close)
        stats = {"sent": 0, "connections": 0}

        def send(conn, data):
            conn.sendall(data)
            stats["sent"] += len(data)
            return stats["sent"]

        def session(conn):
            with conn:
                try:
                    speak(conn, send)
                except (OSError, ValueError):
                    pass                # the client hung up

        def serve():
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                stats["connections"] += 1
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
                threading.Thread(target=session, args=(conn,),
                                 daemon=True).start()
        threading.Thread(target=serve, daemon=True).start()
        return listener.getsockname()[1], stats

    def trickle(self, conn, send, data, interval=0.5):
        """`data`, over and over, one byte per `interval`: every read
        gets something in time, nothing ever ends (until TIMEOUT)."""
        give_up = time.monotonic() + TIMEOUT
        i = 0
        while time.monotonic() < give_up:
            send(conn, data[i % len(data):i % len(data) + 1])
            i += 1
            if self.stop.wait(interval):
                return

    def flood(self, line):
        """A server sending `line` over and over, FLOOD bytes at most."""
        def speak(conn, send):
            block = line * (65536 // len(line) + 1)
            while send(conn, block) < self.FLOOD and not self.stop.is_set():
                pass
        return self.hostile(speak)

    @staticmethod
    def request_of(tls):
        """A SOAP request read from `tls`; b"" when the client left."""
        data = b""
        while b"Envelope>" not in data:
            chunk = tls.recv(65536)
            if not chunk:
                return b""
            data += chunk
        return data

    def assert_in_time(self, error, call, *args, **kw):
        """call() raises `error` within the deadline; its text."""
        started = time.monotonic()
        with self.assertRaises(error) as cm:
            call(*args, **kw)
        took = time.monotonic() - started
        self.assertLess(took, self.TIMEOUT + self.MARGIN, cm.exception)
        return str(cm.exception)

    # -- memory: replies are bounded ---------------------------------------

    def test_reply_floods_are_cut_at_the_bound(self):
        for scheme in ("ftp", "gsiftp"):
            upload = getattr(jp_importer, "upload_" + scheme)
            # Short lines meet the line bound, long ones the size bound;
            # one endless line meets it too (GridFTP reads long lines).
            for line in (b"220-flood\r\n", b"220-" + b"x" * 4000 + b"\r\n",
                         b"x" * 4000):
                with self.subTest(scheme=scheme, line=line[:12]):
                    port, stats = self.flood(line)
                    with self.assertRaises(jp_importer.TransientError) as cm:
                        upload("%s://localhost:%d/x" % (scheme, port),
                               self.payload, self.host, 10)
                    if line.endswith(b"\n") or scheme == "gsiftp":
                        self.assertIn("reply longer than 1000 lines or 64 "
                                      "kB refused", str(cm.exception))
                    else:           # ftplib's own bound of a line
                        self.assertIn("got more than 8192 bytes",
                                      str(cm.exception))
                    # The client hung up after the bound: what the server
                    # got out is that and the socket buffers, no more.
                    self.assertLess(stats["sent"], 16 * 1024 * 1024)

    # -- time: one deadline per call and per phase -------------------------

    def test_jpps_trickling_handshake_or_answer_meets_the_call_deadline(self):
        def handshake(conn, send):
            # A TLS handshake record of 16 kB announced, a byte at a time
            # (the ssl module bounds one handshake by itself; the call's
            # deadline must hold across it all the same).
            conn.recv(65536)                            # ClientHello
            self.trickle(conn, send, b"\x16\x03\x03\x40\x00" + b"\x00" * 60)

        def answer(conn, send):
            with self.pki.server_context().wrap_socket(
                    conn, server_side=True) as tls:
                if self.request_of(tls):
                    self.trickle(tls, send,
                                 b"HTTP/1.1 200 OK\r\nX-Padding: .")
        for speak in (handshake, answer):
            with self.subTest(trickled=speak.__name__):
                port, stats = self.hostile(speak)
                client = jp_importer.JPPSClient(
                    "https://localhost:%d" % port, self.host,
                    timeout=self.TIMEOUT)
                self.addCleanup(client.close)
                error = self.assert_in_time(
                    jp_importer.TransientError, client.register_job,
                    "https://lb.example.org:9000/trickled", USER_SUBJECT)
                self.assertIn("no answer to RegisterJob within 2s", error)
                self.assertGreater(stats["sent"], 0)

    def test_jpps_answer_framings_and_head_bounds(self):
        ok = JPPSFixture.envelope("<jpelem:RegisterJobResponse>"
                                  "</jpelem:RegisterJobResponse>").encode()
        half = len(ok) // 2
        framings = {
            # (answer, the connection is kept for the next call)
            "chunked after 100 Continue": (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n%x;ext=1\r\n%s\r\n"
                b"%x\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n"
                % (half, ok[:half], len(ok) - half, ok[half:]), True),
            "HTTP/1.0 to the end": (b"HTTP/1.0 200 OK\r\n\r\n" + ok,
                                    False),
            "bytes after the answer": (
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%sjunk"
                % (len(ok), ok), False),
            "Connection: close": (
                b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(ok), ok), False),
            "headers beyond 64 kB": (
                b"HTTP/1.1 200 OK\r\n" + b"X-Pad: %s\r\n" % (b"x" * 1000)
                * 70 + b"Content-Length: %d\r\n\r\n%s" % (len(ok), ok),
                None),
            "Content-Length beyond the bound": (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n",
                None)}
        for name, (answer, kept) in sorted(framings.items()):
            with self.subTest(framing=name):
                def speak(conn, send, answer=answer, kept=kept):
                    with self.pki.server_context().wrap_socket(
                            conn, server_side=True) as tls:
                        for _ in range(2):
                            if not self.request_of(tls):
                                return
                            send(tls, answer)
                            if not kept:
                                return
                port, stats = self.hostile(speak)
                client = jp_importer.JPPSClient(
                    "https://localhost:%d" % port, self.host,
                    timeout=self.TIMEOUT)
                self.addCleanup(client.close)
                for n in range(2):
                    if kept is None:
                        error = self.assert_in_time(
                            jp_importer.TransientError, client.register_job,
                            "https://lb.example.org:9000/f%d" % n,
                            USER_SUBJECT)
                        self.assertIn("refused", error)
                        continue
                    client.register_job("https://lb.example.org:9000/f%d"
                                        % n, USER_SUBJECT)
                if kept is not None:
                    self.assertEqual(stats["connections"], 1 if kept else 2)

    def test_ftp_trickling_greeting_or_reply_meets_the_set_up_deadline(self):
        port, _ = self.hostile(lambda conn, send: self.trickle(
            conn, send, b"220-Welcome, slowly\r\n"))
        ftps = self.fixture()
        ftps.inject("trickle", command="TYPE", interval=0.5)
        for url in ("ftp://localhost:%d/x" % port, ftps.url("t/x")):
            with self.subTest(url=url):
                error = self.assert_in_time(
                    jp_importer.TransientError, jp_importer.upload_ftp, url,
                    self.payload, self.host, self.TIMEOUT)
                self.assertIn("no answer within the time limit (2s, "
                              "--timeout, for the greeting", error)
        self.assertIn("TYPE I", ftps.commands)
        self.assertNotIn("STOR /t/x", ftps.commands)

    def test_gsiftp_trickling_greeting_meets_the_set_up_deadline(self):
        port, _ = self.hostile(lambda conn, send: self.trickle(
            conn, send, b"220-GridFTP, slowly\r\n"))
        error = self.assert_in_time(
            jp_importer.TransientError, jp_importer.upload_gsiftp,
            "gsiftp://localhost:%d/x" % port, self.payload, self.host,
            self.TIMEOUT)
        self.assertIn("no answer within the time limit (2s", error)

    # -- what is said before TLS gives no message up -----------------------

    def test_refusals_before_tls_are_transient(self):
        def greeting_refused(conn, send):
            send(conn, b"530 Not now\r\n")
            conn.recv(1024)

        def auth_refused(conn, send):
            send(conn, b"220 GridFTP ready\r\n")
            conn.recv(1024)                             # AUTH GSSAPI
            send(conn, b"504 AUTH GSSAPI refused\r\n")
            conn.recv(1024)
        for scheme, speak, text in (
                ("ftp", greeting_refused, "530 Not now"),
                ("gsiftp", greeting_refused, "530 Not now"),
                ("gsiftp", auth_refused, "504 AUTH GSSAPI refused")):
            with self.subTest(scheme=scheme, speak=speak.__name__):
                port, _ = self.hostile(speak)
                upload = getattr(jp_importer, "upload_" + scheme)
                with self.assertRaises(jp_importer.TransientError) as cm:
                    upload("%s://localhost:%d/x" % (scheme, port),
                           self.payload, self.host, 10)
                self.assertIn("refused without TLS", str(cm.exception))
                self.assertIn(text, str(cm.exception))
        # A server without TLS: retried, with the option named.
        plain = self.fixture(tls=False)
        with self.assertRaises(jp_importer.TransientError) as cm:
            jp_importer.upload_ftp(plain.url("p"), self.payload, self.host,
                                   10)
        self.assertIn("--allow-plain-ftp", str(cm.exception))

    # -- URLs: control characters never reach a control channel ------------

    def test_control_characters_in_a_destination_are_refused(self):
        port, stats = self.hostile(lambda conn, send: send(
            conn, b"220 ready\r\n"))
        ftps = self.fixture()
        for scheme, where in (("gsiftp", "localhost:%d" % port),
                              ("ftp", "localhost:%d" % ftps.port)):
            for path in ("/a%0D%0ADELE%20b", "/a\r\nDELE b", "/a%00b",
                         "/a\tb"):
                url = "%s://%s%s" % (scheme, where, path)
                with self.subTest(url=url):
                    with self.assertRaises(jp_importer.PermanentError) as cm:
                        jp_importer.upload(url, self.payload, self.host, 10)
                    self.assertIn("control characters in the URL",
                                  str(cm.exception))
                    self.assertNotIn("\n", str(cm.exception))
        url = "gsiftp://local\nhost:%d/x" % port
        with self.assertRaises(jp_importer.PermanentError):
            jp_importer.upload(url, self.payload, self.host, 10)
        self.assertEqual((stats["connections"], ftps.connections), (0, 0))
        self.assertEqual(os.listdir(ftps.root), [])


# ---------------------------------------------------------------------------
# lb_dump_exporter: splitting, messages, rejects, crashes, full disks,
# terminals, hostile input
# ---------------------------------------------------------------------------

class TestDumpExporter(unittest.TestCase):
    """lb_dump_exporter on the samples and on large generated dumps,
    grouped and -x, with bad lines; gzip and stdin; safe file names and
    stores; and durability: kills and reruns, syncs before publication,
    a failed sync, file size limits, a pausing pipe."""


    def test_real_samples(self):
        for sample in ("sample_job_waiting", "sample_job_aborted",
                       "sample_job_cleared", "sample_job_tagged_done"):
            x = ExporterRun(self)
            path = os.path.join(SAMPLES, sample)
            with open(path, "rb") as f:
                data = f.read()
            jobid = re.search(rb'DG\.JOBID="([^"]*)"', data).group(1).decode()
            proc = x.run("-d", path)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertEqual(proc.stdout, "")
            lines = len(data.splitlines())
            self.assertIn("1 job(s) exported from %s" % path, proc.stderr)
            self.assertIn("%d lines, %d exported, 0 rejected" % (lines,
                                                                  lines),
                          proc.stderr)
            messages = x.assert_exported([(jp_importer.parse_jobid(jobid),
                                           [data])])
            fields, name, raw = list(messages.values())[0]
            self.assertEqual(raw, ("jobid  %s\nfile   %s" % (
                jp_importer.parse_jobid(jobid), fields["file"])).encode())
            self.assertRegex(name, r"^\d+_\d{6}\.localhost$")
            self.assertTrue(os.path.samefile(
                os.path.join(x.maildir, "new", name),
                os.path.join(x.maildir, "tmp", name)))
            self.assertEqual(stat.S_IMODE(os.stat(fields["file"]).st_mode),
                             0o640)

    def test_samples_are_what_make_samples_writes(self):
        x = ExporterRun(self)
        out = os.path.join(x.dir, "samples")
        proc = run([sys.executable, MAKE_SAMPLES, out])
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(sorted(os.listdir(out)), sorted(os.listdir(SAMPLES)))
        for name in os.listdir(out):
            with open(os.path.join(out, name), "rb") as f:
                written = f.read()
            with open(os.path.join(SAMPLES, name), "rb") as f:
                self.assertEqual(f.read(), written, name)

    def test_template_with_placeholder_jobids_is_rejected_line_by_line(self):
        x = ExporterRun(self)
        path = os.path.join(SAMPLES, "job_template")
        proc = x.run("-d", path)
        self.assertEqual(proc.returncode, 3)
        self.assertEqual(x.messages(), {})
        with open(path, "rb") as f:
            lines = f.read().splitlines()
        rejects = x.rejects().split(b"\n")
        self.assertEqual(rejects[0], b"# line 1: invalid jobid "
                         b"'_CHANGE_ME_JOBID_'")
        self.assertEqual(rejects[1::2][:len(lines)], lines)
        self.assertIn("%s:14: invalid jobid" % path, proc.stderr)

    def test_large_dump_grouped_and_interleaved_with_bad_lines(self):
        bad = [(b"DG.ARRIVED=1 DATE=2 HOST=\"h\" DG.EVNT=\"Running\"",
                "no DG.JOBID field"),
               (b'DG.JOBID="https://lb.example.org:9000/a b" X="1"',
                "invalid jobid"),
               (b'DG.JOBID="https://lb.example.org:9000/open X="1"',
                "unbalanced quotes"),
               (b'DG.JOBID="https://lb.example.org:9000/gen00001" X="\0"',
                "NUL byte"),
               (b'DG.JOBID="http://lb.example.org:9000/wrong"',
                "invalid jobid"),
               (b'DG.JOBID="https://lb.example.org:9000/x" '
                b'DG.JOBID="https://lb.example.org:9000/y"',
                "DG.JOBID given twice")]
        for interleave, options in ((1, ()), (7, ("-x",))):
            x = ExporterRun(self)
            table, data = generated_dump(3000, per_job=4,
                                         interleave=interleave)
            lines = data.splitlines(True)
            # Bad lines and blank lines between the good ones.
            for i, (line, _) in enumerate(bad):
                lines.insert(100 + i * 997, line + b"\n")
            lines.insert(50, b"\n")
            dump = x.dump_file(b"".join(lines))
            proc = x.run("-d", dump, *options)
            self.assertEqual(proc.returncode, 3, proc.stderr)
            x.assert_exported(table)
            rejects = x.rejects()
            for line, reason in bad:
                number = lines.index(line + b"\n") + 1
                self.assertIn(b"# line %d: %s" % (number, reason.encode()),
                              rejects)
                self.assertIn(b"\n" + line + b"\n", rejects)
                self.assertIn("%s:%d: %s" % (dump, number, reason),
                              proc.stderr)
            self.assertIn("%d lines, %d exported, %d rejected, 1 blank"
                          % (len(lines), len(lines) - len(bad) - 1,
                             len(bad)), proc.stderr)

    def test_regrouped_job_in_grouped_mode_gives_one_file(self):
        x = ExporterRun(self)
        a, b, c = ("https://lb.example.org:9000/%s" % n for n in "abc")
        order = [(a, 0), (a, 1), (b, 2), (c, 3), (a, 4), (b, 5)]
        # Many jobs in between, so that the first ones are published
        # before they reappear: the exporter must take them back.
        table, filler = generated_dump(2500, per_job=1)
        data = b"".join(ulm_line(j, n) for j, n in order[:4]) + filler + \
            b"".join(ulm_line(j, n) for j, n in order[4:])
        proc = x.run("-d", x.dump_file(data))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        table += [(j, [ulm_line(j, n) for jj, n in order if jj == j])
                  for j in (a, b, c)]
        x.assert_exported(table)

    def test_jpps_option_and_long_options(self):
        x = ExporterRun(self)
        table, data = generated_dump(2)
        dump = x.dump_file(data)
        proc = run([sys.executable, LB_DUMP_EXPORTER, "--dump", dump,
                    "--store", x.store, "--lbmaildir", x.maildir,
                    "--jpps", "jp.example.org:8901", "--quiet"])
        self.assertEqual((proc.returncode, proc.stderr), (0, ""))
        for fields, name, raw in x.assert_exported(table).values():
            self.assertEqual(raw, (
                "jobid  %s\nfile   %s\njpps   jp.example.org:8901"
                % (fields["jobid"], fields["file"])).encode())
        for args, text in ((["-j", "jp example:1"], "invalid JPPS"),
                           (["stray"], "unexpected argument"),
                           (["--dump"], "requires argument"),
                           (["-y"], "not recognized")):
            proc = x.run(*args)
            self.assertEqual(proc.returncode, 2)
            self.assertIn(text, proc.stderr)
            self.assertNotIn("Traceback", proc.stderr)

    def test_gzip_and_stdin(self):
        table, data = generated_dump(50, per_job=3, interleave=5)
        x = ExporterRun(self)
        proc = x.run("-x", "-q", "-d", x.dump_file(gzip.compress(data),
                                                   "dump.gz"))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        x.assert_exported(table)
        for args in ([], ["-d", "-"]):
            x = ExporterRun(self)
            proc = run(x.args("-x", *args), input=data,
                       universal_newlines=False)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertIn(b"from <stdin>", proc.stderr)
            x.assert_exported(table)

    def test_unsafe_unique_stays_in_the_store(self):
        x = ExporterRun(self)
        jobs = ["https://lb.example.org:9000/a/b/../../etc",
                "https://lb.example.org/.hidden", "https://[::1]:9000/" +
                "u" * 300]
        data = b"".join(ulm_line(j, n) for n, j in enumerate(jobs))
        proc = x.run("-d", x.dump_file(data))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        table = [(jp_importer.parse_jobid(j), [ulm_line(j, n)])
                 for n, j in enumerate(jobs)]
        messages = x.assert_exported(table)
        for fields, _, _ in messages.values():
            name = os.path.basename(fields["file"])
            self.assertFalse(name.startswith("."))
            self.assertLess(len(name), 200)

    def test_world_writable_store_gets_a_private_subdirectory(self):
        x = ExporterRun(self)
        shared = os.path.join(x.dir, "shared-tmp")
        os.mkdir(shared)
        os.chmod(shared, 0o1777)
        table, data = generated_dump(1)
        proc = run([sys.executable, LB_DUMP_EXPORTER, "-q", "-s", shared,
                    "-m", x.maildir, "-d", x.dump_file(data)])
        self.assertEqual(proc.returncode, 0, proc.stderr)
        private = os.path.join(shared, "lb_dump_exporter.%d" % os.geteuid())
        fields = list(x.messages().values())[0][0]
        self.assertEqual(os.path.dirname(fields["file"]), private)
        self.assertEqual(stat.S_IMODE(os.stat(private).st_mode), 0o750)
        os.chmod(x.store if os.path.exists(x.store) else x.dir, 0o700)
        group_writable = os.path.join(x.dir, "group")
        os.mkdir(group_writable)
        os.chmod(group_writable, 0o770)
        proc = run([sys.executable, LB_DUMP_EXPORTER, "-s", group_writable,
                    "-m", x.maildir, "-d", x.dump_file(data)])
        self.assertEqual(proc.returncode, 1)
        self.assertIn("writable by group or others", proc.stderr)

    def test_sigkill_then_rerun_publishes_each_job_once(self):
        x = ExporterRun(self)
        table, data = generated_dump(4000, per_job=3, pad=300)
        proc = subprocess.Popen(x.args("-q"), stdin=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        half = len(data) // 2
        proc.stdin.write(data[:half])
        proc.stdin.flush()
        # The exporter is waiting for the rest: kill it once it has
        # published at least one batch.
        wait_for(lambda: listing(x.maildir, "new"), what="a first batch")
        proc.kill()
        proc.wait(TIMEOUT)
        proc.stdin.close()
        proc.stderr.close()
        published = x.assert_exported(table, complete=False)
        self.assertTrue(0 < len(published) < len(table))
        rerun = run(x.args("-q"), input=data, universal_newlines=False)
        self.assertEqual(rerun.returncode, 0, rerun.stderr)
        after = x.assert_exported(table)
        for jobid, (_, name, _) in published.items():
            self.assertEqual(after[jobid][1], name)    # not announced twice
        # A third run of the same dump has nothing to do.
        again = run(x.args(), input=data, universal_newlines=False)
        self.assertEqual(again.returncode, 0)
        self.assertIn(b"exported completely before", again.stderr)
        self.assertEqual(len(listing(x.maildir, "new")), len(table))

    def traced_export(self, x, dump, fail_sync=None):
        """Run an export in this process, checking the durability order:
        each message is written after a sync, begun after its job's file
        was complete, returned; each is linked into new/ after a sync
        begun after it and its journal entry were written returned.
        `fail_sync`: the number of the sync that fails with EIO.

        A sync records what it covers when it begins (for a syncfs, all
        of the store and the maildir; else the paths named), and makes
        it durable when it returns: in the exporter's thread, alone."""
        durable_files, durable_entries, calls = {}, set(), [0]
        real_sync = lb_dump_exporter.sync_paths

        def covered(paths):
            if len(paths) >= lb_dump_exporter.SYNC_EACH_BELOW:
                paths = [x.store, os.path.join(x.maildir, "tmp"),
                         os.path.join(x.maildir, "new")]
                paths += [os.path.join(d, n) for d in paths
                          for n in os.listdir(d)]
            files, entries = {}, set()
            for path in map(os.path.normpath, paths):
                if os.path.isdir(path):
                    entries.update((path, n) for n in os.listdir(path))
                else:
                    files[path] = os.path.getsize(path)
            return files, entries

        def traced_sync(paths):
            calls[0] += 1
            files, entries = covered(paths)
            if calls[0] == fail_sync:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real_sync(paths)
            durable_files.update(files)
            durable_entries.update(entries)

        def assert_durable(path):
            path = os.path.normpath(path)
            self.assertIn(os.path.split(path), durable_entries, path)
            self.assertEqual(durable_files.get(path),
                             os.path.getsize(path), path)

        exporter_class = lb_dump_exporter.Exporter
        real_write, real_announce = (exporter_class._write_message,
                                     exporter_class._announce)

        def traced_write(exporter, job):
            assert_durable(job.path)
            return real_write(exporter, job)

        def traced_announce(exporter, jobs):
            if not jobs:
                return real_announce(exporter, jobs)
            journal = os.path.normpath(exporter.journal_path())
            assert_durable(journal)
            with open(journal) as f:
                entries = f.read(durable_files[journal])
            for job in jobs:
                assert_durable(job.path)
                assert_durable(os.path.join(x.maildir, "tmp", job.message))
                self.assertIn(job.message + "\t", entries)
            return real_announce(exporter, jobs)
        patches = [(lb_dump_exporter, "sync_paths", real_sync, traced_sync),
                   (exporter_class, "_write_message", real_write,
                    traced_write),
                   (exporter_class, "_announce", real_announce,
                    traced_announce)]
        stderr = io.StringIO()
        try:
            for owner, name, _, traced in patches:
                setattr(owner, name, traced)
            status = lb_dump_exporter.export(lb_dump_exporter.parse_args(
                ["-q", "-d", dump, "-s", x.store, "-m", x.maildir]), stderr)
        except lb_dump_exporter.Error as exc:
            return None, str(exc)
        finally:
            # No sync outlives the run: its end waits for the disk.
            self.assertEqual([t for t in threading.enumerate()
                              if t.name == "sync"], [])
            for owner, name, real, _ in patches:
                setattr(owner, name, real)
        if status == 0:
            # Every link of the run is on disk when the run ends.
            for name in os.listdir(os.path.join(x.maildir, "new")):
                self.assertIn((os.path.join(x.maildir, "new"), name),
                              durable_entries)
        return status, stderr.getvalue()

    def test_publication_waits_for_the_disk(self):
        # Three batches in flight (the exporter syncs the next batch's
        # files while splitting on), and jobs that reappear while their
        # batch is at each step: files syncing, messages syncing,
        # published.
        x = ExporterRun(self)
        table, _ = generated_dump(2600, per_job=2, pad=50)
        extra = {}
        order = []
        for index, (jobid, lines) in enumerate(table):
            order.append(list(lines))
            for late, after in ((5, 1001), (6, 2005), (7, 2599)):
                if index == after:
                    line = ulm_line(table[late][0], 900000 + late, 50)
                    extra.setdefault(late, []).append(line)
                    order.append([line])
        for late, lines in extra.items():
            table[late][1].extend(lines)
        dump = x.dump_file(b"".join(b"".join(lines) for lines in order))
        status, err = self.traced_export(x, dump)
        self.assertEqual((status, err), (0, ""))
        x.assert_exported(table)

    def test_a_failed_sync_publishes_nothing_unsynced(self):
        # 3,500 jobs: 4 batches, 6 syncs; the last one is of new/ alone.
        for failing in (1, 2, 3, 5, 6):
            x = ExporterRun(self)
            table, data = generated_dump(3500, per_job=2, pad=20)
            dump = x.dump_file(data)
            status, err = self.traced_export(x, dump, fail_sync=failing)
            self.assertIsNone(status, failing)
            self.assertEqual(err, "cannot make the batch durable: %s"
                             % os.strerror(errno.EIO))
            published = x.assert_exported(table, complete=False)
            if failing < 6:
                self.assertLess(len(published), len(table))
            proc = x.run("-q", "-d", dump)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            x.assert_exported(table)

    def test_a_big_batch_syncs_its_filesystems_alone(self):
        # One syncfs per filesystem of the batch, never sync(2) (every
        # filesystem of the machine, NFS too); sync(2) only where libc or
        # the kernel has no syncfs.
        work = tempfile.mkdtemp(prefix="jp-syncfs-test-")
        self.addCleanup(shutil.rmtree, work, True)
        other = tempfile.mkdtemp(dir="/dev/shm")       # tmpfs: another fs
        self.addCleanup(shutil.rmtree, other, True)
        paths = [work, other]
        for i in range(lb_dump_exporter.SYNC_EACH_BELOW):
            paths.append(os.path.join(work if i % 2 else other, str(i)))
            open(paths[-1], "wb").close()
        fd = os.open(work, os.O_RDONLY)
        try:
            self.assertEqual(lb_dump_exporter.find_syncfs()[0](fd), 0)
        finally:
            os.close(fd)                              # the real one works
        synced, whole = [], []

        def syncfs(fd):
            synced.append(os.fstat(fd).st_dev)
            return 0
        self.addCleanup(setattr, lb_dump_exporter, "SYNCFS",
                        lb_dump_exporter.SYNCFS)
        self.addCleanup(setattr, os, "sync", os.sync)
        os.sync = lambda: whole.append(1)
        lb_dump_exporter.SYNCFS = (syncfs, lambda: 0)
        lb_dump_exporter.sync_paths(paths)
        self.assertEqual(sorted(synced), sorted(
            set([os.stat(work).st_dev, os.stat(other).st_dev])))
        self.assertEqual(whole, [])
        lb_dump_exporter.SYNCFS = (lambda fd: -1, lambda: errno.ENOSYS)
        lb_dump_exporter.sync_paths(paths)
        self.assertEqual(whole, [1])
        self.assertIs(lb_dump_exporter.SYNCFS, False)
        lb_dump_exporter.sync_paths(paths)
        self.assertEqual(whole, [1, 1])

    def test_a_pausing_pipe_does_not_hold_back_finished_jobs(self):
        # A dump written into a pipe that then pauses (the pipe stays
        # open): the jobs finished so far are announced within a few
        # seconds; the last one may still grow and waits for the end.
        x = ExporterRun(self)
        table, data = generated_dump(300, per_job=2, pad=2000)
        self.assertGreater(len(data), 1 << 20)    # more than the dump id
        proc = subprocess.Popen(x.args("-q"), stdin=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        self.addCleanup(proc.kill)
        proc.stdin.write(data)
        proc.stdin.flush()
        wait_for(lambda: len(listing(x.maildir, "new")) == len(table) - 1,
                 what="every job but the last announced")
        self.assertIsNone(proc.poll())
        self.assertNotIn(table[-1][0], x.messages())
        proc.stdin.close()
        self.assertEqual(proc.wait(TIMEOUT), 0, proc.stderr.read())
        proc.stderr.close()
        x.assert_exported(table)

    def finished_run(self):
        """A finished export of 20 jobs: (the ExporterRun, the table, the
        dump, the journal's path, its lines)."""
        x = ExporterRun(self)
        table, data = generated_dump(20, per_job=2, pad=100)
        dump = x.dump_file(data)
        self.assertEqual(x.run("-q", "-d", dump).returncode, 0)
        journal = [os.path.join(x.store, n) for n in os.listdir(x.store)
                   if n.endswith(".journal")][0]
        with open(journal) as f:
            entries = f.read().splitlines()
        self.assertEqual(entries[-1], "complete")
        return x, table, dump, journal, entries

    def test_rerun_killed_in_its_recovery_loses_nothing(self):
        # A cut run left five journaled messages unpublished; the rerun
        # voided them in the journal, removed two of their master copies
        # and was killed.  A missing master otherwise means "delivered":
        # the next rerun must still export those jobs.
        x, table, dump, journal, entries = self.finished_run()
        entries = entries[:-1]                            # not complete
        cut = [entry.split("\t")[0] for entry in entries[-5:]]
        with open(journal, "w") as f:
            f.write("".join(entry + "\n" for entry in entries))
            f.write("".join("void %s\n" % message for message in cut))
        for message in cut:
            os.unlink(os.path.join(x.maildir, "new", message))
        for message in cut[:2]:
            os.unlink(os.path.join(x.maildir, "tmp", message))
        proc = x.run("-q", "-d", dump)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        messages = x.assert_exported(table)
        self.assertFalse(set(cut) & set(name for _, name, _ in
                                         messages.values()))

    def test_message_written_but_not_journaled_is_taken_back(self):
        # A kill between writing a batch's messages in tmp/ and journaling
        # them: the rerun must remove them, or the importer would queue
        # them after a day as second uploads of their jobs.
        x, table, dump, journal, entries = self.finished_run()
        cut = [entry.split("\t")[0] for entry in entries[-6:-1]]
        with open(journal, "w") as f:
            f.write("".join(entry + "\n" for entry in entries[:-6]))
        for message in cut:
            os.unlink(os.path.join(x.maildir, "new", message))
        # Killed between creating a message and writing it: an empty
        # file named after the batch began.  Another writer's empty file
        # named before it is not the exporter's to remove.
        batch = [e for e in entries if e.startswith("batch ")][-1]
        sec, usec = map(int, batch.split()[1].split("_"))
        empty = "%d_%06d.localhost" % (sec, usec + 1)
        foreign = "%d_%06d.localhost" % (sec - 1, usec)
        for name in (empty, foreign):
            open(os.path.join(x.maildir, "tmp", name), "wb").close()
        proc = x.run("-q", "-d", dump)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        os.unlink(os.path.join(x.maildir, "tmp", foreign))
        messages = x.assert_exported(table)
        for message in cut + [empty]:
            self.assertFalse(os.path.exists(os.path.join(
                x.maildir, "tmp", message)))
        self.assertFalse(set(cut) & set(name for _, name, _ in
                                         messages.values()))

    def test_file_size_limit_is_a_clear_error_and_rerun_completes(self):
        import resource
        x = ExporterRun(self)
        table, data = generated_dump(30, per_job=2, pad=200)
        big = "https://lb.example.org:9000/big"
        table.insert(20, (big, [ulm_line(big, 1, pad=300000),
                                ulm_line(big, 2, pad=300000)]))
        data = b"".join(b"".join(lines) for _, lines in table)
        dump = x.dump_file(data)

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (400000, 400000))
        proc = run(x.args("-q", "-d", dump), preexec_fn=limit)
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(len(proc.stderr.splitlines()), 1, proc.stderr)
        self.assertIn("File too large", proc.stderr)
        self.assertNotIn(big, x.messages())
        x.assert_exported(table, complete=False)
        self.assertFalse([n for n in os.listdir(x.store)
                          if n.startswith("big.")])
        proc = run(x.args("-q", "-d", dump))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        x.assert_exported(table)

    def test_mixed_mode_job_spelled_two_ways_and_parked_twice(self):
        # -x routes a line by its DG.JOBID field to the open job; a job
        # written with and without its port has two such fields, and
        # neither may outlive the job's parking (its lines would go to a
        # forgotten buffer).  More jobs than -x keeps open: each job is
        # parked after its first two lines (one spelling each), and again
        # after its third (with the port) before its fourth (without).
        x = ExporterRun(self)
        jobs = lb_dump_exporter.MAX_OPEN_FILES + 50
        table, _ = generated_dump(jobs, per_job=4, pad=20)
        for _, lines in table:
            for i in (1, 3):
                lines[i] = lines[i].replace(b".org:9000/", b".org/")
        dump = x.dump_file(b"".join(
            [lines[0] + lines[1] for _, lines in table] +
            [lines[i] for i in (2, 3) for _, lines in table]))
        proc = x.run("-q", "-x", "-d", dump)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        x.assert_exported(table)

    def test_file_size_limit_in_mixed_mode_leaves_no_parked_file(self):
        import resource
        x = ExporterRun(self)
        # More jobs than -x keeps open: most are parked (known by their
        # files alone) when the big job fails.
        jobs = lb_dump_exporter.MAX_OPEN_FILES + 100
        table, data = generated_dump(jobs, per_job=2, interleave=jobs,
                                     pad=200)
        big = "https://lb.example.org:9000/big"
        table.append((big, [ulm_line(big, 1, pad=300000),
                            ulm_line(big, 2, pad=300000)]))
        dump = x.dump_file(data + b"".join(table[-1][1]))

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (400000, 400000))
        proc = run(x.args("-q", "-x", "-d", dump), preexec_fn=limit)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("File too large", proc.stderr)
        self.assertEqual(x.messages(), {})
        self.assertEqual([n for n in os.listdir(x.store)
                          if not n.startswith((".", "lb_dump_exporter."))],
                         [])
        proc = run(x.args("-q", "-x", "-d", dump))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        x.assert_exported(table)


def run_on_terminal(cmd, stdin=None, timeout=TIMEOUT, **kwargs):
    """Run `cmd` as from an admin's shell: a pseudo-terminal is its
    controlling terminal and its stdin (unless `stdin` is given), stdout
    and stderr.  (exit status, all it wrote, as text)."""
    master, slave = pty.openpty()

    def take_terminal():
        fcntl.ioctl(0 if stdin is None else 1, termios.TIOCSCTTY, 0)
    try:
        proc = subprocess.Popen(
            cmd, stdin=slave if stdin is None else stdin, stdout=slave,
            stderr=slave, start_new_session=True, preexec_fn=take_terminal,
            **kwargs)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("%s: no end after %.0fs; it wrote %r"
                                     % (cmd, timeout, b"".join(chunks)))
            if not select.select([master], [], [], left)[0]:
                continue
            try:
                data = os.read(master, 65536)
            except OSError as exc:
                # Linux: EIO once no descriptor of the terminal is open.
                if exc.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            chunks.append(data)
        status = proc.wait(max(deadline - time.monotonic(), 1))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return status, b"".join(chunks).decode("utf-8", "replace")


def run_from_cron(cmd, **kwargs):
    """Run `cmd` as cron does: no terminal, stdin /dev/null, output into
    pipes; the CompletedProcess with bytes (a "\\r" stays one)."""
    return run(cmd, stdin=subprocess.DEVNULL, universal_newlines=False,
               **kwargs)


# The exporter's progress line, on a terminal only, and its summary line.
PROGRESS_RE = r"\r\d+ MB( of \d+ MB \(\d+%%\))?, %d jobs, \d+ MB/s "
SUMMARY = "%d job(s) exported from %s in "


class TestOnATerminal(unittest.TestCase):
    """Each tool as an admin runs it on a terminal (its progress display
    and all), and as cron runs it (no terminal): no traceback either way."""

    def assert_clean(self, status, output, expected=0):
        self.assertEqual(status, expected, output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("Exception ignored", output)

    def test_exporter_on_a_terminal(self):
        table, data = generated_dump(2000, per_job=3)
        for compress, from_stdin in ((False, False), (True, False),
                                     (False, True)):
            x = ExporterRun(self)
            dump = x.dump_file(gzip.compress(data) if compress else data)
            if from_stdin:
                with open(dump, "rb") as f:
                    status, output = run_on_terminal(x.args(), stdin=f)
                source = "<stdin>"
            else:
                status, output = run_on_terminal(x.args("-d", dump))
                source = dump
            self.assert_clean(status, output)
            self.assertRegex(output, PROGRESS_RE % len(table))
            if not from_stdin:
                self.assertRegex(output, r" of \d+ MB \(100%\), ")
            self.assertIn(SUMMARY % (len(table), source), output)
            x.assert_exported(table)

    def test_exporter_from_cron(self):
        table, data = generated_dump(2000, per_job=3)
        x = ExporterRun(self)
        dump = x.dump_file(data)
        proc = run_from_cron(x.args("-d", dump))
        self.assert_clean(proc.returncode, proc.stderr.decode())
        self.assertEqual(proc.stdout, b"")
        self.assertNotIn(b"\r", proc.stderr)            # no progress line
        self.assertIn((SUMMARY % (len(table), dump)).encode(), proc.stderr)
        x.assert_exported(table)
        # -q on a terminal: neither progress nor summary.
        x = ExporterRun(self)
        status, output = run_on_terminal(x.args("-q", "-d", dump))
        self.assertEqual((status, output), (0, ""))
        x.assert_exported(table)

    def test_upload_files_on_a_terminal_and_from_cron(self):
        work = tempfile.mkdtemp(prefix="jp-upload-files-test-")
        self.addCleanup(shutil.rmtree, work, True)
        payload, proxy = (os.path.join(work, name) for name in
                          ("stdout.txt", "x509up_u500"))
        for path in (payload, proxy):
            with open(path, "wb") as f:
                f.write(b"Hello, grid\n")
        for number, how in enumerate(("terminal", "cron")):
            maildir = os.path.join(work, "jpsandbox%d" % number)
            cmd = [sys.executable, JP_UPLOAD_FILES, "-j",
                   "https://lb.example.org/job%d" % number, "-m", maildir,
                   "-p", proxy, payload]
            if how == "terminal":
                status, output = run_on_terminal(cmd)
            else:
                proc = run_from_cron(cmd)
                status, output = proc.returncode, (proc.stdout +
                                                   proc.stderr).decode()
            self.assertEqual((status, output), (0, ""), how)    # silent
            self.assertEqual(len(listing(maildir, "new")), 1, how)
            status, output = run_on_terminal(
                [sys.executable, JP_UPLOAD_FILES, "--help"])
            self.assert_clean(status, output)
            self.assertIn("Usage: jp_upload_files", output)

    def test_importer_on_a_terminal_and_from_cron(self):
        h = ImporterHarness(self)
        maildirs = ["-r", h.reg, "-d", h.dump, "-s", h.sandbox]
        for number, how in enumerate(("terminal", "cron")):
            drop_message(h.reg, registration(number))
            for args, text in ((["--help"], "Usage:"),
                               (["--version"], "jp_importer "),
                               (["--status"] + maildirs,
                                "registration maildir %s\n  new 1 " % h.reg),
                               (["--once"] + h.args(),
                                "lb.example.org:9000/job%05d" % number)):
                cmd = [sys.executable, JP_IMPORTER] + args
                if how == "terminal":
                    status, output = run_on_terminal(cmd)
                    output = output.replace("\r\n", "\n")
                else:
                    proc = run_from_cron(cmd)
                    status, output = proc.returncode, (
                        proc.stdout + proc.stderr).decode()
                self.assert_clean(status, output)
                self.assertIn(text, output, (how, args))
            self.assertEqual(listing(h.reg, "new"), [])
        self.assertEqual(len(h.jpps.ops("RegisterJob", "ok")), 2)

    def test_importer_output_into_a_pipe_closed_early(self):
        # `jp_importer.py --status | head -1` with more to say than a pipe
        # holds: the reader is gone before the end.  No "Broken pipe", no
        # traceback; 141, as the shell says of a command killed by SIGPIPE.
        h = ImporterHarness(self)
        for n in range(3000):
            with open(os.path.join(h.reg, "undeliverable", "u%05d" % n),
                      "wb") as f:
                f.write(registration(n))
        proc = subprocess.Popen(
            [sys.executable, JP_IMPORTER, "--status", "-r", h.reg, "-d",
             h.dump, "-s", h.sandbox], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertTrue(proc.stdout.readline().decode().startswith(
            "daemon: "))
        proc.stdout.close()
        errors = proc.stderr.read().decode()
        proc.stderr.close()
        self.assertEqual((proc.wait(TIMEOUT), errors), (141, ""))
        # And a reader gone before the first byte (the output is written
        # when the run ends).
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            proc = run([sys.executable, JP_IMPORTER, "--version"],
                       stdout=write_end, stdin=subprocess.DEVNULL)
        finally:
            os.close(write_end)
        self.assertEqual((proc.returncode, proc.stderr), (141, ""))


# Prints the largest resident size (KiB) of the command it runs, its only
# child, when that ends; exits with its status.
MAXRSS_PROBE = ("import resource, subprocess, sys\n"
                "status = subprocess.call(sys.argv[1:])\n"
                "sys.stdout.write('%d' % resource.getrusage("
                "resource.RUSAGE_CHILDREN).ru_maxrss)\n"
                "sys.exit(status)\n")


class TestExporterHostileInput(unittest.TestCase):
    """Lines made to hurt the exporter (backtracking, size) and links
    planted in a shared store: a clear reason, never a hang, a blow-up
    or a write through the link."""

    def test_hostile_lines_are_rejected_in_linear_time(self):
        x = ExporterRun(self)
        table, data = generated_dump(20, per_job=3)
        lines = data.splitlines(True)
        own = table[5][0].encode()
        head = b'DG.JOBID="https://lb.example.org:9000/hostile" '
        limit = lb_dump_exporter.MAX_LINE
        hostile = [
            (head + b"a=" * 60 + b'b\\"', "unbalanced quotes"),
            # Of the job being written: checked on its fast path first.
            (b'DG.JOBID="' + own + b'" ' + b"a=" * 60 + b'b\\"',
             "unbalanced quotes"),
            (head + b"a=" * 100000 + b'b\\"', "unbalanced quotes"),
            (head + b"a=b" * 100000 + b'\\"', "unbalanced quotes"),
            (head + b'a="\\"' * 50000, "unbalanced quotes"),
            (head + b"a=\\" * 100000 + b'"', "unbalanced quotes"),
            (head + b'a="x"' * 100000 + b'\\"', "unbalanced quotes"),
            # As long as a line may be, and one well over it.
            (head + b"a=" * ((limit - len(head)) // 2 - 2) + b'b\\"',
             "unbalanced quotes"),
            (head + b"a=" * (5 * 1024 * 1024) + b'b\\"',
             "line longer than %d bytes" % limit)]
        for i, (line, _) in enumerate(hostile):
            # Each between good lines; the second inside job 5's.
            at = lines.index(table[5][1][1]) if i == 1 else 6 * i + 2
            lines.insert(at, line + b"\n")
        expected = [(lines.index(line + b"\n") + 1, reason)
                    for line, reason in hostile]
        dump = x.dump_file(b"".join(lines))
        try:
            # A normal run of this takes well under a second.
            proc = x.run("-d", dump, timeout=60)
        except subprocess.TimeoutExpired:
            self.fail("no end after 60s on hostile lines")
        self.assertEqual(proc.returncode, 3, proc.stderr[-2000:])
        self.assertEqual(proc.stderr.splitlines()[:-1],
                         ["%s:%d: %s" % (dump, number, reason)
                          for number, reason in sorted(expected)])
        rejects = x.rejects()
        for (line, _), (number, reason) in zip(hostile, expected):
            self.assertIn(b"# line %d: %s\n%s\n" % (number, reason.encode(),
                                                     line), rejects)
        x.assert_exported(table)
        # What the line check takes as balanced: escapes only inside
        # quotes, where they may hide a quote.
        quotes_ok = lb_dump_exporter.Exporter._quotes_ok
        for line, ok in ((b'A="x\\"y" B="\\\\"', True),
                         (b'A=x\\y B="\\"" C=\\', True),
                         (b'A="x\\" B=1', False), (b'A="\\\\\\"', False),
                         (b'A=x\\"y B="z"', False), (b'A="x\\', False)):
            self.assertEqual(quotes_ok(line), ok, line)

    def test_a_huge_line_costs_no_huge_memory(self):
        # A line of 128 MiB in a 1 MB gzip: rejected whole (the rejects
        # file keeps it byte for byte), in about the memory of a normal
        # run, not in 128 MiB more.
        size = 128 * 1024 * 1024
        table, data = generated_dump(20, per_job=3)
        middle = data.index(b"\n", len(data) // 2) + 1
        head = b'DG.JOBID="https://lb.example.org:9000/huge" X="'
        huge = head + b"v" * size + b'"'
        compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
        packed = [compressor.compress(data[:middle]), compressor.compress(
            head)]
        block = b"v" * (1024 * 1024)
        for _ in range(size // len(block)):
            packed.append(compressor.compress(block))
        packed += [compressor.compress(b'"\n' + data[middle:]),
                   compressor.flush()]
        peaks = []
        for dump in (data, b"".join(packed)):
            x = ExporterRun(self)
            path = x.dump_file(dump)
            proc = run([sys.executable, "-c", MAXRSS_PROBE] +
                       x.args("-d", path))
            peaks.append(int(proc.stdout) // 1024)
            x.assert_exported(table)
        self.assertEqual(proc.returncode, 3, proc.stderr)
        number = data[:middle].count(b"\n") + 1
        reason = "line longer than %d bytes" % lb_dump_exporter.MAX_LINE
        self.assertIn("%s:%d: %s\n" % (path, number, reason), proc.stderr)
        rejects = os.path.join(x.store, [n for n in os.listdir(x.store)
                                         if n.endswith(".rejects")][0])
        self.assertEqual(sha256_of(rejects), hashlib.sha256(
            b"# line %d: %s\n%s\n" % (number, reason.encode(), huge)
        ).hexdigest())
        self.assertLess(peaks[1], peaks[0] + 48, "MiB at most: %s" % peaks)

    def plant(self, x, dump, name, target):
        """A symbolic link at STORE/name, '%s' the dump id of `dump`."""
        with open(dump, "rb") as f:
            dump_id = hashlib.sha256(f.read(
                lb_dump_exporter.FINGERPRINT_BYTES)).hexdigest()[:12]
        os.makedirs(x.store, 0o750, exist_ok=True)
        link = os.path.join(x.store, name % dump_id)
        os.symlink(target, link)
        return link

    def test_symlinks_planted_in_the_store_are_not_followed(self):
        victim_data = b"the file the link points at\n"
        table, data = generated_dump(30, per_job=3, interleave=3)
        planted = table[4][0].rsplit("/", 1)[1] + ".%s"
        for options in ((), ("-x",)):
            x = ExporterRun(self)
            victim = x.dump_file(victim_data, "victim")
            dump = x.dump_file(data)
            links = [self.plant(x, dump, planted, victim),
                     self.plant(x, dump, "intruder.%s", victim)]
            proc = x.run("-d", dump, *options)
            self.assertEqual(proc.returncode, 3, proc.stderr)
            with open(victim, "rb") as f:
                self.assertEqual(f.read(), victim_data, options)
            # The job at the planted name is rejected, line by line; the
            # link at no job's name is not published (-x publishes the
            # store's files of the dump).
            reason = "%s is a symbolic link: not followed" % links[0]
            self.assertEqual(proc.stderr.count(reason), 3, proc.stderr)
            self.assertNotIn("Traceback", proc.stderr)
            for link in links:
                self.assertTrue(os.path.islink(link))
                os.unlink(link)
            x.assert_exported(table[:4] + table[5:])
        # The journal: the run stops at once, a clear line.
        x = ExporterRun(self)
        victim = x.dump_file(victim_data, "victim")
        dump = x.dump_file(data)
        for target in (victim, victim + ".new"):
            link = self.plant(x, dump, ".lb_dump_exporter.%s.journal",
                              target)
            proc = x.run("-d", dump)
            self.assertEqual(proc.returncode, 1)
            self.assertRegex(proc.stderr, r"^lb_dump_exporter: cannot "
                             r"(recover the cut run of|open the journal) "
                             r"%s: .*symbolic links\n$" % re.escape(link))
            self.assertEqual(x.messages(), {})
            os.unlink(link)
        self.assertEqual(read_text(victim).encode(), victim_data)
        self.assertFalse(os.path.exists(victim + ".new"))

    def test_rejects_file_planted_during_the_run_is_not_followed(self):
        # The run removes a rejects file left at its name when it begins;
        # one planted after that is refused, not written through.
        x = ExporterRun(self)
        victim = x.dump_file(b"precious\n", "victim")
        dump = x.dump_file(b"no jobid here\n" + generated_dump(2)[1])
        exporter_class = lb_dump_exporter.Exporter
        real_begin = exporter_class.begin

        def begin(exporter, head):
            fresh = real_begin(exporter, head)
            os.symlink(victim, exporter.rejects_path)
            return fresh
        self.addCleanup(setattr, exporter_class, "begin", real_begin)
        exporter_class.begin = begin
        options = lb_dump_exporter.parse_args(
            ["-q", "-d", dump, "-s", x.store, "-m", x.maildir])
        with self.assertRaises(lb_dump_exporter.Error) as caught:
            lb_dump_exporter.export(options, io.StringIO())
        self.assertRegex(str(caught.exception),
                         r"^cannot write .*\.rejects: File exists$")
        self.assertEqual(read_text(victim), "precious\n")


class TestExporterSpeedPaths(unittest.TestCase):
    """The exporter's fast ways: blocks checked at once, runs of a job's
    lines routed in one piece, and the checker process."""

    @staticmethod
    def children(pid):
        """Pids of the live processes whose parent is `pid`."""
        found = []
        for name in os.listdir("/proc"):
            try:
                with open("/proc/%s/stat" % name) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[1] == str(pid) and fields[0] != "Z":
                found.append(int(name))
        return found

    @staticmethod
    def gone(pid):
        try:
            with open("/proc/%d/stat" % pid) as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    def big_dump(self, jobs, extra=()):
        """(ExporterRun, table, dump bytes) of `jobs` jobs of 3 lines of
        about 650 bytes; mixed by 40 for ("-x",).  Not scaled: the sizes
        are the exporter's blocks (1 MB)."""
        table, data = generated_dump(jobs, per_job=3,
                                     interleave=40 if extra else 1, pad=300)
        return ExporterRun(self), table, data

    def start_fed(self, x, data, *extra):
        """An exporter reading `data` from a pipe, fed 2 MB of it: past
        the first block (its first MB), so its checker is running;
        (process, checker pid)."""
        proc = subprocess.Popen(x.args("-q", *extra), stdin=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        self.addCleanup(proc.stderr.close)
        proc.stdin.write(data[:2 << 20])
        proc.stdin.flush()
        wait_for(lambda: self.children(proc.pid), what="the checker")
        return proc, self.children(proc.pid)[0]

    def test_killed_checker_loses_nothing(self):
        for extra in ((), ("-x",)):
            x, table, data = self.big_dump(2000, extra)
            proc, checker = self.start_fed(x, data, *extra)
            os.kill(checker, signal.SIGKILL)
            proc.stdin.write(data[2 << 20:])
            proc.stdin.close()
            self.assertEqual(proc.wait(TIMEOUT), 0, proc.stderr.read())
            x.assert_exported(table)

    def test_killed_exporter_leaves_no_checker(self):
        x, table, data = self.big_dump(2000)
        proc, checker = self.start_fed(x, data)
        proc.kill()
        proc.wait(TIMEOUT)
        proc.stdin.close()
        wait_for(lambda: self.gone(checker), what="the checker's end")
        dump = x.dump_file(data)
        final = x.run("-q", "-d", dump)
        self.assertEqual(final.returncode, 0, final.stderr)
        x.assert_exported(table)

    def test_bad_lines_in_big_blocks_as_line_by_line(self):
        # Bad lines, and odd but good ones, spread over a dump of several
        # blocks: their blocks go line by line; every other block the
        # fast way.  Each bad line is rejected with its number and
        # reason, and the jobs hold exactly their good lines.
        for extra in ((), ("-x",)):
            x, table, data = self.big_dump(3000, extra)
            owner = {}
            for jobid, lines in table:
                for line in lines:
                    owner[line] = jobid
            lines = data.splitlines(True)
            expected = dict((jobid, list(lines)) for jobid, lines in table)

            def replace(at, new):
                jobid = owner[lines[at]]
                expected[jobid][expected[jobid].index(lines[at])] = new
                lines[at] = new
            # About 1,600 lines a block: the faults at 2500 (a quote
            # escaped wrongly) and 4000 (quotes without backslashes, not
            # paired) are alone in theirs.
            good = lines[1000]
            field = good.index(b" DG.JOBID=")
            replace(1000, good.replace(b" DG.JOBID=", b"\tDG.JOBID="))
            good = lines[8000]
            replace(8000, good[field + 1:-1] + b" " + good[:field] + b"\n")
            bad = [
                (2500, lines[2500].replace(b'quoted\\"', b'quoted\\\\"'),
                 "unbalanced quotes"),
                (4000, lines[4000].replace(b'\\"quoted\\"', b'"quoted'),
                 "unbalanced quotes"),
                (5600, lines[5600].replace(b"PROG=", b"P\0G="),
                 "NUL byte in line"),
                (7000, lines[7000][:-1] + b' DG.JOBID="x"\n',
                 "DG.JOBID given twice"),
                (8100, lines[8100].replace(b":9000/", b":90000/"),
                 "port out of range"),
                (8200, lines[8200].replace(b" DG.JOBID", b" DG.JOB"),
                 "no DG.JOBID field")]
            for at, line, _ in bad:
                expected[owner[lines[at]]].remove(lines[at])
                lines[at] = line
            lines.insert(8500, b"\r\n")
            lines.insert(8500, b"\n")
            dump = x.dump_file(b"".join(lines))
            proc = x.run("-d", dump, *extra)
            self.assertEqual(proc.returncode, 3, proc.stderr)
            x.assert_exported([(jobid, expected[jobid])
                               for jobid, _ in table])
            found = re.findall(rb"# line (\d+): ([^\n]*)\n", x.rejects())
            self.assertEqual(len(found), len(bad))
            for (at, line, reason), (number, said) in zip(bad, found):
                self.assertEqual(int(number), at + 1)
                self.assertIn(reason, said.decode())
                self.assertIn(line, x.rejects())
            self.assertIn("%d lines, %d exported, %d rejected, 2 blank"
                          % (len(lines), len(lines) - 2 - len(bad), len(bad)),
                          proc.stderr)


# ---------------------------------------------------------------------------
# jp_upload_files: archive, message, errors, function interface
# ---------------------------------------------------------------------------

class TestUploadFiles(unittest.TestCase):
    """jp_upload_files: a complete GNU tar archive, the message bytes
    written the maildir way, the command line and the function, errors
    that are one line and leave nothing, and delivery by the importer."""


    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="jp-upload-files-test-")
        os.chmod(self.dir, 0o755)
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.maildir = os.path.join(self.dir, "jpsandbox")
        self.proxy = self.write("x509up_u500", b"not read, only named\n")
        self.small = self.write("stdout.txt", b"Hello, grid\n")
        self.large = self.write("sub/output.bin", os.urandom(3 * 1024 * 1024
                                                             + 17))
        self.jobid = "https://lb.example.org/rReV1TpJ5oY0Z1_M4NBfHw"

    def write(self, name, data):
        path = os.path.join(self.dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def cli(self, *args, **kw):
        env = dict(os.environ)
        env.pop("X509_USER_PROXY", None)
        env.update(kw.pop("env", {}))
        return run([sys.executable, JP_UPLOAD_FILES] + list(args), env=env,
                   cwd=self.dir, **kw)

    def left_behind(self):
        """Every file under the maildir (an aborted request leaves none)."""
        found = []
        for top, _, names in os.walk(self.maildir):
            found.extend(os.path.join(top, n) for n in names)
        return found

    def test_archive_is_a_complete_gnu_tar(self):
        cwd = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, cwd)
        message = jp_upload_files.upload_files(
            self.jobid, [self.small, "sub/output.bin"], self.proxy,
            self.maildir)
        fields = dict(line.split("\t", 1) for line in
                      read_text(message).splitlines())
        archive = fields["file"]
        self.assertEqual(os.path.dirname(archive),
                         os.path.join(self.maildir, "spool"))
        self.assertEqual(stat.S_IMODE(os.stat(archive).st_mode), 0o600)
        with open(archive, "rb") as f:
            raw = f.read()
        # GNU magic in the first header, end-of-archive blocks at the end
        # (the original wrote none), whole 512-byte records.
        self.assertEqual(raw[257:265], b"ustar  \0")
        self.assertEqual(len(raw) % 512, 0)
        self.assertEqual(raw[-1024:], b"\0" * 1024)
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            self.assertEqual([m.name for m in members],
                             [self.small.lstrip("/"), "sub/output.bin"])
            for member, source in zip(members, (self.small, self.large)):
                with open(source, "rb") as f:
                    self.assertEqual(tar.extractfile(member).read(),
                                     f.read())
        if shutil.which("tar"):
            listed = run(["tar", "-tf", archive])
            self.assertEqual(listed.returncode, 0, listed.stderr)
            self.assertEqual(listed.stdout.split(),
                             [self.small.lstrip("/"), "sub/output.bin"])

    def test_message_bytes_and_maildir_way(self):
        message = jp_upload_files.upload_files(
            self.jobid, [self.small], self.proxy, self.maildir,
            jpps="jp.example.org:8901")
        name = os.path.basename(message)
        self.assertRegex(name, r"^\d+_\d{6}\.localhost$")
        self.assertEqual(os.path.dirname(message),
                         os.path.join(self.maildir, "new"))
        tmp = os.path.join(self.maildir, "tmp", name)
        self.assertTrue(os.path.samefile(message, tmp))
        self.assertEqual(stat.S_IMODE(os.stat(message).st_mode), 0o600)
        archive = listing(self.maildir, "spool")
        self.assertEqual(len(archive), 1)
        with open(message, "rb") as f:
            self.assertEqual(f.read(), (
                "jobid\thttps://lb.example.org:9000/rReV1TpJ5oY0Z1_M4NBfHw\n"
                "file\t%s\nproxy\t%s\njpps\tjp.example.org:8901\n"
                % (os.path.join(self.maildir, "spool", archive[0]),
                   self.proxy)).encode())
        for sub in ("", "tmp", "new", "spool"):
            mode = os.stat(os.path.join(self.maildir, sub)).st_mode
            self.assertEqual(stat.S_IMODE(mode), 0o700, sub)
        # jp_importer reads it as it is written.
        with open(message, "rb") as f:
            fields = jp_importer.parse_keyed(f.read())
        self.assertEqual(fields["jobid"],
                         "https://lb.example.org:9000/rReV1TpJ5oY0Z1_M4NBfHw")
        self.assertEqual(fields["jpps"], "jp.example.org:8901")

    def test_command_line_writes_one_request(self):
        proc = self.cli("-j", self.jobid, "-m", self.maildir,
                        env={"X509_USER_PROXY": self.proxy},
                        *[self.small, "sub/output.bin"])
        self.assertEqual((proc.returncode, proc.stdout, proc.stderr),
                         (0, "", ""))
        self.assertEqual(len(listing(self.maildir, "new")), 1)
        self.assertEqual(len(listing(self.maildir, "spool")), 1)
        proc = self.cli("--jobid=" + self.jobid, "--maildir", self.maildir,
                        "--proxy", self.proxy, "--jpps", "jp:8901",
                        self.small)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(len(listing(self.maildir, "new")), 2)
        for flag in ("-h", "-?", "--help"):
            proc = self.cli(flag)
            self.assertEqual(proc.returncode, 0)
            self.assertIn("/var/glite/jpsandbox", proc.stdout)
        proc = self.cli("--version")
        self.assertEqual(proc.stdout, "jp_upload_files %s\n"
                         % jp_upload_files.__version__)

    def test_default_maildir_is_the_importers(self):
        self.assertEqual(jp_upload_files.DEFAULT_MAILDIR,
                         jp_importer.DEFAULT_SANDBOX_MDIR)

    def test_errors_are_one_line_and_leave_nothing(self):
        fifo = os.path.join(self.dir, "fifo")
        os.mkfifo(fifo)
        blocker = self.write("plain-file", b"x")
        m = ["-m", self.maildir]
        cases = [
            ((self.small,) + tuple(m) + ("-p", self.proxy), 2,
             "-j JOBID is required"),
            (("-j", self.jobid, "-p", self.proxy) + tuple(m), 2,
             "no files given"),
            (("-j", "https://lb.example.org/a b", "-p", self.proxy,
              self.small) + tuple(m), 2, "invalid jobid"),
            (("-j", "http://lb.example.org/abc", "-p", self.proxy,
              self.small) + tuple(m), 2, "invalid jobid"),
            (("-j", self.jobid, "-p", self.proxy, "-s", "jp example:1",
              self.small) + tuple(m), 2, "invalid JPPS address"),
            (("-j", self.jobid, self.small) + tuple(m), 2, "no proxy"),
            (("-j", self.jobid, "-p", self.proxy + ".gone",
              self.small) + tuple(m), 1, "does not exist"),
            (("-j", self.jobid, "-p", self.proxy, self.small, "missing.txt")
             + tuple(m), 1, "missing.txt: No such file or directory"),
            (("-j", self.jobid, "-p", self.proxy, self.dir) + tuple(m), 1,
             "is not a regular file"),
            (("-j", self.jobid, "-p", self.proxy, fifo) + tuple(m), 1,
             "is not a regular file"),
            (("-j", self.jobid, "-p", self.proxy, "sub/../stdout.txt")
             + tuple(m), 2, "'..'"),
            (("-j", self.jobid, "-p", self.proxy, self.small, self.small)
             + tuple(m), 2, "given twice"),
            (("-j", self.jobid, "-p", self.proxy, "-m",
              os.path.join(blocker, "md"), self.small), 1,
             "cannot create directory"),
            (("-j", self.jobid, "-x", self.small), 2, "not recognized"),
        ]
        for args, status, text in cases:
            proc = self.cli(*args)
            self.assertEqual(proc.returncode, status, (args, proc.stderr))
            self.assertEqual(len(proc.stderr.splitlines()),
                             1 if status == 1 or "Try" not in proc.stderr
                             else 2, proc.stderr)
            self.assertIn(text, proc.stderr)
            self.assertNotIn("Traceback", proc.stderr)
            self.assertEqual(self.left_behind(), [], args)

    def test_unreadable_file_is_refused(self):
        secret = self.write("secret.txt", b"nobody reads this\n")
        os.chmod(secret, 0)
        prefix = []
        if os.geteuid() == 0:
            # Root reads any file; without these two capabilities it
            # cannot, like the grid user the tool normally runs as.
            if not shutil.which("setpriv"):
                skip_or_fail("setpriv (util-linux) is not installed")
            prefix = ["setpriv",
                      "--bounding-set=-dac_override,-dac_read_search"]
        env = dict(os.environ)
        env.pop("X509_USER_PROXY", None)
        proc = run(prefix + [sys.executable, JP_UPLOAD_FILES, "-j",
                             self.jobid, "-p", self.proxy, "-m",
                             self.maildir, self.small, secret], env=env)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertEqual(proc.stderr, "jp_upload_files: %s: Permission "
                         "denied\n" % secret)
        self.assertEqual(self.left_behind(), [])

    def test_failure_while_writing_leaves_nothing(self):
        import resource
        def small_files():
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024,) * 2)
        proc = self.cli("-j", self.jobid, "-p", self.proxy, "-m",
                        self.maildir, self.small, self.large,
                        preexec_fn=small_files)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn("cannot write the archive", proc.stderr)
        self.assertEqual(len(proc.stderr.splitlines()), 1, proc.stderr)
        self.assertEqual(self.left_behind(), [])

    def test_shared_maildir_refused_unless_allowed(self):
        make_maildir(self.maildir)
        os.chmod(self.maildir, 0o777)
        with self.assertRaises(jp_upload_files.UploadFilesError) as cm:
            jp_upload_files.upload_files(self.jobid, [self.small],
                                         self.proxy, self.maildir)
        self.assertIn("writable by group or others", str(cm.exception))
        self.assertEqual(self.left_behind(), [])
        message = jp_upload_files.upload_files(
            self.jobid, [self.small], self.proxy, self.maildir,
            allow_shared_dirs=True)
        self.assertTrue(os.path.exists(message))

    def test_end_to_end_through_the_importer(self):
        root = os.path.join(self.dir, "ftp-root")
        os.mkdir(root)
        ftps = FTPSFixture(pki(), root).start()
        self.addCleanup(ftps.stop)
        h = ImporterHarness(self, dest_base=ftps.url("jpps"),
                            local_root=root)
        h.jpps.register(self.jobid, USER_SUBJECT)
        message = jp_upload_files.upload_files(
            self.jobid, [self.small, self.large], self.proxy, h.sandbox)
        archive = read_text(message).split("\n")[1].split("\t")[1]
        with open(archive, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        proc = h.once()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(list(h.jpps.committed.values()), [digest])
        call = h.jpps.ops("StartUpload", "ok")[0]
        self.assertEqual((call.get("class"), call.get("contentType")),
                         ("urn:org.glite.jp.primary:isb", "tar/lb"))
        self.assertFalse(os.path.exists(archive))
        for sub in ("tmp", "new", "work", "post", "undeliverable", "spool"):
            self.assertEqual(listing(h.sandbox, sub), [], sub)
        with tarfile.open(h.jpps.local_path(
                list(h.jpps.committed)[0])) as tar:
            self.assertEqual(tar.getnames(), [self.small.lstrip("/"),
                                              self.large.lstrip("/")])

    def test_function_interface(self):
        with self.assertRaises(jp_upload_files.UploadFilesError) as cm:
            jp_upload_files.upload_files("not-a-jobid", [self.small],
                                         self.proxy, self.maildir)
        self.assertIn("invalid jobid 'not-a-jobid'", str(cm.exception))
        with self.assertRaises(jp_upload_files.UploadFilesError):
            jp_upload_files.upload_files(self.jobid, self.small, self.proxy,
                                         self.maildir)
        old = os.environ.get("X509_USER_PROXY")
        os.environ["X509_USER_PROXY"] = self.proxy
        try:
            message = jp_upload_files.upload_files(self.jobid, [self.small],
                                                   maildir=self.maildir)
        finally:
            if old is None:
                del os.environ["X509_USER_PROXY"]
            else:
                os.environ["X509_USER_PROXY"] = old
        self.assertIn("proxy\t%s\n" % self.proxy, read_text(message))
        self.assertNotIn("jpps", read_text(message))


# ---------------------------------------------------------------------------
# Operators: the README's commands, the systemd unit, cron, logrotate,
# failures at start that must never be silent, the original
# deployment's command lines, what an admin watches and steers
# ---------------------------------------------------------------------------

TOOLS = ("jp_importer.py", "lb_dump_exporter.py", "jp_upload_files.py")
README = os.path.join(HERE, "README.md")
CONTRIB = os.path.join(HERE, "contrib")
CRON_LINE_RE = re.compile(r"^(?:[0-9*/,-]+\s+){5}\S+\s+(.*)$")


def readme_blocks(text):
    """The fenced code blocks of a Markdown text, each as one string."""
    blocks, block = [], None
    for line in text.splitlines(True):
        if line.startswith("```"):
            if block is None:
                block = []
            else:
                blocks.append("".join(block))
                block = None
        elif block is not None:
            block.append(line)
    return blocks


def readme_commands(text):
    """Every command line of the README's code blocks that runs a tool.

    The rule: lines continued with a backslash are joined; a crontab
    line (five time fields, a user) stands for its command part; a
    command is an unindented line whose first word, after an optional
    `python3`, is one of TOOLS, as a bare name, `./NAME` or an absolute
    path, and whose second word does not start with `[` (a synopsis).  The
    systemd unit's ExecStart is run by the unit's own test.
    """
    commands = []
    for block in readme_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            if line[:1].isspace():
                continue
            cron = CRON_LINE_RE.match(line)
            words = shlex.split(cron.group(1) if cron else line,
                                comments=True)
            if words[:1] == ["python3"]:
                words = words[1:]
            if not words or os.path.basename(words[0]) not in TOOLS or \
                    not (words[0] in TOOLS or words[0].startswith(("./",
                                                                   "/"))):
                continue
            if len(words) > 1 and words[1].startswith("["):
                continue
            commands.append(words)
    return commands


def readme_mapping(h):
    """The README's example paths and hosts -> the harness's own."""
    return {
        "/etc/grid-security/hostcert.pem": h.cert,
        "/etc/grid-security/glite/hostcert.pem": h.cert,
        "/etc/grid-security/hostkey.pem": h.key,
        "/etc/grid-security/glite/hostkey.pem": h.key,
        "/etc/grid-security/certificates": h.pki.ca_dir,
        "jpps.example.org:8901": h.jpps.hostport,
        "/var/spool/glite/jpreg": h.reg,
        "/var/spool/glite/jpdump": h.dump,
        "/var/glite/jpsandbox": h.sandbox,
        "/var/spool/glite/lbexport": h.path("lbexport"),
        "/var/spool/glite/lbexport/purge.dump": h.path("purge.dump"),
        "/var/log/glite/jp_importer.log": h.logfile,
        "/run/jp_importer/jp_importer.pid": h.pidfile,
    }


def mapped_command(words, mapping):
    """The command with the tool run from this checkout by the test's
    interpreter and every example word replaced by its mapping."""
    return [sys.executable, os.path.join(HERE, os.path.basename(words[0]))] \
        + [mapping.get(word, word) for word in words[1:]]


def readme_block_of(path):
    """The README's code block that equals the file at `path`, or None."""
    with open(path) as f:
        text = f.read()
    with open(README) as f:
        blocks = readme_blocks(f.read())
    return text if text in blocks else None


def without_option(args, option):
    """`args` without `option` and its value."""
    at = args.index(option)
    return args[:at] + args[at + 2:]


def current_user_and_group():
    import grp
    import pwd
    return (pwd.getpwuid(os.geteuid()).pw_name,
            grp.getgrgid(os.getegid()).gr_name)


class TestOperatorRunning(unittest.TestCase):
    """What a site admin runs: every README command as written, the
    shipped systemd unit and logrotate snippet, executable tools; errors
    at start are one line and exit 1 before the daemon detaches; the
    exporter's exit codes, capped reports and pruned journals."""

    def env(self, h):
        env = dict(os.environ, X509_CERT_DIR=h.pki.ca_dir)
        env.pop("X509_USER_PROXY", None)
        return env

    def registered(self, h):
        return len(h.jpps.ops("RegisterJob", "ok"))

    def deliver_one(self, h, n):
        """Drop registration n; wait until the JPPS has it."""
        before = self.registered(h)
        drop_message(h.reg, registration(n))
        wait_for(lambda: self.registered(h) > before,
                 what="registration %d delivered" % n)

    def start_daemon(self, h, cmd, **kw):
        """Start a forking daemon with `cmd`; (pid, stop()).  The pid
        file must hold the daemon's pid when the starter returns."""
        with open(h.path("daemon.err"), "ab") as err:
            proc = run(cmd, stderr=err, **kw)
        self.assertEqual(proc.returncode, 0, read_text(h.path("daemon.err")))
        pidfile = cmd[cmd.index("-i") + 1]
        if not os.path.isabs(pidfile):
            pidfile = os.path.join(kw.get("cwd", "."), pidfile)
        pid = int(read_text(pidfile).strip() or 0)
        self.assertTrue(os.path.exists("/proc/%d" % pid), pid)
        self.assertNotEqual(os.getsid(pid), os.getsid(0))
        return pid, daemon_stopper(self, pid)

    # -- files, executables ----------------------------------------------

    def test_tools_are_executable_and_run_as_written(self):
        for tool in TOOLS:
            path = os.path.join(HERE, tool)
            self.assertTrue(os.access(path, os.X_OK), tool)
            proc = run(["./" + tool, "--version"], cwd=HERE)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertEqual(proc.stdout, "%s 1.0.0\n" % tool[:-3])

    def test_readme_commands_run_as_written(self):
        """Each README command, its paths mapped (readme_mapping), with
        X509_CERT_DIR set (the default CA directory is a system path):
        --status answers, --once and a daemon deliver, the exporter
        exports.  A daemon with no -i gets the test's pid file (the
        default is a system path), and is stopped again."""
        h = upload_harness(self)
        mapping = readme_mapping(h)
        os.makedirs(h.path("lbexport"), 0o750)
        _, data = generated_dump(3)
        with open(h.path("purge.dump"), "wb") as f:
            f.write(data)
        with open(README) as f:
            commands = readme_commands(f.read())
        kinds = []
        for n, words in enumerate(commands):
            cmd = mapped_command(words, mapping)
            tool = os.path.basename(words[0])
            if tool == "lb_dump_exporter.py":
                kinds.append("export")
                proc = run(cmd, env=self.env(h))
                self.assertEqual(proc.returncode, 0, (words, proc.stderr))
                self.assertIn("3 job(s) exported", proc.stderr)
            elif "--status" in words:
                kinds.append("status")
                proc = run(cmd, env=self.env(h))
                self.assertEqual(proc.returncode, 0, (words, proc.stderr))
                self.assertIn("registration maildir %s\n" % h.reg,
                              proc.stdout)
                self.assertIn("credential: ", proc.stdout)
            elif "--once" in words:
                kinds.append("once")
                drop_message(h.reg, registration(n))
                before = self.registered(h)
                proc = run(cmd, env=self.env(h))
                self.assertEqual(proc.returncode, 0, (words, proc.stderr))
                self.assertEqual(self.registered(h), before + 1, words)
                if "--log" in words:
                    self.assertIn("registered", read_text(h.logfile))
            else:
                kinds.append("daemon")
                self.assertNotIn("-g", words)      # the unit's test does -g
                if "-i" not in cmd:
                    cmd += ["-i", h.pidfile]
                _, stop = self.start_daemon(h, cmd, env=self.env(h))
                self.deliver_one(h, n)
                stop()
                self.assertFalse(os.path.exists(h.pidfile))
        self.assertEqual(sorted(kinds), ["daemon", "export", "once",
                                         "status", "status"], commands)

    def unit_path(self):
        path = os.path.join(CONTRIB, "jp_importer.service")
        self.assertIsNotNone(readme_block_of(path),
                             "README's unit differs from " + path)
        return path

    def test_systemd_unit_runs_its_command_in_the_foreground(self):
        """ExecStart as Type=simple runs it: in the foreground, its pid
        in the pid file, TERM to the master alone (KillMode=mixed)."""
        h = ImporterHarness(self)
        with open(self.unit_path()) as f:
            text = f.read().replace("\\\n", " ")
        values = dict(line.split("=", 1) for line in text.splitlines()
                      if "=" in line and not line.startswith("#"))
        self.assertEqual(values["Type"], "simple")
        self.assertEqual(values["KillMode"], "mixed")
        self.assertEqual(values["Restart"], "on-failure")
        self.assertIn("network-online.target", values["After"])
        self.assertIn("network-online.target", values["Wants"])
        words = shlex.split(values["ExecStart"])
        self.assertIn("-g", words)
        with open(h.path("journal"), "wb") as journal:
            proc = subprocess.Popen(
                mapped_command(words, readme_mapping(h)), env=self.env(h),
                stdout=subprocess.DEVNULL, stderr=journal)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        wait_for(lambda: read_text(h.pidfile) == "%d\n" % proc.pid,
                 what="the pid file")
        self.deliver_one(h, 1)
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertFalse(os.path.exists(h.pidfile))
        journal = read_text(h.path("journal"))
        self.assertIn("registered", journal)
        self.assertIn("stopped", journal)

    def test_systemd_unit_verifies(self):
        if not shutil.which("systemd-analyze"):
            skip_or_fail("systemd-analyze is not installed")
        with open(self.unit_path()) as f:
            text = f.read()
        # The unit as installed: its ExecStart names an executable tool.
        unit = os.path.join(tempfile.mkdtemp(prefix="jp-unit-"),
                            "jp_importer.service")
        self.addCleanup(shutil.rmtree, os.path.dirname(unit), True)
        with open(unit, "w") as f:
            f.write(text.replace("/usr/local/sbin/jp_importer.py",
                                 os.path.join(HERE, "jp_importer.py")))
        proc = run(["systemd-analyze", "verify", unit])
        self.assertEqual((proc.returncode, proc.stderr), (0, ""))

    def test_logrotate_snippet_rotates_a_running_daemons_log(self):
        if not shutil.which("logrotate"):
            skip_or_fail("logrotate is not installed")
        path = os.path.join(CONTRIB, "jp_importer.logrotate")
        text = readme_block_of(path)
        self.assertIsNotNone(text, "README's logrotate differs from " + path)
        h = ImporterHarness(self)
        conf, state = h.path("logrotate.conf"), h.path("logrotate.state")
        self.assertIn("su glite glite\n", text)
        with open(conf, "w") as f:
            f.write(text.replace("/var/log/glite/jp_importer.log", h.logfile)
                    .replace("su glite glite", "su %s %s"
                             % current_user_and_group()))
        proc = run(["logrotate", "-d", "-f", "-s", state, conf])
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertNotIn("error:", proc.stdout + proc.stderr)
        proc = h.start("--log", h.logfile)
        wait_for(lambda: "started" in read_text(h.logfile), what="the log")
        self.deliver_one(h, 1)
        # The JPPS has it before the worker logs it: wait for the line.
        wait_for(lambda: "registered" in read_text(h.logfile),
                 what="the delivery logged")
        rotate = run(["logrotate", "-f", "-s", state, conf])
        self.assertEqual(rotate.returncode, 0, rotate.stderr)
        self.assertIn("registered", read_text(h.logfile + ".1"))
        self.deliver_one(h, 2)           # no postrotate: a new file
        wait_for(lambda: "registered" in read_text(h.logfile),
                 what="the next line in a new log file")
        self.assertEqual(h.stop(proc), 0)

    # -- failures at start: one line, exit 1, before detaching -----------

    def test_relative_log_and_pid_file_and_the_starters_exit(self):
        """--log and -i relative to where the starter runs (the daemon
        changes to /), and the starter returns when the pid file holds
        the daemon's pid, not the pid left by an earlier run."""
        h = ImporterHarness(self)
        name = "jp-test-%d.log" % os.getpid()
        self.addCleanup(unlink_if_there, "/" + name)
        for n in range(3):
            with open(h.path("rel.pid"), "w") as f:
                f.write("999999\n")              # left by a killed run
            _, stop = self.start_daemon(h, [
                sys.executable, JP_IMPORTER, "--log", name, "-i", "rel.pid"]
                + without_option(h.args(), "-i"), cwd=h.dir)
            stop()              # at once: a TERM is handled when it returns
            self.assertFalse(os.path.exists(h.path("rel.pid")))
            self.assertEqual(read_text(h.path(name)).count("INFO stopped"),
                             n + 1)
        self.assertFalse(os.path.exists("/" + name))

    def test_log_in_a_missing_directory(self):
        h = ImporterHarness(self)
        for args in (["-g"], [], ["--once"]):
            proc = run([sys.executable, JP_IMPORTER, "--log",
                        h.path("nodir", "x.log")] + args + h.args(),
                       timeout=TIMEOUT)
            self.assertEqual(proc.returncode, 1, args)
            self.assertEqual(proc.stderr, "jp_importer: cannot open log file"
                             " %s: No such file or directory\n"
                             % h.path("nodir", "x.log"))
            self.assertFalse(os.path.exists(h.pidfile))

    def syslog_daemon(self, h, socket_path):
        """Start the daemon (no --log) with its syslog socket at
        `socket_path`; return its standard error's file."""
        err = h.path("daemon.err")
        code = ("import sys; sys.path.insert(0, %r); import jp_importer; "
                "jp_importer.SYSLOG_SOCKET = %r; "
                "sys.exit(jp_importer.main(sys.argv[1:]))"
                % (HERE, socket_path))
        self.start_daemon(h, [sys.executable, "-c", code] + h.args())
        return err

    def test_no_syslog_falls_back_to_standard_error(self):
        h = ImporterHarness(self)
        err = self.syslog_daemon(h, h.path("no-syslog"))
        self.deliver_one(h, 1)
        text = wait_for(lambda: "registered" in read_text(err) and
                        read_text(err), what="the log on stderr")
        self.assertIn("no syslog at %s (No such file or directory); logging"
                      " to standard error" % h.path("no-syslog"), text)
        self.assertIn("started", text)

    def test_syslog_gets_the_log_when_there(self):
        h = ImporterHarness(self)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(h.path("log"))
        sock.settimeout(TIMEOUT)
        err = self.syslog_daemon(h, h.path("log"))
        drop_message(h.reg, registration(1))
        lines = []
        while not any(b"registered" in line for line in lines):
            lines.append(sock.recv(65536))
        self.assertTrue(lines[0].startswith(b"<30>jp_importer["), lines[0])
        self.assertEqual(read_text(err), "")

    def test_encrypted_key_and_certificate_without_key(self):
        h = ImporterHarness(self)
        encrypted = h.path("encrypted.key")
        proc = run(["openssl", "pkey", "-in", h.key, "-aes256", "-passout",
                    "pass:secret", "-out", encrypted])
        self.assertEqual(proc.returncode, 0, proc.stderr)
        h.key = encrypted
        # No terminal to prompt on (the old code then said "Invalid
        # argument"; on a terminal it blocked).
        proc = h.once(stdin=subprocess.DEVNULL, start_new_session=True)
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(proc.stderr.splitlines(), [
            "jp_importer: key %s is encrypted, and a daemon cannot ask for "
            "its pass phrase: use an unencrypted copy, mode 0400 (openssl "
            "pkey -in KEY -out PLAIN)" % encrypted])
        legacy = h.path("legacy.key")
        with open(legacy, "w") as f:
            f.write("-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED"
                    "\nDEK-Info: AES-256-CBC,00\n\nAAAA\n"
                    "-----END RSA PRIVATE KEY-----\n")
        with self.assertRaisesRegex(jp_importer.ConfigError, "is encrypted"):
            jp_importer.check_private_key(legacy, h.cert)
        proc = run([sys.executable, JP_IMPORTER, "--once"]
                   + without_option(h.args(), "-k"))
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(proc.stderr.splitlines(), [
            "jp_importer: credential %s holds no private key: give its key "
            "file with -k" % h.cert])

    def test_malformed_jpps_refused_at_start(self):
        h = ImporterHarness(self)
        for address, text in (
                ("jpps.example.org:99999", "bad port in JPPS address"),
                ("jpps.example.org:http", "bad port in JPPS address"),
                ("ftp://jpps.example.org:8901", "bad JPPS address"),
                ("https://:8901", "bad JPPS address")):
            for mode in ("--once", "-g"):
                proc = run([sys.executable, JP_IMPORTER, mode]
                           + h.args("-p", address), timeout=TIMEOUT)
                # A usage error: the option's value, before anything runs.
                self.assertEqual(proc.returncode, 2, (address, mode))
                self.assertIn(text, proc.stderr.splitlines()[0])
                self.assertEqual(proc.stderr.splitlines()[1:],
                                 ["Try 'jp_importer --help'."])
        self.assertEqual(h.jpps.calls, [])

    def test_credential_expiry_warned_in_log_and_status(self):
        h = ImporterHarness(self)
        h.cert = h.key = h.pki.proxy               # valid for a day
        proc = h.once()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertRegex(proc.stderr, r"WARNING credential %s \(valid "
                         r"until [-0-9 :]+\) expires in \d+h\d+m: renew it"
                         % re.escape(h.cert))
        proc = h.once("--warn-expiry", "0.5")
        self.assertNotIn("expires in", proc.stderr)
        status = [sys.executable, JP_IMPORTER, "--status", "-r", h.reg,
                  "-d", h.dump, "-s", h.sandbox, "-c"]
        proc = run(status + [h.cert])
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertRegex(proc.stdout, r"(?m)^credential: %s \(.*\), "
                         r"valid until [-0-9 :]+  WARNING: expires in "
                         r"\d+h\d+m: renew it$" % re.escape(h.cert))
        proc = run(status + [h.pki.host_cert])
        self.assertRegex(proc.stdout, r"(?m)^credential: %s \(.*\), "
                         r"valid until [-0-9 :]+$"
                         % re.escape(h.pki.host_cert))
        # At start and again at each reload (SIGHUP).
        proc = h.start()
        wait_for(lambda: h.output().count("expires in") == 1,
                 what="the warning at start")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: h.output().count("expires in") == 2,
                 what="the warning on SIGHUP")
        self.assertEqual(h.stop(proc), 0)
        proc = run([sys.executable, JP_IMPORTER, "--warn-expiry", "x"])
        self.assertEqual(proc.returncode, 2)

    # -- the exporter --------------------------------------------------------

    def test_exporter_exit_codes_and_capped_reports(self):
        x = ExporterRun(self)
        table, data = generated_dump(5)
        self.assertEqual(x.run("-d", x.dump_file(data)).returncode, 0)
        shown = lb_dump_exporter.REJECTS_SHOWN
        bad = b"".join(b"DG.ARRIVED=1 DATE=%d HOST=\"h\"\n" % i
                       for i in range(shown + 5))
        table, data = generated_dump(2, pad=7)
        proc = x.run("-d", x.dump_file(bad + data, "bad"))
        self.assertEqual(proc.returncode, 3, proc.stderr)
        report = proc.stderr.splitlines()
        self.assertEqual(len(report), shown + 2, proc.stderr)
        self.assertTrue(report[shown].startswith(
            "lb_dump_exporter: ... and 5 more rejected lines (see %s/"
            % x.store), report[shown])
        self.assertIn("2 job(s) exported", report[-1])
        self.assertEqual(len(x.rejects().splitlines()), 2 * (shown + 5))
        # Failed: nothing exported, exit 1.
        with open(os.path.join(x.dir, "file"), "w"):
            pass
        proc = x.run("-d", x.dump_file(data, "again"), "-s",
                     os.path.join(x.dir, "file"))
        self.assertEqual(proc.returncode, 1, proc.stderr)

    def test_exporter_prunes_old_finished_journals(self):
        x = ExporterRun(self)
        _, first = generated_dump(40)
        dump = x.dump_file(first, "first")
        self.assertEqual(x.run("-q", "-d", dump).returncode, 0)
        journal = [os.path.join(x.store, n) for n in os.listdir(x.store)
                   if n.endswith(".journal")][0]
        self.assertGreater(os.path.getsize(journal), 40 * 50)
        month = time.time() - lb_dump_exporter.JOURNAL_KEEP - 3600
        os.utime(journal, (month, month))
        cut = os.path.join(x.store, ".lb_dump_exporter.0123456789ab.journal")
        with open(cut, "w") as f:
            f.write("batch 1_000001\nm\thttps://lb.example.org:9000/a\ta\n")
        os.utime(cut, (month, month))
        _, second = generated_dump(3, pad=9)
        self.assertEqual(x.run("-q", "-d", x.dump_file(second, "second"))
                         .returncode, 0)
        with open(journal, "rb") as f:
            self.assertEqual(f.read(), b"complete\n")
        with open(cut) as f:                       # unfinished: kept whole
            self.assertEqual(f.read(), "batch 1_000001\nm\thttps://"
                             "lb.example.org:9000/a\ta\n")
        recent = [os.path.join(x.store, n) for n in os.listdir(x.store)
                  if n.endswith(".journal") and
                  os.path.join(x.store, n) not in (journal, cut)]
        self.assertEqual(len(recent), 1)
        self.assertGreater(os.path.getsize(recent[0]), 3 * 50)
        # The rerun protection stays: the first dump is not exported again.
        messages = listing(x.maildir, "new")
        proc = x.run("-d", dump)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("was exported completely before", proc.stderr)
        self.assertEqual(listing(x.maildir, "new"), messages)


class TestOriginalCommandLines(unittest.TestCase):
    """The three tools run exactly as the original packaged start script,
    export script and upload example write them, on the original layout:
    stores anywhere (a spool directory, the default /tmp), dumps of the
    original C exporter, tarballs of the original upload tool in /tmp.
    Nothing may need an option of ours; the only setting beyond the
    command line is X509_CERT_DIR, which the original read too."""

    def setUp(self):
        self.h = h = upload_harness(self)
        # The deployment's directories, under a private test root.
        root = h.path("root")
        self.spool = os.path.join(root, "var", "spool", "glite")
        self.jpreg, self.jpdump, self.lbexport, self.keep = (
            os.path.join(self.spool, n)
            for n in ("jpreg", "jpdump", "lbexport", "lbexport-keep"))
        self.jpsandbox = os.path.join(root, "var", "glite", "jpsandbox")
        for d in (self.spool, os.path.dirname(self.jpsandbox)):
            os.makedirs(d, 0o755)
        self.env = dict(os.environ, X509_CERT_DIR=h.pki.ca_dir)
        self.env.pop("X509_USER_PROXY", None)
        self.owner = USER_SUBJECT
        self.expected = {}          # (unique, class name) -> sha256
        self.token = "orig%d" % (time.time() * 1000)
        # What the exporter's default store (/tmp) keeps of this test.
        default_store = "/tmp/lb_dump_exporter.%d" % os.geteuid()
        self.addCleanup(lambda: [
            unlink_if_there(os.path.join(default_store, name))
            for name in listing(default_store, "")
            if name.startswith(self.token)])

    def purge_dump(self, first, jobs):
        """A purge dump of `jobs` jobs (like glite-lb-purge writes), new
        to every run: the exporter does not export a dump twice."""
        table, data = generated_dump(jobs)
        token = "%s%02d" % (self.token, first)
        table = [(jobid.replace("gen%05d" % j, "%s%03d" % (token, j)),
                  [line.replace(b"gen%05d" % j, b"%s%03d" % (
                      token.encode(), j)) for line in lines])
                 for j, (jobid, lines) in enumerate(table)]
        path = self.h.path("purge_%d" % first)
        with open(path, "wb") as f:
            f.write(b"".join(b"".join(lines) for _, lines in table))
        for jobid, lines in table:
            self.expect(jobid, "lb", b"".join(lines))
        return path

    def expect(self, jobid, name, data):
        unique = jobid.rsplit("/", 1)[1]
        self.expected[(unique, name)] = hashlib.sha256(data).hexdigest()

    def stored(self):
        jpps = self.h.jpps
        with jpps.lock:
            return dict((key, jpps.committed.get(f["destination"]))
                        for key, f in jpps.files.items()
                        if f["state"] == "committed")

    def original_message(self, maildir, data):
        """A message as the original maildir library writes it."""
        os.makedirs(os.path.join(maildir, "tmp"), 0o700, exist_ok=True)
        os.makedirs(os.path.join(maildir, "new"), 0o700, exist_ok=True)
        now = time.time()
        name = "%d_%d.localhost" % (now, int(now * 1e6) % 1000000)
        drop_message(maildir, data, name=name)

    def original_exporter_dump(self, n, jpps_bug=False):
        """A per-job file and message as glite-lb-dump_exporter wrote
        them: <store>/<unique>.<sec>_<usec>, 0640, no final newline in
        the message (with -j: the jpps key run into the file name)."""
        jobid = "https://lb.example.org:9000/cexp%05d" % n
        data = b"".join(ulm_line(jobid, n * 10 + i) for i in range(3))
        path = os.path.join(self.lbexport, "cexp%05d.1795350000_%d" % (n, n))
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
        os.write(fd, data)
        os.close(fd)
        message = "jobid  %s\nfile   %s" % (jobid, path)
        if jpps_bug:
            message += "jpps   %s" % self.h.jpps.hostport
        self.original_message(self.jpdump, message.encode())
        self.expect(jobid, "lb", data)

    def original_sandbox(self, n):
        """A tarball and message as glite_jpimporter_upload_files() made
        them: /tmp/jpimporter_<pid>_<time>.tar, 0600, GNU format with no
        end-of-archive blocks; tab-separated message, each line with LF."""
        jobid = "https://lb.example.org:9000/cbox%05d" % n
        self.h.jpps.register(jobid, self.owner)
        path = "/tmp/jpimporter_%d_%d.tar" % (os.getpid() * 100 + n,
                                              time.time())
        self.addCleanup(unlink_if_there, path)
        member = tarfile.TarInfo("home/user/job/stdout")
        payload = ("output of job %d\n" % n).encode() * 40
        member.size = len(payload)
        blob = member.tobuf(tarfile.GNU_FORMAT) + payload + \
            b"\0" * (-len(payload) % 512)           # no EOF blocks
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.write(fd, blob)
        os.close(fd)
        self.original_message(self.jpsandbox, (
            "jobid\t%s\nfile\t%s\nproxy\t%s\njpps\t%s\n" % (
                jobid, path, self.h.pki.proxy, self.h.jpps.hostport)
        ).encode())
        self.expect(jobid, "sandbox", blob)
        return path

    def start_importer(self, args):
        # Standard error to a file: with no syslog on the node, the
        # daemon keeps it for its log (a pipe would stay open).
        with open(self.h.path("daemon.err"), "ab") as err:
            proc = run([sys.executable, JP_IMPORTER] + args, env=self.env,
                       stderr=err)
        self.assertEqual(proc.returncode, 0,
                         read_text(self.h.path("daemon.err")))
        pidfile = args[args.index("-i") + 1]
        pid = wait_for(lambda: int(read_text(pidfile) or 0),
                       what="the daemon's pid file")
        return pid, read_text(self.h.path("daemon.err")), \
            daemon_stopper(self, pid)

    def test_original_start_export_and_upload_command_lines(self):
        h = self.h
        # glite-lb-export.sh: purge dump -> dump_exporter, into the
        # deployment's store and the default /tmp store.
        purge = self.purge_dump(0, 3)
        proc = run([sys.executable, LB_DUMP_EXPORTER, "-d", purge,
                    "-s", self.lbexport, "-m", self.jpdump])
        self.assertEqual(proc.returncode, 0, proc.stderr)
        purge = self.purge_dump(10, 2)
        proc = run([sys.executable, LB_DUMP_EXPORTER, "-d", purge,
                    "-m", self.jpdump])
        self.assertEqual(proc.returncode, 0, proc.stderr)
        # What the original C tools left in the queues.
        self.original_exporter_dump(1)
        self.original_exporter_dump(2, jpps_bug=True)
        archives = [self.original_sandbox(n) for n in (1, 2)]
        # glite-jp-primary-upload_files -p proxy -j jobid -m dir -s jpps
        jobid = "https://lb.example.org:9000/upl00001"
        h.jpps.register(jobid, self.owner)
        sandbox_file = h.path("stdout.txt")
        with open(sandbox_file, "w") as f:
            f.write("hello\n")
        proc = run([sys.executable, JP_UPLOAD_FILES, "-p", h.pki.proxy,
                    "-j", jobid, "-m", self.jpsandbox, "-s",
                    h.jpps.hostport, sandbox_file])
        self.assertEqual(proc.returncode, 0, proc.stderr)
        # The LB server's registration.
        self.original_message(self.jpreg, (
            "https://lb.example.org:9000/reg00001\n%s" % self.owner
        ).encode())
        # The packaged start script, as $GLITE_USER: daemonized.
        pidfile = h.path("glite-jp-importer.pid")
        pid, said, stop = self.start_importer(
            ["-i", pidfile, "--reg-mdir", self.jpreg, "--dump-mdir",
             self.jpdump, "--jpps", h.jpps.hostport, "--sandbox-mdir",
             self.jpsandbox, "--store", self.keep, "-c", h.cert,
             "-k", h.key])
        want = len(self.expected)
        self.assertEqual(want, 3 + 2 + 2 + 2)
        wait_for(lambda: len(self.stored()) == want + 1, timeout=60,
                 what="every dump and sandbox stored")
        wait_for(lambda: "reg00001" in h.jpps.jobs, what="the registration")
        stored = self.stored()
        for key, digest in self.expected.items():
            self.assertEqual(stored.get(key), digest, key)
        stop()
        self.assertFalse(os.path.exists(pidfile))
        for maildir in (self.jpreg, self.jpdump, self.jpsandbox):
            for sub in ("new", "work", "post", "undeliverable"):
                self.assertEqual(listing(maildir, sub), [], (maildir, sub))
        # --store kept the deployment's dumps; the sandboxes are gone.
        self.assertEqual(len(os.listdir(self.keep)), 3 + 2 + 2)
        for path in archives:
            self.assertFalse(os.path.exists(path))

    def test_example_script_runs_it_in_the_foreground(self):
        """glite-jp-importer.sh: `-g`, output to a log, short options."""
        h = self.h
        purge = self.purge_dump(20, 2)
        proc = run([sys.executable, LB_DUMP_EXPORTER, "-d", purge,
                    "-s", self.lbexport, "-m", self.jpdump])
        self.assertEqual(proc.returncode, 0, proc.stderr)
        log = open(h.path("jp-importer.log"), "wb")
        importer = subprocess.Popen(
            [sys.executable, JP_IMPORTER, "-g", "-i", h.path("pid"),
             "-r", self.jpreg, "-d", self.jpdump, "-s", self.jpsandbox,
             "-p", h.jpps.hostport, "-c", h.cert, "-k", h.key],
            stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        self.addCleanup(lambda: importer.poll() is None and importer.kill())
        wait_for(lambda: len(self.stored()) == 2, timeout=60,
                 what="the dumps stored")
        importer.terminate()
        self.assertEqual(importer.wait(TIMEOUT), 0)
        output = read_text(h.path("jp-importer.log"))
        self.assertNotIn("Traceback", output)
        self.assertEqual(output.count("delivered"), 2, output)


class TestOperatorWatching(unittest.TestCase):
    """What a site admin watches and steers: --status in JSON and for
    monitoring, the --once summary, --flush, selective --requeue and
    --delete, the log level, storage outages, worker names, --help."""

    def importer(self, *args, **kw):
        proc = run([sys.executable, JP_IMPORTER] + list(args),
                   timeout=TIMEOUT, **kw)
        self.assertNotIn("Traceback", proc.stderr)
        return proc

    def status_json(self, h, *extra):
        proc = self.importer("--status", "--json", *(h.args() + list(extra)))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return json.loads(proc.stdout)

    def troubles(self, h):
        """A postponed registration, an undeliverable one, a new one."""
        h.jpps.inject("fault", "RegisterJob", code=errno.EIO)
        postponed = drop_message(h.reg, registration(1))
        h.once("--retry", "600")
        bad = drop_message(h.reg, b"no newline here")
        h.once("--retry", "600")
        fresh = drop_message(h.reg, registration(2), age=7200)
        os.utime(os.path.join(h.reg, "new", fresh),
                 (time.time() - 7200,) * 2)
        return postponed, bad, fresh

    def check(self, h, *extra, **kw):
        args = ["--status", "--check", "-c", h.cert, "-k", h.key,
                "-r", h.reg, "-d", h.dump, "-s", h.sandbox] + list(extra)
        proc = self.importer(*args, **kw)
        self.assertEqual(proc.stdout.count("\n"), 1, proc.stdout)
        return proc.returncode, proc.stdout

    def test_status_json_says_everything_and_the_text_the_same(self):
        h = ImporterHarness(self)
        postponed, bad, fresh = self.troubles(h)
        report = self.status_json(h, "--retry", "600")
        self.assertEqual(report["version"], 1)
        self.assertEqual(report["daemon"], {
            "pidfile": h.pidfile, "running": False, "pid": None,
            "error": None})
        cert = jp_importer.read_pem_certificates(h.cert)[0]
        self.assertEqual(report["credential"]["subject"], HOST_SUBJECT)
        self.assertEqual(report["credential"]["not_after"], cert.not_after)
        self.assertAlmostEqual(report["credential"]["expires_in"],
                               cert.not_after - time.time(), delta=60)
        reg = report["queues"]["registration"]
        self.assertEqual(reg["counts"], {"new": 1, "work": 0, "post": 1,
                                         "undeliverable": 1})
        self.assertEqual(reg["due_now"], 1)               # only the new one
        self.assertGreaterEqual(reg["oldest_age"], 7200)
        self.assertGreater(reg["next_retry"], time.time() + 300)
        self.assertEqual(sorted((e["state"], e["count"])
                                for e in reg["errors"]),
                         [("postponed", 1), ("undeliverable", 1)])
        self.assertIn("EIO", [e for e in reg["errors"]
                              if e["state"] == "postponed"][0]["reason"])
        self.assertEqual([u["name"] for u in reg["undeliverable"]], [bad])
        self.assertEqual(report["queues"]["dump"]["counts"]["new"], 0)
        # The text form says the same for a person.
        proc = self.importer("--status", "--retry", "600", *h.args())
        for text in ("daemon: not running (pid file %s)" % h.pidfile,
                     "credential: %s (%s), valid until %s" % (
                         h.cert, HOST_SUBJECT,
                         jp_importer.format_time(cert.not_after)),
                     "new 1  work 0  post 1  undeliverable 1",
                     "due now: 1", "postponed 1x, last ",
                     "undeliverable 1x, last "):
            self.assertIn(text, proc.stdout)
        # A running daemon: its pid, from the lock it holds.
        for name in (postponed, fresh):
            for sub in ("new", "post"):
                unlink_if_there(os.path.join(h.reg, sub, name))
        proc = h.start()
        wait_for(lambda: read_text(h.pidfile).strip(), what="the pid file")
        report = self.status_json(h)
        self.assertEqual((report["daemon"]["running"],
                          report["daemon"]["pid"]), (True, proc.pid))
        self.assertIn("daemon: running, pid %d" % proc.pid,
                      self.importer("--status", *h.args()).stdout)
        self.assertEqual(h.stop(proc), 0)
        # No credential: null and the reason, the rest as before.
        proc = self.importer("--status", "--json", "-c", h.path("gone.pem"),
                             "-r", h.reg, "-d", h.dump, "-s", h.sandbox)
        report = json.loads(proc.stdout)
        self.assertIsNone(report["credential"])
        self.assertEqual(report["credential_error"], "cannot read %s: No "
                         "such file or directory" % h.path("gone.pem"))
        self.assertEqual(report["queues"]["registration"]["counts"]
                         ["undeliverable"], 1)

    def test_readme_json_sample_has_exactly_the_keys_of_the_code(self):
        h = ImporterHarness(self)
        self.troubles(h)
        report = self.status_json(h)
        with open(os.path.join(HERE, "README.md")) as f:
            readme = f.read()
        block = readme.split("<!-- status-json-sample -->", 1)[1]
        sample = json.loads(block.split("```json", 1)[1].split("```", 1)[0])

        def shape(value):
            if isinstance(value, dict):
                return dict((k, shape(v)) for k, v in value.items())
            if isinstance(value, list):
                return [shape(v) for v in value[:1]]
            return None
        # The sample's lists and credential are filled where ours are.
        self.assertEqual(shape(sample)["queues"]["dump"],
                         shape(report)["queues"]["registration"])
        for kind in ("registration", "sandbox"):
            self.assertEqual(shape(sample)["queues"][kind],
                             shape(report)["queues"]["dump"])
        self.assertEqual(shape(sample)["credential"],
                         shape(report)["credential"])
        self.assertEqual(set(sample), set(report))
        self.assertEqual(shape(sample)["daemon"], shape(report)["daemon"])

    def test_check_exit_codes_for_monitoring(self):
        h = ImporterHarness(self)
        code, line = self.check(h)
        self.assertEqual(code, 0, line)
        self.assertRegex(line, r"^JP_IMPORTER OK - 0 waiting .*\| waiting=0 "
                         r"oldest_age=0s;3600;86400;0 ")
        drop_message(h.reg, b"no newline here")
        h.once()
        code, line = self.check(h)
        self.assertEqual(code, 1, line)
        self.assertTrue(line.startswith("JP_IMPORTER WARNING - 1 "
                                        "undeliverable;"), line)
        self.assertEqual(self.check(h, "--crit-undeliverable", "1")[0], 2)
        self.assertEqual(self.check(h, "--warn-undeliverable", "0")[0], 0)
        drop_message(h.dump, b"jobid x\n", age=7200)
        code, line = self.check(h, "--warn-undeliverable", "0")
        self.assertEqual(code, 1, line)
        self.assertIn("oldest message waiting 2h00m", line)
        code, line = self.check(h, "--warn-undeliverable", "0",
                                "--crit-age", "3600")
        self.assertEqual(code, 2, line)
        # A pid file named and no daemon holding it: CRITICAL.
        code, line = self.check(h, "--warn-undeliverable", "0",
                                "--warn-age", "0", "-i", h.pidfile)
        self.assertEqual(code, 2, line)
        self.assertIn("no daemon holds %s" % h.pidfile, line)
        # An expired credential: CRITICAL.
        expired = h.pki.make_proxy("watch-expired.pem",
                                   start="20200101000000Z",
                                   end="20210101000000Z")
        code, line = self.check(h, "--warn-undeliverable", "0",
                                "--warn-age", "0", "-c", expired)
        self.assertEqual(code, 2, line)
        self.assertIn("credential expired", line)
        # A maildir that cannot be read: UNKNOWN.
        code, line = self.check(h, "-s", h.path("missing"))
        self.assertEqual(code, 3, line)
        self.assertTrue(line.startswith("JP_IMPORTER UNKNOWN - sandbox "
                                        "maildir does not exist"), line)
        proc = self.importer("--check", "-r", h.reg)
        self.assertEqual(proc.returncode, 2)
        self.assertIn("--check goes with --status", proc.stderr)

    def test_once_ends_with_one_summary_line(self):
        h = ImporterHarness(self)
        for n in range(3):
            drop_message(h.reg, registration(n))
        h.jpps.inject("fault", "RegisterJob", code=errno.EIO)
        drop_message(h.reg, b"no newline here")
        os.mkfifo(os.path.join(h.dump, "new", "fifo"))
        proc = h.once()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        lines = [l for l in proc.stderr.splitlines() if "--once:" in l]
        self.assertEqual(len(lines), 1, proc.stderr)
        self.assertRegex(lines[0], r"master: INFO --once: 2 delivered, "
                         r"1 postponed, 2 undeliverable in \d+\.\ds$")
        self.assertIn("--once:", proc.stderr.splitlines()[-2])

    def test_flush_makes_the_postponed_due_even_for_a_running_daemon(self):
        h = ImporterHarness(self)
        h.jpps.inject("fault", "RegisterJob", code=errno.EIO)
        name = drop_message(h.reg, registration(1))
        proc = h.start("--retry", "600")
        wait_for(lambda: listing(h.reg, "post") == [name],
                 what="the message postponed")
        before = h.state(h.reg, name)
        self.assertGreater(float(before["next_retry"]), time.time() + 300)
        # The daemon remembers the retry time; --flush must reach it.
        wait_for(lambda: h.jpps.ops("RegisterJob"), what="the first call")
        out = self.importer("--flush", *h.args())
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("%s: 1 postponed message(s) due now" % h.reg,
                      out.stdout)
        wait_for(lambda: h.jpps.ops("RegisterJob", "ok"),
                 what="delivery after --flush")
        self.assertEqual(h.stop(proc), 0)
        self.assertIn("(attempt 2,", h.output())
        # --flush keeps the attempts and the give-up clock.
        h.jpps.inject("fault", "RegisterJob", code=errno.EIO)
        other = drop_message(h.reg, registration(2))
        h.once("--retry", "600")
        before = h.state(h.reg, other)
        self.importer("--flush", *h.args())
        after = h.state(h.reg, other)
        self.assertLessEqual(float(after["next_retry"]), time.time())
        del before["next_retry"], after["next_retry"]
        self.assertEqual(before, after)

    def test_requeue_and_delete_one_message_by_name_or_jobid(self):
        h = ImporterHarness(self)
        names = [drop_message(h.reg, registration(n), age=7 * 86400)
                 for n in range(3)]
        h.jpps.inject("fault", "RegisterJob", code=errno.EIO, count=3)
        h.once("--give-up", "60")
        self.assertEqual(listing(h.reg, "undeliverable"), sorted(names))
        jobid = "https://lb.example.org:9000/job00001"
        proc = self.importer("--requeue", jobid, *h.args())
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(listing(h.reg, "new"), [names[1]])
        reason = h.state(h.reg, names[2])["reason"]
        proc = self.importer("--delete", names[2], *h.args())
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(listing(h.reg, "undeliverable"), [names[0]])
        self.assertNotIn(names[2], listing(h.reg, "state"))
        record = os.path.join(h.reg, "deleted.log")
        self.assertEqual(stat.S_IMODE(os.stat(record).st_mode), 0o600)
        line = read_text(record)
        self.assertEqual(line.count("\n"), 1)
        for text in ("undeliverable/" + names[2],
                     "https://lb.example.org:9000/job00002",
                     "reason: " + reason, "(uid %d)" % os.getuid()):
            self.assertIn(text, line)
        # Only undeliverable messages; an unknown one is a clear error.
        for mode, what in (("--delete", names[1]), ("--requeue", "nothing"),
                           ("--delete", "https://lb.example.org:9000/x")):
            proc = self.importer(mode, what, *h.args())
            self.assertEqual(proc.returncode, 1, (mode, what))
            self.assertIn("no undeliverable message named", proc.stderr)
        self.assertEqual(listing(h.reg, "new"), [names[1]])
        self.assertEqual(listing(h.reg, "undeliverable"), [names[0]])

    def test_log_level(self):
        h = ImporterHarness(self)
        drop_message(h.reg, registration(1))
        h.jpps.inject("fault", "RegisterJob", code=errno.EIO)
        drop_message(h.reg, registration(2))
        proc = h.once("--log-level", "WARNING")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn("INFO", proc.stderr)
        self.assertIn("WARNING registration", proc.stderr)
        proc = self.importer("--log-level", "LOUD", *h.args())
        self.assertEqual(proc.returncode, 2)
        self.assertIn("--log-level must be one of", proc.stderr)

    def test_workers_are_named_in_ps(self):
        h = ImporterHarness(self)
        proc = h.start("-D", "2")
        workers = h.workers(proc, 4)

        def comm(pid):
            return read_text("/proc/%d/comm" % pid).strip()
        names = wait_for(lambda: sorted(map(comm, workers)) == [
            "jp_imp: dump-1", "jp_imp: dump-2", "jp_imp: reg",
            "jp_imp: sandbox"] and comm(proc.pid) == "jp_importer",
            what="the process names")
        self.assertTrue(names)
        self.assertEqual(h.stop(proc), 0)

    def test_help_and_readme_list_every_option(self):
        proc = self.importer("--help")
        self.assertEqual(proc.returncode, 0)
        with open(os.path.join(HERE, "README.md")) as f:
            readme = f.read()
        section = readme.split("## jp_importer.py: the import daemon")[1]
        section = section.split("### What it does")[0]
        usage_block = section.split("```")[1]
        tables = section.split("```")[2]
        options = ["--" + o.rstrip("=") for o in jp_importer.LONGOPTS]
        options += ["-" + c for c in jp_importer.SHORTOPTS.replace(":", "")]
        # The usage block may give an option by its short name only.
        short = dict((long_, short_) for short_, long_ in re.findall(
            r"^\| `(-\w)`, `(--[\w-]+)", tables, re.M))
        self.assertGreater(len(short), 10)
        for opt in options:
            pattern = r"(?<![\w-])%s(?![\w-])"
            self.assertRegex(proc.stdout, pattern % re.escape(opt),
                             "--help lacks " + opt)
            self.assertRegex(usage_block, pattern % re.escape(
                short.get(opt, opt)), "README usage lacks " + opt)
            self.assertRegex(tables, r"`%s[ `]" % re.escape(opt),
                             "README option table lacks " + opt)

    def test_storage_outage_costs_one_timeout_and_one_warning(self):
        h = upload_harness(self)
        h.ftps.inject("stall", count=10, command="USER")
        for n in range(4):
            queue_dump(h, n)
        proc = h.once("--retry", "30", "--timeout", "1")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(h.ftps.connections, 1)         # not 4
        self.assertEqual(len(listing(h.dump, "post")), 4)
        skipped = [n for n in listing(h.dump, "post") if "unreachable since"
                   in h.state(h.dump, n)["last_error"]]
        self.assertEqual(len(skipped), 3)
        for name in skipped:        # kept for the retry: no second upload
            self.assertTrue(h.state(h.dump, name)["destination"])
        warnings = [l for l in proc.stderr.splitlines() if "WARNING dump" in l]
        self.assertEqual(len(warnings), 1, proc.stderr)
        self.assertIn("no answer within the time limit", warnings[0])
        # Due now, then a daemon with a short back-off: the server comes
        # back, every message goes to the destination it has, and one
        # line says so.
        self.importer("--flush", *h.args())
        h.ftps.release()
        h.ftps.injections[:] = []
        h.ftps.released.clear()
        h.ftps.inject("stall", count=2, command="USER")   # fails twice
        proc = h.start("--retry", "1", "--timeout", "1")
        wait_for(lambda: len(h.jpps.committed) == 4, what="4 commits")
        wait_for(lambda: not listing(h.dump, "post") + listing(h.dump, "work"),
                 what="the queue drained")
        self.assertEqual(h.stop(proc), 0)
        output = h.output()
        self.assertEqual(output.count("WARNING dump"), 1, output)
        self.assertEqual(output.count("no answer within the time limit"), 2,
                         output)
        self.assertEqual(output.count("is back (unreachable since"), 1,
                         output)
        self.assertEqual(len(h.jpps.ops("StartUpload")), 4)

    def test_log_lines_name_the_process(self):
        h = ImporterHarness(self)
        drop_message(h.reg, registration(0))
        proc = h.once()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertRegex(proc.stderr, r"\] registration-0: INFO registration "
                         r"https://\S+: registered")
        self.assertRegex(proc.stderr, r"\] master: INFO --once: 1 delivered")


# ---------------------------------------------------------------------------
# Reliability: SIGKILL at random moments, nothing lost
# ---------------------------------------------------------------------------

# The sizes of the reliability tests.  The default meets the documented
# minimums (2,000 messages and 50 kills, 10,000 malformed messages,
# 100,000 malformed dump lines); JP_TEST_SOAK=1 is the long mode (five to
# ten times more); JP_TEST_QUICK=1 runs the same tests at a tenth of the
# size (CI uses it for every interpreter after the first, which runs the
# full sizes).
SOAK = os.environ.get("JP_TEST_SOAK") == "1"
QUICK = os.environ.get("JP_TEST_QUICK") == "1" and not SOAK


def scaled(count, soak=5):
    """`count` in this mode: times `soak` for JP_TEST_SOAK=1, a tenth
    (at least 1) for JP_TEST_QUICK=1."""
    if SOAK:
        return count * soak
    return max(1, count // 10) if QUICK else count


def report_figures(name, figures):
    """Print a reliability test's figures (for the README) with -v."""
    if VERBOSE or SOAK:
        sys.stderr.write("\n  %s: %s\n" % (name, ", ".join(
            "%s %s" % (k, v) for k, v in figures)))


class TestKillsLoseNothing(unittest.TestCase):
    """SIGKILL of workers and of the whole importer, again and again."""

    def advance_past_upload_deadlines(self, h):
        """Move the clock past the JPPS upload deadline, for both sides.

        A crash between the StartUpload answer and the state write leaves
        an upload open at the JPPS that the importer cannot resume: the
        retry meets EEXIST and waits out the deadline (300 s) before it
        may count the file as stored or start over.  Instead of waiting,
        the JPPS fixture expires its open uploads and the waiting
        messages' clocks are set back; returns how many were waiting.
        """
        h.jpps.expire_uploads()
        waiting = 0
        for maildir in (h.dump, h.sandbox):
            md = jp_importer.Maildir(maildir)
            for name in listing(maildir, "post"):
                state = md.read_state(name)
                if state.get("eexist_since"):
                    waiting += 1
                    state["eexist_since"] = str(time.time() - 400)
                    state["next_retry"] = "0"
                    md.write_state(name, state)
        return waiting

    def test_upload_files_killed_at_random_moments(self):
        rng = random.Random(6)
        work = tempfile.mkdtemp(prefix="jp-upload-kills-")
        self.addCleanup(shutil.rmtree, work, True)
        maildir = os.path.join(work, "jpsandbox")
        inputs = []
        for n in range(3):
            path = os.path.join(work, "file%d" % n)
            with open(path, "wb") as f:
                f.write(os.urandom(rng.randrange(1, 3 << 20)))
            inputs.append(path)
        kills, runs = 0, 0
        while kills < scaled(12):
            cmd = [sys.executable, JP_UPLOAD_FILES, "-j",
                   "https://lb.example.org:9000/kill%04d" % runs, "-m",
                   maildir, "-p", pki().proxy] + inputs
            runs += 1
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.0, 0.2))    # a random moment, not a wait
            if proc.poll() is None:
                proc.kill()
                kills += 1
            proc.wait(TIMEOUT)
            if proc.returncode != 0:        # killed: the user runs it again
                self.assertEqual(run(cmd).returncode, 0)
        # One message per request, each naming a complete archive.  A run
        # killed after writing its message in tmp/ but before linking it
        # into new/ left a complete request there: the importer queues
        # such a lone copy after a day (a second request for the job,
        # which the JPPS answers EEXIST: stored once).  Killed between
        # creating the message and writing it (as any maildir writer can
        # be, the LB server too), it left an empty one, which the
        # importer puts in undeliverable/ after a day, with the reason.
        jobids, named, empty = [], set(), 0
        for sub in ("new", "tmp"):
            for name in listing(maildir, sub):
                path = os.path.join(maildir, sub, name)
                if sub == "tmp" and os.stat(path).st_nlink > 1:
                    continue                   # the master copy of new/
                with open(path, "rb") as f:
                    data = f.read()
                if sub == "tmp" and not data:
                    empty += 1
                    continue
                fields = jp_importer.parse_keyed(data)
                if sub == "new":
                    jobids.append(fields["jobid"])
                named.add(fields["file"])
                with tarfile.open(fields["file"]) as tar:
                    members = tar.getmembers()
                    self.assertEqual(len(members), len(inputs))
                    for member, source in zip(members, inputs):
                        self.assertEqual(hashlib.sha256(tar.extractfile(
                            member).read()).hexdigest(), sha256_of(source))
        # A run killed after publishing, and run again, made two requests.
        self.assertEqual(set(jobids), set(
            "https://lb.example.org:9000/kill%04d" % n for n in range(runs)))
        twice = len(jobids) - runs
        lone = len(listing(maildir, "tmp")) - len(jobids) - empty
        # Archives of killed runs that no message names: the importer's
        # housekeeping removes them once they are a day old.
        spool = os.path.join(maildir, "spool")
        orphans = set(os.path.join(spool, n) for n in os.listdir(spool)) \
            - named
        for path in orphans:
            os.utime(path, (time.time() - 2 * 86400,) * 2)
        self.assertEqual(jp_importer.Maildir(maildir).init()
                         .remove_orphan_archives(), len(orphans))
        self.assertEqual(set(os.path.join(spool, n)
                             for n in os.listdir(spool)), named)
        # A day later the importer queues every lone copy, empty or not
        # (an empty one goes to undeliverable/ as malformed, see
        # TestBadInputInBulk): none stays in tmp/ for ever.
        self.assertEqual(jp_importer.Maildir(maildir).init()
                         .requeue_stale_tmp(now=time.time() + 2 * 86400),
                         lone + empty)
        report_figures("jp_upload_files kills", [
            ("runs", runs), ("killed", kills), ("lost", 0),
            ("requests made twice", twice),
            ("complete requests left in tmp/", lone),
            ("empty ones", empty),
            ("orphan archives removed", len(orphans))])

    def test_exporter_killed_at_random_moments(self):
        rng = random.Random(7)
        for mode, interleave in (("grouped", 1), ("-x", 40)):
            x = ExporterRun(self)
            # Not scaled down for JP_TEST_QUICK=1: a smaller dump is
            # exported before a kill can land in the middle of it.
            jobs = scaled(3000) if SOAK else 3000
            table, data = generated_dump(jobs, per_job=3,
                                         interleave=interleave, pad=300)
            dump = x.dump_file(data)
            args = ["-q", "-d", dump] + (["-x"] if interleave > 1 else [])
            announced, kills, mid_work = {}, 0, 0

            def job_files():
                return [n for n in listing(x.store, "")
                        if not n.startswith((".", "lb_dump_exporter."))]
            for attempt in range(scaled(12)):
                proc = subprocess.Popen(x.args(*args),
                                        stderr=subprocess.DEVNULL)
                if attempt == 0:
                    # The first kill meets the work begun: a job file in
                    # the store.  The others may land at start-up too.
                    wait_for(lambda: proc.poll() is not None or
                             job_files(), what="the exporter's first job file")
                # A random moment, not a wait for an event:
                time.sleep(rng.uniform(0.0, 0.5))
                if proc.poll() is not None:
                    proc.wait()
                    break
                proc.kill()
                proc.wait(TIMEOUT)
                kills += 1
                # What is published names complete files, once per job,
                # and stays as it was announced.
                published = x.assert_exported(table, complete=False)
                for jobid, (_, name, _) in published.items():
                    self.assertEqual(announced.setdefault(jobid, name), name)
                if job_files() and len(published) < len(table):
                    mid_work += 1
            final = x.run(*args)
            self.assertEqual(final.returncode, 0, final.stderr)
            for jobid, (_, name, _) in x.assert_exported(table).items():
                self.assertEqual(announced.setdefault(jobid, name), name)
            # At least one kill left the export half done (the final run
            # then had to finish it).
            self.assertGreaterEqual(kills, 1 if QUICK else 3, mode)
            self.assertGreaterEqual(mid_work, 1, mode)
            report_figures("lb_dump_exporter kills, " + mode, [
                ("jobs", len(table)), ("kills", kills),
                ("kills mid-work", mid_work), ("lost", 0),
                ("announced twice", 0)])

    def test_sigkill_storm_over_a_mixed_workload(self):
        rng = random.Random(8)
        h = upload_harness(self)
        counts = {"reg": scaled(1500), "dump": scaled(400),
                  "sandbox": scaled(100)}
        kills_wanted = scaled(52)
        os.makedirs(h.path("lbexport"), mode=0o700)
        os.makedirs(h.path("sandbox", "spool"), mode=0o700, exist_ok=True)
        digests = {}
        messages = []
        for n in range(counts["reg"]):
            messages.append((h.reg, registration(n)))
        for n in range(counts["dump"]):
            jobid, path = write_dump(h, n, size=rng.randrange(100, 20000))
            h.jpps.register(jobid, USER_SUBJECT)
            digests[jobid] = sha256_of(path)
            messages.append((h.dump, dump_message(jobid, path)))
        for n in range(counts["sandbox"]):
            jobid = "https://lb.example.org:9000/sandbox%05d" % n
            h.jpps.register(jobid, USER_SUBJECT)
            archive = h.path("sandbox", "spool", "%05d.tar" % n)
            write_archive(archive, rng.randrange(100, 30000))
            digests[jobid] = sha256_of(archive)
            messages.append((h.sandbox, sandbox_message(
                jobid, archive, h.pki.proxy)))
        rng.shuffle(messages)

        def start():
            proc = h.start("-D", "4")
            h.workers(proc, 6)
            return proc

        # The messages arrive in waves; after each wave, a kill at a
        # random moment: a random worker (the master starts another), or
        # the whole importer (started again).
        proc = start()
        waves = kills_wanted
        per_wave = len(messages) // waves + 1
        kills = {"worker": 0, "importer": 0}
        wave = 0
        while sum(kills.values()) < kills_wanted:
            for maildir, data in messages[wave * per_wave:
                                          (wave + 1) * per_wave]:
                drop_message(maildir, data)
            wave += 1
            time.sleep(rng.uniform(0.0, 0.15))   # a random moment, not a wait
            if rng.random() < 0.25:
                for pid in [proc.pid] + child_pids(proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait(TIMEOUT)
                kills["importer"] += 1
                proc = start()
            else:
                # The master restarts a worker that died young after a
                # growing delay (a crash loop must not spin): kill one of
                # those alive, and go on.
                workers = child_pids(proc.pid)
                if workers:
                    os.kill(rng.choice(workers), signal.SIGKILL)
                    kills["worker"] += 1
        for maildir, data in messages[wave * per_wave:]:
            drop_message(maildir, data)

        def undelivered():
            return sum(len(listing(m, sub)) for m in (h.reg, h.dump,
                                                      h.sandbox)
                       for sub in ("new", "work"))
        wait_for(lambda: undelivered() == 0, timeout=600 if SOAK else 120,
                 what="the queues drained")
        self.assertEqual(h.stop(proc), 0)
        waited = self.advance_past_upload_deadlines(h)
        h.once()

        registered = set(c.get("job") for c in h.jpps.ops("RegisterJob",
                                                          "ok"))
        self.assertEqual(len(registered), counts["reg"])
        self.assertEqual(sorted(h.jpps.committed.values()),
                         sorted(digests.values()))
        for maildir in (h.reg, h.dump, h.sandbox):
            for sub in ("new", "work", "post", "undeliverable"):
                self.assertEqual(listing(maildir, sub), [], (maildir, sub))
        self.assertEqual(os.listdir(h.path("lbexport")), [])
        self.assertEqual(os.listdir(h.path("sandbox", "spool")), [])
        self.assertNotIn("Traceback", h.output())
        # Duplicates: calls repeated because a crash hid their outcome.
        repeated_registrations = len(h.jpps.ops("RegisterJob")) - \
            counts["reg"]
        repeated_uploads = len(h.jpps.ops("StartUpload")) - len(digests)
        report_figures("importer kills", [
            ("messages", len(messages)), ("kills of a worker",
                                          kills["worker"]),
            ("kills of the whole importer", kills["importer"]),
            ("lost", 0), ("delivered twice", 0),
            ("RegisterJob repeated", repeated_registrations),
            ("StartUpload repeated", repeated_uploads),
            ("deadline waits", waited)])


# ---------------------------------------------------------------------------
# Reliability: bad input in bulk, for the importer and the exporter
# (counts scaled up by JP_TEST_SOAK=1)
# ---------------------------------------------------------------------------

BULK_MESSAGES = scaled(10000, soak=10)
BULK_DUMP_LINES = scaled(100000, soak=10)

BAD_JOBIDS = ("http://lb.example.org/x", "https://lb.example.org/",
              "https:///x", "https://lb.example.org/x y",
              "https://lb.example.org:0/x", "https://lb.example.org:99999/x",
              "https://lb.example.org/x\ty", "https://l b/x",
              "https://lb.example.org/\x01", "ftp://lb.example.org/x",
              "not a jobid")
NOT_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80", b"\xf8\x88")


def random_bytes(rng, size):
    return rng.getrandbits(8 * size).to_bytes(size, "big")


def write_new(maildir, messages, tag):
    """Write each message straight into new/ (a bulk writer's shortcut:
    no tmp/ copy); return the names, in order."""
    names = []
    base = int(time.time())
    new = os.path.join(maildir, "new")
    for i, data in enumerate(messages):
        name = "%d_%06d.%s" % (base, i, tag)
        fd = os.open(os.path.join(new, name),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        names.append(name)
    return names


def common_corruption(rng, kind, good):
    """The corruptions any message kind shares, of the good message
    `good`: (bytes, reason text or None), or None when `kind` is not one
    of them."""
    at = rng.randrange(len(good) + 1)
    if kind == "random":
        return random_bytes(rng, rng.randrange(1, 300)), None
    if kind == "huge":
        return good + b"x" * (jp_importer.MAX_MESSAGE - len(good)
                              + rng.randrange(1, 5000)), "larger than"
    if kind == "nul":
        return good[:at] + b"\0" + good[at:], "NUL byte"
    if kind == "utf8":
        return good[:at] + rng.choice(NOT_UTF8) + good[at:], "not UTF-8"
    return None


def malformed_registration(rng, i):
    """(bytes, reason text or None) of a surely malformed registration."""
    jobid = b"https://lb.example.org:9000/bad%06d" % i
    good = jobid + b"\n/O=Grid/CN=owner %d" % i
    kind = rng.choice(("random", "truncated", "huge", "nul", "utf8",
                       "no_owner", "lines", "jobid", "no_newline", "empty",
                       "random", "truncated", "nul", "utf8", "jobid"))
    corrupted = common_corruption(rng, kind, good)
    if corrupted is not None:
        return corrupted
    if kind == "truncated":
        # Cut before the owner starts: never a whole registration.
        return good[:rng.randrange(len(jobid) + 2)], None
    if kind == "no_owner":
        return jobid + rng.choice((b"\n", b"\n  ", b"\r\n")), "owner"
    if kind == "lines":
        return good + b"\n/O=Grid/CN=second", "several lines"
    if kind == "jobid":
        return (rng.choice(BAD_JOBIDS).encode() + b"\n/O=Grid/CN=u",
                "invalid jobid")
    if kind == "no_newline":
        return good.replace(b"\n", b" "), "without a newline"
    return b"", "without a newline"


def malformed_keyed(rng, i, sandbox):
    """(bytes, reason text or None) of a surely malformed dump or sandbox
    message."""
    sep = "\t" if sandbox else "  "
    jobid_line = "jobid%s https://lb.example.org:9000/bad%06d\n" % (sep, i)
    file_line = "file%s  /nonexistent/bad%06d\n" % (sep, i)
    good = (jobid_line + file_line +
            ("proxy\t/tmp/x509up_u0\n" if sandbox else "")).encode()
    kind = rng.choice(("random", "truncated", "huge", "nul", "utf8",
                       "no_file", "no_jobid", "twice", "jobid", "no_value",
                       "relative", "jpps", "empty", "random", "truncated",
                       "nul", "utf8", "jobid"))
    corrupted = common_corruption(rng, kind, good)
    if corrupted is not None:
        return corrupted
    if kind == "truncated":
        # Cut before the file path starts: "file" and one blank at most.
        return good[:rng.randrange(len(jobid_line) + 6)], None
    if kind == "no_file":
        return jobid_line.encode(), "no 'file' line"
    if kind == "no_jobid":
        return file_line.encode(), "no 'jobid' line"
    if kind == "twice":
        line = rng.choice((jobid_line, file_line)).encode()
        return good + line, "given twice"
    if kind == "jobid":
        return ("jobid%s %s\n%s" % (sep, rng.choice(BAD_JOBIDS),
                                    file_line)).encode(), "invalid jobid"
    if kind == "no_value":
        return good + rng.choice((b"jpps\n", b"file \n", b"jobid\t\n")), \
            "without a value"
    if kind == "relative":
        return ("%sfile%s relative/bad\n" % (jobid_line, sep)).encode(), \
            "not an absolute path"
    if kind == "jpps":
        return good + rng.choice((b"jpps   gopher://jp:8901\n",
                                  b"jpps   jp.example.org:port\n")), \
            "JPPS address"
    return b"", "no 'jobid' line"


BAD_DUMP_KINDS = ("no_jobid", "quotes", "space", "nul", "utf8", "garbage",
                  "twice")


def malformed_dump_line(rng, jobids):
    """(line without LF, reason) of a line the exporter must reject."""
    kind = rng.choice(BAD_DUMP_KINDS)
    jobid = rng.choice(jobids).encode()
    tail = b"X%d" % rng.randrange(10 ** 9)
    if kind == "no_jobid":
        return (b'DG.ARRIVED=1 DATE=2 HOST="h" DG.EVNT="Running" ' + tail,
                "no DG.JOBID field")
    if kind == "quotes":
        return (b'DATE=1 DG.JOBID="' + jobid + b'" ' + tail + b'="open',
                "unbalanced quotes")
    if kind == "space":
        text = "https://lb.example.org:9000/a %s" % tail.decode()
        return (b'DG.JOBID="' + text.encode() + b'" X="1"',
                "invalid jobid %r" % text)
    if kind == "nul":
        return (b'DG.JOBID="' + jobid + b'" X="' + tail + b'\0"',
                "NUL byte in line")
    if kind == "utf8":
        return (b'DG.JOBID="https://lb.example.org:9000/' +
                rng.choice(NOT_UTF8) + tail + b'" X="1"',
                "jobid is not UTF-8")
    if kind == "twice":
        return (b'DG.JOBID="' + jobid + b'" DG.JOBID="' + jobid + b'"',
                "DG.JOBID given twice")
    # Random bytes: no LF, not blank, and no DG.JOBID field in them.
    line = random_bytes(rng, rng.randrange(1, 200)).replace(
        b"\n", b"N").replace(b"\r", b"R")
    return line, ("NUL byte in line" if b"\0" in line
                  else "no DG.JOBID field")


class TestBadInputInBulk(unittest.TestCase):
    """Thousands of malformed messages and dump lines: each one is set
    aside with its reason, nothing crashes, the good ones go through."""

    def test_ten_thousand_malformed_messages(self):
        rng = random.Random(20261129)
        h = upload_harness(self)
        started = time.monotonic()
        bad = {}                # maildir -> {name: reason or None}
        per_kind = {h.reg: [], h.dump: [], h.sandbox: []}
        for i in range(BULK_MESSAGES):
            maildir = rng.choice((h.reg, h.reg, h.dump, h.sandbox))
            if maildir == h.reg:
                per_kind[maildir].append(malformed_registration(rng, i))
            else:
                per_kind[maildir].append(
                    malformed_keyed(rng, i, maildir == h.sandbox))
        for maildir, items in per_kind.items():
            names = write_new(maildir, [data for data, _ in items], "bulk")
            bad[maildir] = dict(zip(names, [r for _, r in items]))
        self.assertEqual(sum(len(b) for b in bad.values()), BULK_MESSAGES)
        # The good ones: registrations, dumps and sandboxes.
        good_jobs = set()
        for n in range(50):
            drop_message(h.reg, registration(n))
            good_jobs.add("https://lb.example.org:9000/job%05d" % n)
        digests = []
        os.makedirs(h.path("sandbox", "spool"), mode=0o700)
        for n in range(5):
            jobid, path, _ = queue_dump(h, n, size=n * 1000)
            digests.append(sha256_of(path))
            archive = h.path("sandbox", "spool", "%d.tar" % n)
            write_archive(archive, 1000 + n)
            digests.append(sha256_of(archive))
            drop_message(h.sandbox, ("jobid\t%s\nfile\t%s\n" % (
                jobid, archive)).encode())
        written = time.monotonic()
        proc = h.once(timeout=600)
        if VERBOSE:
            sys.stderr.write("\n%d malformed messages written in %.1fs, "
                             "importer ran %.1fs\n"
                             % (BULK_MESSAGES, written - started,
                                time.monotonic() - written))
        self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
        self.assertNotIn("Traceback", proc.stderr)
        self.assertNotIn("internal error", proc.stderr)
        self.assertEqual(proc.stderr.count("moved to undeliverable/: "
                                           "malformed message: "),
                         BULK_MESSAGES)
        # Every good one delivered, and nothing of a bad one reached the
        # JPPS.
        self.assertEqual(sorted(c.get("job") for c in
                                h.jpps.ops("RegisterJob", "ok")),
                         sorted(good_jobs))
        self.assertEqual(sorted(h.jpps.committed.values()), sorted(digests))
        self.assertEqual(len(h.jpps.ops()), 50 + 10 * 2)
        # Every malformed one in undeliverable/ with its reason; nothing
        # left anywhere else; malformed in == undeliverable out.
        out = 0
        for maildir, names in bad.items():
            for sub in ("new", "work", "post"):
                self.assertEqual(listing(maildir, sub), [], sub)
            undeliverable = listing(maildir, "undeliverable")
            self.assertEqual(undeliverable, sorted(names))
            out += len(undeliverable)
            for name, expected in names.items():
                reason = h.state(maildir, name).get("reason", "")
                self.assertTrue(reason.startswith("malformed message: ") and
                                len(reason) > 20, (name, reason))
                if expected:
                    self.assertIn(expected, reason, name)
        self.assertEqual(out, BULK_MESSAGES)

    def test_hundred_thousand_malformed_dump_lines(self):
        rng = random.Random(1129)
        x = ExporterRun(self)
        table, data = generated_dump(2000, per_job=5)
        good = data.splitlines(True)
        jobids = [jobid for jobid, _ in table]
        # Where each bad line goes: before good line k (len(good): at the
        # end); a few over-long ones, from one byte over the limit (which
        # may end within a read block) to two read blocks over it.
        slots = [[] for _ in range(len(good) + 1)]
        for _ in range(BULK_DUMP_LINES - 3):
            slots[rng.randrange(len(slots))].append(
                malformed_dump_line(rng, jobids))
        limit = lb_dump_exporter.MAX_LINE
        chunk = lb_dump_exporter.CHUNK
        for extra in (1, 2 * chunk + rng.randrange(1, 99),
                      rng.randrange(1, 2 * chunk)):
            size = limit + extra
            line = (b'DG.JOBID="' + rng.choice(jobids).encode() + b'" X="' +
                    b"v" * size + b'"')
            slots[rng.randrange(len(slots))].append(
                (line, "line longer than %d bytes" % limit))
        lines, expected = [], []
        for k, bad in enumerate(slots):
            for line, reason in bad:
                lines.append(line + b"\n")
                expected.append((len(lines), reason, line))
            if k < len(good):
                lines.append(good[k])
        self.assertEqual(len(expected), BULK_DUMP_LINES)
        dump = x.dump_file(b"".join(lines))
        del data, slots
        errors = os.path.join(x.dir, "stderr")
        with open(errors, "wb") as err:
            proc = x.run("-d", dump, stderr=err, timeout=600)
        with open(errors, "rb") as f:
            stderr = f.read().decode("utf-8", "replace")
        self.assertEqual(proc.returncode, 3, stderr[-2000:])
        self.assertEqual(proc.stdout, "")
        self.assertNotIn("Traceback", stderr)
        # The first rejects one line each, in order, a count of the
        # others, then the summary.
        shown = lb_dump_exporter.REJECTS_SHOWN
        report = stderr.split("\n")
        self.assertEqual(report.pop(), "")
        self.assertEqual(len(report), shown + 2)
        self.assertEqual(report[:shown], ["%s:%d: %s" % (dump, number, reason)
                                          for number, reason, _
                                          in expected[:shown]])
        rejects_file = [n for n in os.listdir(x.store)
                        if n.endswith(".rejects")][0]
        self.assertEqual(report[shown], "lb_dump_exporter: ... and %d more "
                         "rejected lines (see %s)" % (
                             BULK_DUMP_LINES - shown,
                             os.path.join(x.store, rejects_file)))
        self.assertIn("%d lines, %d exported, %d rejected, 0 blank"
                      % (len(lines), len(good), BULK_DUMP_LINES), report[-1])
        # The rejects file: "# line N: reason" and the line, for each.
        rejects = x.rejects().split(b"\n")
        self.assertEqual(rejects.pop(), b"")
        self.assertEqual(len(rejects), 2 * BULK_DUMP_LINES)
        for (number, reason, line), head, body in zip(
                expected, rejects[0::2], rejects[1::2]):
            self.assertEqual(head, b"# line %d: %s"
                             % (number, reason.encode()))
            self.assertEqual(body, line, number)
        # Every good job's file holds exactly its lines.
        x.assert_exported(table)
        exported = sum(len(job_lines) for _, job_lines in table)
        self.assertEqual(exported + len(rejects) // 2, len(lines))


# ---------------------------------------------------------------------------
# Reliability: security, the threat model: the importer's TLS and
# credential checks on the JPPS (HTTPS/SOAP) side, secrets, hardened
# credentials
# ---------------------------------------------------------------------------

_TLS_CERTS = {}


def tls_certificate(name):
    """A (certificate, key) the TLS tests need, issued once per run."""
    if name not in _TLS_CERTS:
        p = pki()
        localhost = "DNS:localhost,IP:127.0.0.1"
        if name == "rogue-server":
            made = p.issue(name, "/O=Rogue/CN=localhost", "serverAuth",
                           san=localhost,
                           ca=(p.rogue_ca_cert, p.path("rogue-ca.key")))
        elif name == "misnamed-server":
            made = p.issue(name, "/O=Grid/OU=Test/CN=other.example",
                           "serverAuth", san="DNS:other.example")
        elif name == "expired-server":
            made = p.issue(name, HOST_SUBJECT, "serverAuth", san=localhost,
                           start="20200101000000Z", end="20210101000000Z")
        elif name == "future-user":
            made = p.issue(name, "/O=Grid/OU=Test/CN=Future User",
                           "clientAuth", start="20990101000000Z",
                           end="20991231000000Z")
        else:
            made = (p.make_proxy(name + ".pem", start="20990101000000Z",
                                 end="20991231000000Z"), None)
        _TLS_CERTS[name] = made
    return _TLS_CERTS[name]


def pem_secrets(*paths):
    """The base64 lines of PEM files (keys, proxies): none may be logged."""
    found = set()
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("-----"):
                    found.add(line)
    return found


class TestTLSAndSecrets(unittest.TestCase):
    """The importer against a JPPS it must not trust, with credentials it
    must refuse or warn about, and logs that hold no secret."""

    def refused_by_the_importer(self, server, in_handshake=True):
        """Run the importer once against a JPPS serving `server`; check
        that nothing was delivered and the message waits in post/; return
        the harness and the message's last_error.  in_handshake: the
        client refused during the TLS handshake (the server saw it)."""
        h = ImporterHarness(self)
        h.jpps.context = h.pki.server_context(*tls_certificate(server))
        name = drop_message(h.reg, registration(1))
        proc = h.once()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        self.assertEqual(h.jpps.ops(), [])
        if in_handshake:
            self.assertGreaterEqual(h.jpps.refused_handshakes, 1)
        self.assertEqual(listing(h.reg, "post"), [name])
        self.assertEqual(listing(h.reg, "undeliverable"), [])
        error = h.state(h.reg, name)["last_error"]
        self.assertIn("JPPS localhost:%d" % h.jpps.port, error)
        self.assertIn(error, proc.stderr)
        self.assertEqual(h.state(h.reg, name)["attempts"], "1")
        return h, error

    def assert_not_trusted(self, error, reason):
        self.assertIn("server certificate not trusted", error)
        self.assertNotIn("host name", error)
        if sys.version_info >= (3, 7):
            self.assertIn(reason, error)
        else:       # 3.6 has no verify_message: the reason is lost
            self.assertIn("certificate verify failed", error)

    def test_unknown_ca_is_retried(self):
        _, error = self.refused_by_the_importer("rogue-server")
        self.assert_not_trusted(error,
                                "unable to get local issuer certificate")

    def test_wrong_host_name_is_refused(self):
        # Python 3.6 checks the name after the handshake, 3.7+ within.
        h, error = self.refused_by_the_importer(
            "misnamed-server", in_handshake=sys.version_info >= (3, 7))
        self.assertIn("does not match the host name", error)
        self.assertRegex(error, r"[Hh]ostname mismatch|hostname 'localhost' "
                         r"doesn't match 'other\.example'")
        # By address: the certificate names no 127.0.0.1 either.
        h.jpps.url = "https://127.0.0.1:%d" % h.jpps.port
        name = drop_message(h.reg, registration(2))
        proc = h.once()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        error = h.state(h.reg, name)["last_error"]
        self.assertIn("does not match the host name", error)
        self.assertRegex(error, r"IP address mismatch.*'127\.0\.0\.1'|"
                         r"hostname '127\.0\.0\.1' doesn't match")
        self.assertEqual(h.jpps.ops(), [])

    def test_expired_server_certificate_is_refused(self):
        _, error = self.refused_by_the_importer("expired-server")
        self.assert_not_trusted(error, "certificate has expired")

    def test_not_yet_valid_credentials_are_clear_errors(self):
        h = ImporterHarness(self)
        name = drop_message(h.reg, registration(1))
        proxy, _ = tls_certificate("future-proxy")
        cert, key = tls_certificate("future-user")
        for h.cert, h.key, subject in (
                (proxy, proxy, USER_SUBJECT + "/CN="),
                (cert, key, "/O=Grid/OU=Test/CN=Future User")):
            proc = h.once()
            self.assertEqual(proc.returncode, 1, proc.stderr)
            self.assertNotIn("Traceback", proc.stderr)
            self.assertEqual(len(proc.stderr.splitlines()), 1, proc.stderr)
            self.assertRegex(proc.stderr, r"^jp_importer: credential %s: "
                             r"certificate %s\S* is not valid before "
                             r"(2098-12-31|2099-01-0[12]) "
                             % (re.escape(h.cert), re.escape(subject)))
        self.assertEqual(h.jpps.ops(), [])
        self.assertEqual(listing(h.reg, "new"), [name])

    def test_key_readable_by_others_is_warned_about(self):
        h = ImporterHarness(self)
        key = h.path("hostkey.pem")
        shutil.copy(h.pki.host_key, key)
        proxy = h.path("proxy.pem")
        shutil.copy(h.pki.proxy, proxy)
        for h.cert, h.key, mode in ((h.cert, key, 0o644),
                                    (h.cert, key, 0o640),
                                    (proxy, proxy, 0o604),
                                    (h.cert, key, 0o600),
                                    (proxy, proxy, 0o400)):
            os.chmod(h.key, mode)
            drop_message(h.reg, registration(mode))
            proc = h.once()
            self.assertEqual(proc.returncode, 0, proc.stderr)
            warning = ("WARNING private key %s is accessible by others "
                       "(mode %04o); it should be 0600 or 0400"
                       % (h.key, mode))
            if mode & 0o077:
                self.assertIn(warning, proc.stderr)
            else:
                self.assertNotIn("accessible by others", proc.stderr)
            self.assertEqual(listing(h.reg, "new"), [])
        self.assertEqual(len(h.jpps.ops("RegisterJob", "ok")), 5)

    def test_no_secrets_in_logs(self):
        password = "Zq9:s3cr3t/pw"
        quoted = "Zq9%3As3cr3t%2Fpw"
        root = tempfile.mkdtemp(prefix="jp-ftp-root-")
        self.addCleanup(shutil.rmtree, root, True)
        ftps = FTPSFixture(pki(), root, users={"jp": password}).start()
        self.addCleanup(ftps.stop)
        h = ImporterHarness(self, dest_base="ftp://jp:%s@localhost:%d/jpps"
                            % (quoted, ftps.port), local_root=root)
        h.cert = h.key = h.pki.proxy
        # Registrations: some fine, one met by an HTTP 500.
        for n in range(5):
            drop_message(h.reg, registration(n))
        h.jpps.inject("http500", op="RegisterJob")
        # Dumps: delivered, a refused login, a dropped transfer, a missing
        # file; a sandbox naming the proxy.
        digests = []
        for n in range(4):
            _, path, _ = queue_dump(h, n, size=20000)
            digests.append(sha256_of(path))
        drop_message(h.dump, dump_message(
            "https://lb.example.org:9000/gone", h.path("lbexport", "gone")))
        ftps.inject("refuse_login")
        ftps.inject("drop_data", after=1000)
        os.makedirs(h.path("sandbox", "spool"), mode=0o700)
        archive = h.path("sandbox", "spool", "1.tar")
        write_archive(archive, 3000)
        drop_message(h.sandbox, sandbox_message(
            "https://lb.example.org:9000/dump00000", archive, h.pki.proxy))
        logfile = h.path("debug.log")
        proc = h.once("-g", "--log", logfile)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        # The retries; the dropped upload's JPPS slot has expired.
        h.jpps.expire_uploads()
        proc2 = h.once("-g", "--log", logfile)
        self.assertEqual(proc2.returncode, 0, proc2.stderr)
        log_text = read_text(logfile)
        # The workload did what it should: password used, failures seen.
        self.assertIn(("jp", password), ftps.logins)
        self.assertIn("530", log_text)
        self.assertIn("not a SOAP 1.1 envelope", log_text)     # HTTP 500
        self.assertIn("426", log_text)
        self.assertIn("no longer exists", log_text)
        self.assertIn("jp:****@localhost:%d" % ftps.port, log_text)
        self.assertEqual(len(h.jpps.ops("RegisterJob", "ok")), 5)
        # Five uploads, one login refused for good (undeliverable, as the
        # missing file), the dropped one delivered on its retry.
        self.assertEqual(len(h.jpps.committed), 4)
        self.assertGreaterEqual(len(set(digests) &
                                    set(h.jpps.committed.values())), 3)
        self.assertEqual(len(listing(h.dump, "undeliverable")) +
                         len(listing(h.sandbox, "undeliverable")), 2)
        for maildir in (h.reg, h.dump, h.sandbox):
            self.assertEqual(listing(maildir, "post"), [])
        # And no secret anywhere it wrote.
        secrets = pem_secrets(h.pki.proxy, h.pki.user_key, h.pki.host_key)
        self.assertGreater(len(secrets), 50)
        for text in (log_text, proc.stderr, proc.stdout, proc2.stderr,
                     proc2.stdout):
            self.assertNotIn("PRIVATE KEY", text)
            self.assertNotIn("s3cr3t", text)
            for secret in secrets:
                self.assertNotIn(secret, text)


def revoked_server():
    """(certificate, key, CA directory) of a server certificate of the
    test CA that a CRL revokes: the directory is the test CA's plus that
    CRL as <hash>.r0, as fetch-crl keeps it.  Made once per run."""
    if "revoked" not in _TLS_CERTS:
        p = pki()
        cert, key = p.issue("revoked-server", HOST_SUBJECT, "serverAuth",
                            san="DNS:localhost,IP:127.0.0.1")
        db = p.path("crl-db")
        os.makedirs(db)
        open(os.path.join(db, "index.txt"), "w").close()
        conf = p.path("crl.cnf")
        with open(conf, "w") as f:
            f.write("[ca]\ndefault_ca=x\n[x]\ndatabase=%s\n"
                    "default_md=sha256\ndefault_crl_days=3650\n"
                    % os.path.join(db, "index.txt"))
        keys = ("-config", conf, "-cert", p.ca_cert, "-keyfile", p.ca_key)
        p.openssl("ca", "-revoke", cert, *keys)
        crl = p.path("test-ca.crl")
        p.openssl("ca", "-gencrl", "-out", crl, *keys)
        ca_dir = p.path("certificates-with-crl")
        shutil.copytree(p.ca_dir, ca_dir, symlinks=True)
        crl_hash = p.openssl("crl", "-noout", "-hash", "-in", crl).strip()
        shutil.copy(crl, os.path.join(ca_dir, crl_hash + ".r0"))
        _TLS_CERTS["revoked"] = (cert, key, ca_dir)
    return _TLS_CERTS["revoked"]


class TestCredentialsHardening(unittest.TestCase):
    """Who gets our credential: only the JPPS the operator named, a
    delegated proxy only for trusted hosts, no revoked server, no proxy
    file planted by another user."""

    def test_message_may_name_only_an_allowed_jpps(self):
        h = upload_harness(self)
        # A JPPS of the message writer's choice: a port that listens but
        # is never served, so any connection made to it stays queued.
        rogue = socket.socket()
        self.addCleanup(rogue.close)
        rogue.bind(("127.0.0.1", 0))
        rogue.listen(8)
        other = JPPSFixture(h.pki, dest_base=h.ftps.url("other"),
                            local_root=h.ftp_root).start()
        self.addCleanup(other.stop)
        port = h.jpps.port
        names = {}
        # The forms the exporter's -j, jp_upload_files -s and the start
        # script's --jpps write all name -p: no option needed for them.
        for n, jpps in enumerate(("localhost:%d" % port,
                                  "https://localhost:%d" % port,
                                  "http://LocalHost:%d/" % port,
                                  "localhost:%d" % rogue.getsockname()[1],
                                  "https://localhost:%d" % other.port)):
            jobid, path = write_dump(h, n)
            h.jpps.register(jobid, USER_SUBJECT)
            other.register(jobid, USER_SUBJECT)
            names[drop_message(h.dump, dump_message(jobid, path, jpps))] = \
                jpps
        proc = h.once()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        self.assertEqual(len(h.jpps.committed), 3)
        self.assertEqual(other.ops(), [])
        rogue.setblocking(False)
        with self.assertRaises(BlockingIOError):
            rogue.accept()                  # no connection was made
        refused = sorted(listing(h.dump, "undeliverable"))
        self.assertEqual(sorted(names[name] for name in refused),
                         sorted(list(names.values())[3:]))
        for name in refused:
            self.assertEqual(
                h.state(h.dump, name)["reason"],
                "the message names JPPS %s, which is neither -p nor allowed "
                "by --allow-jpps; not contacted" % names[name])
        # --allow-jpps (any form of the address) lets the other one in.
        proc = run([sys.executable, JP_IMPORTER, "--requeue", "-r", h.reg,
                    "-d", h.dump, "-s", h.sandbox])
        self.assertEqual(proc.returncode, 0, proc.stderr)
        proc = h.once("--allow-jpps", "localhost:%d" % other.port)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(len(other.committed), 1)
        self.assertEqual(len(listing(h.dump, "undeliverable")), 1)
        for bad in ("gopher://x:1", "localhost:port"):
            proc = h.once("--allow-jpps", bad)
            self.assertEqual(proc.returncode, 2)
            self.assertIn("--allow-jpps: bad", proc.stderr)
            self.assertNotIn("Traceback", proc.stderr)


    def test_delegation_only_to_trusted_hosts_short_and_limited(self):
        p = pki()
        secure = GridFTPPeer(p, encrypt_data=True)
        self.addCleanup(secure.stop)
        jp_importer._KEPT.dcau_demands.clear()
        self.addCleanup(jp_importer._KEPT.dcau_demands.clear)
        # The JPPS is https://localhost:P; its destinations name the same
        # server by address: another host as far as trust goes.
        by_address = "gsiftp://127.0.0.1:%d%s/chain" % (secure.port,
                                                        secure.root)
        h = ImporterHarness(self, dest_base=by_address, local_root="/")
        h.cert = h.key = p.proxy
        _, path, name = queue_dump(h, 1, size=300000)
        digest = sha256_of(path)
        for dcau in ("auto", "A"):
            proc = h.once("--dcau", dcau)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertEqual(listing(h.dump, "post"), [name])
            error = h.state(h.dump, name)["last_error"]
            self.assertIn("a delegated proxy, and 127.0.0.1 is not trusted "
                          "with one (trusted: localhost; see --delegate-to)",
                          error)
            if dcau == "auto":
                self.assertIn("demands data channel protection (534", error)
        self.assertNotIn("DCAU A", secure.log_text())   # never delegated
        self.assertEqual(h.jpps.committed, {})
        self.assertTrue(os.path.exists(path))
        h.jpps.expire_uploads()
        proc = h.once("--delegate-to", "127.0.0.1")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(list(h.jpps.committed.values()), [digest])
        self.assertIn("[CLIENT]: DCAU A", secure.log_text())
        # What is delegated: a limited proxy for the upload's own time.
        signed = []
        original = jp_importer.sign_proxy_request

        def recording(*args, **kw):
            signed.append((time.time(), original(*args, **kw)))
            return signed[-1][1]
        jp_importer.sign_proxy_request = recording
        self.addCleanup(setattr, jp_importer, "sign_proxy_request", original)
        payload = os.path.join(h.dir, "payload")
        with open(payload, "wb") as f:
            f.write(os.urandom(3 * 1024 * 1024))
        creds = jp_importer.Credentials(p.proxy, p.proxy, p.ca_dir)
        for timeout, lifetime in ((10, 600), (300, 3 * 300 + 48)):
            self.assertEqual(jp_importer.upload_gsiftp(
                secure.url("limited-%d" % timeout), payload, creds, timeout,
                dcau="A"), 3 * 1024 * 1024)
            when, der = signed[-1]
            info = jp_importer.CertInfo(der)
            self.assertAlmostEqual(info.not_after - when, lifetime, delta=2)
            pem = os.path.join(h.dir, "delegated.pem")
            with open(pem, "w") as f:
                f.write(ssl.DER_cert_to_PEM_cert(der))
            self.assertRegex(p.openssl("x509", "-in", pem, "-noout",
                                       "-text"),
                             r"Policy Language: 1\.3\.6\.1\.4\.1\.3536"
                             r"\.1\.1\.1\.9\b")
        self.assertEqual(jp_importer.delegated_lifetime(10 ** 12, 120),
                         12 * 3600)
        # --dcau A to an untrusted host: refused before any connection.
        with self.assertRaises(jp_importer.TransientError) as cm:
            jp_importer.upload_gsiftp(
                "gsiftp://storage.invalid/x", payload, None, 5, dcau="A",
                delegate_to=["jpps.example.org", "se.example.org"])
        self.assertIn("storage.invalid is not trusted with one (trusted: "
                      "jpps.example.org, se.example.org;", str(cm.exception))


    def assert_revoked(self, error):
        if sys.version_info >= (3, 7):
            self.assertIn("certificate revoked", error)
        else:       # 3.6 has no verify_message: the reason is lost
            self.assertIn("certificate verify failed", error)

    def test_revoked_server_certificates_are_refused(self):
        cert, key, ca_dir = revoked_server()
        h = upload_harness(self)
        queue_dump(h, 1)
        name = drop_message(h.reg, registration(1))
        # The CRL revokes one certificate: the others still pass.
        proc = h.once("-C", ca_dir)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(len(h.jpps.committed), 1, proc.stderr)
        self.assertEqual(len(h.jpps.ops("RegisterJob", "ok")), 1)
        # A JPPS presenting the revoked one: nothing sent, retried later.
        h.jpps.context = h.pki.server_context(cert, key)
        name = drop_message(h.reg, registration(2))
        proc = h.once("-C", ca_dir)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(len(h.jpps.ops()), 3)
        self.assertEqual(listing(h.reg, "post"), [name])
        error = h.state(h.reg, name)["last_error"]
        self.assertIn("JPPS localhost:%d: server certificate not trusted"
                      % h.jpps.port, error)
        self.assert_revoked(error)
        # An FTPS server presenting it: taken while the CA directory has
        # no CRL, refused once a CRL is renamed in (as fetch-crl does).
        ftps = FTPSFixture(h.pki, h.ftp_root, cert=(cert, key)).start()
        self.addCleanup(ftps.stop)
        ca_copy = os.path.join(h.dir, "ca-copy")
        shutil.copytree(h.pki.ca_dir, ca_copy, symlinks=True)
        creds = jp_importer.Credentials(h.pki.host_cert, h.pki.host_key,
                                        ca_copy).load()
        payload = payloads(h.dir, (5000,))[0][1]
        self.assertEqual(jp_importer.upload(ftps.url("before"), payload,
                                            creds, 5), 5000)
        crl = [n for n in os.listdir(ca_dir) if n.endswith(".r0")][0]
        shutil.copy(os.path.join(ca_dir, crl), os.path.join(ca_copy, "new"))
        os.rename(os.path.join(ca_copy, "new"), os.path.join(ca_copy, crl))
        with self.assertRaises(jp_importer.TransientError) as cm:
            jp_importer.upload(ftps.url("after"), payload, creds, 5)
        self.assert_revoked(str(cm.exception))
        self.assertEqual(ftps.stores, 1)
        # A broken CRL file is a one-line error naming it.
        broken = os.path.join(h.dir, "broken-ca")
        shutil.copytree(ca_dir, broken, symlinks=True)
        crl = [n for n in os.listdir(broken) if n.endswith(".r0")][0]
        with open(os.path.join(broken, crl), "w") as f:
            f.write("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
        proc = h.once("-C", broken)
        self.assertEqual(proc.returncode, 1)
        self.assertRegex(proc.stderr, r"^jp_importer: CRL %s: .+\n$"
                         % re.escape(os.path.join(broken, crl)))


    def test_planted_proxy_is_never_used(self):
        p = pki()
        d = tempfile.mkdtemp(prefix="jp-proxy-lookup-")
        self.addCleanup(shutil.rmtree, d, True)
        for name, value in (("DEFAULT_PROXY", os.path.join(d, "x509up_u%d")),
                            ("HOST_CERT", p.host_cert),
                            ("HOST_KEY", p.host_key)):
            self.addCleanup(setattr, jp_importer, name,
                            getattr(jp_importer, name))
            setattr(jp_importer, name, value)
        me = os.geteuid()
        # The lookup is run for a user `ours` (root has its own order),
        # and `other` plants files: made by us, they are not `other`'s.
        ours = me or 4242
        other = ours + 1

        def plant(uid, mode, owner=None):
            path = jp_importer.DEFAULT_PROXY % uid
            shutil.copy(p.proxy, path)
            os.chmod(path, mode)
            if owner is not None and owner != me:
                os.chown(path, owner, -1)
            return path
        find = jp_importer.find_credentials
        user_env = {"X509_USER_CERT": p.user_cert,
                    "X509_USER_KEY": p.user_key}
        for uid, mode, owner, problem in (
                (other, 0o600, None, "owned by uid %d, not by us (uid %d)"
                 % (me, other)),
                (ours, 0o640, ours, "readable or writable by group or "
                 "others (mode 0640)"),
                (ours, 0o604, ours, "readable or writable by group or "
                 "others (mode 0604)")):
            planted = plant(uid, mode, owner)
            with self.assertLogs("jp_importer", "WARNING") as logs:
                self.assertEqual(find(environ=user_env, uid=uid),
                                 (p.user_cert, p.user_key,
                                  "X509_USER_CERT"))
            self.assertEqual(logs.output, ["WARNING:jp_importer:default "
                                           "proxy %s: %s; not used"
                                           % (planted, problem)])
        # Ours and private: used.  A link at the name: not followed.
        os.chmod(jp_importer.DEFAULT_PROXY % ours, 0o600)
        self.assertEqual(find(environ={}, uid=ours),
                         (jp_importer.DEFAULT_PROXY % ours,) * 2 +
                         ("default proxy",))
        os.symlink(jp_importer.DEFAULT_PROXY % ours,
                   jp_importer.DEFAULT_PROXY % (other + 1))
        with self.assertLogs("jp_importer", "WARNING") as logs:
            self.assertEqual(find(environ=user_env, uid=other + 1)[2],
                             "X509_USER_CERT")
        self.assertIn("not a regular file; not used", logs.output[0])
        # X509_USER_PROXY naming one that is not ours: an error.
        with self.assertRaises(jp_importer.ConfigError) as cm:
            find(environ={"X509_USER_PROXY": jp_importer.DEFAULT_PROXY
                          % other}, uid=other)
        self.assertEqual(str(cm.exception), "X509_USER_PROXY %s: owned by "
                         "uid %d, not by us (uid %d); refused"
                         % (jp_importer.DEFAULT_PROXY % other, me, other))
        # Root: the host certificate before /tmp/x509up_u0, after what
        # the environment names.
        plant(0, 0o600)
        self.assertEqual(find(environ={}, uid=0),
                         (p.host_cert, p.host_key, "host certificate"))
        self.assertEqual(find(environ=user_env, uid=0)[2], "X509_USER_CERT")
        # A proxy replaced on disk by one that is not private: the loaded
        # one is kept.
        proxy = os.path.join(d, "renewed")
        shutil.copy(p.proxy, proxy)
        os.chmod(proxy, 0o600)
        creds = jp_importer.Credentials(proxy, proxy, p.ca_dir)
        creds.private = (me, True)
        creds.load()
        os.unlink(proxy)
        shutil.copy(p.host_cert, proxy)
        os.chmod(proxy, 0o644)
        with self.assertLogs("jp_importer", "ERROR") as logs:
            creds.refresh()
        self.assertIn("proxy %s: readable or writable by group or others "
                      "(mode 0644); refused; keeping the credential loaded "
                      "before" % proxy, logs.output[0])
        self.assertEqual(creds.subject, p.proxy_dn)

    def test_importer_refuses_a_proxy_that_is_not_private(self):
        h = ImporterHarness(self)
        proxy = h.path("x509up")
        shutil.copy(h.pki.proxy, proxy)
        name = drop_message(h.reg, registration(1))
        env = dict(os.environ, X509_USER_PROXY=proxy)
        cmd = [sys.executable, JP_IMPORTER, "--once"] + h.args()[4:]
        self.assertEqual(h.args()[:4], ["-c", h.cert, "-k", h.key])
        for mode in (0o644, 0o600):
            os.chmod(proxy, mode)
            proc = run(cmd, env=env)
            if mode == 0o644:
                self.assertEqual(proc.returncode, 1, proc.stderr)
                self.assertEqual(proc.stderr, "jp_importer: X509_USER_PROXY "
                                 "%s: readable or writable by group or "
                                 "others (mode 0644); refused\n" % proxy)
                self.assertEqual(listing(h.reg, "new"), [name])
                self.assertEqual(h.jpps.ops(), [])
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(listing(h.reg, "new"), [])
        self.assertEqual(len(h.jpps.ops("RegisterJob", "ok")), 1)


# ---------------------------------------------------------------------------
# The demonstration (python3 test_all.py --demo)
# ---------------------------------------------------------------------------

DEMO_SAMPLE = os.path.join(TESTDATA, "samples", "sample_job_waiting")
DEMO_JOBID = "https://lb.example.org:9000/hDQ85r7YMkuGV3mHYQiaQY"
DEMO_OWNER = "/C=XX/O=Example Grid/CN=Jane Roe"


def run_demo(out=sys.stdout):
    """The whole chain on 127.0.0.1 with throwaway credentials.

    A registration, an LB purge dump sample and a sandbox go through the
    maildirs and jp_importer to the JPPS fixture and the FTPS fixture.
    Returns 0 when everything was delivered.
    """
    def say(text=""):
        out.write(text + "\n")
        out.flush()

    work = tempfile.mkdtemp(prefix="jp-demo-")
    os.chmod(work, 0o700)
    servers = []
    try:
        say("== throwaway PKI (openssl) in %s" % work)
        p = PKI(os.path.join(work, "pki"))
        ftproot = os.path.join(work, "ftp-root")
        os.mkdir(ftproot)
        ftps = FTPSFixture(p, ftproot).start()
        servers.append(ftps)
        jpps = JPPSFixture(p, dest_base=ftps.url("jpps"),
                           local_root=ftproot).start()
        servers.append(jpps)
        say("== JPPS fixture on %s, FTPS fixture on %s"
            % (jpps.url, ftps.url("")))
        reg, dump, sandbox = (make_maildir(os.path.join(work, n))
                              for n in ("jpreg", "jpdump", "jpsandbox"))
        store = os.path.join(work, "lbexport")

        say("== LB server: registration message for %s" % DEMO_JOBID)
        drop_message(reg, ("%s\n%s" % (DEMO_JOBID, DEMO_OWNER)).encode(),
                     name="%d_%06d.lb.example.org" % (time.time(), 1))

        say("== lb_dump_exporter.py -d %s" % os.path.basename(DEMO_SAMPLE))
        if not os.path.exists(LB_DUMP_EXPORTER):
            say("   lb_dump_exporter.py does not exist yet: skipped")
        else:
            proc = run([sys.executable, LB_DUMP_EXPORTER, "-q", "-d",
                        DEMO_SAMPLE, "-s", store, "-m", dump])
            say("   exit %d; %s" % (proc.returncode,
                                    (proc.stdout + proc.stderr).strip()))

        say("== jp_upload_files.py: sandbox of two files")
        sandbox_files = []
        for name, text in (("input.jdl", "[ Executable = \"/bin/date\"; ]\n"),
                           ("stdout.txt", "Sun Nov 22 12:00:00 UTC 2026\n")):
            path = os.path.join(work, name)
            with open(path, "w") as f:
                f.write(text)
            sandbox_files.append(path)
        if not os.path.exists(JP_UPLOAD_FILES):
            say("   jp_upload_files.py does not exist yet: skipped")
        else:
            proc = run([sys.executable, JP_UPLOAD_FILES, "-j", DEMO_JOBID,
                        "-m", sandbox, "-p", p.proxy] + sandbox_files)
            say("   exit %d %s" % (proc.returncode,
                                   (proc.stdout + proc.stderr).strip()))

        say("== jp_importer.py --once (with the host certificate)")
        args = [sys.executable, JP_IMPORTER, "--once", "-c", p.host_cert,
                "-k", p.host_key, "-C", p.ca_dir, "-p", jpps.url,
                "-r", reg, "-d", dump, "-s", sandbox, "--retry", "0",
                "--timeout", "10", "-t", "0.1"]
        for attempt in (1, 2, 3):
            proc = run(args)
            for line in proc.stderr.splitlines():
                if "attempt" in line or "ERROR" in line:
                    say("   " + line.split(": ", 1)[-1])
            left = sum(len(listing(m, sub)) for m in (reg, dump, sandbox)
                       for sub in ("new", "post", "work"))
            if not left:
                break

        say("== what the JP primary storage received")
        for call in jpps.calls:
            say("   %-16s %-44s -> %s" % (
                call.op, call.get("job") or call.get("jobid") or
                call.get("destination"), call.result))
        for destination, digest in sorted(jpps.committed.items()):
            size = os.path.getsize(jpps.local_path(destination))
            say("   committed %s (%d bytes, sha256 %s...)"
                % (destination, size, digest[:16]))
        delivered = len(jpps.committed)
        with open(DEMO_SAMPLE, "rb") as f:
            sample_digest = hashlib.sha256(f.read()).hexdigest()
        dump_ok = sample_digest in jpps.committed.values()
        say("   the dump stored is byte-identical to the sample: %s"
            % ("yes" if dump_ok else "NO"))
        undeliverable = [(m, n) for m in (reg, dump, sandbox)
                         for n in listing(m, "undeliverable")]
        say("== result: %d job registered, %d files committed, "
            "%d undeliverable, %d still queued"
            % (len(jpps.jobs), delivered, len(undeliverable), left))
        return 0 if (dump_ok and delivered == 2 and not left and
                     not undeliverable) else 1
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if "--demo" in sys.argv[1:]:
        sys.exit(run_demo())
    unittest.main(testRunner=TranscriptRunner)
