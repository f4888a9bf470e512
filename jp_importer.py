#!/usr/bin/env python3
"""jp_importer -- hand LB jobs over to a JP primary storage, losing nothing.

Usage: %(prog)s [options]
       %(prog)s --status [--json | --check [thresholds]] [maildir options]
       %(prog)s --flush | --requeue [NAME|JOBID...] [maildir options]
       %(prog)s --delete NAME|JOBID... [maildir options]
       %(prog)s --upload FILE URL [credential options]

Watches three LB maildirs: registrations (RegisterJob), LB dumps and
sandbox tarballs (StartUpload, upload to the URL the JP primary storage
hands back, CommitUpload).  A drop-in replacement for glite-jp-importer.

Options (as the original):
  -h, --help              show this help and exit
  -c, --cert FILE         client certificate (host certificate or proxy)
  -k, --key FILE          private key (default: the -c file, as in a proxy)
  -C, --CAdir DIR         trusted CA directory
                          (default: $X509_CERT_DIR or %(cadir)s)
  -g, --debug             stay in the foreground, log to stderr
  -p, --jpps URL          default JP primary storage (default: %(jpps)s);
                          host:port, http:// and https:// all mean TLS
  -r, --reg-mdir DIR      registration maildir (default: %(reg)s)
  -d, --dump-mdir DIR     dump maildir (default: %(dump)s)
  -D, --dump-slaves N     dump worker processes, 1..%(maxdump)d (default: 1)
  -s, --sandbox-mdir DIR  sandbox maildir (default: %(sandbox)s)
  -i, --pidfile FILE      pid file (default: %(pidfile)s)
  -t, --poll SECONDS      idle poll interval (default: %(poll)s)
  -S, --store DIR         keep uploaded dump files in DIR instead of
                          deleting them (created 0750 if missing)

New options (long only):
  --once                  drain every queue once and exit (for cron)
  --status                print the state of the maildirs; change nothing
  --json                  with --status: one JSON object (see README)
  --check                 with --status: one monitoring (Nagios) line;
                          exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN
  --warn-age S, --crit-age S  oldest waiting message (default 3600, 86400)
  --warn-undeliverable N, --crit-undeliverable N
                          undeliverable messages (default 1, 0 = never)
  --requeue [NAME|JOBID...]  move undeliverable messages (all, or those
                          named) back for delivery
  --flush                 make every postponed message due now
  --delete NAME|JOBID...  remove undeliverable messages; a record of each
                          is appended to MAILDIR/deleted.log
  --retry SECONDS         first retry delay (default: 300 registrations,
                          360 uploads; doubles per attempt, at most 1 h)
  --give-up SECONDS       give a failing message up when older than this
                          (default: %(giveup)d = 5 days)
  --timeout SECONDS       total time of one SOAP call, of an upload's
                          login, and of every read and write; a transfer
                          gets 3 times it plus 64 KiB/s (default: %(timeout)d)
  --log FILE              log to FILE (default: syslog, or stderr with -g)
  --log-level LEVEL       DEBUG, INFO (default), WARNING or ERROR
  --warn-expiry DAYS      warn when the credential expires within DAYS
                          (default: 7; in the log and in --status)
  --upload FILE URL       upload one file by hand with the importer's
                          credentials (checks a site's JPPS storage)
  --dcau auto|N|A         gsiftp data channel protection (default: auto)
  --files-in DIR          only upload dump and sandbox files that lie in
                          DIR (repeatable; the sandbox maildir's spool/ is
                          always allowed); without it, any file that
                          passes the checks (see README, "Which files")
  --allow-plain-ftp       allow ftp:// destinations without TLS
  --allow-jpps HOST:PORT  a JPPS a message's jpps line may name besides
                          -p (repeatable); any other: undeliverable
  --delegate-to HOST      a gsiftp host trusted with a delegated proxy
                          besides the host of the message's JPPS
                          (repeatable; see README, "Credentials")
  --allow-shared-dirs     accept maildirs, store and message files owned
                          by another user or writable by group/others
  --version               print the version and exit

Credentials, when -c is not given: $X509_USER_PROXY, /tmp/x509up_u<uid>,
$X509_USER_CERT/$X509_USER_KEY, ~/.globus/usercert.pem and userkey.pem;
as root $X509_USER_PROXY, $X509_USER_CERT/$X509_USER_KEY,
/etc/grid-security/hostcert.pem and hostkey.pem, /tmp/x509up_u0,
~/.globus.  A proxy file must be ours and mode 0600 or 0400.

Signals: TERM/INT finish the messages in hand and exit 0; HUP reloads the
credentials and reopens the log file.

Exit status: 0 success, 1 runtime error, 2 usage error, 141 standard
output closed before all was written (as by `| head -1`); --status --check:
the monitoring codes above.
Requires only the Python 3.6+ standard library.
"""

__version__ = "1.0.0"

import base64
import calendar
import errno
import fcntl
import ftplib
import gc
import getopt
import hashlib
import http.client
import itertools
import json
import logging
import logging.handlers
import math
import os
import pwd
import queue
import random
import re
import select
import shutil
import signal
import socket
import ssl
import stat
import sys
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

PROG = "jp_importer"

DEFAULT_JPPS = "http://localhost:8901"      # GLITE_JPPS of the original
DEFAULT_REG_MDIR = "/var/glite/jpreg"
DEFAULT_DUMP_MDIR = "/var/glite/jpdump"
DEFAULT_SANDBOX_MDIR = "/var/glite/jpsandbox"
DEFAULT_CA_DIR = "/etc/grid-security/certificates"
DEFAULT_PROXY = "/tmp/x509up_u%d"           # % uid
HOST_CERT = "/etc/grid-security/hostcert.pem"
HOST_KEY = "/etc/grid-security/hostkey.pem"
DEFAULT_POLL = 2.0
SYSLOG_SOCKET = "/dev/log"
MAX_DUMP_WORKERS = 20                       # PID_POOL_SIZE of the original

CALL_TIMEOUT = 120.0        # JPPS_NO_RESPONSE_TIMEOUT: one SOAP call, total
CREDENTIAL_CHECK = 1.0      # a credential renewed on disk: used within this
RETRY_REGISTRATION = 300.0  # JPREG_REPEAT_TIMEOUT
RETRY_UPLOAD = 360.0        # JP_REPEAT_TIMEOUT: longer than the JPPS upload
                            # deadline, so a stale upload has expired
RETRY_CAP = 3600.0
GIVE_UP = 5 * 86400.0       # the original's 50-60 min lost every message of
                            # a longer JPPS outage
JITTER = 0.2                # +-20 % on every retry delay
STALE_TMP_AGE = 86400.0     # a lone master copy older than this is requeued
ORPHAN_ARCHIVE_AGE = 86400.0  # a spool/ tarball no message names, removed
UPLOAD_DEADLINE = 300.0     # the JPPS purges unfinished uploads after this
COMMIT_BEFORE = 1000        # seconds asked for in StartUpload (ignored by
                            # the JPPS, sent as the original did)
WARN_EXPIRY = 7 * 86400.0   # warn when the credential expires within this
ONCE_RESTARTS = 2           # --once: a worker that died is restarted this
                            # often, then the run ends with status 1 (its
                            # message is recovered from work/ next time)
RESTART_BACKOFF_MAX = 60.0  # a crashing worker is restarted at most this
                            # slowly, never in a tight fork loop
ORIGINAL_IMPORTER = "glite-jp-importer"     # the C daemon we replace
ORIGINAL_BUSY = 1200.0      # after 15 min the original's attempt cannot
                            # succeed any more: a dump's four calls of 120 s,
                            # an upload the JPPS drops after 300 s, a commit
STATUS_VERSION = 1          # of the --status --json schema (README)
# --status --check: the thresholds (age in seconds of the oldest waiting
# message, undeliverable count; 0 = never) and the credential's remaining
# life below which it warns (a proxy is renewed before its last day).
CHECK_THRESHOLDS = {"warn-age": 3600, "crit-age": 86400,
                    "warn-undeliverable": 1, "crit-undeliverable": 0}
FLUSH_MARK = ".flush"       # in state/: touched by --flush, the workers
                            # then forget which messages are not yet due
DELETED_LOG = "deleted.log"  # in the maildir: a line per --delete

SUBDIRS = ("tmp", "new", "work", "post", "undeliverable")
STATE_DIR = "state"         # ours: per-message attempts, errors, reasons
MAX_MESSAGE = 64 * 1024     # a real message is < 1 kB
MAX_RESPONSE = 1024 * 1024  # a real JPPS answer is < 2 kB
MAX_REASON = 500

CLASS_LB = "urn:org.glite.jp.primary:lb"
CLASS_SANDBOX = "urn:org.glite.jp.primary:isb"  # input and output sandboxes
TYPE_LB = "text/lb"
TYPE_SANDBOX = "tar/lb"                         # what the original sent
REGTIME_ATTR = "http://egee.cesnet.cz/en/Schema/JP/System:regtime"

NS_SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
NS_JPELEM = "http://glite.org/wsdl/elements/jp"
ENVELOPE = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<SOAP-ENV:Envelope'
    ' xmlns:SOAP-ENV="http://schemas.xmlsoap.org/soap/envelope/"'
    ' xmlns:SOAP-ENC="http://schemas.xmlsoap.org/soap/encoding/"'
    ' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
    ' xmlns:xsd="http://www.w3.org/2001/XMLSchema"'
    ' xmlns:jpsrv="http://glite.org/wsdl/services/jp"'
    ' xmlns:jptype="http://glite.org/wsdl/types/jp"'
    ' xmlns:jpelem="http://glite.org/wsdl/elements/jp">'
    '<SOAP-ENV:Body>%s</SOAP-ENV:Body></SOAP-ENV:Envelope>')

KIND_REG, KIND_DUMP, KIND_SANDBOX = "registration", "dump", "sandbox"

log = logging.getLogger(PROG)

# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class Error(Exception):
    """Base class for the errors jp_importer reports and survives."""


class ConfigError(Error):
    """Bad configuration (options, credentials, directories): fatal."""


class TransientError(Error):
    """May succeed later: timeouts, dropped connections, 4xx replies."""


class NoAnswerError(TransientError):
    """A server that did not answer in time: a storage outage, not a
    refusal (see Worker's back-off per storage server)."""


class PermanentError(Error):
    """Will not succeed by retrying: 5xx, authentication refused,
    destination forbidden, untrusted or misnamed server."""


class RetryLaterError(TransientError):
    """A transient failure that must not be retried before `delay` s."""

    def __init__(self, message, delay):
        TransientError.__init__(self, message)
        self.delay = delay


class MalformedMessageError(PermanentError):
    """A maildir message that cannot be understood; quarantined."""


class MaildirError(Error):
    """The maildir cannot be written (a full disk, a read-only mount):
    the message is set aside unrecorded and tried again later."""


class JPPSFaultError(Error):
    """A SOAP fault from the JPPS, with the genericFault chain.

    `code` is the errno of the outermost genericFault, or None when the
    fault carried no parsable detail; `chain` lists (source, code, text,
    description) from the outermost to the root cause.
    """

    def __init__(self, faultstring, code=None, chain=()):
        self.faultstring, self.code, self.chain = faultstring, code, chain
        Error.__init__(self, self.describe())

    def describe(self):
        """The fault in one line: errno name, faultstring, then the chain."""
        parts = ["%s: %s" % (errno.errorcode.get(self.code, self.code),
                             self.faultstring) if self.code is not None
                 else self.faultstring]
        for source, code, text, description in self.chain:
            parts.append("%s: %s (%s)" % (source, text or code, description))
        return "; ".join(parts)


# Everything that can go wrong on a socket and is worth another try
# (cf. ftplib.all_errors); socket.timeout is not a TimeoutError before 3.10.
NETWORK_ERRORS = (socket.timeout, OSError, EOFError,
                  http.client.HTTPException)

# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def signame(sig):
    """"SIGTERM" for signal number `sig`; "signal 99" for an unknown one."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        return "signal %d" % sig


def decode_wait_status(status):
    """Describe a waitpid() status as supervisor does."""
    if os.WIFEXITED(status):
        return "exit status %d" % os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return "terminated by %s" % signame(os.WTERMSIG(status))
    return "status %d" % status


def one_line(text, limit=MAX_REASON):
    """Text fit for one log line or a state file value."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# What a log line or --status must not show raw, since a message name, a DN
# or a server's text could carry it: C0 and C1 control characters and DEL
# (a forged line, a terminal escape), and the lone surrogates that stand
# for the undecodable bytes of a file name (unwritable as UTF-8).
UNPRINTABLE_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match):
    """printable()'s re.sub callback: the escape of one character."""
    code = ord(match.group())
    if 0xdc80 <= code <= 0xdcff:            # surrogateescape: the byte
        code -= 0xdc00
    return _ESCAPES.get(chr(code)) or (
        "\\x%02x" % code if code < 0x100 else "\\u%04x" % code)


def printable(text):
    """`text` with those characters as visible escapes: \\n, \\x1b, \\xff."""
    return UNPRINTABLE_RE.sub(_escape, text)


URL_PASSWORD_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^/@:]*):[^/@]*@")


def public_url(url):
    """`url` fit for a log line: a password in it becomes ****."""
    return URL_PASSWORD_RE.sub(r"\1:****@", url)


def format_time(t):
    """Local time `t` (seconds since the epoch): 2010-06-21 11:30:28."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def format_age(seconds):
    """2d03h, 4h05m, 6m07s or 8s."""
    s = max(0, int(seconds))
    if s >= 86400:
        return "%dd%02dh" % (s // 86400, s % 86400 // 3600)
    if s >= 3600:
        return "%dh%02dm" % (s // 3600, s % 3600 // 60)
    if s >= 60:
        return "%dm%02ds" % (s // 60, s % 60)
    return "%ds" % s


def soap_datetime(t):
    """xsd:dateTime in UTC, the form gSOAP writes: 2010-06-21T09:30:28Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def unlink_quietly(path):
    """Remove `path`; a file that is gone already is no error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_private_file(path, data, sync=True):
    """Write `data` to `path` atomically (tmp, rename), mode 0600.

    With `sync` the data reaches the disk before the rename; without it
    the file still survives the death of the process, not of the machine.
    """
    tmp = "%s.%d.tmp" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                 0o600)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)


CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
JOBID_RE = re.compile(r"^https://(\[[^\]\s/]+\]|[^\s/:?\[\]]+)(?::(\d+))?"
                      r"/([^\s?]+)(\?\S*)?$")


def parse_jobid(text):
    """Parse an LB jobid as the original did; return the normal form.

    https://host[:port]/unique[?info], port 9000 when absent.  Raises
    ValueError with the reason.
    """
    if CONTROL_RE.search(text):
        raise ValueError("control character in jobid")
    match = JOBID_RE.match(text)
    if not match:
        raise ValueError("not an LB jobid (https://host[:port]/unique)")
    host, port, unique, info = match.groups()
    port = int(port) if port else 9000
    if not 0 < port < 65536:
        raise ValueError("jobid port out of range")
    return "https://%s:%d/%s%s" % (host, port, unique, info or "")


def parse_endpoint(text):
    """(host, port, path) of a JPPS address.

    host:port, http://host:port[/path] and https://host:port[/path] all
    mean TLS: the original's GSI transport was TLS whatever the scheme.
    """
    if "://" not in text:
        text = "https://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https", "httpg") or not parts.hostname:
        raise ConfigError("bad JPPS address %r (want host:port or "
                          "https://host:port)" % text)
    try:
        port = parts.port or 8901
    except ValueError:
        raise ConfigError("bad port in JPPS address %r" % text)
    return parts.hostname, port, parts.path or "/"


def endpoint_key(text):
    """"host:port" of a JPPS address, whatever its form: what the
    --allow-jpps check compares."""
    host, port, _ = parse_endpoint(text)
    return "%s:%d" % (host.lower(), port)


# ---------------------------------------------------------------------------
# Certificates: just enough DER to read validity and names
# ---------------------------------------------------------------------------

PEM_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*"
                         rb"-----END CERTIFICATE-----", re.S)
OID_NAMES = {"2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST",
             "2.5.4.10": "O", "2.5.4.11": "OU",
             "0.9.2342.19200300.100.1.25": "DC",
             "1.2.840.113549.1.9.1": "emailAddress"}


def der_read(data, pos=0):
    """Read one DER TLV at `pos`; return (tag, value start, value end)."""
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7f
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def der_children(data, start, end):
    """The (tag, start, end) of each TLV inside a constructed value."""
    items = []
    while start < end:
        tag, vstart, vend = der_read(data, start)
        items.append((tag, vstart, vend))
        start = vend
    return items


def der_oid(raw):
    """The dotted text of an OBJECT IDENTIFIER's content: "2.5.4.3"."""
    first = raw[0]
    parts, value = [first // 40 if first < 80 else 2,
                    first % 40 if first < 80 else first - 80], 0
    for byte in raw[1:]:
        value = value << 7 | byte & 0x7f
        if not byte & 0x80:
            parts.append(value)
            value = 0
    return ".".join(str(p) for p in parts)


def der_timegm(der, tlv):
    """Seconds since the epoch of a DER UTCTime or GeneralizedTime."""
    tag, start, end = tlv
    text = der[start:end].decode("ascii")
    if tag == 0x17:                               # UTCTime YYMMDDhhmmssZ
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    return calendar.timegm(time.strptime(text[:14], "%Y%m%d%H%M%S"))


def der_name(data, start, end):
    """An X.501 Name as a slash-form DN: /O=Grid/CN=x."""
    out = []
    for _, rs, re_ in der_children(data, start, end):        # RDN SETs
        for _, as_, ae in der_children(data, rs, re_):       # AVA SEQs
            (_, os_, oe), (_, vs, ve) = der_children(data, as_, ae)[:2]
            oid = der_oid(data[os_:oe])
            out.append("/%s=%s" % (OID_NAMES.get(oid, oid),
                                   data[vs:ve].decode("utf-8", "replace")))
    return "".join(out)


class CertInfo:
    """Subject, issuer and validity of one X.509 certificate (DER).

    `subject` and `issuer` are slash-form DNs, `not_before` and
    `not_after` seconds since the epoch; `subject_der` is the subject
    Name's DER content (for a proxy's subject) and `der` the whole
    certificate.
    """

    def __init__(self, der):
        _, cs, ce = der_read(der)
        tbs = der_children(der, cs, ce)[0]
        fields = der_children(der, tbs[1], tbs[2])
        if fields[0][0] == 0xa0:                 # explicit version [0]
            fields = fields[1:]
        self.serial = int.from_bytes(der[fields[0][1]:fields[0][2]], "big")
        self.issuer = der_name(der, fields[2][1], fields[2][2])
        validity = der_children(der, fields[3][1], fields[3][2])
        self.not_before, self.not_after = (
            der_timegm(der, v) for v in validity)
        self.subject = der_name(der, fields[4][1], fields[4][2])
        self.subject_der = der[fields[4][1]:fields[4][2]]
        self.der = der


def read_pem_certificates(path):
    """CertInfo of every certificate in a PEM file, in file order."""
    with open(path, "rb") as f:
        data = f.read(1024 * 1024)
    return [CertInfo(base64.b64decode(b"".join(m.group(1).split())))
            for m in PEM_CERT_RE.finditer(data)]


# ---------------------------------------------------------------------------
# Credentials
# ---------------------------------------------------------------------------

def find_credentials(cert=None, key=None, environ=None, uid=None):
    """(cert file, key file, where) by the grid lookup order.

    -c/-k first; then X509_USER_PROXY, /tmp/x509up_u<uid>,
    X509_USER_CERT/X509_USER_KEY, ~/.globus.  As root: X509_USER_PROXY,
    X509_USER_CERT, the host certificate, /tmp/x509up_u0, ~/.globus:
    what the environment names, then the host credential before a file
    in /tmp that any user can create before root does.  A proxy file
    holds its key, so key == cert for proxies.  A proxy found here must
    be ours and private (private_file_problem()): X509_USER_PROXY naming
    another is an error, a default proxy that is not is skipped with a
    warning.
    """
    env = os.environ if environ is None else environ
    uid = os.geteuid() if uid is None else uid
    if cert:
        return cert, key or cert, "-c"
    if key:
        raise ConfigError("-k given without -c")
    named, defaults = [], []
    if env.get("X509_USER_PROXY"):
        named.append((env["X509_USER_PROXY"], None, "X509_USER_PROXY"))
    defaults.append((DEFAULT_PROXY % uid, None, "default proxy"))
    if env.get("X509_USER_CERT"):
        (named if uid == 0 else defaults).append(
            (env["X509_USER_CERT"], env.get("X509_USER_KEY"),
             "X509_USER_CERT"))
    home = os.path.expanduser("~")
    defaults.append((os.path.join(home, ".globus", "usercert.pem"),
                     os.path.join(home, ".globus", "userkey.pem"),
                     "~/.globus"))
    if uid == 0:
        defaults.insert(0, (HOST_CERT, HOST_KEY, "host certificate"))
    for cert_file, key_file, where in named + defaults:
        if where in PROXY_LOOKUPS and os.path.lexists(cert_file):
            problem = private_file_problem(cert_file, uid,
                                           where == "X509_USER_PROXY")
            if problem and where == "default proxy":
                log.warning("%s %s: %s; not used", where, cert_file,
                            problem)
                continue
            if problem:
                raise ConfigError("%s %s: %s; refused"
                                  % (where, cert_file, problem))
        if os.path.exists(cert_file):
            return cert_file, key_file or cert_file, where
        if where in ("X509_USER_PROXY", "X509_USER_CERT"):
            raise ConfigError("%s names %s, which does not exist"
                              % (where, cert_file))
    raise ConfigError("no credential found: give -c/-k, or set "
                      "X509_USER_PROXY or X509_USER_CERT/X509_USER_KEY")


PROXY_LOOKUPS = ("X509_USER_PROXY", "default proxy")


def private_file_problem(path, uid, follow=True):
    """Why `path` must not be used as our proxy, or None: it must be a
    regular file owned by `uid` that group and others can neither read
    nor write.  follow=False: a symbolic link is refused too (in /tmp
    anyone can put one at a name of ours)."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError as exc:
        return exc.strerror
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != uid:
        return "owned by uid %d, not by us (uid %d)" % (st.st_uid, uid)
    if st.st_mode & 0o077:
        return ("readable or writable by group or others (mode %04o)"
                % stat.S_IMODE(st.st_mode))
    return None


def find_ca_dir(ca_dir=None, environ=None):
    """The CA directory: `ca_dir` (-C), else $X509_CERT_DIR, else
    DEFAULT_CA_DIR; ConfigError when it does not exist."""
    env = os.environ if environ is None else environ
    path = ca_dir or env.get("X509_CERT_DIR") or DEFAULT_CA_DIR
    if not os.path.isdir(path):
        raise ConfigError("CA directory %s does not exist (-C or "
                          "X509_CERT_DIR)" % path)
    return path


PEM_ANY_KEY_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----")


def check_private_key(key_file, cert_file):
    """Refuse, in one line, a key file a daemon cannot use.

    No private key in it (-c without -k, naming a bare certificate), or
    an encrypted one: OpenSSL would ask for the pass phrase on the
    terminal and block, or fail with a bare "Invalid argument".
    """
    try:
        with open(key_file, "rb") as f:
            data = f.read(1024 * 1024)
    except OSError as exc:
        raise ConfigError("cannot read key %s: %s"
                          % (key_file, exc.strerror))
    match = PEM_ANY_KEY_RE.search(data)
    if not match:
        raise ConfigError(
            "credential %s holds no private key: give its key file with -k"
            % cert_file if key_file == cert_file else
            "key %s holds no PEM private key" % key_file)
    if match.group(1) == b"ENCRYPTED " or b"Proc-Type: 4,ENCRYPTED" in data:
        raise ConfigError("key %s is encrypted, and a daemon cannot ask for "
                          "its pass phrase: use an unencrypted copy, mode "
                          "0400 (openssl pkey -in KEY -out PLAIN)" % key_file)


def expiry_warning(not_after, within, now=None):
    """"expires in ..." for a credential that expires within `within`
    seconds, or None."""
    left = not_after - (time.time() if now is None else now)
    if left > within:
        return None
    return "expires in %s: renew it" % format_age(max(left, 0))


class Credentials:
    """The importer's X.509 credential and trusted CA directory.

    client_context() gives a TLS client context that presents the
    credential and verifies servers against the CA directory, host name
    included.  The files are watched: a credential renewed on disk (a new
    proxy, a new host certificate) is loaded before the next call, and
    reload() forces that (SIGHUP).  Nothing of the key is ever logged.
    """

    def __init__(self, cert_file, key_file, ca_dir):
        self.cert_file, self.key_file, self.ca_dir = cert_file, key_file, \
            ca_dir
        self._stamp = None
        self._context = None
        self.private = None         # (uid, follow): checked at each load
        self.subject = None
        self.identity = None
        self.not_after = None
        self.generation = 0         # bumped on every (re)load

    @classmethod
    def from_options(cls, cert=None, key=None, ca_dir=None):
        """The credentials -c, -k and -C name, or the environment and
        the defaults (find_credentials(), find_ca_dir()); not loaded yet."""
        cert_file, key_file, where = find_credentials(cert, key)
        credentials = cls(os.path.abspath(cert_file),
                          os.path.abspath(key_file), find_ca_dir(ca_dir))
        if where in PROXY_LOOKUPS:
            # Renewed on disk, it is loaded again: checked again.
            credentials.private = (os.geteuid(), where == "X509_USER_PROXY")
        return credentials

    def _file_stamp(self):
        """What changes when the files are renewed: inode, mtime and size
        of the certificate and the key, and the CA directory's mtime."""
        stamp = []
        for path in (self.cert_file, self.key_file):
            st = os.stat(path)
            stamp.append((st.st_ino, st.st_mtime_ns, st.st_size))
        # fetch-crl renames new CRLs into the CA directory: its change
        # time brings them in (a stale CRL would fail every handshake).
        stamp.append(os.stat(self.ca_dir).st_mtime_ns)
        return tuple(stamp)

    def load(self):
        """Load and check the credential; raise ConfigError naming the file.

        Checks: readable, a certificate inside, not expired or not yet
        valid (every certificate of the chain), key matching, and warns
        (like ssh) when the key is readable by others.  A proxy found by
        the lookup must still be ours and private.
        """
        if self.private is not None:
            problem = private_file_problem(self.cert_file, *self.private)
            if problem:
                raise ConfigError("proxy %s: %s; refused"
                                  % (self.cert_file, problem))
        try:
            stamp = self._file_stamp()
            certs = read_pem_certificates(self.cert_file)
        except OSError as exc:
            raise ConfigError("cannot read credential %s: %s"
                              % (exc.filename or self.cert_file,
                                 exc.strerror))
        except (ValueError, IndexError) as exc:
            raise ConfigError("credential %s: unreadable certificate (%s)"
                              % (self.cert_file, exc))
        if not certs:
            raise ConfigError("credential %s holds no certificate"
                              % self.cert_file)
        now = time.time()
        for cert in certs:
            if now > cert.not_after:
                raise ConfigError("credential %s: certificate %s expired on "
                                  "%s" % (self.cert_file, cert.subject,
                                          format_time(cert.not_after)))
            if now < cert.not_before:
                raise ConfigError("credential %s: certificate %s is not "
                                  "valid before %s"
                                  % (self.cert_file, cert.subject,
                                     format_time(cert.not_before)))
        check_private_key(self.key_file, self.cert_file)
        mode = os.stat(self.key_file).st_mode
        if mode & 0o077:
            log.warning("private key %s is accessible by others (mode %04o);"
                        " it should be 0600 or 0400", self.key_file,
                        stat.S_IMODE(mode))
        context = ssl.create_default_context(capath=self.ca_dir)
        set_minimum_tls(context)
        load_crls(context, self.ca_dir)
        try:
            # A password, so that OpenSSL never prompts on a terminal.
            context.load_cert_chain(self.cert_file, self.key_file,
                                    password=b"")
        except ssl.SSLError as exc:
            raise ConfigError("credential %s / key %s: %s (wrong key, or an "
                              "encrypted key?)" % (self.cert_file,
                                                   self.key_file,
                                                   exc.reason or exc))
        except OSError as exc:
            raise ConfigError("cannot read key %s: %s"
                              % (self.key_file, exc.strerror))
        self._context = context
        self._stamp = stamp
        self.subject = certs[0].subject
        self.identity = grid_identity(certs)
        self.not_after = min(c.not_after for c in certs)
        self.generation += 1
        return self

    def refresh(self):
        """Reload when the files changed on disk; keep the old on failure."""
        try:
            changed = self._file_stamp() != self._stamp
        except OSError as exc:
            log.warning("credential %s: %s; keeping the loaded one",
                        exc.filename, exc.strerror)
            return
        if changed:
            self.reload()

    def reload(self):
        """load() again (SIGHUP); an unusable file is logged and the
        credential loaded before is kept (ConfigError if there is none)."""
        try:
            self.load()
            log.info("credential %s loaded: %s, valid until %s",
                     self.cert_file, self.subject,
                     format_time(self.not_after))
        except ConfigError as exc:
            if self._context is None:
                raise
            log.error("%s; keeping the credential loaded before", exc)

    def client_context(self):
        """The TLS client context (loaded on first use)."""
        if self._context is None:
            self.load()
        if time.time() > self.not_after:
            raise TransientError("credential %s expired on %s"
                                 % (self.cert_file,
                                    format_time(self.not_after)))
        return self._context


CRL_NAME_RE = re.compile(r"^[0-9a-f]{8}\.r[0-9]+$")


def load_crls(context, ca_dir):
    """Load every CRL of the CA directory (<hash>.r0, .r1...: fetch-crl
    keeps them there) into `context`, and check server certificates
    against them; the number loaded.

    Only the leaf is checked (VERIFY_CRL_CHECK_LEAF): checking the whole
    chain needs a CRL of every CA in it, the root's own issuer included,
    and a directory whose CAs lack one would refuse every server.  With
    no CRL at all nothing is checked (OpenSSL would otherwise refuse
    every server for a missing CRL); with some, a server whose CA has
    none is refused ("unable to get certificate CRL").
    """
    try:
        names = sorted(n for n in os.listdir(ca_dir) if CRL_NAME_RE.match(n))
    except OSError as exc:
        raise ConfigError("cannot read CA directory %s: %s"
                          % (ca_dir, exc.strerror))
    for name in names:
        path = os.path.join(ca_dir, name)
        try:
            context.load_verify_locations(cafile=path)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError("CRL %s: %s" % (
                path, getattr(exc, "reason", None) or exc.strerror or exc))
    if names:
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return len(names)


def grid_identity(certs):
    """The grid identity of a chain: the first non-proxy subject.

    An RFC 3820 proxy's subject is its issuer's plus one CN; walking the
    chain from the leaf, the identity is the first subject that is not
    such an extension of the next certificate (what Globus reports).
    """
    identity = certs[0].subject
    for cert in certs:
        if cert.subject.startswith(cert.issuer + "/CN=") and \
                "/" not in cert.subject[len(cert.issuer) + 4:]:
            identity = cert.issuer
        else:
            break
    return identity


def set_minimum_tls(context):
    """Make `context` refuse TLS before 1.2."""
    if hasattr(ssl, "TLSVersion"):                               # novm
        context.minimum_version = ssl.TLSVersion.TLSv1_2          # novm
    else:
        context.options |= (getattr(ssl, "OP_NO_TLSv1", 0)
                            | getattr(ssl, "OP_NO_TLSv1_1", 0))


# ---------------------------------------------------------------------------
# JPPS client: SOAP 1.1 document/literal over HTTP/1.1 + TLS
# ---------------------------------------------------------------------------

def _local(tag):
    """The local part of an ElementTree tag: "Body" of "{ns}Body"."""
    return tag.rpartition("}")[2]


def _child_text(elem, name):
    """Text of the first child called `name`, qualified or not."""
    for child in elem:
        if _local(child.tag) == name:
            return child.text or ""
    return None


def parse_generic_fault(elem):
    """[(source, code, text, description), ...] from a genericFault."""
    chain = []
    while elem is not None:
        code = _child_text(elem, "code")
        try:
            code = int(code) if code is not None else None
        except ValueError:
            code = None
        chain.append((_child_text(elem, "source"), code,
                      _child_text(elem, "text"),
                      _child_text(elem, "description")))
        elem = next((c for c in elem if _local(c.tag) == "reason"), None)
    return chain


def parse_soap_response(op, body):
    """The response element of `op`, or raise JPPSFaultError / TransientError.

    Hostile input is refused before parsing: a DTD could declare entities
    (billion laughs), so any DOCTYPE or ENTITY declaration is an error.
    """
    if len(body) > MAX_RESPONSE:
        raise TransientError("JPPS response larger than %d bytes"
                             % MAX_RESPONSE)
    head = body.lstrip()[:64 * 1024].upper()
    if b"<!DOCTYPE" in head or b"<!ENTITY" in body.upper():
        raise TransientError("JPPS response with a DTD refused")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise TransientError("JPPS response is not XML (%s)" % exc)
    if root.tag != "{%s}Envelope" % NS_SOAP:
        raise TransientError("JPPS response is not a SOAP 1.1 envelope "
                             "(root %s)" % one_line(root.tag, 80))
    soap_body = root.find("{%s}Body" % NS_SOAP)
    if soap_body is None or not len(soap_body):
        raise TransientError("JPPS response has an empty SOAP body")
    first = soap_body[0]
    if first.tag == "{%s}Fault" % NS_SOAP:
        chain = []
        detail = first.find("detail")
        if detail is None:
            detail = first.find("{%s}detail" % NS_SOAP)
        if detail is not None:
            for elem in detail.iter():
                if _child_text(elem, "code") is not None and \
                        _child_text(elem, "source") is not None:
                    chain = parse_generic_fault(elem)
                    break
        faultstring = _child_text(first, "faultstring") or "SOAP fault"
        code = chain[0][1] if chain else None
        raise JPPSFaultError(one_line(faultstring, 200), code, chain)
    if first.tag != "{%s}%sResponse" % (NS_JPELEM, op):
        raise TransientError("JPPS answered %s with %s"
                             % (op, one_line(first.tag, 100)))
    return first


HTTP_MAX_HEAD = 64 * 1024     # status line and headers of one answer


class _HTTPReader:
    """Reads one HTTP/1.1 answer from a socket, every read bounded by
    the call's deadline (the _Deadline shuts the socket at the end)."""

    def __init__(self, sock, deadline):
        self.sock, self.deadline = sock, deadline
        self.buffer = b""

    def _more(self, what):
        """Read what comes into the buffer, within the deadline (else
        socket.timeout); `what` is the part awaited.  At the end of the
        connection: http.client's RemoteDisconnected (nothing came) or
        IncompleteRead."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("call timeout")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except ssl.SSLError as exc:
            # An end without close_notify: with OpenSSL 3 before Python
            # 3.10 an error, later the end (suppress_ragged_eofs).
            if "EOF" not in str(exc).upper():
                raise
            data = b""
        if not data:
            if what == "status line" and not self.buffer:
                raise http.client.RemoteDisconnected(
                    "Remote end closed connection without response")
            raise http.client.IncompleteRead(self.buffer)
        self.buffer += data

    def _line(self, limit, what):
        """The next line, without its CR LF; TransientError past `limit`
        bytes (`what` names the line)."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line, self.buffer = (self.buffer[:end].rstrip(b"\r"),
                                     self.buffer[end + 1:])
                return line
            if len(self.buffer) > limit:
                raise TransientError("%s longer than %d bytes refused"
                                     % (what, limit))
            self._more(what)

    def head(self):
        """(version, status, {lower-case name: value})."""
        size = HTTP_MAX_HEAD
        line = self._line(size, "status line")
        version, _, rest = line.partition(b" ")
        code = rest[:3]
        if not version.startswith(b"HTTP/1.") or len(code) != 3 or \
                not code.isdigit():
            raise http.client.BadStatusLine(one_line(
                line.decode("latin-1"), 80))
        headers = {}
        while True:
            size -= len(line) + 2
            if size < 0:
                raise TransientError("response headers longer than %d "
                                     "bytes refused" % HTTP_MAX_HEAD)
            line = self._line(size, "response header")
            if not line:
                return version.decode("ascii", "replace"), int(code), \
                    headers
            name, sep, value = line.decode("latin-1").partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()

    def exactly(self, size):
        """The next `size` bytes."""
        while len(self.buffer) < size:
            self._more("body")
        body, self.buffer = self.buffer[:size], self.buffer[size:]
        return body

    def chunked(self):
        """A chunked body, joined; TransientError past MAX_RESPONSE bytes."""
        parts, total = [], 0
        while True:
            line = self._line(1024, "chunk size line")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise http.client.HTTPException("bad chunk size line %r"
                                                % line[:40])
            if size == 0:
                while self._line(HTTP_MAX_HEAD, "trailer"):
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_RESPONSE:
                raise TransientError("response larger than %d bytes"
                                     % MAX_RESPONSE)
            parts.append(self.exactly(size))
            if self._line(2, "chunk end"):
                raise http.client.HTTPException("no CRLF after a chunk")

    def to_end(self):
        """The body up to the end of the connection; TransientError past
        MAX_RESPONSE bytes."""
        while True:
            if len(self.buffer) > MAX_RESPONSE:
                raise TransientError("response larger than %d bytes"
                                     % MAX_RESPONSE)
            try:
                self._more("body")
            except http.client.IncompleteRead:
                return self.buffer


class JPPSClient:
    """One JP primary storage endpoint, one keep-alive TLS connection.

    Every call has a total time budget (`timeout`) for connect, TLS
    handshake, request and answer, held by a _Deadline: a server that
    trickles its answer a byte at a time cannot stretch it.  A connection
    the server closed while idle is reopened transparently, once.  A
    request goes out as one buffer (headers and body together: one TLS
    record, no wait for a delayed ACK); the answer is read by _HTTPReader:
    Content-Length, chunked bodies and "Connection: close" are handled as
    any HTTP/1.1 client does.
    """

    def __init__(self, address, credentials, timeout=CALL_TIMEOUT):
        self.address = address
        self.host, self.port, self.path = parse_endpoint(address)
        self.credentials = credentials
        self.timeout = timeout
        self._sock = None
        self._pending = None
        self._limit = None          # the _Deadline of the call in progress
        self._generation = None
        self._refresh_at = 0
        self._last_answer = (None, None)
        self._head = ("POST %s HTTP/1.1\r\nHost: %s:%d\r\n"
                      "User-Agent: %s/%s\r\n"
                      "Content-Type: text/xml; charset=utf-8\r\n"
                      "SOAPAction: \"\"\r\nConnection: keep-alive\r\n"
                      "Content-Length: " % (self.path, self.host, self.port,
                                            PROG, __version__))

    def close(self):
        """Drop the connection (and end a call left unanswered)."""
        self._end_call()
        self._disconnect()

    def _disconnect(self):
        """Close the connection; the next call opens a new one."""
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def _end_call(self):
        """Stop the call's time limit; a connection it shut down is
        closed."""
        limit, self._limit = self._limit, None
        if limit is not None:
            limit.cancel()                # before a descriptor is freed
            if limit.expired:
                self._disconnect()        # shut down: no keep-alive left

    def _connect(self, deadline):
        """The open connection (reused is True) or a new one."""
        now = time.monotonic()
        if now >= self._refresh_at:     # three stat() calls: once a second
            self.credentials.refresh()
            self._refresh_at = now + CREDENTIAL_CHECK
        context = self.credentials.client_context()
        if self._generation != self.credentials.generation:
            self._disconnect()            # a new credential, a new session
            self._generation = self.credentials.generation
        if self._sock is not None:
            self._limit.watch(self._sock)
            return True
        sock = socket.create_connection(
            (self.host, self.port), max(0.1, deadline - time.monotonic()))
        try:
            self._limit.watch(sock)       # the handshake too
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            self._sock = context.wrap_socket(sock,
                                             server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        return False

    def call(self, op, inner_xml):
        """POST one request; return the response element."""
        self.send(op, inner_xml)
        return self.receive()

    def send(self, op, inner_xml):
        """Send one request; receive() reads its answer.

        Split so that a worker can do its maildir work while the JPPS
        handles the request; there is never more than one in flight.
        """
        body = (ENVELOPE % ('<jpelem:%s>%s</jpelem:%s>'
                            % (op, inner_xml, op))).encode("utf-8")
        request = ("%s%d\r\n\r\n" % (self._head, len(body))).encode() + body
        self._end_call()                # one never received is over
        self._limit = _Deadline(self.timeout)
        self._pending = [op, request, time.monotonic() + self.timeout,
                         False]
        try:
            self._transmit(first=True)
        except BaseException:
            self._end_call()
            raise

    def _transmit(self, first):
        op, request, deadline, _ = self._pending
        reused = False          # a failed connect or handshake: not reused
        try:
            reused = self._connect(deadline)
            self._pending[3] = reused
            self._sock.settimeout(max(0.001, deadline - time.monotonic()))
            self._sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError,
                ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
            self._disconnect()
            # A keep-alive connection the server closed while idle: the
            # request never reached it, so sending it again is safe.
            if first and reused and not self._limit.expired:
                return self._transmit(first=False)
            raise self._network_error(exc, op)
        except Exception as exc:
            self._disconnect()
            raise self._network_error(exc, op)

    def receive(self):
        """The response element of the request sent last."""
        op = self._pending[0]
        try:
            status, data = self._receive()
        finally:
            self._end_call()
        if status not in (200, 500):
            raise TransientError("%s: HTTP %d to %s"
                                 % (self._where(), status, op))
        # A server answers every RegisterJob alike, byte for byte: the
        # element parsed last time, when the bytes are the same (callers
        # only read it).
        if self._last_answer[0] == (op, data) and status == 200:
            return self._last_answer[1]
        try:
            element = parse_soap_response(op, data)
        except TransientError as exc:
            self.close()
            raise TransientError("%s: %s" % (self._where(), exc))
        if status == 200:
            self._last_answer = ((op, data), element)
        return element

    def _receive(self):
        op, request, deadline, reused = self._pending
        try:
            return self._read_response(deadline)
        except (http.client.RemoteDisconnected, ConnectionResetError,
                ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
            self._disconnect()
            if not reused or self._limit.expired:
                raise self._network_error(exc, op)
            # Closed while idle, before any answer: once more, fresh.
            self._transmit(first=False)
            try:
                return self._read_response(deadline)
            except Exception as exc2:
                self._disconnect()
                raise self._network_error(exc2, op)
        except TransientError as exc:
            self._disconnect()
            raise TransientError("%s: %s" % (self._where(), exc))
        except Exception as exc:
            self._disconnect()
            raise self._network_error(exc, op)

    def _where(self):
        """"JPPS host:port", for messages."""
        return "JPPS %s:%d" % (self.host, self.port)

    def _network_error(self, exc, op):
        """The TransientError to raise for a failed exchange."""
        where = self._where()
        if isinstance(exc, Error):
            return exc
        if isinstance(exc, socket.timeout) or self._limit.expired:
            # a connection the deadline shut fails in any which way
            return TransientError("%s: no answer to %s within %gs"
                                  % (where, op, self.timeout))
        # From 3.7 every failed verification is an SSLCertVerificationError,
        # which is also ssl.CertificateError; only codes 62 and 64
        # (X509_V_ERR_HOSTNAME/IP_ADDRESS_MISMATCH) are about the name.
        # 3.6 raises CertificateError (no code) for the name alone.
        if isinstance(exc, ssl.CertificateError) and \
                getattr(exc, "verify_code", 62) in (62, 64):
            return TransientError("%s: server certificate does not match "
                                  "the host name: %s" % (where, getattr(
                                      exc, "verify_message", "") or exc))
        if isinstance(exc, ssl.SSLError):
            if exc.reason == "CERTIFICATE_VERIFY_FAILED":
                return TransientError("%s: server certificate not trusted: "
                                      "%s" % (where, getattr(
                                          exc, "verify_message", "") or exc))
            return TransientError("%s: TLS error during %s: %s"
                                  % (where, op, exc.reason or exc))
        if isinstance(exc, NETWORK_ERRORS):
            return TransientError("%s: %s failed: %s" % (where, op, exc))
        return exc

    def _read_response(self, deadline):
        """(status, body) of the answer; HTTP/1.1 read here, not by
        http.client, whose header parsing (the email package, a buffered
        file object per answer) cost more than the rest of a
        registration's own work.  Content-Length, chunked bodies, bodies
        up to the end of the connection, 1xx interim answers and
        "Connection: close" (or HTTP/1.0) are handled; everything is
        bounded (HTTP_MAX_HEAD, MAX_RESPONSE)."""
        sock = self._sock
        if sock is None:
            raise ConnectionResetError("not connected")
        reader = _HTTPReader(sock, deadline)
        while True:
            version, status, headers = reader.head()
            if not 100 <= status < 200:
                break
        will_close = "close" in headers.get("connection", "").lower() or (
            version == "HTTP/1.0" and "keep-alive" not in
            headers.get("connection", "").lower())
        length = headers.get("content-length")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = reader.chunked()
        elif length is not None:
            if not length.isdigit():
                raise http.client.HTTPException("bad Content-Length %r"
                                                % one_line(length, 40))
            if int(length) > MAX_RESPONSE:
                raise TransientError("response of %s bytes refused"
                                     % length)
            body = reader.exactly(int(length))
        elif status in (204, 304):
            body = b""
        else:
            body, will_close = reader.to_end(), True
        if will_close or reader.buffer:   # bytes after the answer: unsafe
            self._disconnect()
        return status, body

    # -- operations --------------------------------------------------------

    def register_job(self, job, owner):
        """RegisterJob: `job` (a jobid) for owner DN `owner`."""
        self.call("RegisterJob", "<job>%s</job><owner>%s</owner>"
                  % (escape(job), escape(owner)))

    def start_upload(self, job, file_class, content_type):
        """Return (destination, commitBefore text).

        `name` is sent as xsi:nil: the WSDL requires the element, the
        original sent a NULL name, and the JPPS (gSOAP) reads nil as NULL,
        so the file is named after its class alone.  An empty <name/>
        would be "" there, and the file "lb." instead of "lb".
        """
        resp = self.call(
            "StartUpload",
            '<job>%s</job><class>%s</class><name xsi:nil="true"/>'
            "<commitBefore>%s</commitBefore><contentType>%s</contentType>"
            % (escape(job), escape(file_class),
               soap_datetime(time.time() + COMMIT_BEFORE),
               escape(content_type)))
        destination = _child_text(resp, "destination")
        if not destination:
            raise TransientError("JPPS %s:%d: StartUpload returned no "
                                 "destination" % (self.host, self.port))
        return destination, _child_text(resp, "commitBefore")

    def commit_upload(self, destination):
        """CommitUpload of `destination`, the URL start_upload() gave."""
        self.call("CommitUpload", "<destination>%s</destination>"
                  % escape(destination))

    def get_job_attributes(self, jobid, attributes):
        """GetJobAttributes: (name, value element) of each value of
        `attributes` the JPPS has for `jobid`."""
        resp = self.call("GetJobAttributes", "<jobid>%s</jobid>%s" % (
            escape(jobid), "".join("<attributes>%s</attributes>"
                                   % escape(a) for a in attributes)))
        return [(_child_text(v, "name"), v) for v in resp]


# ---------------------------------------------------------------------------
# Maildir spool (the LB "maildir" layout, made loss-free)
# ---------------------------------------------------------------------------
#
# Layout as the original: tmp/ holds the master copy of every message for
# its whole life, new/ a link waiting for the first attempt, work/ the
# message being processed, post/ a message waiting for its retry,
# undeliverable/ what was given up.  Ours in addition: state/<name> keeps
# the attempts, the last error, the next retry time, the reason a message
# was given up, and the progress of an upload (so a crash between
# CommitUpload and the maildir step is not mistaken for a failure).
#
# Claiming: the worker opens the message, takes flock(LOCK_EX) on it, then
# renames it into work/ and holds the lock until the message has left
# work/.  The lock belongs to the open file, so the kernel drops it when
# the worker dies, even by SIGKILL: a message in work/ whose lock can be
# taken has no owner, and whoever takes the lock delivers it.  This works
# for any number of workers and importer instances on one machine.

#
# The original importer takes no lock: a message it works on lies in work/
# unlocked, like one a worker of ours left when it died.  It reads the
# message and closes it before its calls, so no open descriptor betrays it
# either.  What does is a running process of that name whose options (or
# defaults) name the maildir: while there is one, an unlocked message
# younger than ORIGINAL_BUSY in work/ is left to it.

ORIGINAL_SHORTOPTS = "hgp:r:d:D:s:i:t:c:k:C:K:"
ORIGINAL_LONGOPTS = ["help", "cert=", "key=", "CAdir=", "debug", "jpps=",
                     "reg-mdir=", "dump-mdir=", "dump-slaves=",
                     "sandbox-mdir=", "pidfile=", "poll=", "store=",
                     "perf-sink="]
ORIGINAL_MAILDIR_OPTS = {"-r": 0, "--reg-mdir": 0, "-d": 1, "--dump-mdir": 1,
                         "-s": 2, "--sandbox-mdir": 2}


def original_importers(root):
    """Pids of running original importers that watch maildir `root`.

    Best effort, from /proc.  One whose options or working directory we
    cannot read counts as watching it: waiting longer is the safe error.
    """
    root = os.path.realpath(root)
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    pids = []
    for pid in entries:
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = [os.fsdecode(a) for a in f.read().split(b"\0")]
        except OSError:
            continue
        if not os.path.basename(argv[0]).endswith(ORIGINAL_IMPORTER):
            continue
        maildirs = _original_maildirs(pid, argv[1:-1] if argv[-1] == ""
                                      else argv[1:])
        if maildirs is None or root in maildirs:
            pids.append(int(pid))
    return pids


def _original_maildirs(pid, args):
    """The maildirs an original importer with `args` watches, or None."""
    maildirs = [DEFAULT_REG_MDIR, DEFAULT_DUMP_MDIR, DEFAULT_SANDBOX_MDIR]
    try:
        opts = getopt.gnu_getopt(args, ORIGINAL_SHORTOPTS,
                                 ORIGINAL_LONGOPTS)[0]
        cwd = os.readlink("/proc/%s/cwd" % pid)
    except (getopt.GetoptError, OSError):
        return None
    for opt, arg in opts:
        if opt in ORIGINAL_MAILDIR_OPTS:
            maildirs[ORIGINAL_MAILDIR_OPTS[opt]] = arg
    return set(os.path.realpath(os.path.join(cwd, d)) for d in maildirs)


NAME_ORDER_RE = re.compile(r"^(\d+)_(\d+)\.")


# An open() failing so means this entry can never be read as a message
# (a socket, a device, a file we may not read), not a maildir in trouble.
NOT_A_MESSAGE_ERRNOS = (errno.ELOOP, errno.ENXIO, errno.ENODEV, errno.EACCES,
                        errno.EPERM, errno.EISDIR, errno.EOVERFLOW)


def _file_kind(mode):
    """What a file of stat mode `mode` is, for a message: "a FIFO"."""
    for test, kind in ((stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "of an unknown type"


def _name_order(name):
    """Sort key of a maildir name: by the seconds and sequence of its
    "<seconds>_<n>." prefix, names without one last."""
    match = NAME_ORDER_RE.match(name)
    if match:
        return (int(match.group(1)), int(match.group(2)), name)
    return (float("inf"), 0, name)


def check_directory(path, allow_shared=False, what="directory"):
    """Refuse a directory another user could tamper with.

    It must be a real directory (not a symlink), owned by us, and not
    writable by group or others, unless allow_shared says otherwise.
    """
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ConfigError("%s %s: %s" % (what, path, exc.strerror))
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError("%s %s is a symbolic link; refusing it"
                          % (what, path))
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError("%s %s is not a directory" % (what, path))
    if allow_shared:
        return
    if st.st_uid != os.geteuid():
        raise ConfigError("%s %s is owned by uid %d, not by us (uid %d); "
                          "use --allow-shared-dirs to accept it"
                          % (what, path, st.st_uid, os.geteuid()))
    if st.st_mode & 0o022:
        raise ConfigError("%s %s is writable by group or others (mode %04o);"
                          " use --allow-shared-dirs to accept it"
                          % (what, path, stat.S_IMODE(st.st_mode)))


GIVEN_UP_RE = re.compile(r"^given up after \d+ attempts over \S+; ")


def _count_error(groups, state, text, when, default_when):
    """Count one error in `groups` for --status; "given up after 3
    attempts over 5d02h; last error: X" counts with the others of X."""
    try:
        when = float(when)
    except (TypeError, ValueError):
        when = default_when
    entry = groups.setdefault((state, GIVEN_UP_RE.sub("given up; ", text)),
                              [0, when])
    entry[0] += 1
    entry[1] = max(entry[1], when)


class Maildir:
    """One LB maildir: claim, postpone, finish and inspect messages."""

    def __init__(self, root):
        self.root = root
        self.paths = dict((sub, os.path.join(root, sub))
                          for sub in SUBDIRS + (STATE_DIR, "spool"))
        self._prefix = dict((sub, path + os.sep)
                            for sub, path in self.paths.items())
        self.quarantined = 0        # by this process (the --once summary)

    def path(self, sub, name):
        """The path of `name` in subdirectory `sub`."""
        return self._prefix[sub] + name       # hot: no os.path.join

    def init(self, create=True, allow_shared=False):
        """Create missing subdirectories (0700) and check them all."""
        for directory in [self.root] + [self.paths[s]
                                        for s in SUBDIRS + (STATE_DIR,)]:
            # state/ is ours: a maildir only the original used has none,
            # and --requeue must record there the fresh give-up clock.
            if (create or directory == self.paths[STATE_DIR]) and \
                    not os.path.lexists(directory):
                try:
                    os.mkdir(directory, 0o700)
                except OSError as exc:
                    raise ConfigError("cannot create maildir directory %s: "
                                      "%s" % (directory, exc.strerror))
            check_directory(directory, allow_shared, "maildir directory")
            if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
                raise ConfigError("maildir directory %s is not readable and "
                                  "writable by us" % directory)
        return self

    def names(self, sub):
        """Message names in a subdirectory, oldest first."""
        try:
            names = os.listdir(self.paths[sub])
        except FileNotFoundError:
            return []
        return sorted((n for n in names if not n.startswith(".")),
                      key=_name_order)

    # -- state files --------------------------------------------------------

    def read_state(self, name):
        state = {}
        try:
            with open(self.path(STATE_DIR, name), "rb") as f:
                for line in f.read(MAX_MESSAGE).decode("utf-8",
                                                       "replace").split("\n"):
                    key, sep, value = line.partition("=")
                    if sep:
                        state[key] = value
        except FileNotFoundError:
            pass
        return state

    def write_state(self, name, state, sync=True):
        text = "".join("%s=%s\n" % (k, one_line(v, 2000))
                       for k, v in sorted(state.items()) if v is not None)
        write_private_file(self.path(STATE_DIR, name), text.encode("utf-8"),
                           sync)

    def remove_state(self, name):
        unlink_quietly(self.path(STATE_DIR, name))

    # -- claiming -----------------------------------------------------------

    def claim(self, sub, name, has_state=True):
        """Claim message `name` from new/, post/ or (an orphan) work/.

        Returns a Message holding the lock, or None when another process
        has it or it went away.  has_state=False says there is no state
        file to read (the caller listed state/ after listing new/).
        """
        source = self.path(sub, name)
        try:
            # Never blocks on a FIFO, follows a symlink or takes a terminal.
            fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_NOCTTY)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            if exc.errno in NOT_A_MESSAGE_ERRNOS:
                return self._quarantine(sub, name, exc)
            raise
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if not stat.S_ISREG(st.st_mode):        # a FIFO, a directory ...
            os.close(fd)
            return self._quarantine(sub, name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if sub != "work":
                # Everyone locks before renaming, so holding the lock while
                # the name still exists in new/ or post/ makes it ours.
                os.rename(source, self.path("work", name))
            elif os.stat(source).st_ino != st.st_ino:
                # An orphan: its owner may have finished it between our
                # open and our lock, and the name gone or been reused.
                raise FileNotFoundError(name)
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return Message(self, name, fd, st, sub, has_state)

    def _quarantine(self, sub, name, error=None):
        """What is no message file goes aside, never in the queue's way.

        A symlink (never followed), socket, FIFO, directory or device, or a
        file we may not read (`error`): renamed as it is to undeliverable/
        (under a new name if that one is taken there), the reason in
        state/.  Returns None: nothing to deliver.
        """
        source = self.path(sub, name)
        try:
            st = os.lstat(source)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            reason = "message file is a symbolic link; not followed"
        elif not stat.S_ISREG(st.st_mode):
            reason = ("message file is %s, not a regular file"
                      % _file_kind(st.st_mode))
        elif error is not None:
            reason = "message file cannot be read: %s" % error.strerror
        else:
            return None         # replaced by a file since: claimed next pass
        target = name
        if os.path.lexists(self.path("undeliverable", name)):
            target = "%s.%d.%d" % (name, time.time() * 1e6, os.getpid())
        self.write_state(target, {"reason": reason,
                                  "gave_up": str(time.time())})
        try:
            os.rename(source, self.path("undeliverable", target))
        except FileNotFoundError:       # another worker put it aside first
            if target != name:
                self.remove_state(target)
            return None
        try:                            # a link left in tmp/ by --requeue
            left = os.lstat(self.path("tmp", name))
            if (left.st_dev, left.st_ino) == (st.st_dev, st.st_ino):
                unlink_quietly(self.path("tmp", name))
        except FileNotFoundError:
            pass
        self.quarantined += 1
        log.error("%s: %s/%s: %s; moved to undeliverable/%s",
                  self.root, sub, name, reason,
                  "" if target == name else target)
        return None

    def next_retry(self, name, default_retry, state=None):
        """When a postponed message is due; None when it is gone."""
        state = self.read_state(name) if state is None else state
        try:
            return float(state["next_retry"])
        except (KeyError, ValueError):
            pass
        # Postponed by the original importer: its clock is the ctime.
        try:
            return os.stat(self.path("post", name)).st_ctime + default_retry
        except FileNotFoundError:
            return None

    # -- housekeeping -------------------------------------------------------

    def requeue_stale_tmp(self, age=STALE_TMP_AGE, now=None):
        """Queue again master copies left in tmp/ (the original never did).

        A file in tmp/ with no other link, older than `age`, was left by a
        writer or an importer that died between two steps.  It is linked
        into new/: if it is partial, it will be quarantined as malformed;
        either way nothing is silently dropped.
        """
        now = time.time() if now is None else now
        count = 0
        for name in self.names("tmp"):
            path = self.path("tmp", name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or \
                    now - st.st_mtime < age:
                continue
            try:
                os.link(path, self.path("new", name))
            except FileExistsError:
                continue
            count += 1
            log.warning("%s: tmp/%s was left alone since %s; queued again",
                        self.root, name, format_time(st.st_mtime))
        return count

    def remove_orphan_archives(self, age=ORPHAN_ARCHIVE_AGE, now=None):
        """Remove tarballs in spool/ that no message names.

        jp_upload_files writes the archive, then its message; killed in
        between, it leaves an archive nobody will upload (its caller saw
        it fail).  Only files older than `age` are looked at, and the
        messages are read only when there is such a file.
        """
        now = time.time() if now is None else now
        candidates = set()
        for name in self.names("spool"):
            path = self.path("spool", name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime > age:
                candidates.add(path)
        if not candidates:
            return 0
        for sub in SUBDIRS:
            for name in self.names(sub):
                try:
                    fd = os.open(self.path(sub, name), os.O_RDONLY |
                                 os.O_NOFOLLOW | os.O_NONBLOCK)
                except OSError:
                    continue
                try:
                    if stat.S_ISREG(os.fstat(fd).st_mode):
                        data = os.read(fd, MAX_MESSAGE)
                        named = parse_keyed(data)["file"]
                        candidates.discard(os.path.normpath(named))
                except MalformedMessageError:
                    # Quarantined, maybe to be repaired: keep what it names.
                    for path in [c for c in candidates
                                 if os.fsencode(c) in data]:
                        candidates.discard(path)
                except OSError:
                    pass
                finally:
                    os.close(fd)
        for path in sorted(candidates):
            unlink_quietly(path)
            log.warning("%s: removed %s: no message names it (its writer "
                        "died before writing the message)", self.root, path)
        return len(candidates)

    def remove_stale_state(self):
        """Remove state files whose message is gone everywhere."""
        present = set()
        for sub in SUBDIRS:
            present.update(self.names(sub))
        for name in self.names(STATE_DIR):
            if name not in present and not name.endswith(".tmp"):
                unlink_quietly(self.path(STATE_DIR, name))

    def requeue_undeliverable(self, select=None):
        """Move undeliverable messages back to new/ (those for which
        select(name, jobid) is true, if given); return their names."""
        moved = []
        for name in self.names("undeliverable"):
            source = self.path("undeliverable", name)
            if select is not None and not select(
                    name, self.jobid_of("undeliverable", name)):
                continue
            state = self.read_state(name)
            state.update({"requeued": str(time.time()), "attempts": "0",
                          "next_retry": None, "reason": None,
                          "gave_up": None})
            self.write_state(name, state)
            if not os.path.exists(self.path("tmp", name)):
                try:
                    os.link(source, self.path("tmp", name))
                except OSError:
                    pass
            try:
                os.rename(source, self.path("new", name))
            except FileNotFoundError:
                continue
            moved.append(name)
        return moved

    def status(self, default_retry, now=None):
        """A dict describing the maildir, for --status.

        default_retry: the retry delay of a message the original importer
        postponed (it has no state file), as the workers apply it.
        `errors` groups the last errors of post/ and the reasons of
        undeliverable/ by their text: {(state, text): [count, last]}.
        """
        now = time.time() if now is None else now
        info = {"root": self.root, "counts": {}, "oldest": None,
                "next_retry": None, "due_now": 0, "undeliverable": [],
                "errors": {}}
        for sub in ("new", "work", "post", "undeliverable"):
            names = self.names(sub)
            info["counts"][sub] = len(names)
            if sub == "new":
                info["due_now"] += len(names)
            for name in names:
                try:
                    mtime = os.lstat(self.path(sub, name)).st_mtime
                except FileNotFoundError:
                    continue
                if sub != "undeliverable" and (info["oldest"] is None
                                               or mtime < info["oldest"]):
                    info["oldest"] = mtime
                if sub == "post":
                    state = self.read_state(name)
                    retry = self.next_retry(name, default_retry, state)
                    if retry is None:
                        continue
                    info["due_now"] += retry <= now
                    if info["next_retry"] is None or \
                            retry < info["next_retry"]:
                        info["next_retry"] = retry
                    if state.get("last_error"):
                        _count_error(info["errors"], "postponed",
                                     state["last_error"],
                                     state.get("last_attempt"), mtime)
                if sub == "undeliverable":
                    state = self.read_state(name)
                    reason = state.get("reason", "given up by the original "
                                       "importer (no reason recorded)")
                    info["undeliverable"].append(
                        (name, state.get("jobid") or
                         self._peek_jobid(self.path(sub, name)), reason))
                    _count_error(info["errors"], "undeliverable", reason,
                                 state.get("gave_up"), mtime)
        return info

    def jobid_of(self, sub, name):
        """The jobid of a message, from its state or its first lines."""
        return (self.read_state(name).get("jobid")
                or self._peek_jobid(self.path(sub, name)))

    def flush(self, now=None):
        """Make every message of post/ due now; return how many.

        Only its retry time changes (attempts and the give-up clock stay).
        Each is locked as a worker claims it, so a message a worker holds
        is left alone and no state a worker writes is overwritten.  The
        mark file tells running workers to forget the retry times they
        remember.
        """
        now = time.time() if now is None else now
        count = 0
        for name in self.names("post"):
            try:
                fd = os.open(self.path("post", name), os.O_RDONLY |
                             os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.stat(self.path("post", name)).st_ino != \
                        os.fstat(fd).st_ino:
                    continue
                state = self.read_state(name)
                state["next_retry"] = str(now)
                self.write_state(name, state)
                count += 1
            except (BlockingIOError, FileNotFoundError):
                continue            # claimed by a worker meanwhile
            finally:
                os.close(fd)
        write_private_file(self.path(STATE_DIR, FLUSH_MARK),
                           ("%f\n" % now).encode("ascii"))
        return count

    def delete_undeliverable(self, name, who):
        """Remove an undeliverable message, its tmp/ copy and its state.

        A line goes first to deleted.log (0600, synced): when, which
        message, its jobid, who, and why it was undeliverable.
        """
        path = self.path("undeliverable", name)
        st = os.lstat(path)
        state = self.read_state(name)
        fields = [format_time(time.time()), "undeliverable/" + name,
                  state.get("jobid") or self._peek_jobid(path), "by " + who,
                  "reason: " + state.get("reason", "(none recorded)")]
        line = "\t".join(printable(one_line(f, 1000)) for f in fields)
        fd = os.open(os.path.join(self.root, DELETED_LOG), os.O_WRONLY |
                     os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, (line + "\n").encode("utf-8", "surrogateescape"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            left = os.lstat(self.path("tmp", name))
            if (left.st_dev, left.st_ino) == (st.st_dev, st.st_ino):
                unlink_quietly(self.path("tmp", name))
        except FileNotFoundError:
            pass
        if stat.S_ISDIR(st.st_mode):          # put aside as it was found
            shutil.rmtree(path)
        else:
            os.unlink(path)
        self.remove_state(name)

    @staticmethod
    def _peek_jobid(path):
        """The jobid in the message file at `path` (its "jobid" line, or
        a first line that is one), or "?"; a link or FIFO is not read."""
        try:                    # what is put aside may be a FIFO or a link
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_NOCTTY)
        except OSError:
            return "?"
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return "?"
            data = os.read(fd, 4096).decode("utf-8", "replace")
        except OSError:
            return "?"
        finally:
            os.close(fd)
        for line in data.split("\n"):
            words = line.split(None, 1)
            if len(words) == 2 and words[0] == "jobid":
                return words[1].strip()
        first = data.split("\n", 1)[0]
        return first if first.startswith("https://") else "?"


class _Closer:
    """Closes the descriptors of delivered messages in the background.

    The last close of an unlinked file frees its inode, and that can
    block: on ext4 mounted with online discard and no journal to batch
    the discards, every freed file waits for the disk (0.5-0.9 ms on the
    benchmark's machine, three times a whole RegisterJob exchange).  The
    message has left the maildir before (both names unlinked): only the
    descriptor (and the lock on a file nobody can reach) waits.  Such
    waits overlap, so THREADS threads close them, BATCH at a time; at most
    QUEUE batches wait for a thread, and flush() waits for all (the end
    of every pass).
    A forked child starts its own threads, as _Deadline's watcher.
    """

    THREADS = 4
    BATCH = 8                   # descriptors handed over at a time
    QUEUE = 32                  # batches waiting, at most
    _pid = None

    @classmethod
    def close(cls, fd):
        """Close descriptor `fd` in the background."""
        if cls._pid != os.getpid():
            cls._pid = os.getpid()
            cls._batch = []
            cls._queue = queue.Queue(cls.QUEUE)
            for n in range(cls.THREADS):
                thread = threading.Thread(target=cls._run,
                                          args=(cls._queue,),
                                          name="closer-%d" % n)
                thread.daemon = True
                thread.start()
        cls._batch.append(fd)
        if len(cls._batch) >= cls.BATCH:
            cls._queue.put(cls._batch)
            cls._batch = []

    @staticmethod
    def _run(batches):
        while True:
            for fd in batches.get():
                try:
                    os.close(fd)
                except OSError:
                    pass
            batches.task_done()

    @classmethod
    def flush(cls):
        """Return when every descriptor handed over is closed."""
        if cls._pid == os.getpid():
            if cls._batch:
                cls._queue.put(cls._batch)
                cls._batch = []
            cls._queue.join()


class Message:
    """A claimed message: in work/, locked by us until finished."""

    def __init__(self, maildir, name, fd, st, source, has_state=True):
        self.maildir, self.name, self.fd = maildir, name, fd
        self.source = source                     # new, post or work
        self.size = st.st_size
        self.state = maildir.read_state(name) if has_state else {}
        # The give-up clock: when it was written, or when an admin sent it
        # back with --requeue.
        try:
            self.mtime = max(st.st_mtime, float(self.state.get("requeued",
                                                               0)))
        except ValueError:
            self.mtime = st.st_mtime
        self.jobid = self.state.get("jobid")
        self.owner = st.st_uid                   # who wrote the message
        self._data = None
        self.outcome = None     # delivered, postponed or undeliverable

    def read(self):
        """The message bytes; MalformedMessageError when oversized."""
        if self._data is None:
            chunks, size = [], 0
            os.lseek(self.fd, 0, os.SEEK_SET)
            while True:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_MESSAGE:
                    raise MalformedMessageError("message larger than %d bytes"
                                                % MAX_MESSAGE)
                chunks.append(chunk)
            self._data = b"".join(chunks)
        return self._data

    @property
    def attempts(self):
        """The number of attempts made so far (from the state file)."""
        try:
            return int(self.state.get("attempts", "0"))
        except ValueError:
            return 0

    def save_state(self, **changes):
        """Record a delivery's progress (attempts, destination, commit).

        Not synced: the record saves work after a crash of the process,
        which it survives; after a crash of the machine a record lost or
        left empty only means the work is done again (StartUpload again,
        EEXIST until the JPPS drops the unfinished upload, or ENOENT of a
        CommitUpload done before), never that a message is lost.  Three
        fsyncs a dump cost more than its upload.
        """
        self.state.update(changes)
        if self.jobid:
            self.state["jobid"] = self.jobid
        try:
            self.maildir.write_state(self.name, self.state, sync=False)
        except OSError as exc:
            raise MaildirError("cannot write %s: %s" % (
                self.maildir.path(STATE_DIR, self.name),
                exc.strerror or exc))

    def _close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def done(self):
        """Delivered: the message leaves the maildir."""
        md = self.maildir
        unlink_quietly(md.path("tmp", self.name))
        unlink_quietly(md.path("work", self.name))
        if self.state:
            md.remove_state(self.name)
        fd, self.fd = self.fd, None
        _Closer.close(fd)
        self.outcome = "delivered"

    def postpone(self, error, retry_base, give_up, now=None, at_least=0):
        """Failed: schedule a retry, or give up when old enough.

        Returns the next retry time, or None when the message was given up.
        The delay doubles with every attempt from retry_base, capped at an
        hour, with +-20 % jitter so that a backlog does not retry in step.
        """
        now = time.time() if now is None else now
        attempts = self.attempts + 1
        if now - self.mtime > give_up:
            self.give_up("given up after %d attempts over %s; last error: %s"
                         % (attempts, format_age(now - self.mtime), error),
                         attempts=str(attempts), last_error=error)
            return None
        delay = min(max(RETRY_CAP, retry_base),
                    retry_base * 2 ** (attempts - 1))
        delay *= random.uniform(1 - JITTER, 1 + JITTER)
        next_retry = now + max(delay, at_least)
        self.save_state(attempts=str(attempts), last_error=one_line(error),
                        last_attempt=str(now), next_retry=str(next_retry))
        os.rename(self.maildir.path("work", self.name),
                  self.maildir.path("post", self.name))
        self._close()
        self.outcome = "postponed"
        return next_retry

    def give_up(self, reason, **changes):
        """Move to undeliverable/ with the reason recorded; keep the data."""
        changes.update(reason=one_line(reason), gave_up=str(time.time()),
                       next_retry=None)
        self.save_state(**changes)
        md = self.maildir
        os.rename(md.path("work", self.name),
                  md.path("undeliverable", self.name))
        unlink_quietly(md.path("tmp", self.name))
        self._close()
        self.outcome = "undeliverable"

    def release(self):
        """Leave it in work/, unlocked: the next pass picks it up again."""
        self._close()

    def unclaim(self):
        """Put an untouched message back where it was claimed from."""
        if self.source != "work":
            os.rename(self.maildir.path("work", self.name),
                      self.maildir.path(self.source, self.name))
        self._close()


# ---------------------------------------------------------------------------
# Messages: the three formats (see README, "Message formats")
# ---------------------------------------------------------------------------

def _decode_message(data):
    """The text of a message's bytes; MalformedMessageError for a NUL
    byte or bytes that are not UTF-8."""
    if b"\0" in data:
        raise MalformedMessageError("NUL byte in message")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedMessageError("message is not UTF-8 (byte %d)"
                                    % exc.start)


def _valid_jobid(text):
    """parse_jobid(), raising MalformedMessageError for a bad jobid."""
    try:
        return parse_jobid(text)
    except ValueError as exc:
        raise MalformedMessageError("invalid jobid %r: %s"
                                    % (one_line(text, 100), exc))


def parse_registration(data):
    """(jobid, owner) of a registration message: "<jobid>\\n<owner>".

    The LB server writes no trailing newline; one (or CRLF) is tolerated.
    """
    text = _decode_message(data)
    if "\n" not in text:
        raise MalformedMessageError("registration without a newline between "
                                    "jobid and owner")
    jobid, owner = text.split("\n", 1)
    owner = owner.rstrip("\r\n")
    if "\n" in owner:
        raise MalformedMessageError("registration owner spans several lines")
    if not owner.strip():
        raise MalformedMessageError("registration without an owner")
    if CONTROL_RE.search(owner):
        # No DN has one, and XML cannot carry it: the JPPS refused the
        # request on every retry, for days.
        raise MalformedMessageError("registration owner %r has a control "
                                    "character" % owner[:200])
    return _valid_jobid(jobid.rstrip("\r")), owner


ORIGINAL_EXPORTER_JPPS_BUG = re.compile(r"^(/.*?)jpps {3}([^\s/]+:\d+)$")


def parse_keyed(data):
    """The keys of a dump or sandbox message, as a dict.

    Lines "key<blanks>value": the exporter's padded keys ("jobid  X"),
    tabs ("jobid\\tX") or single spaces; the value is the rest of the line
    (trailing CR dropped).  Unknown keys are ignored; a repeated known key
    or a key without a value makes the message malformed, as do a
    missing jobid or file.
    """
    text = _decode_message(data)
    fields = {}
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r").lstrip(" \t")
        if not line:
            continue
        parts = re.split(r"[ \t]+", line, maxsplit=1)
        if len(parts) < 2 or not parts[1].strip():
            raise MalformedMessageError("line %d: key %r without a value"
                                        % (number, one_line(parts[0], 40)))
        key, value = parts
        if key in ("jobid", "file", "jpps", "proxy"):
            if key in fields:
                raise MalformedMessageError("key %r given twice" % key)
            fields[key] = value
    for key in ("jobid", "file"):
        if key not in fields:
            raise MalformedMessageError("no %r line" % key)
    broken = ORIGINAL_EXPORTER_JPPS_BUG.match(fields["file"])
    if broken and "jpps" not in fields:
        # The original exporter's -j forgot the newline before "jpps";
        # its three-space padding makes the repair unambiguous.
        fields["file"], fields["jpps"] = broken.groups()
    fields["jobid"] = _valid_jobid(fields["jobid"])
    if not os.path.isabs(fields["file"]):
        raise MalformedMessageError("file %r is not an absolute path"
                                    % one_line(fields["file"], 200))
    if "jpps" in fields:
        try:
            parse_endpoint(fields["jpps"])
        except ConfigError as exc:
            raise MalformedMessageError(str(exc))
    return fields


DUMP_HEAD = 64 * 1024          # where a dump's first event line must be


def _ulm_field(head, key):
    """The unescaped value of ULM field `key` in the first lines of a dump."""
    match = re.search(rb'\b' + re.escape(key) + rb'="((?:[^"\\\n]|\\.)*)"',
                      head)
    if not match:
        return None
    return re.sub(r'\\(.)', r'\1', match.group(1).decode("utf-8", "replace"))


def dump_owner(source):
    """The job owner (DG.USER) named in the first lines of an LB dump."""
    return _ulm_field(os.pread(source.fileno(), DUMP_HEAD, 0), b"DG.USER")


# ---------------------------------------------------------------------------
# Files that messages name: opened once, checked open, uploaded from there
# ---------------------------------------------------------------------------
#
# A message may only make the importer upload a file that its writer could
# have written and that belongs to the message's queue.  The path is walked
# from "/" one component at a time (openat), never trusting a place another
# user controls: every directory on the way is owned by root or by us and
# not writable by group or others unless sticky (as /tmp is), and a symbolic
# link on the way is followed only when root or we own it.  The last
# component is opened once, with O_NOFOLLOW and O_NONBLOCK (a FIFO never
# blocks), and the open file is checked: a regular file, one link, owned by
# the writer of the message, who is us unless --allow-shared-dirs.  The
# upload reads from that descriptor, so nothing swapped in after the check
# is ever read.  The file must also belong to its queue (check_belongs).
# The layouts of the original tools pass: the exporter's store (/tmp or any
# private directory), the upload tool's /tmp/jpimporter_<pid>_<time>.tar,
# our sandbox spool.

MAX_SYMLINKS = 40                       # as the kernel's path walk allows
OPEN_FILE_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) |
                   getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) |
                   getattr(os, "O_CLOEXEC", 0))
OPEN_DIR_FLAGS = OPEN_FILE_FLAGS | getattr(os, "O_DIRECTORY", 0)


def _trusted_owner(uid):
    """Whether uid `uid` may own our directories: root or us."""
    return uid in (0, os.geteuid())


def open_directory(path, allow_shared=False):
    """(descriptor, resolved path) of directory `path`, reached safely.

    Raises PermanentError naming the first place on the way that another
    user could have changed (see above), TransientError for an I/O error,
    PermanentError when the directory does not exist.
    """
    if not os.path.isabs(path):
        raise PermanentError("%s is not an absolute path" % path)
    fds, names = [os.open("/", OPEN_DIR_FLAGS)], []
    pending = list(reversed(path.split("/")))
    links = 0
    try:
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if len(fds) > 1:
                    os.close(fds.pop())
                    names.pop()
                continue
            where = "/" + "/".join(names + [name])
            st = os.stat(name, dir_fd=fds[-1], follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                if not _trusted_owner(st.st_uid):
                    raise PermanentError(
                        "%s is a symbolic link owned by uid %d; not followed"
                        % (where, st.st_uid))
                links += 1
                if links > MAX_SYMLINKS:
                    raise PermanentError("too many symbolic links in %s"
                                         % path)
                target = os.readlink(name, dir_fd=fds[-1])
                if target.startswith("/"):
                    while len(fds) > 1:
                        os.close(fds.pop())
                    del names[:]
                pending.extend(reversed(target.split("/")))
                continue
            fd = os.open(name, OPEN_DIR_FLAGS, dir_fd=fds[-1])
            fds.append(fd)
            names.append(name)
            _check_directory_open(fd, where, allow_shared)
        return fds.pop(), "/" + "/".join(names)
    except FileNotFoundError:
        raise PermanentError("directory %s no longer exists" % path)
    except NotADirectoryError:
        raise PermanentError("%s is not a directory" % path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:             # swapped for a link meanwhile
            raise PermanentError("%s changed into a symbolic link while "
                                 "being checked" % path)
        raise TransientError("directory %s: %s" % (path, exc.strerror))
    finally:
        for fd in fds:
            os.close(fd)


def _check_directory_open(fd, where, allow_shared):
    """Refuse the open directory `fd` (named `where`) unless owned by
    root or us and not writable by others (sticky excepted);
    PermanentError says why.  `allow_shared` accepts any."""
    st = os.fstat(fd)
    if allow_shared:
        return
    if not _trusted_owner(st.st_uid):
        raise PermanentError("directory %s is owned by uid %d, neither root "
                             "nor us; see --allow-shared-dirs"
                             % (where, st.st_uid))
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise PermanentError("directory %s is writable by group or others "
                             "and not sticky (mode %04o); see "
                             "--allow-shared-dirs"
                             % (where, stat.S_IMODE(st.st_mode)))


def open_message_file(path, writer_uid, allow_shared=False, within=None):
    """The file a message names, open for reading, after every check.

    `writer_uid`: the owner of the message, who must own the file too
    (and be us, unless allow_shared): a message makes us send only what
    its writer could have sent.  `within`: resolved
    directories the file must lie in (--files-in), or None for anywhere.
    Returns a binary file object; raises PermanentError (the message can
    never be delivered) or TransientError.
    """
    directory, name = os.path.split(path)
    if not name:
        raise PermanentError("%s names no file" % path)
    dir_fd, real_dir = open_directory(directory or "/", allow_shared)
    try:
        if within is not None and not any(
                real_dir == d or real_dir.startswith(d.rstrip("/") + "/")
                for d in within):
            raise PermanentError(
                "file %s is outside the directories files may come from "
                "(%s); see --files-in" % (path, ", ".join(within)))
        try:
            fd = os.open(name, OPEN_FILE_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            raise PermanentError("file %s no longer exists" % path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PermanentError("file %s is a symbolic link; not "
                                     "followed" % path)
            if exc.errno in (errno.ENXIO, errno.EACCES, errno.EPERM):
                raise PermanentError("file %s cannot be opened: %s"
                                     % (path, exc.strerror))
            raise TransientError("file %s: %s" % (path, exc.strerror))
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PermanentError("file %s is not a regular file" % path)
        if st.st_nlink != 1:
            raise PermanentError("file %s has %d links; a file to upload has "
                                 "one" % (path, st.st_nlink))
        if st.st_uid != writer_uid:
            raise PermanentError("file %s is owned by uid %d, not by the "
                                 "writer of the message (uid %d)"
                                 % (path, st.st_uid, writer_uid))
        if st.st_uid != os.geteuid() and not allow_shared:
            raise PermanentError("file %s is owned by uid %d, not by us; "
                                 "see --allow-shared-dirs"
                                 % (path, st.st_uid))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_belongs(source, path, jobid, file_class):
    """A file must belong to the queue and the job that name it.

    A dump holds its job's events (DG.JOBID of its first line); a
    sandbox is a tar archive.  So a sandbox message cannot send another
    job's pending dump elsewhere, nor a dump message another job's file.
    """
    head = os.pread(source.fileno(), DUMP_HEAD, 0)
    if file_class == CLASS_LB:
        named = _ulm_field(head.split(b"\n", 1)[0], b"DG.JOBID")
        try:
            named = parse_jobid(named) if named else None
        except ValueError:
            named = None
        if named != jobid:
            raise PermanentError(
                "file %s does not hold the events of job %s (its first "
                "line is %s)" % (path, jobid, "of job " + one_line(named, 200)
                                 if named else "no LB event of a job"))
    elif head[257:262] != b"ustar":
        raise PermanentError("file %s is not a tar archive; a sandbox "
                             "message names one" % path)


# ---------------------------------------------------------------------------
# Upload transports
# ---------------------------------------------------------------------------

# -- shared by ftp://, ftps:// and gsiftp://

UPLOAD_BLOCK = 256 * 1024      # read and sent at a time: files are streamed
FTPS_IMPLICIT_PORT = 990
UPLOAD_PORTS = {"ftp": 21, "ftps": FTPS_IMPLICIT_PORT, "gsiftp": 2811}
FTP_MIN_RATE = 64 * 1024       # bytes/s: the slowest upload still waited for
FTP_QUIT_WAIT = 5.0            # seconds for the goodbye after a refusal
FTP_TICKET_WAIT = 2.0          # seconds for the server's TLS 1.3 verdict
FTP_MAX_REPLY = 64 * 1024      # characters of one reply (a real one: < 1 kB)
FTP_MAX_REPLY_LINES = 1000     # lines of one multi-line reply
CONTROL_IDLE = 60.0            # seconds a kept control connection may idle
CONTROL_MAX_AGE = 3600.0       # and its age: servers drop TLS sessions at 2 h
CONTROL_KEPT = 8               # control connections kept per process, at most
CONTROL_CHARS_RE = re.compile(r"[\x00-\x1f\x7f]")

# Everything an upload can raise besides our own Error (cf. ftplib's
# all_errors): _ftp_error() translates them.  ssl.CertificateError is a
# ValueError, and so is the refusal of CR or LF in a command.
UPLOAD_ERRORS = (ftplib.Error, ssl.SSLError, OSError, EOFError, ValueError)
# The server's refusals: after one, the connection is still in step.
FTP_REFUSALS = (ftplib.error_reply, ftplib.error_temp, ftplib.error_perm)


def _check_reply_size(lines, size):
    """Refuse a reply past FTP_MAX_REPLY_LINES lines or FTP_MAX_REPLY
    characters: a multi-line reply ends only when the server says so, and
    a server flooding "220-" lines would fill the worker's memory."""
    if lines > FTP_MAX_REPLY_LINES or size > FTP_MAX_REPLY:
        raise ftplib.error_proto(
            "reply longer than %d lines or %d kB refused"
            % (FTP_MAX_REPLY_LINES, FTP_MAX_REPLY // 1024))


def _upload_destination(url):
    """(split URL, host, port, path) of an ftp://, ftps:// or gsiftp://
    destination, the port by default that of its scheme (UPLOAD_PORTS);
    PermanentError for one that cannot be used.

    Control characters (CR and LF above all), raw or percent-encoded, are
    refused: in a command on the control channel they would end it and
    start one of the URL author's choosing (urlsplit drops raw CR, LF and
    tab silently, which would name another file).
    """
    if CONTROL_CHARS_RE.search(urllib.parse.unquote(url)):
        raise PermanentError(one_line(
            "cannot upload to %r: control characters in the URL"
            % public_url(url)))
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or UPLOAD_PORTS.get(parts.scheme.lower(), 21)
    except ValueError:
        raise PermanentError("bad port in %s" % one_line(public_url(url), 200))
    target = urllib.parse.unquote(parts.path)
    if not parts.hostname or not target or target.endswith("/"):
        raise PermanentError("cannot upload to %s: no host or file name"
                             % one_line(public_url(url), 200))
    return parts, parts.hostname, port, target


class _SourceFile:
    """`with _SourceFile(source) as f`: a binary file object to upload
    from; `source` is one already (closed by its owner), or a path,
    opened here and closed at the end (--upload, tests)."""

    def __init__(self, source):
        self.source, self.opened = source, None

    def __enter__(self):
        if not isinstance(self.source, str):
            return self.source
        try:
            self.opened = open(self.source, "rb")
        except OSError as exc:
            raise TransientError("cannot read %s: %s"
                                 % (self.source, exc.strerror))
        return self.opened

    def __exit__(self, *exc_info):
        if self.opened is not None:
            self.opened.close()


def _send_file(source, channel):
    """Send file object `source` from its first byte with
    `channel`.sendall(); return the bytes sent.  Every attempt sends
    from byte 0 (a pipe, for --upload, cannot be rewound: it is sent as
    it comes)."""
    if source.seekable():
        source.seek(0)
    sent = 0
    while True:
        block = source.read(UPLOAD_BLOCK)
        if not block:
            return sent
        channel.sendall(block)
        sent += len(block)


def _transfer_limit(size, timeout):
    """Seconds the transfer of `size` bytes may take: 3 * `timeout`
    plus the size at FTP_MIN_RATE."""
    return 3 * timeout + size / FTP_MIN_RATE


class _Deadline:
    """The overall time limit of one JPPS call or one phase of an upload.

    Socket timeouts bound every single read and write, but a server that
    trickles a byte now and then never trips them.  When the limit
    passes, a watcher thread shuts the watched connections down; the
    blocked call then fails at once and the caller reports the overrun.
    Sockets are held by descriptor: a TLS wrap keeps the descriptor (and
    detaches the plain socket object before its handshake), so the
    handshakes are covered too.  Only the caller's own thread opens
    sockets meanwhile, so a descriptor cannot be reused by a stranger
    before cancel(), which comes before the connections are closed (and
    after which the watcher no longer touches them: both hold _cond).
    `phase` names what is limited, for the error message.

    One watcher thread per process serves every deadline: a thread per
    SOAP call cost a fifth of the registration rate.  A forked child has
    no thread but the one that forked, so it starts its own watcher.
    """

    _pid = None

    def __init__(self, seconds, phase=None):
        self.expired = False
        self.fds = set()
        self._start(seconds, phase)

    @classmethod
    def _watcher(cls):
        if cls._pid != os.getpid():
            cls._pid = os.getpid()
            cls._cond = threading.Condition()
            cls._live = set()
            cls._wake = None            # the watcher's next look (None: idle)
            thread = threading.Thread(target=cls._watch_all,
                                      name="deadlines")
            thread.daemon = True
            thread.start()
        return cls._cond

    @classmethod
    def _watch_all(cls):
        cond, live = cls._cond, cls._live
        with cond:
            while True:
                first = min(live, key=lambda d: d.due, default=None)
                if first is None:
                    cls._wake = None
                    cond.wait()
                    continue
                wait = first.due - time.monotonic()
                if wait > 0:
                    cls._wake = first.due
                    cond.wait(wait)
                    continue
                live.discard(first)
                first.expired = True
                for fd in first.fds:
                    cls._shut(fd)

    def _start(self, seconds, phase):
        self.seconds, self.phase = seconds, phase
        self.due = time.monotonic() + seconds
        cond = self._watcher()
        with cond:
            self._live.add(self)
            if self._wake is None or self.due < self._wake:
                cond.notify()

    def restart(self, seconds, phase=None):
        """The next phase: a new limit from now, the same connections.
        Raises socket.timeout when the phase before has run out."""
        self.cancel()
        if self.expired:
            raise socket.timeout("timed out")
        self._start(seconds, phase)

    def watch(self, sock):
        """Shut `sock` down too when the limit passes (at once if it has)."""
        with self._cond:
            self.fds.add(sock.fileno())
            if self.expired:
                self._shut(sock.fileno())

    @staticmethod
    def _shut(fd):
        """Shut down both ways the connection of descriptor `fd`."""
        try:
            dup = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            return                      # closed already
        try:
            dup.shutdown(socket.SHUT_RDWR)  # acts on the connection itself
        except OSError:
            pass
        finally:
            dup.close()

    def cancel(self):
        """Stop the limit (before the watched sockets are closed)."""
        with self._cond:
            self._live.discard(self)


class _KeptControls:
    """The logged-in upload control connections of this process, kept
    between uploads to the same server: a new connection costs a TCP and
    a TLS (or GSI) handshake and a login, several times a 10 kB upload.

    take() gives the connection kept under `key` after a NOOP answered
    within min(--timeout, FTP_QUIT_WAIT), or None (none kept, or it
    failed the check, or it is stale: idle more than CONTROL_IDLE, older
    than CONTROL_MAX_AGE, made with another credential `stamp`, or
    refused by the caller's `usable`): the caller then opens a new one,
    and a stale connection costs the upload nothing.  keep() puts one
    back after a whole upload; a failed upload closes its connection.
    At most CONTROL_KEPT are kept (the least recently used goes).

    It also remembers the GridFTP servers that demanded a protected data
    channel (demands_dcau(), with --dcau auto).

    A connection belongs to the process that opened it: in a forked
    child the parent's are only closed, never used nor ended (a QUIT or
    a TLS close_notify would end the parent's session; closing the
    child's descriptors sends nothing); the child also starts with no
    DCAU demands of its own.
    """

    def __init__(self):
        self.pid = None
        self.kept = {}      # key -> (connection, last use, stamp)
        # --dcau auto: (host, port) of the servers that refused DCAU N.
        # Each costs a whole extra login when N is tried first every time.
        self.dcau_demands = set()

    def _mine(self):
        """The kept connections of this process: a forked child closes
        its parent's and forgets their servers' DCAU demands."""
        if self.pid != os.getpid():
            for conn, _, _ in self.kept.values():
                conn.close()
            self.pid, self.kept = os.getpid(), {}
            self.dcau_demands.clear()
        return self.kept

    def demands_dcau(self, host, port):
        """Whether the GridFTP server at `host`:`port` refused an
        unprotected data channel in this process (and has not failed an
        upload since)."""
        self._mine()
        return (host, port) in self.dcau_demands

    def note_dcau(self, host, port, demanded):
        """Remember that the server demands DCAU (`demanded`), or forget
        it (an upload with DCAU A failed: N is tried first next time)."""
        self._mine()
        if demanded:
            self.dcau_demands.add((host, port))
        else:
            self.dcau_demands.discard((host, port))

    def take(self, key, stamp, timeout, usable=None):
        """The connection kept under `key`, checked with NOOP, or None
        (see the class's description)."""
        self.close_idle()
        entry = self._mine().pop(key, None)
        if entry is None:
            return None
        conn, _, kept_stamp = entry
        if kept_stamp != stamp or \
                time.monotonic() - conn.opened > CONTROL_MAX_AGE or \
                (usable is not None and not usable(conn)):
            self._end(conn)
            return None
        check = _Deadline(min(timeout, FTP_QUIT_WAIT), "liveness")
        conn.deadline = check
        check.watch(conn.sock)
        conn.sock.settimeout(min(timeout, FTP_QUIT_WAIT))
        try:
            conn.voidcmd("NOOP")
        except UPLOAD_ERRORS + (Error,) as exc:
            log.debug("%s:%d: the kept connection is gone (%s); a new one",
                      conn.host, conn.port, one_line(str(exc), 200))
            check.cancel()
            conn.close()
            return None
        check.cancel()
        conn.timeout = timeout
        conn.sock.settimeout(timeout)
        return conn

    def keep_after(self, deadline, key, conn, stamp):
        """After a whole upload: keep `conn` unless its `deadline` ran
        out (and shut it down); whether it was kept."""
        deadline.cancel()
        if deadline.expired:
            return False
        self.keep(key, conn, stamp)
        return True

    def keep(self, key, conn, stamp):
        """Keep `conn` under `key`, made with credential `stamp`; the
        connection it replaces and the least recently used one past
        CONTROL_KEPT are ended."""
        kept = self._mine()
        old = kept.pop(key, None)
        if old is not None:
            self._end(old[0])
        kept[key] = (conn, time.monotonic(), stamp)
        while len(kept) > CONTROL_KEPT:
            oldest = min(kept, key=lambda k: kept[k][1])
            self._end(kept.pop(oldest)[0])

    def close_idle(self, idle=None):
        """End the connections unused for `idle` (CONTROL_IDLE) s."""
        kept = self._mine()
        idle = CONTROL_IDLE if idle is None else idle
        now = time.monotonic()
        for key in [k for k, e in kept.items() if now - e[1] > idle]:
            self._end(kept.pop(key)[0])

    def close_all(self):
        """End every kept connection."""
        kept = self._mine()
        while kept:
            self._end(kept.popitem()[1][0])

    @staticmethod
    def _end(conn):
        """QUIT and close, within FTP_QUIT_WAIT: errors do not matter."""
        deadline = _Deadline(FTP_QUIT_WAIT, "goodbye")
        conn.deadline = deadline
        try:
            deadline.watch(conn.sock)
            conn.goodbye()
        finally:
            deadline.cancel()
            conn.close()


_KEPT = _KeptControls()


def credential_stamp(credentials):
    """What a kept connection was made with: another credential object,
    or the same one loaded again (renewed, SIGHUP), makes it stale."""
    return id(credentials), credentials.generation


def forget_connections():
    """In a new worker process: nothing kept by the parent is used."""
    _KEPT._mine()


def close_connections(idle=False):
    """End the kept upload connections: all, or (`idle`) those unused for
    CONTROL_IDLE seconds."""
    if idle:
        _KEPT.close_idle()
    else:
        _KEPT.close_all()


class _FTPS(ftplib.FTP_TLS):
    """ftplib's FTP over TLS, with what our uploads need besides.

    - The data connection resumes the control connection's TLS session
      (RFC 4217 section 10.2; vsftpd's require_ssl_reuse=YES refuses a
      data connection that does not, and ftplib does not do it by
      itself, CPython issue 63699).
    - Implicit TLS (ftps://, as curl reads it): TLS from the first byte.
    - Every connection is watched by the attempt's _Deadline.
    - A reply is at most FTP_MAX_REPLY_LINES lines, FTP_MAX_REPLY
      characters (ftplib bounds a line, not the lines of a reply).
    - UTF-8 paths on every Python (ftplib used latin-1 up to 3.8).
    """

    encoding = "utf-8"

    def __init__(self, context, timeout, deadline, implicit=False):
        ftplib.FTP_TLS.__init__(self, context=context, timeout=timeout)
        self.deadline = deadline
        self.implicit = implicit
        self.opened = time.monotonic()

    @property
    def secure(self):
        """Whether the control connection is encrypted (TLS)."""
        return isinstance(self.sock, ssl.SSLSocket)

    def goodbye(self):
        """QUIT, briefly: a polite end that must not hold up the caller;
        errors do not matter."""
        try:
            if self.sock is not None:
                self.sock.settimeout(min(self.timeout, FTP_QUIT_WAIT))
                self.voidcmd("QUIT")
        except UPLOAD_ERRORS:
            pass

    def connect(self, host, port, timeout):
        """Connect to `host`:`port`, TLS at once when implicit; the
        greeting.  ftplib's connect, but the socket is watched by the
        deadline before the greeting is read."""
        self.host, self.port, self.timeout = host, port, timeout
        sock = socket.create_connection((host, port), timeout)
        self.deadline.watch(sock)
        if self.implicit:
            sock = self.context.wrap_socket(sock, server_hostname=host)
            self._prot_p = True
        self.sock, self.af = sock, sock.family
        self.file = sock.makefile("r", encoding=self.encoding)
        self.welcome = self.getresp()
        return self.welcome

    def getmultiline(self):
        """ftplib's, bounded by _check_reply_size(): ftplib joins lines
        for as long as they come."""
        lines = [self.getline()]
        if lines[0][3:4] == "-":
            code, size = lines[0][:3], len(lines[0])
            while True:
                line = self.getline()
                lines.append(line)
                size += len(line) + 1
                _check_reply_size(len(lines), size)
                if line[:3] == code and line[3:4] != "-":
                    break
        return "\n".join(lines)

    def auth(self):
        """AUTH TLS; with TLS 1.3, the server's verdict on our certificate
        is awaited too (_await_verdict)."""
        resp = ftplib.FTP_TLS.auth(self)
        if self.sock.version() == "TLSv1.3":
            self._await_verdict()
        return resp

    def _await_verdict(self):
        """After AUTH TLS, wait briefly for the server's first TLS
        records: its refusal of our certificate (an alert) raises
        ssl.SSLError here, not a reset later."""
        # TLS 1.3 ends the client's handshake before the server has
        # judged our certificate: a refusal comes as an alert after it.
        # A command sent meanwhile makes the closing server reset the
        # connection, and the reset loses the alert ("connection reset",
        # transient, instead of "our certificate was refused").  So the
        # server's first records, session tickets or that alert, are
        # awaited before the first command (FTP_TICKET_WAIT at most: a
        # server without tickets costs that much per upload; half the
        # set-up's --timeout at most, so that the set-up can still end).
        wait = min(self.timeout / 2.0, FTP_TICKET_WAIT)
        if not select.select([self.sock], [], [], wait)[0]:
            return
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(1)
        except ssl.SSLWantReadError:
            return                          # tickets only: go on
        finally:
            self.sock.settimeout(self.timeout)
        if data:
            raise ftplib.error_proto("unexpected data after AUTH TLS")
        raise EOFError("connection closed after the TLS handshake")

    def ntransfercmd(self, cmd, rest=None):
        """ftplib's, the data connection watched by the deadline, with
        TCP_NODELAY and, under PROT P, the control connection's TLS
        session resumed."""
        session = None
        if self._prot_p:
            session = self.sock.session
            if session is not None and not session.has_ticket and \
                    self.sock.version() == "TLSv1.3":
                # TLS 1.3 sends the session ticket after the handshake,
                # and the client takes it in only when it reads from the
                # control connection.  Replies have been read by now, so
                # this is a safeguard: one more reply brings the ticket.
                # No TLS 1.2 cap is needed: vsftpd on OpenSSL 3 resumes
                # TLS 1.3 sessions (require_ssl_reuse=YES, tested).
                self.voidcmd("NOOP")
                session = self.sock.session
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        self.deadline.watch(conn)
        # The close_notify after the last block must not wait for the
        # ACK of that block (Nagle; up to 40 ms of delayed ACK a file).
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._prot_p:
            try:
                conn = self.context.wrap_socket(
                    conn, server_hostname=self.host, session=session)
            except OSError:
                conn.close()
                self.data_failed()      # vsftpd: 522 ... reuse required
                raise
        return conn, size

    def data_failed(self):
        """After a failed data connection: raise the server's reason.

        A server that drops the data connection says why on the control
        connection (426, 451, 452, 522, 552): that reply is the better
        error, and it classifies the failure.  Returns when there is no
        such reply (a timeout is not waited out a second time).
        """
        if self.deadline.expired:
            return
        self.sock.settimeout(min(self.timeout, FTP_QUIT_WAIT))
        try:
            self.voidresp()
        except (ssl.SSLError, OSError, EOFError):
            pass


def _ftp_error(exc, where, secure=True):
    """The importer's error for an FTP failure: permanent or transient.

    Permanent: refusals that another attempt cannot change (login
    refused, destination forbidden or invalid), said by the server over
    TLS (`secure`).  Transient: 4xx, a full server (452, and 552
    "exceeded storage allocation", which a site frees), timeouts, dropped
    connections, certificate trouble that the admin will fix on either
    side, and any refusal before TLS: anyone on the path can answer 5xx
    there, and that must not give a message up.
    """
    text = one_line(str(exc), 300)
    if not text:            # EOFError(), as ftplib raises for a closed line
        text = ("connection closed by the server"
                if isinstance(exc, EOFError) else type(exc).__name__)
    if isinstance(exc, ftplib.error_perm) and not secure:
        return TransientError("%s refused without TLS (unauthenticated, so "
                              "retried): %s" % (where, text))
    if isinstance(exc, ftplib.error_perm) and not text.startswith("552"):
        return PermanentError("%s refused: %s" % (where, text))
    if isinstance(exc, ssl.CertificateError) or (
            isinstance(exc, ssl.SSLError) and
            "CERTIFICATE_VERIFY_FAILED" in str(exc)):
        return TransientError("%s: server certificate not accepted: %s"
                              % (where, text))
    if isinstance(exc, ssl.SSLError) and re.search(
            r"ALERT_(UNKNOWN_CA|BAD_CERTIFICATE|CERTIFICATE_\w+|"
            r"ACCESS_DENIED)|CERTIFICATE_REQUIRED", str(exc)):
        return PermanentError("%s: our certificate was refused: %s"
                              % (where, text))
    if isinstance(exc, socket.timeout):
        return NoAnswerError("%s: no answer within the time limit" % where)
    return TransientError("%s: %s" % (where, text))


def _ftp_mkdirs(ftp, directory):
    """Create the missing directories of `directory`: the whole path at
    once, which is enough when only the last level is new (the JPPS's
    directory of each job), else each level (MKD)."""
    parts = [p for p in directory.split("/") if p]
    prefix = "/" if directory.startswith("/") else ""
    if len(parts) > 1:
        try:
            ftp.voidcmd("MKD " + prefix + "/".join(parts))
            return
        except ftplib.error_perm:
            pass            # a level above is missing (or it exists)
    for i in range(len(parts)):
        try:
            ftp.voidcmd("MKD " + prefix + "/".join(parts[:i + 1]))
        except ftplib.error_perm:
            pass            # it exists (or cannot be made: STOR will say)


def _upload_attempt(source, target, where, key, credentials, timeout, keep,
                    new, login, store, usable=None):
    """One upload attempt, the part every transport shares; the bytes
    sent.

    The connection is one kept under `key` (with `keep`; refused by
    `usable` if given), else `new(deadline)`, which `login(conn)` then
    connects and logs in.  The missing directories of `target` are made,
    `store(conn)` sends file object `source` and returns the bytes sent,
    and SIZE checks them.  The set-up (up to the directories) may take
    `timeout` seconds in all, the transfer _transfer_limit().
    After a whole upload the connection is kept (`keep`) or ended with
    QUIT; after a failure it is closed, with QUIT first when the server
    or we refused (the connection is still in step).
    Raises TransientError, PermanentError or NoAnswerError (_ftp_error,
    _ftp_overrun), naming the server by `where`.
    """
    size = os.fstat(source.fileno()).st_size
    stamp = credential_stamp(credentials)
    conn = _KEPT.take(key, stamp, timeout, usable) if keep else None
    deadline = _Deadline(timeout, "set-up")
    if conn is None:
        conn = new(deadline)
    else:
        conn.deadline = deadline
        deadline.watch(conn.sock)
    kept = False
    try:
        if conn.sock is None:
            login(conn)
        _ftp_mkdirs(conn, target.rsplit("/", 1)[0])
        deadline.restart(_transfer_limit(size, timeout), "transfer")
        sent = store(conn)
        _ftp_check_size(conn, target, sent, where)
        if keep:
            kept = _KEPT.keep_after(deadline, key, conn, stamp)
        else:
            conn.goodbye()          # stored and checked: that is enough
        return sent
    except Error:
        if deadline.expired:
            raise _ftp_overrun(where, deadline, size)
        conn.goodbye()              # our own refusals: still in step
        raise
    except UPLOAD_ERRORS as exc:
        if deadline.expired:
            raise _ftp_overrun(where, deadline, size)
        if isinstance(exc, FTP_REFUSALS):
            conn.goodbye()          # a refusal: the connection is in step
        raise _ftp_error(exc, where, conn.secure)
    finally:
        deadline.cancel()           # before the descriptors are freed
        if not kept:
            conn.close()


def upload_ftp(url, source, credentials, timeout, allow_plain=False,
               keep=False):
    """Upload file object `source` to an ftp:// or ftps:// URL over TLS
    (RFC 4217).

    Explicit TLS (AUTH TLS, PBSZ 0, PROT P) with the importer's client
    certificate, the server verified against the CA directory with its
    host name; ftps:// is implicit TLS (TLS from the first byte, port 990
    by default), as curl reads such URLs.
    Plain FTP only with allow_plain, when the server refuses AUTH TLS.
    The user and password come from the URL (percent-decoded), else
    "anonymous": with FTPS the client certificate is what the server
    checks.  Missing directories of the path are made (MKD).
    Every connect, read and write is limited to `timeout` seconds; the
    set-up (connect, greeting, TLS, login, directories) to `timeout` in
    all, and the transfer (PASV, STOR, the data, SIZE) to 3 * timeout
    plus the file's size at FTP_MIN_RATE.  Each attempt sends the file
    from its first byte.
    With `keep` (the workers), the logged-in connection is kept for the
    next upload to the same server, user and credential (_KeptControls):
    that one then starts at MKD, its set-up limit the same.
    Returns the bytes sent, checked with SIZE where the server has it.
    """
    parts, host, port, target = _upload_destination(url)
    scheme = parts.scheme.lower()
    user = urllib.parse.unquote(parts.username or "anonymous")
    password = urllib.parse.unquote(parts.password or "")
    where = "ftp %s:%d" % (host, port)
    key = (scheme, host.lower(), port, user, password, allow_plain)
    with _SourceFile(source) as source:
        context = credentials.client_context()
        return _upload_attempt(
            source, target, where, key, credentials, timeout, keep,
            new=lambda deadline: _FTPS(context, timeout, deadline,
                                       implicit=scheme == "ftps"),
            login=lambda ftp: _ftp_login(ftp, host, port, user, password,
                                         allow_plain, where),
            store=lambda ftp: _ftp_store(ftp, target, source))


def _ftp_login(ftp, host, port, user, password, allow_plain, where):
    """Connect, TLS, log in, binary stream mode."""
    ftp.connect(host, port, ftp.timeout)
    if not ftp.implicit:
        try:
            ftp.auth()
        except ftplib.error_perm as exc:
            # Transient, as every refusal before TLS: anyone on the path
            # can say it.  The message is kept until TLS comes back or
            # --allow-plain-ftp is given, and then delivered.
            if not allow_plain:
                raise TransientError(
                    "%s refuses TLS (%s); plain FTP is allowed only with "
                    "--allow-plain-ftp" % (where, one_line(str(exc), 200)))
            log.warning("%s: no TLS (--allow-plain-ftp): the upload is not "
                        "encrypted", where)
    if isinstance(ftp.sock, ssl.SSLSocket):
        ftp.prot_p()                            # PBSZ 0, PROT P
    ftplib.FTP.login(ftp, user, password)       # TLS is set up above
    ftp.voidcmd("TYPE I")
    try:
        ftp.voidcmd("MODE S")
    except ftplib.error_perm:
        pass                                    # stream mode is the default


def _ftp_overrun(where, deadline, size):
    """The error for an upload phase that ran out of time."""
    if deadline.phase == "set-up":
        return NoAnswerError(
            "%s: no answer within the time limit (%gs, --timeout, for the "
            "greeting, TLS, login and directories)"
            % (where, deadline.seconds))
    return NoAnswerError(
        "%s: the upload of %d bytes did not finish within %.0fs (3 times "
        "--timeout plus %d kB/s)" % (where, size, deadline.seconds,
                                     FTP_MIN_RATE // 1024))


def _ftp_store(ftp, target, source):
    """STOR `source` as `target` from its first byte; the bytes sent."""
    conn = ftp.transfercmd("STOR " + target)
    try:
        sent = _send_file(source, conn)
        if isinstance(conn, ssl.SSLSocket):
            # close_notify marks the end of the file.  A server that
            # closes without answering it is no failure: its reply to
            # STOR and SIZE say whether the file arrived whole.
            try:
                conn.unwrap()
            except (ssl.SSLError, OSError):
                pass
    except OSError as exc:              # ssl.SSLError is one too
        if not isinstance(exc, socket.timeout):
            conn.close()
            ftp.data_failed()           # the server's reason, if any
        raise
    finally:
        conn.close()
    ftp.voidresp()
    return sent


def _ftp_check_size(ftp, target, sent, where):
    """SIZE after STOR: a short file is a failed upload."""
    try:
        size = ftp.size(target)
    except ftplib.error_perm:
        return                          # no SIZE here: trust the 226
    if size is not None and size != sent:
        raise TransientError("%s stored %d bytes of %d in %s"
                             % (where, size, sent, target))


# -- gsiftp:// (GridFTP with GSI)
#
# The control channel is authenticated with GSI as the Globus server does
# it: AUTH GSSAPI, then TLS handshake records carried base64 in
# ADAT commands and 335 replies, driven here through ssl.MemoryBIO; after
# the handshake a 0x00 byte from the server (TLS 1.3) and our delegation
# flag.  From then on every command travels as one TLS record in ENC and
# every reply as 632 lines.  The data channel is plain TCP (DCAU N) or,
# when the server demands it, GSI with a delegated proxy (DCAU A).

GSI_NO_DELEGATION = b"0"
GSI_DELEGATION = b"D"


# GSI delegation: the server sends a PKCS#10 request and we return an RFC
# 3820 proxy certificate for its key, signed with our own key (RSA,
# PKCS#1 v1.5 with SHA-256: hashlib, DER and pow() are all it takes).

OID_CN = "2.5.4.3"
OID_RSA = "1.2.840.113549.1.1.1"
OID_SHA256_RSA = "1.2.840.113549.1.1.11"
OID_KEY_USAGE = "2.5.29.15"
OID_BASIC_CONSTRAINTS = "2.5.29.19"
OID_PROXY_CERT_INFO = "1.3.6.1.5.5.7.1.14"
OID_PPL_INHERIT_ALL = "1.3.6.1.5.5.7.21.1"
OID_PPL_GLOBUS_LIMITED = "1.3.6.1.4.1.3536.1.1.1.9"
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
DELEGATED_LIFETIME = 12 * 3600      # at most: see delegated_lifetime()
DELEGATED_MIN_LIFETIME = 600        # covers the peers' clock differences
PEM_KEY_RE = re.compile(rb"-----BEGIN (RSA )?PRIVATE KEY-----\s*(.+?)\s*"
                        rb"-----END (RSA )?PRIVATE KEY-----", re.S)


def _handshake(tls, exchange):
    """Drive the handshake of `tls`, an SSLObject on memory BIOs:
    `exchange()` is called whenever it waits for the peer, to send what
    it wrote and feed it the peer's answer."""
    while True:
        try:
            tls.do_handshake()
            return
        except ssl.SSLWantReadError:
            exchange()


def der(tag, content):
    """One DER TLV."""
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def der_int(value):
    """The DER INTEGER of a non-negative int."""
    return der(0x02, value.to_bytes((value.bit_length() + 8) // 8, "big"))


def der_oid_encode(text):
    """The DER OBJECT IDENTIFIER of dotted text (der_oid's inverse)."""
    arcs = [int(a) for a in text.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7f]
        arc >>= 7
        while arc:
            chunk.append(0x80 | arc & 0x7f)
            arc >>= 7
        out.extend(reversed(chunk))
    return der(0x06, bytes(out))


def der_time(t):
    """The DER time of `t`: UTCTime before 2050, GeneralizedTime from
    then on (RFC 5280 4.1.2.5)."""
    stamp = time.gmtime(t)
    if stamp.tm_year < 2050:                        # RFC 5280 4.1.2.5
        return der(0x17, time.strftime("%y%m%d%H%M%SZ", stamp).encode())
    return der(0x18, time.strftime("%Y%m%d%H%M%SZ", stamp).encode())


def read_rsa_key(path):
    """(n, e, d, p, q, dp, dq, qinv) of the RSA key in a PEM file (PKCS#1
    or unencrypted PKCS#8): the fields of RFC 8017's RSAPrivateKey."""
    with open(path, "rb") as f:
        match = PEM_KEY_RE.search(f.read(1024 * 1024))
    if not match:
        raise PermanentError("delegation needs an unencrypted RSA key; "
                             "none found in %s" % path)
    data = base64.b64decode(b"".join(match.group(2).split()))
    _, s, e = der_read(data)
    fields = der_children(data, s, e)
    if not match.group(1):                          # PKCS#8: unwrap
        algorithm = der_children(data, fields[1][1], fields[1][2])[0]
        if der_oid(data[algorithm[1]:algorithm[2]]) != OID_RSA:
            raise PermanentError("delegation needs an RSA key; %s holds "
                                 "another kind" % path)
        data = data[fields[2][1]:fields[2][2]]
        _, s, e = der_read(data)
        fields = der_children(data, s, e)
    return tuple(int.from_bytes(data[f[1]:f[2]], "big")
                 for f in fields[1:9])


def rsa_sign_raw(key, message):
    """message**d mod n, by the Chinese remainder theorem: two half-size
    exponentiations, about a quarter of the 20 ms a 2048-bit pow(m, d, n)
    takes in CPython.  The result is checked with the public exponent
    (cheap) before it leaves: a wrong one (a fault in one half, which
    would give the key away, or a key of more than two primes) is
    replaced by the plain exponentiation."""
    n, e, d, p, q, dp, dq, qinv = key
    m1 = pow(message, dp, p)
    m2 = pow(message, dq, q)
    signature = m2 + q * ((m1 - m2) * qinv % p)
    if pow(signature, e, n) != message:
        signature = pow(message, d, n)
    return signature


def sign_proxy_request(request, cert_file, key_file, now=None,
                       lifetime=DELEGATED_LIFETIME, limited=True):
    """The DER of an RFC 3820 proxy for the key in PKCS#10 `request`.

    Issued by the first certificate of `cert_file` (our credential),
    subject = its subject + CN=<serial>, valid `lifetime` seconds (never
    longer than its issuer), signed with the key in `key_file`.  A
    `limited` proxy carries the Globus limited-proxy policy language:
    Globus job submission (GRAM) refuses such a proxy, and proxies made
    from it stay limited; data transfers take it.
    """
    now = time.time() if now is None else now
    info = read_pem_certificates(cert_file)[0]
    subject = info.subject_der
    _, s, e = der_read(request)
    cri = der_children(request, s, e)[0]
    spki = der_children(request, cri[1], cri[2])[2]
    public_key = der(0x30, request[spki[1]:spki[2]])
    serial = int.from_bytes(os.urandom(4), "big") & 0x7fffffff | 1
    proxy_subject = der(0x30, subject + der(0x31, der(0x30, der_oid_encode(
        OID_CN) + der(0x13, str(serial).encode()))))
    algorithm = der(0x30, der_oid_encode(OID_SHA256_RSA) + b"\x05\x00")
    critical = b"\x01\x01\xff"
    extensions = der(0xa3, der(0x30, b"".join([
        der(0x30, der_oid_encode(OID_KEY_USAGE) + critical +
            der(0x04, b"\x03\x02\x05\xa0")),     # digitalSignature, keyEnc.
        der(0x30, der_oid_encode(OID_BASIC_CONSTRAINTS) + critical +
            der(0x04, b"\x30\x00")),             # CA:FALSE
        der(0x30, der_oid_encode(OID_PROXY_CERT_INFO) + critical +
            der(0x04, der(0x30, der(0x30, der_oid_encode(
                OID_PPL_GLOBUS_LIMITED if limited
                else OID_PPL_INHERIT_ALL))))),
    ])))
    tbs_der = der(0x30, b"".join([
        b"\xa0\x03\x02\x01\x02", der_int(serial), algorithm,
        der(0x30, subject), der(0x30, der_time(now - 300) + der_time(
            min(info.not_after, now + lifetime))),
        proxy_subject, public_key, extensions]))
    key = read_rsa_key(key_file)
    n = key[0]
    size = (n.bit_length() + 7) // 8
    digest = SHA256_DIGEST_INFO + hashlib.sha256(tbs_der).digest()
    block = b"\x00\x01" + b"\xff" * (size - 3 - len(digest)) + b"\x00" + \
        digest                                   # EMSA-PKCS1-v1_5
    signature = rsa_sign_raw(key, int.from_bytes(block, "big")).to_bytes(
        size, "big")
    return der(0x30, tbs_der + algorithm + der(0x03, b"\x00" + signature))


class _DataTLS:
    """GSI on a DCAU A data connection: we connect, so we are the TLS
    client; the server presents the proxy we delegated, which OpenSSL's
    purpose check would refuse as a server certificate (its user
    certificate is clientAuth only), so the peer is checked here: it
    must be exactly that proxy.

    With `control`, its socket is watched during the handshake: a server
    that refuses the STOR (a forbidden destination) answers there and
    never shakes hands, and that answer is the error to report.
    """

    def __init__(self, sock, credentials, delegated, control=None):
        self.sock, self.control = sock, control
        self.preliminary = None         # the 1xx reply, if it came early
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        set_minimum_tls(context)
        context.load_cert_chain(credentials.cert_file, credentials.key_file,
                                password=b"")           # never a prompt
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing)
        _handshake(self.tls, self._exchange)
        self._flush()
        if self.tls.getpeercert(binary_form=True) != delegated:
            raise TransientError("the GridFTP data channel peer is not the "
                                 "proxy we delegated; refusing it")

    def _exchange(self):
        """One handshake round: send our records, read the peer's."""
        self._flush()
        self._receive()

    def _flush(self):
        """Send what TLS has written."""
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _receive(self):
        """Feed TLS what the data connection brings.  With `control`, a
        reply there is read first: 4xx and 5xx raise, a 1xx is kept as
        `preliminary`."""
        if self.control is not None and self.preliminary is None:
            ready = select.select([self.sock, self.control.sock], [], [],
                                  self.sock.gettimeout())[0]
            if not ready:
                raise socket.timeout("timed out")
            if self.control.sock in ready:
                # 4xx/5xx raise here; a 1xx is kept for the caller
                self.preliminary = self.control.check(self.control.reply(),
                                                      "1")
                if self.sock not in ready:
                    return
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("data connection closed during the handshake")
        self.incoming.write(data)

    def clear_channel(self):
        """PROT C: the 0x00 byte, our flag, then plain bytes follow."""
        while True:
            try:
                if self.tls.read(1):
                    break
            except ssl.SSLWantReadError:
                self._receive()
        self.tls.write(GSI_NO_DELEGATION)
        self._flush()

    def sendall(self, block):
        """Send `block`, encrypted."""
        self.tls.write(block)
        self._flush()

    def finish(self):
        """End TLS (close_notify): the end of the file."""
        try:
            self.tls.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass
        self._flush()


class _GSIControl:
    """An authenticated GridFTP control connection (GSI, RFC 2228).

    Its connections are watched by `deadline` (a _Deadline); a reply is
    bounded as _FTPS bounds it, lines included (an ADAT line carries a
    whole handshake flight, so FTP_MAX_REPLY, not ftplib's 8 kB).
    """

    def __init__(self, context, timeout, deadline):
        self.context, self.timeout, self.deadline = context, timeout, deadline
        self.host = self.port = self.sock = self.file = None
        self.secure = False             # authenticated: commands wrapped
        self.delegated = None
        self.opened = time.monotonic()

    def connect(self, host, port):
        """Connect to `host`:`port`; the server is verified with `host`
        in authenticate()."""
        self.host, self.port = host, port
        self.sock = socket.create_connection((host, port), self.timeout)
        self.deadline.watch(self.sock)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = self.context.wrap_bio(self.incoming, self.outgoing,
                                         server_hostname=host)

    def goodbye(self):
        """QUIT, briefly, on a logged-in connection; errors do not
        matter."""
        if self.secure:
            self.sock.settimeout(min(self.timeout, FTP_QUIT_WAIT))
            try:
                self.command("QUIT")
            except UPLOAD_ERRORS:
                pass

    def delegated_left(self):
        """Seconds the proxy delegated on this connection is valid."""
        return CertInfo(self.delegated).not_after - time.time()

    def close(self):
        """Close the connection (nothing is sent)."""
        for thing in (self.file, self.sock):
            try:
                if thing is not None:
                    thing.close()
            except OSError:
                pass

    # -- wire -------------------------------------------------------------

    def _send_line(self, line):
        """Send `line` as it is."""
        self.sock.sendall(line.encode("ascii") + b"\r\n")

    def _read_reply_lines(self):
        """The lines of one reply as sent (multi-line replies joined)."""
        lines, size = [], 0
        while True:
            raw = self.file.readline(FTP_MAX_REPLY + 1)
            if not raw:
                raise EOFError("connection closed by the server")
            size += len(raw)
            _check_reply_size(len(lines) + 1, size)
            line = raw.decode("latin-1").rstrip("\r\n")
            lines.append(line)
            if len(lines) == 1 and not (len(line) >= 4 and line[3] == "-"):
                return lines
            if len(lines) > 1 and line[:3] == lines[0][:3] and \
                    line[3:4] == " ":
                return lines

    def reply(self):
        """(code, text) of the next reply, unwrapped once authenticated."""
        lines = self._read_reply_lines()
        code = lines[0][:3]
        if code in ("631", "632", "633"):
            text = b""
            for line in lines:
                self.incoming.write(base64.b64decode(line[4:]))
                text += self._read_plain()
            lines = text.decode("utf-8", "replace").rstrip("\r\n").split(
                "\r\n")
            code = lines[-1][:3]
        text = "\n".join(lines)
        if not code.isdigit():
            raise ftplib.error_proto(text)
        return code, text

    def _read_plain(self):
        """What TLS has decrypted so far."""
        data = b""
        while True:
            try:
                data += self.tls.read(65536)
            except ssl.SSLWantReadError:
                return data

    def send(self, line):
        """Send one command, wrapped once authenticated; its reply is
        left for reply().  ValueError for a line with CR or LF."""
        if "\r" in line or "\n" in line:      # as ftplib's putline
            raise ValueError("CR or LF in an FTP command refused")
        if self.secure:
            self.tls.write((line + "\r\n").encode("utf-8"))
            self._send_line("ENC " + base64.b64encode(
                self.outgoing.read()).decode("ascii"))
        else:
            self._send_line(line)

    def command(self, line, expect="2"):
        """Send one command (wrapped once authenticated); its reply text.

        Raises ftplib's error_temp (4xx) or error_perm (5xx), as ftplib
        would, and error_reply for a code other than `expect`.
        """
        self.send(line)
        return self.check(self.reply(), expect)

    @staticmethod
    def check(reply, expect="2"):
        """The text of `reply`, a (code, text), when its code starts with
        `expect`; else ftplib's error_temp (4xx), error_perm (5xx) or
        error_reply."""
        code, text = reply
        if code.startswith(expect):
            return text
        if code[0] == "4":
            raise ftplib.error_temp(text)
        if code[0] == "5":
            raise ftplib.error_perm(text)
        raise ftplib.error_reply(text)

    # -- authentication ----------------------------------------------------

    def authenticate(self, credentials=None, lifetime=DELEGATED_LIFETIME):
        """AUTH GSSAPI and the GSI handshake in ADAT; then USER/PASS.

        With `credentials`, a limited proxy valid `lifetime` seconds is
        delegated to the server (needed for DCAU A); self.delegated is
        then its DER.
        """
        self.check(self.reply())                          # 220 welcome
        self.command("AUTH GSSAPI", "3")                   # 334
        _handshake(self.tls, self._adat_flight)
        # TLS 1.3: our last flight is still to be sent, and the server
        # answers it with one byte, 0x00, before it takes the flag.
        pending = self.outgoing.read()
        if pending:
            reply = self._adat(pending)
            if reply[0] != "335":
                raise self._refused(reply)
            self._read_plain()
        self.delegated = None
        if credentials is None:
            self.tls.write(GSI_NO_DELEGATION)
            reply = self._adat(self.outgoing.read())
        else:
            self.tls.write(GSI_DELEGATION)
            reply = self._adat(self.outgoing.read())
            if reply[0] != "335":
                raise self._refused(reply)
            request = self._read_plain()
            try:
                self.delegated = sign_proxy_request(
                    request, credentials.cert_file, credentials.key_file,
                    lifetime=lifetime)
            except (ValueError, IndexError, AttributeError) as exc:
                raise TransientError("cannot delegate to %s:%d: %s"
                                     % (self.host, self.port, exc))
            self.tls.write(self.delegated)
            reply = self._adat(self.outgoing.read())
        if reply[0] != "235":
            raise self._refused(reply)
        self.secure = True
        self.command("USER :globus-mapping:", "3")
        self.command("PASS dummy")

    def _adat_flight(self):
        """Send our handshake records in ADAT; the answer must be 335."""
        reply = self._adat(self.outgoing.read())
        if reply[0] != "335":
            raise self._refused(reply)

    def _adat(self, token):
        """Send an ADAT token; the reply, its own token fed to TLS."""
        self._send_line("ADAT " + base64.b64encode(token).decode("ascii"))
        code, text = self.reply()
        match = re.search(r"ADAT=(\S+)", text)
        if match:
            self.incoming.write(base64.b64decode(match.group(1)))
        return code, text

    def _refused(self, reply):
        """The error for a refused GSI handshake: permanent for a 5xx."""
        code, text = reply
        if code[0] == "5":
            return PermanentError("GSI authentication refused by %s:%d: %s"
                                  % (self.host, self.port, one_line(text)))
        return TransientError("GSI authentication with %s:%d failed: %s"
                              % (self.host, self.port, one_line(text)))

    # -- what _ftp_mkdirs and _ftp_check_size use of ftplib.FTP --------------

    def voidcmd(self, line):
        """command(), as ftplib names it."""
        return self.command(line)

    def size(self, target):
        """The size of `target` (SIZE), or None when the reply is not 213."""
        text = self.command("SIZE " + target)
        return int(text.split()[1]) if text.startswith("213") else None

    # -- transfer ---------------------------------------------------------

    def passive(self):
        """A data connection from PASV, to the control peer's address
        (as ftplib: a PASV reply cannot send us elsewhere)."""
        text = self.command("PASV")
        match = re.search(r"(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)", text)
        if not match:
            raise ftplib.error_proto(text)
        port = int(match.group(5)) * 256 + int(match.group(6))
        data = socket.create_connection((self.sock.getpeername()[0], port),
                                        self.timeout)
        self.deadline.watch(data)
        return data


def delegated_lifetime(size, timeout):
    """Seconds a proxy delegated for one upload is valid: the time the
    upload may take (_transfer_limit), at least DELEGATED_MIN_LIFETIME,
    at most DELEGATED_LIFETIME."""
    return int(min(DELEGATED_LIFETIME, max(DELEGATED_MIN_LIFETIME, math.ceil(
        _transfer_limit(size, timeout)))))


def upload_gsiftp(url, source, credentials, timeout, dcau="auto", prot="P",
                  delegate_to=None, keep=False):
    """Upload file object `source` to a gsiftp:// URL (GridFTP with GSI).

    The importer's credential (host certificate or proxy) authenticates
    the control channel; the server is verified against the CA directory
    with its host name.  `dcau` chooses the data channel: "N" plain TCP;
    "A" authenticated (a proxy is delegated to the server, which presents
    it on the data connection) with `prot` "P" (encrypted) or "C" (clear
    after the handshake); "auto" tries N and, when the server demands
    protection (534, as with -encrypt-data), starts again with A (and
    goes straight to A with that server for the rest of the process,
    until an attempt with A fails).  A is used only with a host in
    `delegate_to` (host names): a proxy of our credential goes nowhere
    else; None trusts the URL's own host (the caller named it, as
    --upload's operator does).
    Time limits as upload_ftp: `timeout` for every read and write and for
    the set-up (up to the directories), 3 * timeout plus the size at
    FTP_MIN_RATE for the transfer.
    `keep`: the control connection is kept for the next upload, as
    upload_ftp keeps it; with DCAU A, only while the proxy delegated on
    it stays valid (_gsiftp_put).
    Returns the bytes sent, checked with SIZE.
    """
    _, host, port, target = _upload_destination(url)
    dcau = str(dcau).upper()
    if dcau not in ("AUTO", "A", "N"):
        raise PermanentError("unknown DCAU policy %r" % dcau)
    where = "gsiftp %s:%d" % (host, port)
    untrusted = None
    if delegate_to is not None:
        trusted = sorted(set(h.lower() for h in delegate_to))
        if host.lower() not in trusted:
            untrusted = ("a delegated proxy, and %s is not trusted with one "
                         "(trusted: %s; see --delegate-to)"
                         % (host, ", ".join(trusted) or "none"))
    mode = dcau
    if dcau == "A" and untrusted:
        raise TransientError("%s: --dcau A needs %s" % (where, untrusted))
    if dcau == "AUTO":
        mode = "A" if _KEPT.demands_dcau(host, port) and not untrusted \
            else "N"
    with _SourceFile(source) as source:
        try:
            return _gsiftp_put(host, port, target, source, credentials,
                               timeout, mode, prot, where, keep)
        except _NeedsDCAUError as exc:
            if dcau != "AUTO":
                raise TransientError("%s demands data channel protection "
                                     "(%s) and --dcau is N" % (where, exc))
            if untrusted:
                raise TransientError("%s demands data channel protection "
                                     "(%s), which needs %s"
                                     % (where, exc, untrusted))
            log.info("%s demands data channel protection (%s): DCAU A",
                     where, exc)
            _KEPT.note_dcau(host, port, True)
            return _gsiftp_put(host, port, target, source, credentials,
                               timeout, "A", prot, where, keep)
        except Error:
            if dcau == "AUTO":
                _KEPT.note_dcau(host, port, False)  # N first next time
            raise


class _NeedsDCAUError(TransientError):
    """The server refuses an unprotected data channel (upload_gsiftp
    then tries DCAU A, or gives this reason)."""


def _gsiftp_put(host, port, target, source, credentials, timeout, dcau,
                prot, where, keep=False):
    """One GridFTP upload attempt with a fixed DCAU mode, from byte 0
    (_upload_attempt); with A, a proxy valid delegated_lifetime() is
    delegated.

    With `keep`, a kept connection in the same mode serves, and this one
    is kept.  With A, the host is in the key (the caller has checked it
    may have a proxy), and a kept connection serves only while its
    proxy, sized for its first upload, still has this transfer's limit
    plus DELEGATED_MIN_LIFETIME / 2 (the peers' clock differences) to
    run; then a new connection delegates a new one.
    """
    size = os.fstat(source.fileno()).st_size
    needed = _transfer_limit(size, timeout) + DELEGATED_MIN_LIFETIME / 2
    context = credentials.client_context()
    return _upload_attempt(
        source, target, where, ("gsiftp", host.lower(), port, dcau, prot),
        credentials, timeout, keep,
        new=lambda deadline: _GSIControl(context, timeout, deadline),
        login=lambda control: _gsiftp_login(
            control, host, port, credentials, dcau, prot,
            delegated_lifetime(size, timeout)),
        store=lambda control: _gsiftp_store(
            control, target, source, credentials, dcau, prot),
        usable=lambda conn: dcau != "A" or conn.delegated_left() > needed)


def _gsiftp_login(control, host, port, credentials, dcau, prot, lifetime):
    """Connect, GSI, login, binary stream mode and the data channel's
    protection on a new control connection."""
    control.connect(host, port)
    control.authenticate(credentials if dcau == "A" else None, lifetime)
    control.command("TYPE I")
    control.command("MODE S")
    try:
        control.command("DCAU " + dcau)
        if dcau == "A":
            control.command("PBSZ 1048576")
            control.command("PROT " + prot)
    except ftplib.error_perm as exc:
        if dcau == "N":
            raise _NeedsDCAUError(one_line(str(exc), 200))
        raise


def _gsiftp_store(control, target, source, credentials, dcau, prot):
    """PASV and STOR `source` as `target` on the data channel `dcau`
    and `prot` ask for; the bytes sent."""
    try:
        data = control.passive()
    except ftplib.error_perm as exc:
        if dcau == "N" and str(exc).startswith("534"):
            raise _NeedsDCAUError(one_line(str(exc), 200))
        raise
    try:
        if dcau == "A":
            # The Globus server answers STOR only after the data
            # channel handshake: send it, shake hands, then read.
            control.send("STOR " + target)
            channel = _DataTLS(data, credentials, control.delegated,
                               control)
            if prot == "C":
                channel.clear_channel()
            if channel.preliminary is None:
                control.check(control.reply(), "1")
            if prot == "C":
                channel = data
        else:
            control.command("STOR " + target, "1")
            channel = data
        sent = _send_file(source, channel)
        if isinstance(channel, _DataTLS):
            channel.finish()
    finally:
        data.close()
    control.check(control.reply())               # 226
    return sent


def upload(url, source, credentials, timeout, dcau="auto",
           allow_plain=False, delegate_to=None, keep=False):
    """Put `source` at `url` (gsiftp://, ftp:// or ftps://) from its
    first byte: an open binary file, or the path of one.  `delegate_to`:
    the hosts a gsiftp upload may delegate a proxy to (upload_gsiftp).
    `keep`: the control connection is kept for the next upload to the
    same server (_KeptControls).

    Returns the number of bytes sent; raises TransientError (retry) or
    PermanentError (undeliverable).
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    credentials.refresh()           # a renewed proxy serves uploads too
    if scheme == "gsiftp":
        return upload_gsiftp(url, source, credentials, timeout, dcau=dcau,
                             delegate_to=delegate_to, keep=keep)
    if scheme in ("ftp", "ftps"):
        return upload_ftp(url, source, credentials, timeout,
                          allow_plain=allow_plain, keep=keep)
    raise PermanentError("cannot upload to %r: unsupported scheme"
                         % one_line(public_url(url), 200))


def storage_server(url):
    """"host:port" of an upload URL (the default port of its scheme)."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = UPLOAD_PORTS.get(parts.scheme.lower(), 21)
    return "%s:%d" % (parts.hostname, port)


# What says a server cannot be reached (no connection, no answer), as
# opposed to its refusal or its reply.
UNREACHABLE_ERRNOS = (errno.ECONNREFUSED, errno.ECONNRESET,
                      errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT,
                      errno.EHOSTDOWN, errno.ENETDOWN, errno.EPIPE)


def network_failure(exc):
    """Whether a TransientError of upload() came from the network: a
    time-out, no connection, a dropped one (not a reply, not TLS)."""
    if isinstance(exc, NoAnswerError):
        return True
    for _ in range(6):
        exc = exc.__cause__ or exc.__context__
        if exc is None or isinstance(exc, (ftplib.Error, ssl.SSLError,
                                           ssl.CertificateError)):
            return False
        if isinstance(exc, (socket.timeout, EOFError)) or (
                isinstance(exc, OSError) and
                exc.errno in UNREACHABLE_ERRNOS):
            return True
    return False


# ---------------------------------------------------------------------------
# Delivery: one worker per maildir kind
# ---------------------------------------------------------------------------

class Worker:
    """Delivers the messages of one maildir, one at a time.

    run_pass() takes every message of new/, then every due message of
    post/, then every orphan of work/ (a worker died holding it), and
    returns how many it handled.  Each message ends delivered (removed),
    postponed (post/, with its state) or undeliverable (with the reason).
    """

    RETRY = {KIND_REG: RETRY_REGISTRATION, KIND_DUMP: RETRY_UPLOAD,
             KIND_SANDBOX: RETRY_UPLOAD}

    def __init__(self, kind, maildir, options, credentials, once=False):
        self.kind, self.maildir = kind, maildir
        # --once tries each message at most once per run, whatever the
        # retry delay: the run ends when every queue has been drained.
        self.tried = set() if once else None
        self.options, self.credentials = options, credentials
        self.retry_base = (options.retry if options.retry is not None
                           else self.RETRY[kind])
        self.clients = {}
        self.allowed_jpps = None    # endpoint_key()s, made on first use
        # name -> a time before which a postponed message is surely not
        # due; saves re-reading every state file of a big backlog in post/
        # on every pass.  Retry times only move later, so it stays true.
        self.not_before = {}
        self.left_alone = {}    # work/ name -> when the original is done
        self.stop_requested = False
        self.reload_requested = False
        self.file_directories = file_directories(options)
        self.claim_error = None
        # What became of the messages handled (the --once summary).
        self.counts = {"delivered": 0, "postponed": 0, "undeliverable": 0}
        self.flush_mark = self._flush_mark()
        # "host:port" of a storage server that failed on the network ->
        # {"since", "until", "backoff"}: until then its uploads wait.
        self.storage_down = {}
        self.deliver = {KIND_REG: self.deliver_registration,
                        KIND_DUMP: self.deliver_dump,
                        KIND_SANDBOX: self.deliver_sandbox}[kind]

    def client(self, address=None):
        """The client of -p, or of the JPPS a message's jpps line names:
        that must be -p or an --allow-jpps one, else the message is
        undeliverable and no connection is made (a message writer must
        not send our credential and its files to a JPPS of its choice)."""
        if address is not None and address != self.options.jpps:
            if self.allowed_jpps is None:
                self.allowed_jpps = set(endpoint_key(a) for a in
                                        [self.options.jpps] +
                                        self.options.allow_jpps)
            if endpoint_key(address) not in self.allowed_jpps:
                raise PermanentError(
                    "the message names JPPS %s, which is neither -p nor "
                    "allowed by --allow-jpps; not contacted"
                    % one_line(address, 200))
        address = address or self.options.jpps
        client = self.clients.get(address)
        if client is None:
            client = self.clients[address] = JPPSClient(
                address, self.credentials, self.options.timeout)
        return client

    def close(self):
        """Close the JPPS connections and the kept upload connections."""
        for client in self.clients.values():
            client.close()
        close_connections()

    def _flush_mark(self):
        """The mtime of state/.flush (touched by --flush), or None."""
        try:
            return os.stat(self.maildir.path(STATE_DIR,
                                             FLUSH_MARK)).st_mtime_ns
        except OSError:
            return None

    def run_pass(self):
        """Deliver what there is; return how many messages were handled."""
        mark = self._flush_mark()
        if mark != self.flush_mark:         # --flush: all of post/ is due
            self.flush_mark = mark
            self.not_before.clear()
        close_connections(idle=True)        # kept for uploads, idle too long
        self.apply_reload()                 # an idle worker too, at once
        try:
            if self.kind == KIND_REG:
                return self._overlapped_registrations(self._claims())
            handled = 0
            for msg in self._claims():
                started = time.monotonic()
                value, level = self._attempt(msg, self.deliver, msg)
                self._conclude(msg, started, value, level)
                handled += 1
            return handled
        finally:
            _Closer.flush()

    def apply_reload(self):
        """SIGHUP: the credential loaded again and the log reopened,
        before the next message (one in hand keeps its connection)."""
        if self.reload_requested:
            self.reload_requested = False
            reopen_logs()
            self.credentials.reload()

    def _claims(self):
        """Claim, one at a time, every message there is to deliver now."""
        for sub in ("new", "post", "work"):
            names = self.maildir.names(sub)
            # State files of messages in new/ (requeued ones) are written
            # before the move to new/, so this listing, taken after that
            # of new/, has them all: no open() per fresh message.
            with_state = (set(self.maildir.names(STATE_DIR))
                          if sub == "new" else None)
            if sub == "work":
                for gone in set(self.left_alone).difference(names):
                    del self.left_alone[gone]
            for name in names:
                self.apply_reload()
                if self.stop_requested:
                    return
                if self.tried is not None and name in self.tried:
                    continue
                if sub == "post" and not self._due(name):
                    continue
                if sub == "work" and max(self.not_before.get(name, 0),
                                         self.left_alone.get(name, 0)) \
                        > time.time():
                    continue    # set aside by _set_aside() or _abandoned()
                try:
                    msg = self.maildir.claim(
                        sub, name, with_state is None or name in with_state)
                except OSError as exc:
                    # A read-only maildir: nothing can be claimed now.
                    # One line per new trouble, then quietly next pass.
                    text = "%s: cannot claim %s/%s: %s" % (
                        self.maildir.root, sub, name, exc.strerror or exc)
                    if text != self.claim_error:
                        log.error("%s", text)
                    self.claim_error = text
                    return
                self.claim_error = None
                if msg is None or (sub == "work" and
                                   not self._abandoned(msg)):
                    continue
                if self.tried is not None:
                    self.tried.add(name)
                if sub == "work":
                    log.warning("%s: work/%s was left by a worker that "
                                "died; delivering it", self.maildir.root,
                                name)
                yield msg

    def _abandoned(self, msg):
        """An unlocked message in work/: ours to deliver now?

        Yes, unless an original importer runs on this maildir and the
        message went into work/ (its ctime) less than ORIGINAL_BUSY ago:
        then the original may be delivering it, and it is left alone.
        """
        since = os.fstat(msg.fd).st_ctime
        if time.time() - since > ORIGINAL_BUSY:
            return True
        pids = original_importers(self.maildir.root)
        if not pids:
            return True
        msg.release()
        if msg.name not in self.left_alone:
            log.warning("%s: work/%s may be in the hands of the original "
                        "importer (pid %s); left to it until %s",
                        self.maildir.root, msg.name,
                        " ".join(str(p) for p in pids),
                        format_time(since + ORIGINAL_BUSY))
        self.left_alone[msg.name] = since + ORIGINAL_BUSY
        return False

    def _overlapped_registrations(self, claims):
        """Registrations, with the maildir work done while the JPPS works.

        For each message: send its RegisterJob, then finish the previous
        message (unlink, log) and claim the next while the JPPS handles the
        request, then read the answer.  One request in flight, in order;
        each message's outcome is exactly that of the plain sequence.
        """
        handled, in_flight = 0, None          # (msg, started)
        for msg in itertools.chain(claims, (None,)):
            finished = None
            if in_flight is not None:
                previous, started = in_flight
                value, level = self._attempt(previous,
                                             self._receive_registration)
                finished, in_flight = (previous, started, value, level), None
            if msg is not None and self.stop_requested:
                msg.unclaim()           # claimed ahead; not started: back
                msg = None
            if msg is not None:
                handled += 1
                started = time.monotonic()
                value, level = self._attempt(msg, self._send_registration,
                                             msg)
                if level is None:
                    in_flight = (msg, started)
                else:
                    self._conclude(msg, started, value, level)
            if finished is not None:
                self._conclude(*finished)
        return handled

    def _due(self, name):
        """Whether message `name` may be tried now (its retry time has
        come)."""
        now = time.time()
        if self.not_before.get(name, 0) > now:
            return False
        next_retry = self.maildir.next_retry(name, self.retry_base)
        if next_retry is None or next_retry > now:
            if next_retry is not None:
                self.not_before[name] = next_retry
            return False
        self.not_before.pop(name, None)
        return True

    def _attempt(self, msg, step, *args):
        """Run one delivery step: (result, None) when it worked.

        When it failed, the message has been moved (post/ or
        undeliverable/) and the result is (outcome text, log level).
        """
        try:
            try:
                return step(*args), None
            except MalformedMessageError as exc:
                msg.give_up("malformed message: %s" % exc)
                return ("moved to undeliverable/: malformed message: %s"
                        % exc, logging.ERROR)
            except PermanentError as exc:
                msg.give_up(str(exc))
                return "moved to undeliverable/: %s" % exc, logging.ERROR
            except (TransientError, JPPSFaultError) as exc:
                return self._postpone(msg, exc)
            except MaildirError:
                raise
            except Exception as exc:
                # A bug of ours must not lose the message nor kill the
                # worker.
                log.exception("internal error on %s", msg.name)
                return self._postpone(msg, "internal error: %r" % exc)
        except (MaildirError, OSError) as exc:
            text, level = self._set_aside(msg, exc)
            return "failed, " + text, level

    def _set_aside(self, msg, exc):
        """The maildir cannot be written (a full disk, a read-only mount).

        Neither a traceback nor a dead worker (which --once would restart
        for ever): the message goes back to post/ (a rename needs no free
        space) or, if even that fails, stays in work/; either way it is
        tried again after the retry delay, without a record of this
        attempt.  Nothing is lost.
        """
        if isinstance(exc, OSError):
            exc = "%s%s" % (exc.strerror or exc,
                            ": " + exc.filename if exc.filename else "")
        where = "work"
        if msg.fd is not None:
            try:
                os.rename(self.maildir.path("work", msg.name),
                          self.maildir.path("post", msg.name))
                where = "post"
            except OSError:
                pass
            msg.release()
        self.not_before[msg.name] = time.time() + self.retry_base
        return ("not recorded: %s; left in %s/, next attempt in %s"
                % (exc, where, format_age(self.retry_base)), logging.ERROR)

    def _conclude(self, msg, started, value, level):
        """Finish a delivered message; log one line with the outcome."""
        if level is None:
            try:
                msg.done()
                level = logging.INFO
            except OSError as exc:
                text, level = self._set_aside(msg, exc)
                value = "%s, but %s" % (value, text)
        # Set aside (not recorded) counts as postponed: it is tried again.
        self.counts[msg.outcome or "postponed"] += 1
        log.log(level, "%s %s: %s (attempt %d, %.2fs)", self.kind,
                msg.jobid or msg.name, one_line(value, 1000),
                msg.attempts + (level == logging.INFO),
                time.monotonic() - started)

    def _postpone(self, msg, exc):
        next_retry = msg.postpone(one_line(exc), self.retry_base,
                                  self.options.give_up,
                                  at_least=getattr(exc, "delay", 0))
        if next_retry is None:
            return ("given up, moved to undeliverable/: %s" % exc,
                    logging.ERROR)
        self.not_before[msg.name] = next_retry
        # A storage outage is one WARNING, not one per message and retry.
        return ("failed: %s; next attempt at %s"
                % (exc, format_time(next_retry)),
                logging.INFO if getattr(exc, "quiet", False)
                else logging.WARNING)

    # -- the three kinds ----------------------------------------------------

    def deliver_registration(self, msg):
        """Register the job of registration message `msg`; the outcome."""
        self._send_registration(msg)
        return self._receive_registration()

    def _send_registration(self, msg):
        jobid, owner = parse_registration(msg.read())
        msg.jobid = jobid
        self.client().send("RegisterJob", "<job>%s</job><owner>%s</owner>"
                           % (escape(jobid), escape(owner)))

    def _receive_registration(self):
        try:
            self.client().receive()
        except JPPSFaultError as fault:
            if fault.code == errno.EEXIST:       # already there: success
                return "already registered"
            raise
        return "registered"

    def deliver_dump(self, msg):
        """Upload and commit the LB dump message `msg` names; the outcome."""
        fields = parse_keyed(msg.read())
        msg.jobid = fields["jobid"]
        return self.deliver_file(msg, fields, CLASS_LB, TYPE_LB,
                                 failsafe=True)

    def deliver_sandbox(self, msg):
        """Upload and commit the sandbox tarball message `msg` names; the
        outcome."""
        fields = parse_keyed(msg.read())
        msg.jobid = fields["jobid"]
        return self.deliver_file(msg, fields, CLASS_SANDBOX, TYPE_SANDBOX,
                                 failsafe=False)

    def deliver_file(self, msg, fields, file_class, content_type, failsafe):
        """StartUpload, upload, CommitUpload; then remove or store the file.

        The progress is recorded in the message state, so a crash at any
        step resumes correctly: after CommitUpload succeeded the message
        ends delivered, never undeliverable for a missing file.
        """
        path, client = fields["file"], self.client(fields.get("jpps"))
        if msg.state.get("committed"):
            self.finish_file(path, file_class)
            return "delivered (committed by an earlier attempt)"
        pending = msg.state.get("destination")
        if pending and not msg.state.get("uploading"):
            # Uploaded (no `uploading` mark; also the state an older
            # version wrote): commit, the file is not read again.
            return self._commit(msg, client, pending, path, file_class,
                                "delivered (committed an interrupted "
                                "upload)")
        with self.open_file(msg, path, fields["jobid"], file_class) as source:
            if pending:
                result = self._resume(msg, client, pending, source, path,
                                      file_class)
                if result is not None:
                    return result
            started = time.time()
            destination = self.start_upload(msg, client, fields["jobid"],
                                            source, file_class, content_type,
                                            failsafe)
            if destination is None:
                self.finish_file(path, file_class)
                return "already stored at the JPPS (StartUpload EEXIST)"
            # Recorded before the transfer: after a failed transfer or a
            # crash the next attempt sends the file again to the same
            # destination while the JPPS holds it open, instead of meeting
            # EEXIST from a second StartUpload and waiting the deadline out.
            msg.save_state(destination=destination,
                           upload_started=str(started), uploading="1")
            return self._upload_and_commit(msg, client, destination, source,
                                           path, file_class)

    def _upload_and_commit(self, msg, client, destination, source, path,
                           file_class):
        server = storage_server(destination)
        self._storage_wait(server)
        try:
            # A proxy only for the host of the JPPS that handed out the
            # destination, or one the operator named: a destination host
            # is whatever the JPPS, or a message's jpps line, says.
            size = upload(destination, source, self.credentials,
                          self.options.timeout, dcau=self.options.dcau,
                          allow_plain=self.options.allow_plain_ftp,
                          delegate_to=[client.host] +
                          self.options.delegate_to, keep=True)
        except TransientError as exc:
            if network_failure(exc):
                self._storage_failed(server, exc)
            raise
        self._storage_back(server)
        msg.save_state(uploading=None)
        return self._commit(msg, client, destination, path, file_class,
                            "delivered %d bytes to %s"
                            % (size, public_url(destination)))

    # -- storage servers that fail: one costs one --timeout, not one each

    def _storage_wait(self, server):
        """Postpone at once an upload to a server backed off from; the
        message keeps its destination (saved before) for the retry."""
        down = self.storage_down.get(server)
        now = time.time()
        if down is not None and down["until"] > now:
            exc = RetryLaterError(
                "storage %s unreachable since %s; not tried before %s"
                % (server, format_time(down["since"]),
                   format_time(down["until"])), down["until"] - now)
            exc.quiet = True
            raise exc

    def _storage_failed(self, server, exc):
        """A network failure: back off from `server`, starting at the
        retry delay and doubling (at most an hour); only the first
        failure of an outage is logged as a WARNING."""
        down = self.storage_down.get(server)
        if down is None:
            down = self.storage_down[server] = {
                "since": time.time(), "backoff": self.retry_base}
        else:
            down["backoff"] = min(max(RETRY_CAP, self.retry_base),
                                  2 * down["backoff"])
            exc.quiet = True
        down["until"] = time.time() + down["backoff"]

    def _storage_back(self, server):
        down = self.storage_down.pop(server, None)
        if down is not None:
            log.info("storage %s is back (unreachable since %s)", server,
                     format_time(down["since"]))

    def _resume(self, msg, client, destination, source, path, file_class):
        """An earlier attempt got a destination and may not have sent the
        file whole; None: start over.  Upload again, from byte 0, while the
        JPPS surely still holds the upload open."""
        started = float(msg.state.get("upload_started") or 0)
        if time.time() - started < UPLOAD_DEADLINE - 60:
            return self._upload_and_commit(msg, client, destination, source,
                                           path, file_class)
        msg.save_state(destination=None, upload_started=None, uploading=None)
        return None

    def _commit(self, msg, client, destination, path, file_class, result):
        """CommitUpload; an ENOENT answer may mean it was done already.

        ENOENT, "no such upload in progress", comes after a CommitUpload
        whose answer was lost (our client sends a call again on a new
        connection when the old one drops), or after a crash between the
        commit and the maildir step; but also when the upload expired at
        the JPPS, UPLOAD_DEADLINE after StartUpload.  Only well within
        that deadline does ENOENT prove the commit; later, the attempt
        starts over, and StartUpload tells (EEXIST: stored).
        """
        try:
            client.commit_upload(destination)
        except JPPSFaultError as fault:
            started = float(msg.state.get("upload_started") or 0)
            if fault.code != errno.ENOENT or \
                    time.time() - started > UPLOAD_DEADLINE - 60:
                msg.save_state(destination=None, upload_started=None,
                               uploading=None)
                raise
            result = "delivered (the JPPS had the commit already)"
        msg.save_state(committed="1", destination=None, upload_started=None)
        self.finish_file(path, file_class)
        return result

    def start_upload(self, msg, client, jobid, source, file_class,
                     content_type, failsafe):
        """StartUpload of `jobid`'s file: the destination URL, or None
        when the file is already stored (_already_stored).  With
        `failsafe`, a job the JPPS does not know is registered
        (failsafe_register) and StartUpload asked once more."""
        try:
            return self._start_upload(msg, client, jobid, file_class,
                                      content_type)
        except JPPSFaultError as fault:
            if fault.code not in (errno.ENOENT, None) or not failsafe or \
                    not self.failsafe_register(client, jobid, source, fault):
                raise
        return self._start_upload(msg, client, jobid, file_class,
                                  content_type)

    def _start_upload(self, msg, client, jobid, file_class, content_type):
        """One StartUpload call, as start_upload() describes it."""
        try:
            destination, _ = client.start_upload(jobid, file_class,
                                                 content_type)
        except JPPSFaultError as fault:
            if fault.code == errno.EEXIST:
                return self._already_stored(msg, fault)
            raise
        if "eexist_since" in msg.state:
            msg.save_state(eexist_since=None)
        return destination

    def _already_stored(self, msg, fault):
        """StartUpload EEXIST: an upload in progress, or a stored file.

        An unfinished upload expires at the JPPS after its deadline (300 s
        from StartUpload).  EEXIST again after that means the file is
        stored: a crash of ours, or a duplicate message, after a successful
        commit.
        """
        now = time.time()
        first = float(msg.state.get("eexist_since") or now)
        if now - first > UPLOAD_DEADLINE:
            return None
        msg.save_state(eexist_since=str(first))
        raise RetryLaterError("%s; checking again after the JPPS upload "
                              "deadline" % fault,
                              first + UPLOAD_DEADLINE + 10 - now)

    def failsafe_register(self, client, jobid, source, start_fault):
        """Register a job the JPPS does not know (StartUpload ENOENT).

        Fixes of the original: the check goes to the message's JPPS, not
        the default one, EPERM means the job exists (it belongs to someone
        else), and the owner is the job's owner from the dump, not the
        importer.
        Returns True when the job was registered here.
        """
        try:
            client.get_job_attributes(jobid, [REGTIME_ATTR])
            exists = True
        except JPPSFaultError as fault:
            if fault.code not in (errno.ENOENT, errno.EPERM, None):
                raise
            exists = fault.code == errno.EPERM
        if exists:
            raise TransientError("StartUpload failed although the job is "
                                 "registered: %s" % start_fault)
        owner = dump_owner(source)
        if owner is None:
            owner = self.credentials.identity
            log.warning("%s: no DG.USER in its dump; registering with our "
                        "own identity as owner", jobid)
        log.info("%s: not registered at %s; failsafe registration (owner "
                 "%s)", jobid, client.address, owner)
        try:
            client.register_job(jobid, owner)
        except JPPSFaultError as fault:
            if fault.code != errno.EEXIST:
                raise
        return True

    def open_file(self, msg, path, jobid, file_class):
        """The file the message names, open, checked, and its job's."""
        source = open_message_file(path, msg.owner,
                                   self.options.allow_shared_dirs,
                                   self.file_directories)
        try:
            check_belongs(source, path, jobid, file_class)
        except BaseException:
            source.close()
            raise
        return source

    def finish_file(self, path, file_class):
        """After the commit: keep a dump in --store, else remove the file.

        The directory is reached as safely as for the upload, and only a
        regular file of ours is removed or moved: a message cannot make
        us delete what it could not make us upload.
        """
        store = self.options.store if file_class == CLASS_LB else None
        directory, name = os.path.split(path)
        try:
            dir_fd, _ = open_directory(directory,
                                       self.options.allow_shared_dirs)
        except PermanentError as exc:
            log.warning("uploaded file %s left in place: %s", path, exc)
            return
        try:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if not stat.S_ISREG(st.st_mode):
                log.warning("uploaded file %s left in place: no longer a "
                            "regular file", path)
                return
            if not store:
                os.unlink(name, dir_fd=dir_fd)
                return
            target = os.path.join(store, name)
            if os.path.lexists(target):
                target += ".%d" % time.time()
            try:
                os.rename(name, target, src_dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # Another filesystem: copy, sync, then remove (a rename
                # across filesystems fails; the original left the file).
                with os.fdopen(os.open(name, OPEN_FILE_FLAGS,
                                       dir_fd=dir_fd), "rb") as source:
                    write_private_file(target, source.read())
                os.unlink(name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)


# ---------------------------------------------------------------------------
# Process plumbing: master, workers, signals, daemon
# ---------------------------------------------------------------------------

class Wakeup:
    """A self-pipe: signal handlers record the signal and wake wait().

    The byte that wakes wait() is written by the interpreter's C-level
    handler (signal.set_wakeup_fd), not by handler(): a Python handler
    runs only between bytecodes of the main thread, so a signal that
    came just before select() started, or to another thread, would
    leave select() asleep for its whole timeout (the master's is ten
    minutes).
    """

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe()
        for fd in (self.read_fd, self.write_fd):
            os.set_blocking(fd, False)
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        self.signals = []

    def handler(self, sig, frame):
        """The signal handler: record `sig` for take()."""
        self.signals.append(sig)

    def install(self, signals, handler=None):
        """Handle each of `signals` with `handler` (default: handler()),
        and wake wait() on any of them.  Call from the main thread."""
        signal.set_wakeup_fd(self.write_fd)
        for sig in signals:
            signal.signal(sig, handler or self.handler)

    def wait(self, timeout):
        """Sleep up to `timeout` s; a signal ends it at once."""
        if self.signals:
            return
        try:
            select.select([self.read_fd], [], [], max(0, timeout))
        except InterruptedError:
            pass
        try:
            while os.read(self.read_fd, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def take(self):
        """The signals received since the last take(), in order."""
        sigs, self.signals[:] = list(self.signals), []
        return sigs

    def close(self):
        """Close the pipe; signals no longer write to it."""
        previous = signal.set_wakeup_fd(-1)
        if previous != self.write_fd:
            signal.set_wakeup_fd(previous)      # not ours: left as it was
        os.close(self.read_fd)
        os.close(self.write_fd)


WORKER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_worker(kind, maildir, options, credentials, once=False,
               master_pid=None, report_fd=None):
    """The body of a worker process: deliver until told to stop.

    TERM/INT stop it after the message in hand (every call is bounded by
    its timeout); HUP reloads the credential and reopens the log.  A
    worker whose master went away stops too.  With `once`, it stops when
    a pass finds nothing to do.  At the end it writes to `report_fd`, if
    given, one line: delivered, postponed, undeliverable (a write this
    short to a pipe is atomic).
    """
    wakeup = Wakeup()
    worker = Worker(kind, maildir, options, credentials, once)

    def on_signal(sig, frame):
        if sig == signal.SIGHUP:
            worker.reload_requested = True
        else:
            worker.stop_requested = True
        wakeup.handler(sig, frame)

    wakeup.install(WORKER_SIGNALS, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
    try:
        while not worker.stop_requested:
            handled = worker.run_pass()
            if master_pid and os.getppid() != master_pid:
                log.warning("%s worker: the master is gone; stopping", kind)
                break
            if handled == 0 and not worker.stop_requested:
                if once:
                    break
                wakeup.wait(options.poll)
                wakeup.take()
    finally:
        worker.close()
        wakeup.close()
        if report_fd is not None:
            counts = worker.counts
            try:
                os.write(report_fd, b"%d %d %d\n" % (
                    counts["delivered"], counts["postponed"],
                    counts["undeliverable"] + maildir.quarantined))
            except OSError:
                pass            # full (restarts without end): uncounted
    return 0


def set_process_name(name):
    """Name this process for ps -e, top and pgrep (Linux: the 15-byte
    /proc/PID/comm; the command line stays python3 jp_importer.py ...)."""
    try:
        with open("/proc/self/comm", "wb") as f:
            f.write(name.encode("ascii", "replace")[:15])
    except OSError:
        pass            # not Linux, or an old kernel: the name stays


class Master:
    """Forks and supervises the workers.

    One registration worker, `dump_slaves` dump workers and one sandbox
    worker.  A worker that dies is restarted; one that dies young is
    restarted with a doubling delay (at most a minute), so a crashing
    worker cannot fork-bomb the node.  TERM/INT: the workers finish the
    message in hand, the master waits for them (the original did not),
    then returns.
    """

    STOP_GRACE = 30.0           # beyond the call timeouts, then SIGKILL
    HOUSEKEEPING = 600.0        # stale tmp/ copies, state files, spool/

    def __init__(self, options, credentials, maildirs, ready=None):
        self.options, self.credentials = options, credentials
        self.ready = ready              # called once TERM is handled
        self.maildirs = maildirs
        self.slots = ([(KIND_REG, maildirs[KIND_REG])]
                      + [(KIND_DUMP, maildirs[KIND_DUMP])]
                      * options.dump_slaves
                      + [(KIND_SANDBOX, maildirs[KIND_SANDBOX])])
        self.children = {}              # pid -> slot
        self.started = {}               # slot -> monotonic start time
        self.backoff = {}               # slot -> next restart delay
        self.restart_at = {}            # slot -> monotonic time
        self.finished = set()           # slots done (--once)
        self.wakeup = None
        self.report = None              # --once: pipe of the workers' counts
        self.once_deaths = {}           # --once: slot -> workers that died
        self.expiry_checked = time.monotonic()  # of the last expiry check

    def spawn(self, slot):
        """Fork the worker of `slot`; in the child, run it to the end."""
        kind, maildir = self.slots[slot]
        master_pid = os.getpid()
        # Blocked over the fork: a TERM in the new worker before it has
        # its own handlers would run the master's (in the worker: lost)
        # and the master would wait for it.  run_worker unblocks them.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        pid = os.fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        else:                                            # the worker
            status = 1
            try:
                for sig in (signal.SIGCHLD,) + WORKER_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                self.wakeup.close()
                forget_connections()            # the master's are its own
                set_role("%s-%d" % (kind, slot))
                set_process_name("jp_imp: " + {
                    KIND_REG: "reg", KIND_DUMP: "dump-%d" % slot,
                    KIND_SANDBOX: "sandbox"}[kind])
                if self.report:
                    os.close(self.report[0])
                status = run_worker(kind, maildir, self.options,
                                    self.credentials, self.options.once,
                                    master_pid, self.report and
                                    self.report[1])
            except BaseException:
                log.exception("%s worker failed", kind)
            finally:
                logging.shutdown()
                os._exit(status)
        self.children[pid] = slot
        self.started[slot] = time.monotonic()

    def reap(self, stopping):
        """Collect the workers that ended; unless `stopping` (or a --once
        worker is done), schedule their restart: at once for one that
        ran a minute, else after a doubling back-off."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            slot = self.children.pop(pid, None)
            if slot is None:
                continue
            kind = self.slots[slot][0]
            if stopping or (self.options.once and os.WIFEXITED(status)
                            and os.WEXITSTATUS(status) == 0):
                self.finished.add(slot)
                continue
            if self.options.once:
                self.once_deaths[slot] = self.once_deaths.get(slot, 0) + 1
                if self.once_deaths[slot] > ONCE_RESTARTS:
                    # --once must end: a run that cannot is an error.
                    log.error("%s worker (pid %d) died: %s; not restarted "
                              "again (--once)", kind, pid,
                              decode_wait_status(status))
                    self.finished.add(slot)
                    continue
            lived = time.monotonic() - self.started[slot]
            delay = 0.0 if lived > 60 else min(
                RESTART_BACKOFF_MAX, max(1.0, 2 * self.backoff.get(slot, 0)))
            self.backoff[slot] = delay
            self.restart_at[slot] = time.monotonic() + delay
            log.error("%s worker (pid %d) died: %s; restarting in %.0fs",
                      kind, pid, decode_wait_status(status), delay)

    def warn_expiry(self):
        """Log the credential's coming expiry: at start, on SIGHUP, and
        once a day from housekeeping (a renewed file on disk first)."""
        self.expiry_checked = time.monotonic()
        warning = expiry_warning(self.credentials.not_after,
                                 self.options.warn_expiry)
        if warning:
            log.warning("credential %s (valid until %s) %s",
                        self.credentials.cert_file,
                        format_time(self.credentials.not_after), warning)

    def housekeeping(self):
        """The master's periodic chores: the credential's expiry (daily)
        and the maildirs' stale and orphan files."""
        if time.monotonic() - self.expiry_checked > 86400:
            self.credentials.refresh()
            self.warn_expiry()
        for maildir in self.maildirs.values():
            try:
                maildir.requeue_stale_tmp()
                maildir.remove_stale_state()
                maildir.remove_orphan_archives()
            except OSError as exc:
                log.error("%s: housekeeping failed: %s", maildir.root, exc)

    def run(self):
        started = time.monotonic()
        set_process_name(PROG)
        self.wakeup = Wakeup()
        self.wakeup.install((signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                             signal.SIGCHLD))
        if self.ready:
            self.ready()
        if self.options.once:
            self.report = os.pipe()
            os.set_blocking(self.report[1], False)  # a worker never hangs
        self.housekeeping()
        next_housekeeping = time.monotonic() + self.HOUSEKEEPING
        for slot in range(len(self.slots)):
            self.spawn(slot)
        log.info("started: %d workers (pid %s), JPPS %s", len(self.slots),
                 " ".join(str(p) for p in sorted(self.children)),
                 self.options.jpps)
        self.warn_expiry()
        stopping, kill_at = False, None
        while True:
            for sig in self.wakeup.take():
                if sig in (signal.SIGTERM, signal.SIGINT) and not stopping:
                    log.info("terminating on %s: waiting for the workers to "
                             "finish their messages", signame(sig))
                    stopping = True
                    kill_at = (time.monotonic() + self.options.timeout * 2
                               + self.STOP_GRACE)
                    self.signal_children(signal.SIGTERM)
                elif sig == signal.SIGHUP:
                    log.info("SIGHUP: reloading credentials, reopening log")
                    reopen_logs()
                    self.credentials.reload()
                    self.warn_expiry()
                    self.signal_children(signal.SIGHUP)
            self.reap(stopping)
            now = time.monotonic()
            if stopping:
                if not self.children:
                    break
                if now > kill_at:
                    log.error("workers still busy; killing them (their "
                              "messages are recovered at the next start)")
                    self.signal_children(signal.SIGKILL)
                    kill_at = now + self.STOP_GRACE
            elif self.options.once and len(self.finished) == len(self.slots):
                break
            else:
                for slot, when in list(self.restart_at.items()):
                    if when <= now:
                        del self.restart_at[slot]
                        self.spawn(slot)
                if now >= next_housekeeping:
                    self.housekeeping()
                    next_housekeeping = now + self.HOUSEKEEPING
            waits = [self.HOUSEKEEPING] + [max(0, t - now) for t in
                                            self.restart_at.values()]
            self.wakeup.wait(min(waits + ([1.0] if stopping else [])))
        if self.report:
            self.summary(time.monotonic() - started)
        log.info("stopped")
        return 1 if any(n > ONCE_RESTARTS
                        for n in self.once_deaths.values()) else 0

    def summary(self, seconds):
        """--once: one line with what became of the messages, summed over
        the workers (a worker killed by a signal has not counted in)."""
        os.close(self.report[1])
        data = b""
        while True:
            chunk = os.read(self.report[0], 65536)
            if not chunk:
                break
            data += chunk
        os.close(self.report[0])
        totals = [0, 0, 0]
        for line in data.split(b"\n"):
            for i, word in enumerate(line.split()[:3]):
                totals[i] += int(word)
        log.info("--once: %d delivered, %d postponed, %d undeliverable in "
                 "%.1fs", totals[0], totals[1], totals[2], seconds)

    def signal_children(self, sig):
        """Send `sig` to every worker."""
        for pid in list(self.children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


class PidFile:
    """A locked pid file: two starters cannot both run.

    The lock is flock() on the open file, so it passes to the daemon
    through the forks and goes away with the last process holding it.
    """

    def __init__(self, path):
        self.path = path
        self.fd = None

    def acquire(self):
        """Open and lock the pid file; ConfigError when another
        jp_importer holds it.  Returns self."""
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT |
                              os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise ConfigError("cannot open pid file %s: %s"
                              % (self.path, exc.strerror))
        for attempt in (1, 2, 3):
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt < 3:         # --status probes it for a moment
                    time.sleep(0.05)
        else:
            pid = os.read(self.fd, 32).decode("ascii", "replace").strip()
            os.close(self.fd)
            self.fd = None
            raise ConfigError("another jp_importer is running (pid %s, pid "
                              "file %s)" % (pid or "?", self.path))
        fcntl.fcntl(self.fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        return self

    def write(self):
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, b"%d\n" % os.getpid())
        os.fsync(self.fd)

    def remove(self):
        """Remove the pid file and close it."""
        unlink_quietly(self.path)
        os.close(self.fd)


def daemonize(keep_stderr=False):
    """Detach from the terminal (PEP 3143 / Stevens 13.3).

    umask and working directory first, then fork and setsid so we lead a
    session with no controlling terminal, then fork again so we can never
    acquire one, then the standard streams go to /dev/null (standard
    error stays with keep_stderr: the log goes there).

    The starter exits only when the daemon writes b"1" to the returned
    descriptor (its pid file written: an init script or systemd reads
    it then), with status 1 if the daemon died before.
    """
    os.umask(0o027)
    os.chdir("/")
    ready_r, ready_w = os.pipe()
    if os.fork() > 0:
        os.close(ready_w)
        try:
            ready = os.read(ready_r, 1)
        except OSError:
            ready = b""
        if ready != b"1":
            sys.stderr.write("%s: the daemon stopped before it was ready; "
                             "see its log\n" % PROG)
            sys.stderr.flush()
        os._exit(0 if ready == b"1" else 1)
    os.close(ready_r)
    fcntl.fcntl(ready_w, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    for sig in ("SIGTSTP", "SIGTTIN", "SIGTTOU"):
        signal.signal(getattr(signal, sig), signal.SIG_IGN)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1) if keep_stderr else (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    return ready_w


# -- logging ---------------------------------------------------------------

class _Formatter(logging.Formatter):
    """One record, one line: control characters in the message escaped
    (a message name, a DN or a server's text cannot forge a log line)."""

    def formatMessage(self, record):
        """The record formatted, its message made printable()."""
        record.message = printable(record.message)
        return logging.Formatter.formatMessage(self, record)


class _RoleFilter(logging.Filter):
    """Gives every record the `role` of this process, for the format:
    "master", or a worker's kind and slot ("dump-1")."""

    def __init__(self, role="master"):
        logging.Filter.__init__(self)
        self.role = role

    def filter(self, record):
        record.role = self.role
        return True


def _role_filters():
    """The _RoleFilter of each of our log handlers."""
    return [f for handler in log.handlers for f in handler.filters
            if isinstance(f, _RoleFilter)]


def set_role(role):
    """Name this process's part in its log lines from now on."""
    for role_filter in _role_filters():
        role_filter.role = role


def setup_logging(logfile=None, use_syslog=False, level=None):
    """Log to a file, to syslog (daemon) or to stderr (foreground)."""
    # No caller lookup per record (the logging HOWTO's optimisation): one
    # line per message is logged, and the frame walk was a tenth of the
    # local work of a registration.
    logging._srcfile = None
    roles = [f.role for f in _role_filters()]
    for handler in list(log.handlers):
        log.removeHandler(handler)
    if logfile:
        handler = logging.handlers.WatchedFileHandler(logfile)
        fmt = "%(asctime)s " + PROG + "[%(process)d] %(role)s: " \
            "%(levelname)s %(message)s"
    elif use_syslog:
        handler = logging.handlers.SysLogHandler(
            address=SYSLOG_SOCKET,
            facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        fmt = PROG + "[%(process)d]: %(role)s: %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s " + PROG + "[%(process)d] %(role)s: " \
            "%(levelname)s %(message)s"
    handler.setFormatter(_Formatter(fmt))
    handler.addFilter(_RoleFilter(*roles[:1]))    # the role set before
    log.addHandler(handler)
    if level is not None:           # else as set before (--log-level)
        log.setLevel(level)
    log.propagate = False


def syslog_error():
    """None when the syslog socket takes a connection, else why not.

    SysLogHandler ignores a failed connection, and then drops every
    record: asked first, the daemon can log elsewhere and say so.
    """
    error = None
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        sock = socket.socket(socket.AF_UNIX, kind)
        try:
            sock.connect(SYSLOG_SOCKET)
            return None
        except OSError as exc:
            error = error or exc.strerror or str(exc)
        finally:
            sock.close()
    return error


def reopen_logs():
    """Reopen the log file (after logrotate moved it away)."""
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                if handler.stream:
                    handler.stream.close()
                handler.stream = handler._open()
            finally:
                handler.release()


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

SHORTOPTS = "hc:k:C:gp:r:d:D:s:i:t:S:"
LONGOPTS = ["help", "cert=", "key=", "CAdir=", "debug", "jpps=",
            "reg-mdir=", "dump-mdir=", "dump-slaves=", "sandbox-mdir=",
            "pidfile=", "poll=", "store=", "once", "status", "requeue",
            "retry=", "give-up=", "timeout=", "log=", "upload", "dcau=",
            "allow-plain-ftp", "allow-shared-dirs", "files-in=",
            "allow-jpps=", "delegate-to=", "version",
            "json", "check", "warn-age=", "crit-age=",
            "warn-undeliverable=", "crit-undeliverable=",
            "flush", "delete", "log-level=", "warn-expiry="]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def default_pidfile():
    """The pid file without -i: in /var/run for root, else in the home
    directory."""
    if os.geteuid() == 0:
        return "/var/run/glite-jpimporter.pid"
    return os.path.join(os.path.expanduser("~"), "glite_jpimporter.pid")


class Options:
    """The parsed command line (plain attributes)."""

    def __init__(self):
        self.cert = self.key = self.ca_dir = None
        self.debug = False
        self.jpps = DEFAULT_JPPS
        self.reg_mdir = DEFAULT_REG_MDIR
        self.dump_mdir = DEFAULT_DUMP_MDIR
        self.sandbox_mdir = DEFAULT_SANDBOX_MDIR
        self.dump_slaves = 1
        self.pidfile = None
        self.poll = DEFAULT_POLL
        self.store = None
        self.once = self.status = self.requeue = self.upload = False
        self.retry = None
        self.give_up = GIVE_UP
        self.timeout = CALL_TIMEOUT
        self.logfile = None
        self.dcau = "auto"
        self.allow_plain_ftp = False
        self.allow_shared_dirs = False
        self.files_in = []
        self.allow_jpps = []        # JPPS a message may name besides -p
        self.delegate_to = []       # gsiftp hosts trusted with a proxy
        self.help = self.version = False
        self.args = []
        self.json = self.check = self.flush = self.delete = False
        self.thresholds = dict(CHECK_THRESHOLDS)
        self.pidfile_given = False
        self.log_level = logging.INFO
        self.warn_expiry = WARN_EXPIRY


def _number(opt, value, low=None, high=None, integer=False):
    """The number `value` given to option `opt` (an int with `integer`),
    within `low` and `high` when given; getopt.GetoptError if not."""
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        raise getopt.GetoptError("%s needs a number, not %r" % (opt, value))
    if number != number or (low is not None and number < low) or \
            (high is not None and number > high):
        raise getopt.GetoptError("%s must be between %s and %s, not %s"
                                 % (opt, low, high if high is not None
                                    else "any", value))
    return number


def _check_endpoint(opt, value):
    """getopt.GetoptError unless `value` (given to `opt`) is a JPPS
    address."""
    try:
        parse_endpoint(value)
    except ConfigError as exc:
        raise getopt.GetoptError("%s: %s" % (opt, exc))


def parse_args(argv):
    """Options for argv (without the program name); GetoptError if bad."""
    opts, args = getopt.gnu_getopt(argv, SHORTOPTS, LONGOPTS)
    o = Options()
    simple = {"-c": "cert", "--cert": "cert", "-k": "key", "--key": "key",
              "-C": "ca_dir", "--CAdir": "ca_dir", "-p": "jpps",
              "--jpps": "jpps", "-r": "reg_mdir", "--reg-mdir": "reg_mdir",
              "-d": "dump_mdir", "--dump-mdir": "dump_mdir",
              "-s": "sandbox_mdir", "--sandbox-mdir": "sandbox_mdir",
              "-i": "pidfile", "--pidfile": "pidfile", "-S": "store",
              "--store": "store", "--log": "logfile"}
    flags = {"-h": "help", "--help": "help", "-g": "debug",
             "--debug": "debug", "--once": "once", "--status": "status",
             "--requeue": "requeue", "--upload": "upload",
             "--allow-plain-ftp": "allow_plain_ftp",
             "--allow-shared-dirs": "allow_shared_dirs",
             "--version": "version", "--json": "json", "--check": "check",
             "--flush": "flush", "--delete": "delete"}
    for opt, arg in opts:
        if opt in simple:
            if not arg:
                raise getopt.GetoptError("%s needs a non-empty value" % opt)
            setattr(o, simple[opt], arg)
            if simple[opt] == "jpps":
                _check_endpoint(opt, arg)
        elif opt in flags:
            setattr(o, flags[opt], True)
        elif opt in ("-D", "--dump-slaves"):
            o.dump_slaves = _number(opt, arg, 1, MAX_DUMP_WORKERS, True)
        elif opt in ("-t", "--poll"):
            o.poll = _number(opt, arg, 0.01, 86400)
        elif opt == "--retry":
            o.retry = _number(opt, arg, 0, 86400)
        elif opt == "--give-up":
            o.give_up = _number(opt, arg, 0, 10 * 365 * 86400)
        elif opt == "--timeout":
            o.timeout = _number(opt, arg, 0.1, 86400)
        elif opt == "--files-in":
            if not arg:
                raise getopt.GetoptError("--files-in needs a directory")
            o.files_in.append(os.path.abspath(arg))
        elif opt == "--allow-jpps":
            _check_endpoint(opt, arg)
            o.allow_jpps.append(arg)
        elif opt == "--delegate-to":
            host = arg.strip().strip("[]").lower()
            if not host or "/" in host:
                raise getopt.GetoptError("--delegate-to needs a host name, "
                                         "not %r" % arg)
            o.delegate_to.append(host)
        elif opt == "--warn-expiry":
            o.warn_expiry = _number(opt, arg, 0, 3650) * 86400
        elif opt == "--dcau":
            if arg not in ("auto", "N", "A"):
                raise getopt.GetoptError("--dcau must be auto, N or A")
            o.dcau = arg
        elif opt[2:] in CHECK_THRESHOLDS:
            o.thresholds[opt[2:]] = _number(opt, arg, 0, None,
                                            "undeliverable" in opt)
        elif opt == "--log-level":
            if arg.upper() not in LOG_LEVELS:
                raise getopt.GetoptError("--log-level must be one of %s"
                                         % ", ".join(LOG_LEVELS))
            o.log_level = getattr(logging, arg.upper())
    modes = [m for m in ("once", "status", "requeue", "upload", "flush",
                         "delete") if getattr(o, m)]
    if len(modes) > 1:
        raise getopt.GetoptError("--%s and --%s exclude each other"
                                 % tuple(modes[:2]))
    if (o.json or o.check) and not o.status:
        raise getopt.GetoptError("--%s goes with --status"
                                 % ("json" if o.json else "check"))
    if o.json and o.check:
        raise getopt.GetoptError("--json and --check exclude each other")
    if o.upload:
        if len(args) != 2:
            raise getopt.GetoptError("--upload needs FILE and URL")
    elif o.delete and not args:
        raise getopt.GetoptError("--delete needs the NAME or JOBID of "
                                 "undeliverable messages")
    elif args and not (o.requeue or o.delete):
        raise getopt.GetoptError("unexpected argument %r" % args[0])
    o.args = args
    o.pidfile_given = o.pidfile is not None
    if o.store:
        o.store = os.path.abspath(o.store)
    # Absolute before the daemon changes to /: a relative --log or -i
    # would name another file there (or one it may not create).
    o.logfile = o.logfile and os.path.abspath(o.logfile)
    o.pidfile = os.path.abspath(o.pidfile or default_pidfile())
    return o


def usage(stream):
    """Write the usage text (the module docstring) to `stream`."""
    stream.write(__doc__ % {
        "prog": PROG, "cadir": DEFAULT_CA_DIR, "jpps": DEFAULT_JPPS,
        "reg": DEFAULT_REG_MDIR, "dump": DEFAULT_DUMP_MDIR,
        "sandbox": DEFAULT_SANDBOX_MDIR, "maxdump": MAX_DUMP_WORKERS,
        "pidfile": default_pidfile(), "poll": "%g" % DEFAULT_POLL,
        "giveup": GIVE_UP, "timeout": CALL_TIMEOUT})


def file_directories(o):
    """The directories dump and sandbox files may lie in (resolved), or
    None: anywhere the checks of open_message_file() allow."""
    if not o.files_in:
        return None
    dirs = list(o.files_in) + [os.path.join(o.sandbox_mdir, "spool")]
    return [os.path.realpath(d) for d in dirs]


def open_maildirs(o, create=True):
    """{kind: Maildir} of the three maildirs of options `o`, checked
    and, with `create`, made."""
    return dict((kind, Maildir(os.path.abspath(path)).init(
        create, o.allow_shared_dirs)) for kind, path in maildir_paths(o))


def maildir_paths(o):
    """(kind, path) of each of the three maildirs of options `o`."""
    return ((KIND_REG, o.reg_mdir), (KIND_DUMP, o.dump_mdir),
            (KIND_SANDBOX, o.sandbox_mdir))


def daemon_status(pidfile):
    """Whether a daemon holds the pid file's lock, and its pid.

    The probe is a shared flock() for a moment: it fails while the daemon
    holds its exclusive lock (a starting daemon tries three times).
    """
    info = {"pidfile": os.path.abspath(pidfile), "running": False,
            "pid": None, "error": None}
    try:
        fd = os.open(pidfile, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return info
    except OSError as exc:
        info.update(running=None, error="cannot open: %s" % exc.strerror)
        return info
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        info["running"] = True
        try:
            info["pid"] = int(os.read(fd, 32).split()[0])
        except (OSError, ValueError, IndexError):
            pass                        # being written: running, pid unknown
    finally:
        os.close(fd)
    return info


def credential_status(o, now):
    """(the credential's file, subject, expiry, None) or (None, why).

    Only its certificates are read (no key needed): any user who may read
    the certificate can check its expiry.
    """
    cert_file = o.cert
    try:
        cert_file = find_credentials(o.cert, o.key)[0]
        certs = read_pem_certificates(cert_file)
    except ConfigError as exc:
        return None, str(exc)
    except OSError as exc:
        return None, "cannot read %s: %s" % (exc.filename or cert_file,
                                              exc.strerror)
    except (ValueError, IndexError) as exc:
        return None, "%s: unreadable certificate (%s)" % (cert_file, exc)
    if not certs:
        return None, "%s holds no certificate" % cert_file
    not_after = min(c.not_after for c in certs)
    return {"file": os.path.abspath(cert_file), "subject": certs[0].subject,
            "not_after": not_after,
            "expires_in": int(not_after - now)}, None


def queue_status(path, default_retry, now):
    """One queue of --status --json (README, "Watching it")."""
    info = {"path": os.path.abspath(path), "error": None,
            "counts": dict((sub, 0) for sub in SUBDIRS[1:]),
            "due_now": 0, "oldest_age": None, "next_retry": None,
            "errors": [], "undeliverable": []}
    if not os.path.isdir(path):
        info["error"] = "does not exist"
        return info
    try:
        md = Maildir(path).status(default_retry, now)
    except OSError as exc:
        info["error"] = "cannot read: %s" % (exc.strerror or exc)
        return info
    info.update(counts=md["counts"], due_now=md["due_now"])
    if md["oldest"] is not None:
        info["oldest_age"] = max(0, int(now - md["oldest"]))
    if md["next_retry"] is not None:
        info["next_retry"] = int(md["next_retry"])
    info["errors"] = [
        {"state": state, "reason": reason, "count": count, "last": int(last)}
        for (state, reason), (count, last) in sorted(
            md["errors"].items(), key=lambda item: (-item[1][0],
                                                    -item[1][1]))]
    info["undeliverable"] = [{"name": name, "jobid": jobid, "reason": reason}
                             for name, jobid, reason in md["undeliverable"]]
    return info


def status_report(o, now=None):
    """Everything --status says, as one JSON-ready dict."""
    now = time.time() if now is None else now
    credential, why = credential_status(o, now)
    return {"version": STATUS_VERSION, "time": int(now),
            "daemon": daemon_status(o.pidfile),
            "credential": credential, "credential_error": why,
            "queues": dict((kind, queue_status(
                path, o.retry if o.retry is not None else Worker.RETRY[kind],
                now)) for kind, path in maildir_paths(o))}


def print_status(o, stream):
    """Write the --status report (status_report()) as text to
    `stream`."""
    now = time.time()
    report = status_report(o, now)
    daemon = report["daemon"]
    stream.write("daemon: %s (pid file %s)\n" % (
        "running, pid %s" % (daemon["pid"] or "?") if daemon["running"]
        else daemon["error"] or "not running", daemon["pidfile"]))
    cred = report["credential"]
    if cred is None:
        stream.write("credential: none usable: %s\n"
                     % printable(report["credential_error"]))
    else:
        warning = expiry_warning(cred["not_after"], o.warn_expiry, now)
        stream.write("credential: %s (%s), %s %s%s\n" % (
            cred["file"], printable(cred["subject"]),
            "expired on" if cred["expires_in"] < 0 else "valid until",
            format_time(cred["not_after"]),
            "  WARNING: " + warning if warning else ""))
    for kind, path in maildir_paths(o):
        info = report["queues"][kind]
        stream.write("%s maildir %s\n" % (kind, path))
        if info["error"]:
            stream.write("  %s\n" % info["error"])
            continue
        stream.write("  new %(new)d  work %(work)d  post %(post)d  "
                     "undeliverable %(undeliverable)d\n" % info["counts"])
        if info["oldest_age"] is not None:
            stream.write("  oldest message: %s old; due now: %d\n"
                         % (format_age(info["oldest_age"]), info["due_now"]))
        if info["next_retry"] is not None:
            stream.write("  next retry: %s (%s)\n" % (
                format_time(info["next_retry"]),
                "due" if info["next_retry"] <= now else
                "in " + format_age(info["next_retry"] - now)))
        for error in info["errors"]:
            stream.write("  %s %dx, last %s: %s\n" % (
                error["state"], error["count"], format_time(error["last"]),
                printable(error["reason"])))
        for item in info["undeliverable"]:
            stream.write("  undeliverable %s\n" % printable(
                "%(name)s %(jobid)s: %(reason)s" % item))


def check_status(o, report):
    """--status --check: (exit status, one line) in the Nagios way."""
    names = ("OK", "WARNING", "CRITICAL", "UNKNOWN")
    broken = ["%s maildir %s" % (kind, q["error"])
              for kind, q in sorted(report["queues"].items()) if q["error"]]
    if broken:
        return 3, "JP_IMPORTER UNKNOWN - " + printable("; ".join(broken))
    queues = report["queues"].values()
    waiting = sum(q["counts"][s] for q in queues
                  for s in ("new", "work", "post"))
    postponed = sum(q["counts"]["post"] for q in queues)
    undeliverable = sum(q["counts"]["undeliverable"] for q in queues)
    oldest = max([q["oldest_age"] or 0 for q in queues])
    th = o.thresholds
    problems = []               # (level, text)

    def judge(value, warn, crit, text):
        if crit and value >= crit:
            problems.append((2, text))
        elif warn and value >= warn:
            problems.append((1, text))
    judge(oldest, th["warn-age"], th["crit-age"],
          "oldest message waiting %s" % format_age(oldest))
    judge(undeliverable, th["warn-undeliverable"], th["crit-undeliverable"],
          "%d undeliverable" % undeliverable)
    daemon, cred = report["daemon"], report["credential"]
    if o.pidfile_given and not daemon["running"]:
        problems.append((2, "no daemon holds %s" % daemon["pidfile"]))
    if cred is not None and cred["expires_in"] <= 0:
        problems.append((2, "credential expired"))
    elif cred is not None and cred["expires_in"] < o.warn_expiry:
        problems.append((1, "credential expires in %s"
                         % format_age(cred["expires_in"])))
    level = max([p[0] for p in problems] + [0])
    text = "; ".join([p[1] for p in problems] + [
        "%d waiting (oldest %s), %d postponed, %d undeliverable"
        % (waiting, format_age(oldest), postponed, undeliverable)])
    perf = ("waiting=%d oldest_age=%ds;%s;%s;0 postponed=%d "
            "undeliverable=%d;%s;%s;0" % (
                waiting, oldest, th["warn-age"] or "", th["crit-age"] or "",
                postponed, undeliverable, th["warn-undeliverable"] or "",
                th["crit-undeliverable"] or ""))
    return level, "JP_IMPORTER %s - %s | %s" % (names[level], text, perf)


def who_am_i():
    """The user for a --delete record (and who sudo'ed, if so)."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "?"
    sudo = os.environ.get("SUDO_USER")
    return "%s (uid %d)%s" % (name, uid, " via sudo by " + sudo
                              if sudo else "")


def requeue_or_delete(o):
    """--requeue [NAME|JOBID...] and --delete NAME|JOBID...: only
    undeliverable messages; a NAME or JOBID that matches none is an
    error (exit status 1) after the others were done.  All is done
    before the report is written: a reader gone early stops nothing."""
    report = []
    wanted = set(o.args)
    for arg in o.args:
        try:
            wanted.add(parse_jobid(arg))
        except ValueError:
            pass
    matched = set()

    def select(name, jobid):
        try:
            normal = parse_jobid(jobid)
        except ValueError:
            normal = jobid
        hits = wanted.intersection((name, jobid, normal))
        matched.update(hits)
        return bool(hits) or not o.args
    for kind, maildir in open_maildirs(o, create=False).items():
        if o.requeue:
            moved = maildir.requeue_undeliverable(select)
            report.append("%s: %d message(s) requeued\n"
                          % (maildir.root, len(moved)))
            continue
        for name in maildir.names("undeliverable"):
            jobid = maildir.jobid_of("undeliverable", name)
            if select(name, jobid):
                maildir.delete_undeliverable(name, who_am_i())
                report.append("%s: deleted undeliverable/%s (%s); recorded "
                              "in %s\n" % (maildir.root, printable(name),
                                           printable(jobid), DELETED_LOG))
    code = to_stdout(lambda out: out.write("".join(report)))
    missing = [a for a in o.args if a not in matched and not any(
        w in matched for w in _jobid_forms(a))]
    if missing:
        raise Error("no undeliverable message named %s"
                    % ", ".join(printable(m) for m in missing))
    return code


def _jobid_forms(text):
    """The normal form of `text` as a jobid, in a list; none if it is
    not one."""
    try:
        return [parse_jobid(text)]
    except ValueError:
        return []


def run_daemon(o):
    """Start the master (daemonized unless -g or --once)."""
    credentials = Credentials.from_options(o.cert, o.key, o.ca_dir).load()
    parse_endpoint(o.jpps)      # refused now, not retried for days
    maildirs = open_maildirs(o)
    if o.store:
        if not os.path.isdir(o.store):
            try:
                os.mkdir(o.store, 0o750)
            except OSError as exc:
                raise ConfigError("cannot create store directory %s: %s"
                                  % (o.store, exc.strerror))
        check_directory(o.store, o.allow_shared_dirs, "store directory")
    foreground = o.debug or o.once
    pidfile = None if o.once else PidFile(o.pidfile).acquire()
    ready = None
    if not foreground:
        use_syslog = o.logfile is None
        error = syslog_error() if use_syslog else None
        if error:
            # A node without a syslog daemon: log where the starter
            # sends our standard error (a file, the journal), and say
            # so there, rather than fail or log nowhere.
            sys.stderr.write("%s: no syslog at %s (%s); logging to "
                             "standard error (see --log)\n"
                             % (PROG, SYSLOG_SOCKET, error))
            sys.stderr.flush()
            use_syslog = False
        ready = daemonize(keep_stderr=not use_syslog and o.logfile is None)
        setup_logging(o.logfile, use_syslog=use_syslog)
    if pidfile:
        pidfile.write()

    def tell_starter():
        # Now the pid file is right and a TERM is handled.
        if ready is not None:
            os.write(ready, b"1")
            os.close(ready)

    log.info("jp_importer %s: credential %s (%s), valid until %s",
             __version__, credentials.cert_file, credentials.subject,
             format_time(credentials.not_after))
    for maildir in maildirs.values():
        pids = original_importers(maildir.root)
        if pids:
            log.warning("%s: the original importer (pid %s) runs on this "
                        "maildir: stop it first (README, \"Migrating from "
                        "the C tools\")", maildir.root,
                        " ".join(str(p) for p in pids))
    try:
        return Master(o, credentials, maildirs, tell_starter).run()
    finally:
        if pidfile and os.getpid() == pidfile_owner(pidfile):
            pidfile.remove()


def to_stdout(write):
    """write(sys.stdout), flushed; the exit status: 0, or 141 when the
    reader has gone (`--status | head -1`), the status the shell gives a
    command killed by SIGPIPE, with no traceback and no message."""
    try:
        write(sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # What is still buffered goes nowhere: the flush at exit would
        # fail again, and loudly.
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
        return 141
    return 0


def pidfile_owner(pidfile):
    """The pid written in the locked `pidfile` (a PidFile), 0 if none."""
    try:
        os.lseek(pidfile.fd, 0, os.SEEK_SET)
        return int(os.read(pidfile.fd, 32).strip() or 0)
    except (OSError, ValueError):
        return 0


def main(argv=None):
    """Run jp_importer; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        o = parse_args(argv)
    except getopt.GetoptError as exc:
        sys.stderr.write("%s: %s\nTry '%s --help'.\n" % (PROG, exc, PROG))
        return 2
    if o.help:
        return to_stdout(usage)
    if o.version:
        return to_stdout(lambda out: out.write("%s %s\n"
                                               % (PROG, __version__)))
    try:
        setup_logging(o.logfile, level=o.log_level)
    except OSError as exc:
        sys.stderr.write("%s: cannot open log file %s: %s\n"
                         % (PROG, o.logfile, exc.strerror))
        return 1
    try:
        if o.status and o.check:
            code, line = check_status(o, status_report(o))
            sys.stdout.write(line + "\n")
            return code
        if o.status and o.json:
            report = status_report(o)
            return to_stdout(lambda out: out.write(json.dumps(
                report, indent=1, sort_keys=True) + "\n"))
        if o.status:
            return to_stdout(lambda out: print_status(o, out))
        if o.requeue or o.delete:
            return requeue_or_delete(o)
        if o.flush:
            # All made due first: a reader gone early stops no flush.
            flushed = [(maildir.root, maildir.flush()) for maildir in
                       open_maildirs(o, create=False).values()]
            return to_stdout(lambda out: out.write("".join(
                "%s: %d postponed message(s) due now\n" % f
                for f in flushed)))
        if o.upload:
            path, url = o.args
            credentials = Credentials.from_options(o.cert, o.key,
                                                   o.ca_dir).load()
            started = time.monotonic()
            size = upload(url, path, credentials, o.timeout, dcau=o.dcau,
                          allow_plain=o.allow_plain_ftp)
            elapsed = time.monotonic() - started
            return to_stdout(lambda out: out.write(
                "uploaded %d bytes to %s in %.2fs\n"
                % (size, public_url(url), elapsed)))
        return run_daemon(o)
    except (Error, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, Error):
            text = "%s%s" % (exc.strerror or exc,
                             ": " + exc.filename if exc.filename else "")
        else:
            text = str(exc)
        if o.logfile:
            log.error("%s", text)
        if o.status and o.check:        # the monitoring codes win
            sys.stdout.write("JP_IMPORTER UNKNOWN - %s\n" % printable(text))
            return 3
        sys.stderr.write("%s: %s\n" % (PROG, printable(text)))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # What the imports made (thousands of functions, classes, patterns)
    # is never garbage: out of the cyclic collector's sight, the full
    # collection at exit skips it (8 to 10 ms of a one-shot --upload,
    # measured) and so do the daemon's.  Left to main()'s callers when
    # imported (the tests run it in process).
    if hasattr(gc, "freeze"):                                    # novm
        gc.freeze()                                              # novm
    sys.exit(main())
