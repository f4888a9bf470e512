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


if __name__ == "__main__":
    unittest.main()
