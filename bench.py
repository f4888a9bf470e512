#!/usr/bin/env python3
"""bench -- side-by-side benchmarks of the JP import tools and baselines.

Usage: python3 bench.py [--quick] [--runs N] [--json FILE] [WORKLOAD...]

Workloads (all by default): registrations, dumps, uploads, end-to-end,
startup.  Every figure is the median of several runs (3 by default), and
every comparison is a ratio against a baseline measured in the same run,
because the machines are shared and noisy: a ratio is the median of each
round's own ratio, not the ratio of two medians, so that noise common to
a round's two commands cancels.  --quick runs small sizes once: a smoke
test that the benchmark works (it asserts no timing).

registrations
    jp_importer --once draining 20,000 registrations to the JPPS built
    with gSOAP (test_all.GSoapJPPSPeer), against a bare keep-alive
    http.client loop posting the same envelopes to the same JPPS.  The
    Python JPPS fixture, slower than either client, would measure itself.
dumps
    lb_dump_exporter on generated dumps of about 10 kB a job (100 MB and
    1 GB), grouped and interleaved (-x), against cp + sync of the same
    file, an awk one-liner that splits by DG.JOBID, and the maildir
    floor (MAILDIR_FLOOR): the exporter's file operations alone, with no
    line read and no sync, which no exporter keeping the maildir
    contract can beat on the machine.  Each command starts after a sync,
    with the caches dropped (as root) and the dump read back in, in a
    directory that ext4 places in a fresh block group (spread()): on
    ext4 without a journal a new file next to many recently deleted ones
    costs 200-500 us instead of 25 (recently_deleted() in
    fs/ext4/ialloc.c), which would measure the previous workload.  Peak
    RSS is the command's own, through a fork-and-exec trampoline
    (child_run()), since Linux keeps a parent's peak across exec.
uploads
    a 256 MiB file with jp_importer.py --upload against curl --ssl-reqd
    to vsftpd, and against globus-url-copy (same proxy) to
    globus-gridftp-server, plain (-nodcau) and with -encrypt-data
    (-dcpriv).  Each command is a whole process, the payload and the
    servers' directories in memory (tmpfs), so that clients and wire are
    compared, not the disk; "transport alone" takes each side's start-up
    (the same command doing nothing) off its time, as a daemon's worker
    pays none per upload.
end-to-end
    1,000 dumps of 10 kB from lb_dump_exporter through jp_importer -D 4
    to the gSOAP JPPS and vsftpd, from the exporter's start until the
    dump maildir is empty, against two ceilings of the same round: the
    same importer's registrations/s (3,000 moved into its reg/new/ at
    once), and BARE_PIPELINE, four stdlib processes doing only what a
    dump costs the peers (StartUpload, MKD, STOR over a resumed TLS data
    connection, CommitUpload) on kept connections, and that pipeline's
    JPPS calls alone and FTPS stores alone.
startup
    the short-lived commands against python3 -c pass.

Uses test_all.py's fixtures (PKI, JPPS fixture, FTPS fixture, real peers).
Standard library only.
"""

import getopt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import test_all                                             # noqa: E402
from test_all import (JP_IMPORTER, LB_DUMP_EXPORTER,        # noqa: E402
                      JP_UPLOAD_FILES, drop_message, make_maildir)

WORKLOADS = ["registrations", "dumps", "uploads", "end-to-end", "startup"]
BARE_CLIENT = r'''
import http.client, ssl, sys, time
port, count, cert, key, ca, path = sys.argv[1:7]
ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(cert, key)
conn = http.client.HTTPSConnection("localhost", int(port), context=ctx)
bodies = open(path, "rb").read().split(b"\0")
started = time.perf_counter()
for body in bodies:
    conn.request("POST", "/", body=body, headers={
        "Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'})
    resp = conn.getresponse()
    resp.read()
    if resp.status != 200:
        sys.exit("HTTP %d" % resp.status)
print(time.perf_counter() - started)
'''


# What one dump costs the peers, with nothing of ours: StartUpload,
# MKD of the job's directory, STOR over a TLS-resumed data connection,
# CommitUpload, on one keep-alive HTTPS connection and one FTPS control
# connection.  Its part "calls" times the two JPPS calls alone, "stores"
# the MKD and STOR alone (StartUpload done before the clock starts).
# Prints "ready", waits for a line on stdin, prints seconds.
BARE_PIPELINE = r"""
import ftplib, http.client, io, re, ssl, sys, time
jpps_port, first, count, cert, key, ca, data, part = sys.argv[1:9]
first, count = int(first), int(count)
payload = open(data, "rb").read()
ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(cert, key)
ENVELOPE = (%r)

class FTPS(ftplib.FTP_TLS):
    def ntransfercmd(self, cmd, rest=None):
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        return self.context.wrap_socket(conn, server_hostname=self.host,
                                        session=self.sock.session), size

def call(op, body):
    conn.request("POST", "/", body=(ENVELOPE %% ("<jpelem:%%s>%%s</jpelem:%%s>"
                                                %% (op, body, op))).encode(),
                 headers={"Content-Type": "text/xml; charset=utf-8",
                          "SOAPAction": '""'})
    resp = conn.getresponse()
    text = resp.read().decode()
    if resp.status != 200:
        sys.exit("%%s: HTTP %%d %%s" %% (op, resp.status, text[:300]))
    return text

def start_upload(job):
    answer = call("StartUpload", '<job>%%s</job><class>urn:org.glite.jp.'
                  'primary:lb</class><name xsi:nil="true"/><commitBefore>'
                  '2038-01-01T00:00:00Z</commitBefore><contentType>text/lb'
                  '</contentType>' %% job)
    return re.search("<destination>([^<]*)</destination>", answer).group(1)

def store(dest):
    global ftp
    host, port, path = re.match("ftp://([^:/]+):(\\d+)(/.*)", dest).groups()
    if ftp is None:
        ftp = FTPS(context=ctx)
        ftp.connect(host, int(port))
        ftp.login()
        ftp.prot_p()
        parts = path.split("/")[1:-2]       # the levels above the job's
        for i in range(len(parts)):
            try:
                ftp.voidcmd("MKD /" + "/".join(parts[:i + 1]))
            except ftplib.error_perm:
                pass
    try:
        ftp.voidcmd("MKD " + path.rsplit("/", 1)[0])
    except ftplib.error_perm:
        pass
    ftp.storbinary("STOR " + path, io.BytesIO(payload))

conn = http.client.HTTPSConnection("localhost", int(jpps_port), context=ctx)
jobs = ["https://lb.example.org:9000/bare%%s%%07d" %% (part, j)
        for j in range(first, first + count)]
for job in jobs:
    call("RegisterJob", "<job>%%s</job><owner>/O=Grid/CN=u</owner>" %% job)
ftp = None
dests = [start_upload(job) for job in jobs] if part == "stores" else None
print("ready", flush=True)
sys.stdin.readline()
started = time.perf_counter()
for n, job in enumerate(jobs):
    dest = dests[n] if dests else start_upload(job)
    if part != "calls":
        store(dest)
    if part != "stores":
        call("CommitUpload", "<destination>%%s</destination>" %% dest)
print(time.perf_counter() - started, flush=True)
"""

class Table:
    """Rows of results, printed at the end and written as JSON."""

    def __init__(self):
        self.rows = []

    def add(self, workload, what, value, unit, baseline=None, ratio=None,
            note=""):
        row = {"workload": workload, "what": what, "value": value,
               "unit": unit, "baseline": baseline, "ratio": ratio,
               "note": note}
        self.rows.append(row)
        print("  %-14s %-46s %12s %-8s %s%s" % (
            workload, what, fmt(value), unit,
            "ratio %.2f" % ratio if ratio is not None else "",
            ("  " + note) if note else ""), flush=True)

    def skip(self, workload, reason):
        self.add(workload, "skipped: " + reason, None, "")


def fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return "%.3g" % value if value < 100 else "%.0f" % value
    return str(value)


def median_of(runs, func):
    """Run func() `runs` times; the median of each key of its dict.

    A ratio is the median of the rounds' own ratios (each a key of
    func's dict), not the ratio of two medians: the noise a round's two
    commands share, such as another machine busy on the disk, cancels.
    """
    results = [func() for _ in range(runs)]
    return dict((k, statistics.median(r[k] for r in results))
                for k in results[0])


# Linux keeps a process's peak RSS across exec, so a command started
# straight from this (large) process would report at least our own peak.
# This small trampoline forks the command instead and reports the
# command's own figures, and the time from fork to exit, on file
# descriptor argv[1].
TRAMPOLINE = """import os, sys, time
report = int(sys.argv[1])
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
os.write(report, b"%d %d %r" % (status, usage.ru_maxrss,
                                time.perf_counter() - started))
"""


def settle(warm=None, commands=(), drop=True):
    """Give the next timed command the same start as the others.

    Writes back what is dirty; then (`drop`), as root, drops the page,
    dentry and inode caches, reads `warm` (the input) back in and runs
    `commands` (each timed command with --version or the like, so that
    none starts from a cold cache, Python with its many modules the
    coldest).  The drop matters on ext4 without a journal (this
    machine's disk): the kernel does not reuse an inode freed in the
    last ~50 minutes while its inode-table block is cached, and scans
    past every such inode for each new file (recently_deleted() in
    fs/ext4/ialloc.c).  Removing one round's hundreds of thousands of
    files then made each file creation of the next command cost 200-500
    us instead of 25, slowing whichever command came first.
    """
    os.sync()
    if not drop:
        return
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return                        # not root: the caches stay
    if warm:
        with open(warm, "rb") as f:
            while f.read(1 << 20):
                pass
    for cmd in commands:
        subprocess.call(cmd, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)


def spread(directory):
    """Have ext4 place each subdirectory of `directory` in a block group
    of its own choosing (chattr +T, the Orlov allocator's top
    directory), away from the groups that earlier workloads and tests
    filled with freshly freed inodes (see settle()): there, on this
    machine, the same exporter run took 3 to 4 s instead of 1.5."""
    subprocess.call(["chattr", "+T", directory], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)


def child_run(cmd, expect=0, **kw):
    """Run cmd, which must exit with `expect`; return (seconds, peak RSS
    in MB of that command alone)."""
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", TRAMPOLINE, str(write_end)] + list(cmd),
            pass_fds=(write_end,), **kw)
        os.close(write_end)
        write_end = None
        with os.fdopen(read_end, "rb") as report:
            read_end = None
            figures = report.read().split()
        proc.wait()
    finally:
        for fd in (read_end, write_end):
            if fd is not None:
                os.close(fd)
    if proc.returncode != 0 or len(figures) != 3:
        raise RuntimeError("%s: the trampoline failed" % (cmd[:3],))
    status, maxrss, elapsed = int(figures[0]), int(figures[1]), \
        float(figures[2])
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
    if code != expect:
        raise RuntimeError("%s exited with %d" % (cmd[:3], code))
    return elapsed, maxrss / 1024.0


# ---------------------------------------------------------------------------
# 1. Registrations
# ---------------------------------------------------------------------------

def bench_registrations(table, quick, runs):
    """jp_importer draining N registrations vs a bare http.client loop,
    both against the JPPS served by gSOAP (test_all.GSoapJPPSPeer): the
    Python fixture, slower than either client, would measure itself."""
    count = 1000 if quick else 20000
    p = test_all.pki()
    import jp_importer
    try:
        test_all.gsoap_jpps_binary()
    except test_all.unittest.SkipTest as exc:
        table.skip("registrations", "gSOAP JPPS: %s" % exc)
        return
    work = tempfile.mkdtemp(prefix="jp-bench-")
    try:
        envelopes = os.path.join(work, "envelopes")
        with open(envelopes, "wb") as f:
            f.write(b"\0".join(
                (jp_importer.ENVELOPE % (
                    "<jpelem:RegisterJob><job>https://lb.example.org:9000/"
                    "bare%06d</job><owner>/O=Grid/CN=u</owner>"
                    "</jpelem:RegisterJob>" % i)).encode()
                for i in range(count)))
        script = os.path.join(work, "bare.py")
        with open(script, "w") as f:
            f.write(BARE_CLIENT)

        def once():
            jpps = test_all.GSoapJPPSPeer(p, log=False)
            try:
                run_dir = tempfile.mkdtemp(dir=work)
                reg = make_maildir(os.path.join(run_dir, "reg"))
                for i in range(count):
                    drop_message(reg, (
                        "https://lb.example.org:9000/job%06d\n/O=Grid/CN=u"
                        % i).encode())
                imp, _ = child_run([
                    sys.executable, JP_IMPORTER, "--once", "-c", p.host_cert,
                    "-k", p.host_key, "-C", p.ca_dir, "-p", jpps.url,
                    "-r", reg, "-d", os.path.join(run_dir, "d"),
                    "-s", os.path.join(run_dir, "s"),
                    "--log", os.path.join(run_dir, "log")])
                # A message leaves the maildir only once the JPPS said so.
                left = sum(len(os.listdir(os.path.join(reg, sub))) for sub
                           in ("new", "work", "post", "undeliverable"))
                if left:
                    raise RuntimeError("%d of %d not registered"
                                       % (left, count))
                out = subprocess.check_output([
                    sys.executable, script, str(jpps.port), str(count),
                    p.host_cert, p.host_key, p.ca_cert, envelopes])
                bare = count / float(out)
                shutil.rmtree(run_dir, ignore_errors=True)
                ratios.append(count / imp / bare)
                return {"importer": count / imp, "bare": bare,
                        "ratio": ratios[-1]}
            finally:
                jpps.stop()

        ratios = []
        m = median_of(runs, once)
        table.add("registrations", "bare keep-alive http.client loop, gSOAP "
                  "JPPS", m["bare"], "jobs/s")
        table.add("registrations", "jp_importer --once, %d messages" % count,
                  m["importer"], "jobs/s", m["bare"], m["ratio"],
                  "%.1f M jobs/day; rounds %.2f-%.2f" % (
                      m["importer"] * 86400 / 1e6, min(ratios), max(ratios)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------
# 2. Dump splitting
# ---------------------------------------------------------------------------

DUMP_TEMPLATE = os.path.join(test_all.TESTDATA, "samples", "job_template")
AWK_SPLIT = r'''
match($0, /DG\.JOBID="[^"]*"/) {
    f = substr($0, RSTART + 10, RLENGTH - 11); gsub(/[^A-Za-z0-9_-]/, "_", f)
    f = dir "/" f
    if (f != last) { if (last != "") close(last); last = f }
    print >> f
}'''

# The floor under any exporter that keeps the maildir contract on this
# machine: lb_dump_exporter's file operations alone, and not even synced.
# The dump is cut into `jobs` equal pieces without reading a line; each
# piece is written to a file of its own and, by batches of 1,000 as the
# exporter does, a message for each is written in tmp/ and linked into
# new/.  No sync: whatever durability costs comes on top.
MAILDIR_FLOOR = r'''
import os, sys
dump, jobs, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
store, tmp, new = (os.path.join(out, d) for d in ("store", "tmp", "new"))
for d in (store, tmp, new):
    os.makedirs(d)
size = os.path.getsize(dump)
piece = size // jobs
source = os.open(dump, os.O_RDONLY)
for first in range(0, jobs, 1000):
    batch = range(first, min(first + 1000, jobs))
    for job in batch:
        data = os.read(source, piece if job < jobs - 1 else
                       size - piece * (jobs - 1))
        fd = os.open("%s/job%07d" % (store, job),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, data)
        os.close(fd)
    for job in batch:
        fd = os.open("%s/%d.localhost" % (tmp, job),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"jobid  https://lb.example.org:9000/bench%07d\n"
                     b"file   %s/job%07d\n" % (job, store.encode(), job))
        os.close(fd)
    for job in batch:
        os.link("%s/%d.localhost" % (tmp, job), "%s/%d.localhost" % (new, job))
'''


def make_dump(path, jobs, interleave=1):
    """A purge dump of `jobs` jobs of about 10 kB each, from job_template.

    interleave > 1 mixes the lines of each `interleave` consecutive jobs
    (as a server dump ordered by arrival would), the input of -x.
    """
    with open(DUMP_TEMPLATE, "rb") as f:
        lines = f.read().splitlines(True)
    lines = lines + lines[1:5]          # 14 + 4 events: about 10 kB a job
    with open(path, "wb", buffering=4 << 20) as out:
        for first in range(0, jobs, interleave):
            block = [[line.replace(b"_CHANGE_ME_JOBID_",
                                   b"https://lb.example.org:9000/bench%07d"
                                   % job) for line in lines]
                     for job in range(first, min(first + interleave, jobs))]
            for i in range(len(lines)):
                out.write(b"".join(job_lines[i] for job_lines in block))
    return os.path.getsize(path)


def bench_dumps(table, quick, runs):
    """lb_dump_exporter against cp + sync and an awk one-liner."""
    if not os.path.exists(LB_DUMP_EXPORTER):
        table.skip("dumps", "lb_dump_exporter.py is not there")
        return
    sizes = [2000] if quick else [10000, 100000]  # 20 MB; 100 MB and 1 GB
    work = tempfile.mkdtemp(prefix="jp-bench-", dir=os.environ.get(
        "JP_BENCH_DIR"))
    spread(work)              # each round's directory: a fresh group
    warm = [[sys.executable, LB_DUMP_EXPORTER, "--version"],
            ["awk", "BEGIN {}"], ["cp", "--version"], ["sync", "--version"]]
    try:
        for jobs in sizes:
            for mode, interleave in (("grouped", 1), ("interleaved -x", 100)):
                dump = os.path.join(work, "dump")
                size = make_dump(dump, jobs, interleave)
                mb = size / 1e6

                def once():
                    out = tempfile.mkdtemp(dir=work)
                    try:
                        cmd = [sys.executable, LB_DUMP_EXPORTER, "-q", "-d",
                               dump, "-s", os.path.join(out, "store"),
                               "-m", os.path.join(out, "md")]
                        if interleave > 1:
                            cmd.append("-x")
                        # Each command starts from the same state: nothing
                        # left to write back, the dump alone in the cache.
                        settle(dump, warm)
                        exporter, rss = child_run(cmd)
                        made = len(os.listdir(os.path.join(out, "md", "new")))
                        if made != jobs:
                            raise RuntimeError("%d messages for %d jobs"
                                               % (made, jobs))
                        settle(dump, warm)
                        started = time.perf_counter()
                        subprocess.check_call(["cp", dump, os.path.join(
                            out, "copy")])
                        subprocess.check_call(["sync"])
                        copy = time.perf_counter() - started
                        os.mkdir(os.path.join(out, "awk"))
                        settle(dump, warm)
                        awk, _ = child_run(["awk", "-v", "dir=" + os.path.join(
                            out, "awk"), AWK_SPLIT, dump])
                        settle(dump, warm)
                        floor, _ = child_run([sys.executable, "-c",
                                              MAILDIR_FLOOR, dump, str(jobs),
                                              os.path.join(out, "floor")])
                        return {"exporter": exporter, "rss": rss,
                                "copy": copy, "awk": awk, "floor": floor,
                                "x copy": copy / exporter,
                                "x awk": awk / exporter,
                                "x floor": floor / exporter,
                                "awk x copy": copy / awk,
                                "floor x copy": copy / floor,
                                "floor x awk": awk / floor}
                    finally:
                        shutil.rmtree(out, ignore_errors=True)

                m = median_of(runs, once)
                what = "%s, %d jobs, %.0f MB" % (mode, jobs, mb)
                table.add("dumps", "cp + sync: " + what, mb / m["copy"],
                          "MB/s")
                table.add("dumps", "awk split: " + what, mb / m["awk"],
                          "MB/s", mb / m["copy"], m["awk x copy"])
                table.add("dumps", "maildir floor: " + what, mb / m["floor"],
                          "MB/s", mb / m["copy"], m["floor x copy"],
                          "%.2f x awk" % m["floor x awk"])
                table.add("dumps", "lb_dump_exporter: " + what,
                          mb / m["exporter"], "MB/s", mb / m["copy"],
                          m["x copy"],
                          "%.0f jobs/s, peak RSS %.1f MB, %.2f x awk, "
                          "%.2f x floor" % (jobs / m["exporter"], m["rss"],
                                            m["x awk"], m["x floor"]))
                os.unlink(dump)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------
# 3. Uploads
# ---------------------------------------------------------------------------

def bench_uploads(table, quick, runs):
    """jp_importer --upload against curl (FTPS) and globus-url-copy."""
    p = test_all.pki()
    size_mb = 16 if quick else 256
    # The payload and the servers' directories are in memory (tmpfs):
    # the clients and the wire are compared, not this shared disk, on
    # which the same code's ratios wandered from 0.64 to 1.59.
    saved = tempfile.tempdir
    if os.access("/dev/shm", os.W_OK):
        tempfile.tempdir = "/dev/shm"
    try:
        upload_peers(table, p, size_mb, runs)
    finally:
        tempfile.tempdir = saved


def start_up(cmd, **kw):
    """Seconds a command takes to start and exit doing nothing (the
    median of 3): what a daemon's worker does not pay for each upload."""
    return statistics.median(child_run(cmd, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, **kw)[0]
                             for _ in range(3))


def upload_peers(table, p, size_mb, runs):
    """Each command is a whole process; the "transport alone" ratio takes
    each side's start-up (start_up()) off its time."""
    work = tempfile.mkdtemp(prefix="jp-bench-")
    try:
        payload = os.path.join(work, "payload")
        with open(payload, "wb") as f:
            for _ in range(size_mb):
                f.write(os.urandom(1 << 20))
        mb = size_mb * 1048576 / 1e6
        ours = [sys.executable, JP_IMPORTER, "-C", p.ca_dir, "--timeout",
                "60", "--upload", payload]
        ours_idle = [sys.executable, JP_IMPORTER, "--version"]
        try:
            vsftpd = test_all.VsftpdPeer(p)
        except test_all.unittest.SkipTest as exc:
            table.skip("uploads", "FTPS: %s" % exc)
        else:
            try:
                n = [0]

                def ftps():
                    n[0] += 1
                    settle(drop=False)
                    mine, _ = child_run(ours + ["-c", p.host_cert, "-k",
                                                p.host_key, vsftpd.url(
                                                    "ours%d" % n[0])],
                                        stdout=subprocess.DEVNULL)
                    os.unlink(vsftpd.local("ours%d" % n[0]))
                    settle(drop=False)
                    curl, _ = child_run([
                        "curl", "-sS", "--ssl-reqd", "--tls-max", "1.2",
                        "--cacert", p.ca_cert, "--cert", p.host_cert,
                        "--key", p.host_key, "-T", payload,
                        vsftpd.url("curl%d" % n[0])])
                    os.unlink(vsftpd.local("curl%d" % n[0]))
                    mine0, curl0 = start_up(ours_idle), start_up(
                        ["curl", "--version"])
                    return {"ours": mb / mine, "curl": mb / curl,
                            "ratio": curl / mine,
                            "transport": (curl - curl0) / (mine - mine0)}
                m = median_of(runs, ftps)
                table.add("uploads", "curl --ssl-reqd -T to vsftpd, %d MiB"
                          % size_mb, m["curl"], "MB/s")
                table.add("uploads", "jp_importer --upload ftp:// (FTPS)",
                          m["ours"], "MB/s", m["curl"], m["ratio"],
                          "transport alone %.2f" % m["transport"])
            finally:
                vsftpd.stop()
        for name, extra, client_flag, dcau in (
                ("gsiftp DCAU N", [], "-nodcau", "N"),
                ("gsiftp -encrypt-data, DCAU A + PROT P", ["-encrypt-data"],
                 "-dcpriv", "A")):
            try:
                peer = test_all.GridFTPPeer(p, extra=extra)
            except test_all.unittest.SkipTest as exc:
                table.skip("uploads", "%s: %s" % (name, exc))
                continue
            try:
                env = dict(os.environ, X509_USER_PROXY=p.proxy,
                           X509_CERT_DIR=p.ca_dir)
                n = [0]

                def gsiftp():
                    n[0] += 1
                    settle(drop=False)
                    mine, _ = child_run(ours + ["-c", p.proxy, "--dcau", dcau,
                                                peer.url("ours%d" % n[0])],
                                        stdout=subprocess.DEVNULL)
                    os.unlink(os.path.join(peer.root, "ours%d" % n[0]))
                    settle(drop=False)
                    guc, _ = child_run(["globus-url-copy", client_flag,
                                        "file://" + payload,
                                        peer.url("guc%d" % n[0])], env=env)
                    os.unlink(os.path.join(peer.root, "guc%d" % n[0]))
                    mine0, guc0 = start_up(ours_idle), start_up(
                        ["globus-url-copy", "-version"], expect=1, env=env)
                    return {"ours": mb / mine, "guc": mb / guc,
                            "ratio": guc / mine,
                            "transport": (guc - guc0) / (mine - mine0)}
                m = median_of(runs, gsiftp)
                table.add("uploads", "globus-url-copy %s, %d MiB"
                          % (client_flag, size_mb), m["guc"], "MB/s")
                table.add("uploads", "jp_importer --upload " + name,
                          m["ours"], "MB/s", m["guc"], m["ratio"],
                          "transport alone %.2f" % m["transport"])
            finally:
                peer.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------
# 4. End-to-end
# ---------------------------------------------------------------------------

def drained(maildir):
    """True when every message has left `maildir` (tmp/ keeps the
    master copy of each until it is delivered)."""
    return not any(os.listdir(os.path.join(maildir, sub))
                   for sub in ("tmp", "new", "work", "post"))


def registrations_through(md, run_dir, count):
    """Registrations/s of a running importer: `count` messages for the
    jobs bench%07d, written beforehand, moved into its reg/new/ at once;
    the time from the move until the maildir is empty."""
    stage = make_maildir(os.path.join(run_dir, "stage"))
    for i in range(count):
        drop_message(stage, ("https://lb.example.org:9000/bench%07d\n"
                             "/O=CESNET/CN=u" % i).encode())
    names = os.listdir(os.path.join(stage, "new"))
    started = time.time()
    for name in names:
        os.rename(os.path.join(stage, "tmp", name),
                  os.path.join(md["reg"], "tmp", name))
        os.rename(os.path.join(stage, "new", name),
                  os.path.join(md["reg"], "new", name))
    test_all.wait_for(lambda: drained(md["reg"]), timeout=600, interval=0.01,
                      what="%d registrations" % count)
    return count / (time.time() - started)


def bare_pipeline(p, jpps, payload, jobs, work, part="dump", workers=4):
    """Jobs/s of `workers` BARE_PIPELINE processes, `jobs` in all, doing
    `part` of a dump's work: "dump" (all), "calls" or "stores"."""
    script = os.path.join(work, "bare_pipeline.py")
    import jp_importer
    with open(script, "w") as f:
        f.write(BARE_PIPELINE % (jp_importer.ENVELOPE,))
    share = jobs // workers
    procs = [subprocess.Popen(
        [sys.executable, script, str(jpps.port), str(i * share), str(share),
         p.host_cert, p.host_key, p.ca_cert, payload, part],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for i in range(workers)]
    try:
        for proc in procs:
            if proc.stdout.readline().strip() != b"ready":
                raise RuntimeError("the bare pipeline did not start")
        started = time.perf_counter()
        for proc in procs:
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        for proc in procs:
            proc.stdout.read()
            if proc.wait(600):
                raise RuntimeError("the bare pipeline failed")
        return share * workers / (time.perf_counter() - started)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def bench_end_to_end(table, quick, runs):
    """Dumps of 10 kB from lb_dump_exporter through jp_importer -D 4 to
    the gSOAP JPPS and vsftpd (FTPS), from the exporter's start until the
    dump maildir is empty, against two ceilings from the same run: the
    same importer's registrations/s (a dump takes two JPPS calls and an
    upload where a registration takes one call), and a bare pipeline of
    as many processes doing only what a dump costs the peers (StartUpload,
    MKD, STOR over a resumed TLS data connection, CommitUpload) on kept
    connections, with no maildir, file or check of ours; and that
    pipeline's two halves alone (the JPPS calls, the FTPS stores), to
    show which of the peers bounds it."""
    p = test_all.pki()
    jobs = 100 if quick else 1000
    ceiling_jobs = 1000 if quick else 3000
    try:
        test_all.gsoap_jpps_binary()
        vsftpd = test_all.VsftpdPeer(p)
    except test_all.unittest.SkipTest as exc:
        table.skip("end-to-end", str(exc))
        return
    work = tempfile.mkdtemp(prefix="jp-bench-")
    spread(work)
    try:
        dump = os.path.join(work, "dump")
        size = make_dump(dump, jobs)
        payload = os.path.join(work, "payload")
        with open(dump, "rb") as src, open(payload, "wb") as dst:
            dst.write(src.read(size // jobs))

        def once():
            run_dir = tempfile.mkdtemp(dir=work)
            jpps = test_all.GSoapJPPSPeer(p, dest_base=vsftpd.url(
                os.path.basename(run_dir)), log=False)
            try:
                bare = bare_pipeline(p, jpps, payload, jobs, run_dir)
                calls = bare_pipeline(p, jpps, payload, jobs, run_dir, "calls")
                stores = bare_pipeline(p, jpps, payload, jobs, run_dir,
                                       "stores")
                md = {k: make_maildir(os.path.join(run_dir, k))
                      for k in ("reg", "dump", "sandbox")}
                log = open(os.path.join(run_dir, "log"), "wb")
                importer = subprocess.Popen([
                    sys.executable, JP_IMPORTER, "-g", "-c", p.host_cert,
                    "-k", p.host_key, "-C", p.ca_dir, "-p", jpps.url,
                    "-r", md["reg"], "-d", md["dump"], "-s", md["sandbox"],
                    "-D", "4", "-t", "0.05", "-i",
                    os.path.join(run_dir, "pid"), "--files-in",
                    os.path.join(run_dir, "store")], stdout=log, stderr=log)
                try:
                    # Registers the dumps' jobs too: StartUpload finds them.
                    ceiling = registrations_through(md, run_dir,
                                                    max(ceiling_jobs, jobs))
                    started = time.time()
                    subprocess.check_call([
                        sys.executable, LB_DUMP_EXPORTER, "-q", "-d", dump,
                        "-s", os.path.join(run_dir, "store"), "-m",
                        md["dump"]])
                    test_all.wait_for(lambda: drained(md["dump"]),
                                      timeout=600, interval=0.01,
                                      what="%d dumps delivered" % jobs)
                    elapsed = time.time() - started
                finally:
                    importer.terminate()
                    importer.wait(60)
                    log.close()
                if os.listdir(os.path.join(md["dump"], "undeliverable")):
                    raise RuntimeError("dumps given up: see %s" % run_dir)
                return {"rate": jobs / elapsed, "ceiling": ceiling,
                        "ratio": jobs / elapsed / ceiling, "bare": bare,
                        "x bare": jobs / elapsed / bare, "calls": calls,
                        "stores": stores, "bare ratio": bare / ceiling,
                        "calls ratio": calls / ceiling,
                        "stores ratio": stores / ceiling}
            finally:
                jpps.stop()
                shutil.rmtree(run_dir, ignore_errors=True)

        m = median_of(runs, once)
        table.add("end-to-end", "ceiling: %d registrations, same importer"
                  % max(ceiling_jobs, jobs), m["ceiling"], "jobs/s")
        table.add("end-to-end", "bare pipeline: 4 kept-connection clients",
                  m["bare"], "jobs/s", m["ceiling"], m["bare ratio"])
        table.add("end-to-end", "  its StartUpload + CommitUpload alone",
                  m["calls"], "jobs/s", m["ceiling"], m["calls ratio"])
        table.add("end-to-end", "  its MKD + STOR (FTPS) alone",
                  m["stores"], "jobs/s", m["ceiling"], m["stores ratio"])
        table.add("end-to-end", "%d dumps of 10 kB: exporter, importer -D 4"
                  % jobs, m["rate"], "jobs/s", m["ceiling"], m["ratio"],
                  "%.2f x bare pipeline" % m["x bare"])
    finally:
        vsftpd.stop()
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------
# 5. Start-up
# ---------------------------------------------------------------------------

def bench_startup(table, quick, runs):
    """Wall time of the short-lived commands against `python3 -c pass`."""
    work = tempfile.mkdtemp(prefix="jp-bench-")
    try:
        p = test_all.pki()
        sandbox = os.path.join(work, "sandbox")
        reg = make_maildir(os.path.join(work, "reg"))
        payload = os.path.join(work, "stdout.txt")
        with open(payload, "w") as f:
            f.write("hello\n")
        repeat = 3 if quick else 20
        commands = [("python3 -c pass", [sys.executable, "-c", "pass"])]
        if os.path.exists(JP_UPLOAD_FILES):
            commands.append(("jp_upload_files.py, one request", [
                sys.executable, JP_UPLOAD_FILES, "-j",
                "https://lb.example.org:9000/bench", "-m", sandbox,
                "-p", p.proxy, payload]))
        commands.append(("jp_importer.py --status", [
            sys.executable, JP_IMPORTER, "--status", "-r", reg, "-d", reg,
            "-s", reg]))
        times = {}
        for _ in range(runs):
            for name, cmd in commands:
                samples = []
                for _ in range(repeat):
                    samples.append(child_run(cmd, stdout=subprocess.DEVNULL)
                                   [0])
                times.setdefault(name, []).append(statistics.median(samples))
        base = statistics.median(times["python3 -c pass"]) * 1000
        table.add("startup", "python3 -c pass", base, "ms")
        for name, _ in commands[1:]:
            value = statistics.median(times[name]) * 1000
            table.add("startup", name, value, "ms", base, value / base)
        if not os.path.exists(JP_UPLOAD_FILES):
            table.skip("startup", "jp_upload_files.py is not there")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

BENCHES = {"registrations": bench_registrations, "dumps": bench_dumps,
           "uploads": bench_uploads, "end-to-end": bench_end_to_end,
           "startup": bench_startup}


def machine():
    return {"host": platform.node(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "system": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, args = getopt.gnu_getopt(argv, "h", ["quick", "runs=",
                                                   "json=", "help"])
    except getopt.GetoptError as exc:
        sys.stderr.write("bench.py: %s\n" % exc)
        return 2
    opts = dict(opts)
    if "-h" in opts or "--help" in opts:
        sys.stdout.write(__doc__)
        return 0
    quick = "--quick" in opts
    runs = int(opts.get("--runs", 1 if quick else 3))
    chosen = args or WORKLOADS
    unknown = [w for w in chosen if w not in WORKLOADS]
    if unknown:
        sys.stderr.write("bench.py: unknown workload %s\n" % unknown[0])
        return 2
    table = Table()
    info = machine()
    print("bench.py %s: %d run(s) each, median; %s, Python %s, %d CPUs"
          % ("--quick" if quick else "full", runs, info["system"],
             info["python"], info["cpus"]))
    for name in chosen:
        if name not in BENCHES:
            table.skip(name, "not written yet")
            continue
        try:
            BENCHES[name](table, quick, runs)
        except test_all.unittest.SkipTest as exc:
            table.skip(name, str(exc))
    if "--json" in opts:
        with open(opts["--json"], "w") as f:
            json.dump({"machine": info, "quick": quick, "runs": runs,
                       "rows": table.rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
