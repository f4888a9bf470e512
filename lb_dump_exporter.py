#!/usr/bin/env python3
"""lb_dump_exporter -- split an LB purge dump into one upload per job.

Usage: %(prog)s [-h] [-d FILE] [-s DIR] [-j HOST:PORT] [-m DIR] [-x] [-q]

Reads an LB purge dump (lines "DG.ARRIVED=<date> <ULM event>"), writes
each job's lines into one file under the store directory and, for each
job, an upload message into the dump maildir, which jp_importer delivers
to the JP primary storage.  A drop-in replacement for
glite-lb-dump_exporter.

Options (as the original; the long ones now take their argument):
  -h, --help              show this help and exit
  -d, --dump FILE         the dump to read; '-' or absent: standard input;
                          gzip-compressed input is read transparently
  -s, --store DIR         directory for the per-job files (default: %(store)s;
                          created 0750 if missing)
  -j, --jpps HOST:PORT    JP primary storage written into every message
  -m, --lbmaildir DIR     dump maildir (default: %(maildir)s; its
                          subdirectories are created if missing)
  -x, --mixed             the dump is not grouped by job (a server dump):
                          every job stays open until the end

New options:
  -q, --quiet             no progress line and no summary
  --allow-shared-dirs     accept a store or maildir owned by another user or
                          writable by group or others
  --version               print the version and exit

Bad lines (no DG.JOBID, unbalanced quotes, an invalid jobid, NUL bytes,
longer than %(maxline)d bytes) do not stop the run: each is written with
its line number and reason to STORE/lb_dump_exporter.<dump id>.rejects
and reported on stderr (the first %(shown)d).  A run cut short (crash, kill,
full disk) is completed by running the same command again: jobs already
announced are not announced twice (the journal
STORE/.lb_dump_exporter.<dump id>.journal; %(keep)d days after a dump
finished, it shrinks to its last line).

Exit status: 0 every line exported, 3 done but some lines rejected (they
are in the rejects file), 1 runtime error (run again), 2 usage error.
Requires only the Python 3.6+ standard library.
"""

__version__ = "1.0.0"

import errno
import getopt
import gzip
import hashlib
import io
import itertools
import marshal
import mmap
import os
import re
import select
import signal
import stat
import sys
import threading
import time
import urllib.parse
import zlib

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

PROG = "lb_dump_exporter"
DEFAULT_STORE = "/tmp"                   # DUMP_FILE_STORE_PREFIX
DEFAULT_MAILDIR = "/tmp/dumpinfo_lbmd"   # LB_MAILDIR_PATH
SUBDIRS = ("tmp", "new", "work", "post", "undeliverable")

CHUNK = 1024 * 1024              # read size: the loop works on big blocks
MAX_LINE = 4 * 1024 * 1024       # a longer "line" is not an LB event
FINGERPRINT_BYTES = 1024 * 1024  # the dump id hashes this much of the input
# Finished jobs are made durable and published by batches (see
# Exporter.publish); these bound a batch.
BATCH_JOBS = 1000
BATCH_BYTES = 64 * 1024 * 1024
BATCH_SECONDS = 2.0
SYNC_EACH_BELOW = 16             # fewer files than this: fsync each one
MAX_OPEN_FILES = 200             # -x: per-job descriptors kept open
JOB_BUFFER = 256 * 1024          # lines of a job written in one go
MIXED_BUFFER = 16 * 1024 * 1024  # -x: at most this much buffered in all
KNOWN_JOBIDS = 10000             # parsed jobids remembered (-x mostly)
MAX_SAFE_NAME = 120
CHECKER_WAIT = 60.0             # a checker silent this long is given up
REJECTS_SHOWN = 20               # rejected lines reported on stderr, at most
JOURNAL_KEEP = 30 * 86400        # a finished dump's journal entries, kept
COMPLETE = b"complete\n"         # a journal's last line, once finished
EXIT_REJECTED = 3                # done, but some lines went to the rejects
SYNCFS = None                    # sync_filesystems(): looked up when needed

JOBID_FIELD = b'DG.JOBID="'
JOBID_RE = re.compile(r"^https://(\[[^\]\s/]+\]|[^\s/:?\[\]]+)(?::(\d+))?"
                      r"/([^\s?]+)(\?\S*)?$")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# Balanced quotes: a quoted value ends at the first '"' not escaped by a
# backslash; outside one a backslash is just a byte (so, without
# backslashes, an even number of quotes: the fast check).  Each byte can
# match one way only, so a failing match backtracks in linear time (a
# pattern for whole KEY=VALUE fields, where a bare value could swallow
# the next field, took exponential time on a line like a=a=a=...b\").
BALANCED_RE = re.compile(rb'[^"]*(?:"[^"\\]*(?:\\.[^"\\]*)*"[^"]*)*')
if sys.version_info >= (3, 11):
    # The same, possessive (3.11 has them): no backtracking state kept,
    # about a tenth faster.  The same lines match: a byte matches one way.
    BALANCED_RE = re.compile(
        rb'[^"]*+(?:"[^"\\]*+(?:\\.[^"\\]*+)*+"[^"]*+)*+')
# A whole block of lines is checked at once (Exporter.block): the jobid
# field of each line, found after a space, and the rest of that line
# skipped (a second field in it shows in the count of JOBID_FIELD).
BLOCK_JOBID_RE = re.compile(rb' DG\.JOBID="([^"\n]*)"[^\n]*\n')
# translate() deletes these: what is left of a block is its quotes,
# backslashes and line ends.
NOT_QUOTING = bytes(range(256)).translate(None, b'"\\\n')
UNSAFE_NAME_RE = re.compile(r"[^A-Za-z0-9_.-]|^\.")

# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class Error(Exception):
    """A runtime error that ends the run; str() is the one-line reason."""


class BadLineError(Exception):
    """A dump line that cannot be exported; str() is the reason."""


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def parse_jobid(text):
    """(normal form, unique) of an LB jobid, parsed as the original.

    https://host[:port]/unique[?info], port 9000 when absent; whitespace
    or control characters anywhere make it invalid.
    """
    match = JOBID_RE.match(text)
    if not match or CONTROL_RE.search(text):
        raise BadLineError("invalid jobid %r" % text[:200])
    host, port, unique, info = match.groups()
    port = int(port) if port else 9000
    if not 0 < port < 65536:
        raise BadLineError("invalid jobid %r: port out of range" % text[:200])
    return "https://%s:%d/%s%s" % (host, port, unique, info or ""), unique


def safe_name(unique):
    """A file name for a jobid's unique part that stays in its directory.

    '/' and anything outside [A-Za-z0-9_.-] (and a leading '.') become
    %XX escapes, so the name is one path component (the original's
    path went into a subdirectory, and the export failed); an
    overlong one is cut and made unique again with a hash.
    """
    name = UNSAFE_NAME_RE.sub(
        lambda m: "".join("%%%02X" % b for b in m.group().encode()), unique)
    if len(name) > MAX_SAFE_NAME:
        name = "%s~%s" % (name[:MAX_SAFE_NAME - 17], hashlib.sha256(
            unique.encode()).hexdigest()[:16])
    return name


def check_jpps(text):
    """A JPPS address as jp_importer reads it (host:port or a URL)."""
    url = text if "://" in text else "https://" + text
    try:
        parts = urllib.parse.urlsplit(url)
        ok = parts.scheme in ("http", "https", "httpg") and parts.hostname \
            and not any(c.isspace() or c < " " for c in text)
        parts.port                              # raises on a bad port
    except ValueError:
        ok = False
    if not ok:
        raise getopt.GetoptError("invalid JPPS address %r (want host:port)"
                                 % text)
    return text


def prepare_directory(path, mode, allow_shared, what):
    """Create `path` with `mode` when missing; refuse it if unsafe.

    Unsafe: a symbolic link, not a directory, owned by another user, or
    writable by group or others (another user could swap our files).
    """
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    except OSError as exc:
        raise Error("cannot create %s %s: %s" % (what, path, exc.strerror))
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise Error("%s %s is not a directory (or is a symbolic link)"
                    % (what, path))
    if allow_shared:
        return
    if st.st_uid != os.geteuid():
        raise Error("%s %s is owned by uid %d, not by us; use "
                    "--allow-shared-dirs to accept it"
                    % (what, path, st.st_uid))
    if st.st_mode & 0o022:
        raise Error("%s %s is writable by group or others (mode %04o); use "
                    "--allow-shared-dirs to accept it"
                    % (what, path, stat.S_IMODE(st.st_mode)))


def private_store(store, allow_shared):
    """The directory the per-job files really go to.

    The original default, /tmp, is world-writable: there, anybody could
    plant a file under a job's name.  In such a directory (sticky,
    writable by others) we use our own subdirectory instead.
    """
    try:
        st = os.stat(store)
    except FileNotFoundError:
        return store
    except OSError as exc:
        raise Error("store %s: %s" % (store, exc.strerror))
    if not allow_shared and st.st_mode & stat.S_ISVTX and \
            st.st_mode & 0o002:
        return os.path.join(store, "%s.%d" % (PROG, os.geteuid()))
    return store


def sync_filesystems(paths):
    """Write back everything of the filesystems that hold `paths`.

    syncfs(2) on each, through ctypes (os has no syncfs): sync(2) would
    also write back every other filesystem of the machine, and hang on
    an unreachable NFS server.  Where libc or the kernel lacks syncfs
    (glibc before 2.14, Linux before 2.6.39), sync(2) it is.
    """
    global SYNCFS
    if SYNCFS is None:
        SYNCFS = find_syncfs()
    filesystems, directories = {}, set()
    for path in paths:
        # The files of one directory are on its filesystem: one stat.
        directory = os.path.dirname(path.rstrip(os.sep))
        if directory not in directories:
            directories.add(directory)
            filesystems.setdefault(os.stat(path).st_dev, path)
    for path in filesystems.values():
        if not SYNCFS:
            os.sync()
            return
        call, get_errno = SYNCFS
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            if call(fd) != 0:
                err = get_errno()
                if err != errno.ENOSYS:
                    raise OSError(err, os.strerror(err))
                SYNCFS = False
                os.sync()
                return
        finally:
            os.close(fd)


def sync_paths(paths):
    """Make `paths` (files and directories) durable.

    A few are fsynced one by one; for many, one syncfs(2) per filesystem
    they are on is much cheaper than thousands of fsyncs.
    """
    if len(paths) >= SYNC_EACH_BELOW:
        sync_filesystems(paths)
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class SyncThread(threading.Thread):
    """sync_paths(paths) while the main thread goes on splitting; the
    waits of a sync (the disk's) then cost no time.  Daemonic: a run cut
    short does not wait for it."""

    def __init__(self, paths):
        """Start syncing `paths` (a list of files and directories) at once.

        The outcome is in `error` (the OSError, or None) once join()
        returns.
        """
        threading.Thread.__init__(self, name="sync", daemon=True)
        self.paths, self.error = paths, None
        self.start()

    def run(self):
        """The thread: sync_paths(paths), keeping an OSError in `error`."""
        try:
            sync_paths(self.paths)
        except OSError as exc:
            self.error = exc


def find_syncfs():
    """(libc's syncfs, ctypes.get_errno), or False where there is none."""
    try:
        import ctypes           # here: only big batches need it
        call = ctypes.CDLL(None, use_errno=True).syncfs
    except (ImportError, OSError, AttributeError):
        return False
    call.argtypes = [ctypes.c_int]
    call.restype = ctypes.c_int
    return call, ctypes.get_errno


def made_here(st):
    """Could the lstat() `st` be of a file the exporter made?  A regular
    file of ours with one link: not a symbolic link or a hard link to
    elsewhere, nor another user's file, planted in a shared store to have
    us write through it or publish it."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and \
        st.st_nlink == 1


def unlink_quietly(path):
    """Remove the file `path`; an error (it is gone already) is ignored."""
    try:
        os.unlink(path)
    except OSError:
        pass


def write_all(fd, data):
    """Write all of `data` (bytes-like) to the descriptor `fd`.

    os.write() may write less than asked; this goes on until all is
    written.  Raises OSError as os.write() does.
    """
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def clock():
    """Now as (seconds, microseconds): the time of a message name."""
    now = time.time()
    return int(now), int(now % 1 * 1e6)


def message_time(text):
    """(seconds, microseconds) of a "<sec>_<usec>" message name, or None."""
    sec, _, usec = text.partition("_")
    if not (sec.isdigit() and usec.isdigit()):
        return None
    return int(sec), int(usec)


def open_input(path):
    """(binary stream, total size or None, the stream of the file as
    stored, its descriptor when it is a pipe or the like, else None) of
    the dump; gzip unwrapped."""
    if path in (None, "-"):
        raw = sys.stdin.buffer
        total = None
    else:
        try:
            raw = open(path, "rb")
        except OSError as exc:
            raise Error("cannot open dump %s: %s" % (path, exc.strerror))
        total = os.fstat(raw.fileno()).st_size
    if not hasattr(raw, "peek"):
        raw = io.BufferedReader(raw)
    if raw.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb"), total, raw, None
    try:
        fd = raw.fileno()
        waits = not stat.S_ISREG(os.fstat(fd).st_mode)
    except (OSError, ValueError, io.UnsupportedOperation):
        waits = False
    return raw, total, raw, fd if waits else None


# ---------------------------------------------------------------------------
# Core: jobs, batches, the journal
# ---------------------------------------------------------------------------

class Job:
    """One job of the dump: its file, its message, where it stands."""

    __slots__ = ("jobid", "name", "path", "fd", "buf", "buffered", "size",
                 "message", "retracted", "published", "finished",
                 "fields", "joined")

    def __init__(self, jobid, name, path):
        """A job not yet started: `jobid` in normal form, `name` its
        safe_name(), `path` its file in the store.
        """
        self.jobid, self.name, self.path = jobid, name, path
        self.fd = None
        self.buf = []             # lines not yet written
        self.buffered = 0
        self.joined = 0           # lines in buf beyond one per item
        self.size = 0
        self.message = None       # its maildir name, once written
        self.retracted = None     # private path of a message taken back
        self.published = False    # linked into new/ by this run
        self.finished = None      # time.monotonic() when it was complete
        self.fields = []          # -x: its DG.JOBID fields in by_field


class Exporter:
    """Split one dump into per-job files and publish one message each.

    Order that makes a crash at any point harmless: a job's file is
    complete and synced before its message exists in tmp/; the message
    is in the journal, synced, before it is linked into new/.  A rerun
    of the same dump (same dump id) skips the jobs whose message was
    linked, and removes and redoes everything else.
    """

    def __init__(self, store, maildir, jpps=None, mixed=False,
                 allow_shared=False, reject=None):
        """An exporter writing into `store` and `maildir` (both absolute).

        jpps: the JPPS written into every message, or None; mixed: the
        dump is not grouped by job (-x); allow_shared: accept directories
        of other users (--allow-shared-dirs); reject: called as
        reject(line number, reason) for each rejected line, or None.
        Nothing is touched before prepare() and begin().
        """
        self.store, self.maildir, self.jpps = store, maildir, jpps
        # Paths in them by concatenation: os.path.join, six times a job,
        # was the most called function of a run.
        self.in_store = os.path.join(store, "")
        self.in_tmp = os.path.join(maildir, "tmp", "")
        self.in_new = os.path.join(maildir, "new", "")
        self.mixed = mixed
        self.allow_shared = allow_shared
        self.report_reject = reject
        self.open = {}            # key -> Job still being written
        self.lru = []             # -x: jobs holding a descriptor
        self.by_field = {}        # -x: DG.JOBID field -> open Job
        # Finished jobs on their way to new/ (see publish()):
        self.pending = []         # their files written
        self.pending_bytes = 0
        self.syncing = []         # their files being synced
        self.written = []         # their messages journaled, being synced
        self.sync_thread = None
        self.handed_over = set()      # reappeared, but the importer has it
        self.announced = set()    # names announced by an earlier run
        self.journal_fd = None
        self.rejects_fd = None
        self.unflushed = 0        # -x: bytes read since the last flush
        self.known = {}           # DG.JOBID field -> (jobid, file name)
        # -x: a job whose descriptor was closed is "parked": only its file
        # stands for it (the end of the input finds it in the store), so
        # memory does not grow with the number of jobs.  Its jobid is
        # kept only when it is not `jobid_prefix` + its file name.
        self.jobid_prefix = None
        self.parked_jobids = {}
        self.current = None       # grouped mode: the job being written
        self.current_field = None
        self.counts = {"jobs": 0, "lines": 0, "exported": 0, "rejected": 0,
                       "blank": 0, "earlier": 0, "bytes": 0}
        self.dump_id = None
        self.started = clock()

    # -- set-up -----------------------------------------------------------

    def prepare(self):
        """Create the store and the maildir with its subdirectories.

        Raises Error when one cannot be made or is not safe to use (see
        prepare_directory()).
        """
        prepare_directory(self.store, 0o750, self.allow_shared, "store")
        prepare_directory(self.maildir, 0o700, self.allow_shared, "maildir")
        for sub in SUBDIRS:
            prepare_directory(os.path.join(self.maildir, sub), 0o700,
                              self.allow_shared, "maildir directory")

    def begin(self, head):
        """Name the run after the dump and recover an earlier cut run."""
        self.dump_id = hashlib.sha256(
            head[:FINGERPRINT_BYTES]).hexdigest()[:12]
        self.suffix = "." + self.dump_id
        journal = self.journal_path()
        if os.path.exists(journal):
            try:
                if self._recover():
                    return False
            except OSError as exc:
                raise Error("cannot recover the cut run of %s: %s"
                            % (journal, exc.strerror))
        # Never through a symbolic link: in the store, files are ours.
        try:
            self.journal_fd = os.open(journal, os.O_WRONLY | os.O_APPEND |
                                      os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise Error("cannot open the journal %s: %s"
                        % (journal, exc.strerror))
        self.rejects_path = os.path.join(
            self.store, "%s.%s.rejects" % (PROG, self.dump_id))
        unlink_quietly(self.rejects_path)
        return True

    def prune_journals(self, now=None):
        """Shrink to their last line, "complete", the journals of dumps
        finished more than JOURNAL_KEEP ago (about 100 bytes a job).

        A rerun of a finished dump reads nothing but that line, so the
        rerun protection stays; an unfinished journal is the rerun's
        to recover and is kept whole.
        """
        now = time.time() if now is None else now
        prefix = ".%s." % PROG
        for name in os.listdir(self.store):
            if not (name.startswith(prefix) and name.endswith(".journal")):
                continue
            path = self.in_store + name
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode) or \
                        st.st_size <= len(COMPLETE) or \
                        now - st.st_mtime < JOURNAL_KEEP:
                    continue
                with open(path, "rb") as f:
                    f.seek(-len(COMPLETE), os.SEEK_END)
                    if f.read() != COMPLETE:
                        continue
                fd = os.open(path + ".new", os.O_WRONLY | os.O_CREAT |
                             os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                try:
                    write_all(fd, COMPLETE)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(path + ".new", path)
            except OSError:
                pass                # the whole journal stays: tried again
                                    # at the next run

    def journal_path(self):
        """The path of this dump's journal in the store (after begin())."""
        return os.path.join(self.store, ".%s.%s.journal"
                            % (PROG, self.dump_id))

    def _read_journal(self):
        """([message, jobid, file name] of every whole entry not voided
        since, True when the run that wrote it had finished, the time
        (seconds, microseconds) of the last batch begun or None, the set
        of voided messages)."""
        entries, complete, batch, voided = {}, False, None, set()
        fd = os.open(self.journal_path(), os.O_RDONLY | os.O_NOFOLLOW)
        with open(fd, "r", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.endswith("\n"):
                    continue                  # cut in the middle
                if line == "complete\n":
                    complete = True
                elif line.startswith("batch "):
                    batch = message_time(line[6:-1])
                elif line.startswith("void "):
                    entries.pop(line[5:-1], None)
                    voided.add(line[5:-1])
                else:
                    fields = line[:-1].split("\t")
                    if len(fields) == 3:
                        entries[fields[0]] = fields
        return list(entries.values()), complete, batch, voided

    def _recover(self):
        """Read an earlier run's journal; True when it had finished."""
        entries, complete, batch, voided = self._read_journal()
        if complete:
            return True
        journaled = set(entry[0] for entry in entries)
        retracted, remove = [], voided - journaled
        for name in os.listdir(self.in_tmp):
            if name.endswith(".retracted"):
                # A message taken back to append to when the run was
                # cut: its job is redone, like one never published.
                retracted.append(name)
            elif name not in journaled and self._cut_before_journal(
                    self.in_tmp + name, name, batch):
                remove.add(name)
        taken_back = set(name[:-len(".retracted")] for name in retracted)
        unpublished = []
        for message, jobid, filename in entries:
            name = filename[:-len(self.suffix)]
            try:
                linked = os.stat(self.in_tmp + message).st_nlink > 1
            except FileNotFoundError:
                linked = True             # delivered and removed already
            if linked and message not in taken_back:
                self.announced.add(name)
            else:
                unpublished.append(message)
                self.announced.discard(name)
        # A missing master means "delivered" to the next rerun: before
        # the masters of these go, the journal says, durably, that they
        # never were (a rerun killed here must not lose their jobs).
        self._void(unpublished)
        for name in retracted:
            unlink_quietly(self.in_tmp + name)
        for message in remove.union(unpublished):
            unlink_quietly(self.in_tmp + message)
        for filename in os.listdir(self.store):
            if filename.endswith(self.suffix) and \
                    filename[:-len(self.suffix)] not in self.announced:
                unlink_quietly(self.in_store + filename)
        return False

    def _void(self, messages):
        """Journal `messages` as never published, and sync that."""
        if not messages:
            return
        fd = os.open(self.journal_path(), os.O_WRONLY | os.O_APPEND |
                     os.O_NOFOLLOW)
        try:
            write_all(fd, "".join("void %s\n" % message
                                  for message in messages).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _cut_before_journal(self, path, message, batch):
        """Is `path` in tmp/ a message of this dump that the cut run wrote
        but did not journal (so never published)?  Left there, the
        importer would queue it after a day: a second upload of its job.

        Killed between creating a message and writing it, the run left
        it empty: an empty one is taken for ours when it is named after
        the last batch began (`batch`) and before this run started
        (another writer still between creating and writing its message
        since then would be very slow; it would see its link fail).
        """
        try:
            st = os.lstat(path)
            if st.st_nlink != 1 or not stat.S_ISREG(st.st_mode):
                return False
            if st.st_size == 0:
                named = message_time(message.split(".", 1)[0])
                return batch is not None and named is not None and \
                    batch <= named < self.started
            with open(path, "rb") as f:
                head = f.read(8192)
        except OSError:
            return False
        for line in head.split(b"\n"):
            key, _, value = line.partition(b" ")
            if key == b"file":
                value = os.fsdecode(value.strip())
                return os.path.dirname(value) == self.store and \
                    value.endswith(self.suffix)
        return False

    # -- lines ------------------------------------------------------------

    def block(self, number, data, ids=False):
        """Route a block of whole lines, each ending with LF.

        `number`: the number of the line before the block; `ids`: what
        _block_ids(data) returns, when already known (a Checker's
        answer).  Returns the number of the block's last line.

        When every line of the block passes the checks (_block_ids(),
        a few passes over the whole block), a grouped dump's lines reach
        their job a run at a time, and only the first line of each job
        goes through lines().  With -x, or when a line fails, every line
        of the block goes through lines(), which says what is wrong with
        which line.
        """
        if ids is False:
            # -x: lines of one job seldom follow each other; lines()
            # routes and checks each (cheaper than checking the block
            # first, unless a checker did that on another core).
            ids = None if self.mixed else self._block_ids(data)
        if ids is None or self.mixed:
            lines = data.split(b"\n")
            lines.pop()
            clean = ids is None and b"\0" not in data and b"\\" not in data
            return self.lines(number, lines, len(data), clean,
                              checked=ids is not None)
        runs = [(ident, len(list(group)))
                for ident, group in itertools.groupby(ids)]
        pos = 0
        for i, (ident, count) in enumerate(runs):
            if i + 1 < len(runs):
                # The next run begins at the first line naming its job.
                stop = data.rfind(b"\n", pos, data.find(
                    JOBID_FIELD + runs[i + 1][0] + b'"', pos)) + 1
            else:
                stop = len(data)
            field = JOBID_FIELD + ident + b'"'
            if field != self.current_field:
                # A new job: its first line the long way (it may be
                # rejected, or of a job announced by an earlier run).
                first = data.index(b"\n", pos)
                number = self.lines(number, [data[pos:first]], checked=True)
                pos, count = first + 1, count - 1
                if field != self.current_field:
                    lines = data[pos:stop].split(b"\n")
                    lines.pop()
                    number = self.lines(number, lines, checked=True)
                    pos = stop
                    continue
            if count:
                job = self.current
                job.buf.append(data[pos:stop - 1])
                job.joined += count - 1
                job.buffered += stop - pos
                number += count
                if job.buffered > JOB_BUFFER:
                    self._flush(job)
            pos = stop
        return number

    @staticmethod
    def _block_ids(data):
        """The jobid (bytes) of each line of `data`, whole lines; None
        when a line must go the long way.

        A line passes if it has no NUL byte, exactly one DG.JOBID field,
        after a space, and balanced quotes.  Of a line without a
        backslash, translate() and removing the pairs '""' leave nothing
        if its quotes pair up, one '"' if not; a line with a backslash
        gets BALANCED_RE.
        """
        if b"\0" in data:
            return None
        ids = BLOCK_JOBID_RE.findall(data)
        count = data.count(b"\n")
        if len(ids) != count or data.count(JOBID_FIELD) != count:
            return None
        quoting = data.translate(None, NOT_QUOTING).replace(b'""', b"")
        if quoting.startswith(b'"\n') or b'\n"\n' in quoting:
            return None
        at = data.find(b"\\")
        while at >= 0:
            start = data.rfind(b"\n", 0, at) + 1
            end = data.index(b"\n", at)
            if BALANCED_RE.fullmatch(data, start, end) is None:
                return None
            at = data.find(b"\\", end)
        return ids

    def lines(self, number, lines, size=0, clean=False, checked=False):
        """Route lines (without LF), numbered from `number` + 1.

        The hot loop: a line of the job being written (every line but
        the first of a job in a grouped dump), or with -x of any job
        open, costs a few bytes operations; everything else goes the
        long way.  `clean` says the block has no NUL byte and no
        backslash: then a line's quotes are balanced when their number
        is even.  `checked`: every line has passed _block_ids() (one
        DG.JOBID field, balanced quotes, no NUL byte).
        """
        field, job = self.current_field, self.current
        quotes_ok = self._quotes_ok
        by_field = self.by_field if self.mixed else None
        skip = len(JOBID_FIELD)
        for line in lines:
            number += 1
            # The fast way: the line names a job being written (grouped:
            # the current one; -x: any open one) and passes the checks.
            if by_field is None:
                target = job
                at = line.find(field) if field is not None else -1
            else:
                at = line.find(JOBID_FIELD)
                target = by_field.get(line[at:line.find(
                    b'"', at + skip) + 1]) if at >= 0 else None
            if target is None or at < 0 or (at and line[at - 1] != 32) or \
                    not checked and (line.count(JOBID_FIELD) != 1 or (
                        line.count(b'"') & 1 if clean else
                        b"\0" in line or not quotes_ok(line))):
                if not line or line == b"\r":
                    self.counts["blank"] += 1
                    continue
                try:
                    target = self._job_of(line, checked)
                except BadLineError as exc:
                    self.reject(number, line, str(exc))
                    continue
                if target is None:        # announced by an earlier run
                    self.counts["earlier"] += 1
                    continue
                field, job = self.current_field, self.current
            target.buf.append(line)
            target.buffered += len(line) + 1
            if target.buffered > JOB_BUFFER:
                self._flush(target)
        if self.mixed:
            # Every job is open: bound the lines buffered over all of them.
            self.unflushed += size
            if self.unflushed > MIXED_BUFFER:
                for job in self.open.values():
                    self._flush(job)
                self.unflushed = 0
        return number

    @staticmethod
    def _quotes_ok(line):
        """Are the quotes of `line` (bytes) balanced?  Linear time: a
        line without a backslash by counting, else with BALANCED_RE.
        """
        if b"\\" not in line:
            return line.count(b'"') % 2 == 0
        return BALANCED_RE.fullmatch(line) is not None

    def _job_of(self, line, checked=False):
        """The Job that `line` (bytes, with no LF) belongs to, started
        if new; None if its job was announced by an earlier run.

        checked: the quotes were checked already (by _block_ids()).
        Raises BadLineError with the reason when the line cannot be exported.
        """
        if b"\0" in line:
            raise BadLineError("NUL byte in line")
        start = line.find(JOBID_FIELD)
        if start < 0 or (start and line[start - 1] not in b" \t"):
            raise BadLineError("no DG.JOBID field")
        if line.count(JOBID_FIELD) != 1:
            raise BadLineError("DG.JOBID given twice")
        if not checked and not self._quotes_ok(line):
            raise BadLineError("unbalanced quotes")
        end = line.find(b'"', start + len(JOBID_FIELD))
        field = line[start:end + 1]
        known = self.known.get(field)
        if known is None:
            raw = line[start + len(JOBID_FIELD):end]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise BadLineError("jobid is not UTF-8")
            if "\\" in text:
                raise BadLineError("invalid jobid %r" % text[:200])
            jobid, unique = parse_jobid(text)
            known = jobid, safe_name(unique)
            if len(self.known) >= KNOWN_JOBIDS:
                self.known.clear()
            self.known[field] = known
        return self._switch(field, known[0], known[1])

    def _switch(self, field, jobid, name):
        """The Job for a jobid seen in a line; None if announced earlier."""
        if name in self.announced:
            return None
        job = self.open.get(name)
        if job is None:
            job = self._start(jobid, name)
        if self.mixed:
            if field not in job.fields:
                job.fields.append(field)
                self.by_field[field] = job
        else:
            if self.current is not None and self.current is not job:
                self._finish(self.current)
            self.current, self.current_field = job, field
        return job

    def _start(self, jobid, name):
        """Create the file of a job first seen and return its new Job (or
        the Job of a file this run made before, reopened).  Raises
        BadLineError for a planted file, Error when the file cannot be made.
        """
        path = self.in_store + name + self.suffix
        job = Job(jobid, name, path)
        try:
            job.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o640)
        except FileExistsError:
            # Seen before in this run: not grouped after all.  Or planted.
            self._refuse_planted(path)
            job = self._reopen(jobid, name, path)
        except OSError as exc:
            raise Error("cannot create %s: %s" % (path, exc.strerror))
        else:
            self.counts["jobs"] += 1
        self.open[name] = job
        self._track(job)
        return job

    @staticmethod
    def _refuse_planted(path):
        """Raise BadLineError when the existing `path` is a symbolic link or a
        file the exporter did not make; return otherwise.
        """
        try:
            st = os.lstat(path)
        except OSError:
            return                # the reopen says what is wrong
        if stat.S_ISLNK(st.st_mode):
            raise BadLineError("%s is a symbolic link: not followed" % path)
        if not made_here(st):
            raise BadLineError("%s is not a file the exporter made: left alone"
                               % path)

    def _reopen(self, jobid, name, path):
        """The Job of a job seen again after its lines ended, with its
        file `path` open for appending.

        With -x a parked job is back; in a grouped dump the job is taken
        back from its batch, or its published message is retracted.
        Raises BadLineError when the importer has the job already.
        """
        if self.mixed:                # a parked job is back
            self.parked_jobids.pop(name, None)
            job = Job(jobid, name, path)
            job.fd = self._open_append(path)
            return job
        if name in self.handed_over:
            raise BadLineError("job %s reappeared after its dump was handed "
                               "to the importer" % jobid)
        job = self._take_back(name)
        if job is None:
            # Its message is written, or published: publish what is
            # written, then take the message back like any other.
            self.drain()
            job = Job(jobid, name, path)
            self._retract(job)
        job.fd = self._open_append(path)
        return job

    def _take_back(self, name):
        """The finished job `name` if it has no message yet, out of its
        batch; else None."""
        for batch in (self.pending, self.syncing):
            for job in batch:
                if job.name == name:
                    batch.remove(job)
                    return job
        return None

    def _retract(self, job):
        """Take back the published message of a job that reappeared.

        Renaming it out of new/ is atomic against the importer's claim
        (also a rename): if it is still there, it is ours again.  If the
        importer has it already, the late lines cannot join the file and
        are rejected, never published as a second dump of the job.
        """
        message = self._journaled_message(job.name)
        if message is None:
            raise BadLineError("job %s reappeared but its message is unknown"
                               % job.jobid)
        private = self.in_tmp + message + ".retracted"
        try:
            os.rename(self.in_new + message, private)
        except FileNotFoundError:
            self.handed_over.add(job.name)
            raise BadLineError("job %s reappeared after its dump was handed "
                               "to the importer" % job.jobid)
        job.message, job.retracted = message, private
        job.published = True
        job.size = os.path.getsize(job.path)

    def _journaled_message(self, name):
        """The message journaled for the job `name`, or None."""
        found = None
        for message, _, filename in self._read_journal()[0]:
            if filename == name + self.suffix:
                found = message
        return found

    def _open_append(self, path):
        """A descriptor of `path` open for appending (never through a
        symbolic link).  Raises Error when it cannot be opened.
        """
        try:
            return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        except OSError as exc:
            raise Error("cannot reopen %s: %s" % (path, exc.strerror))

    def _track(self, job):
        """-x: keep at most MAX_OPEN_FILES jobs open; park the oldest."""
        if not self.mixed:
            return
        self.lru.append(job)
        if len(self.lru) > MAX_OPEN_FILES:
            self._park(self.lru.pop(0))

    def _park(self, job):
        """-x: write out a job and forget it but for its file (and its
        jobid, where the file name does not tell it)."""
        if job.buf and job.fd is None:
            job.fd = self._open_append(job.path)
        self._flush(job)
        if job.fd is not None:
            os.close(job.fd)
            job.fd = None
        del self.open[job.name]
        self._forget_fields(job)
        if self.jobid_prefix is None and job.jobid.endswith("/" + job.name):
            self.jobid_prefix = job.jobid[:-len(job.name)]
        if job.jobid != (self.jobid_prefix or "") + job.name:
            self.parked_jobids[job.name] = job.jobid

    def _forget_fields(self, job):
        """-x: the DG.JOBID fields of `job` no longer route lines to it."""
        for field in job.fields:
            del self.by_field[field]
        job.fields = []

    def _finish_parked(self, finished):
        """-x, end of input: queue every parked job, found in the store
        (a file planted there at a job's name is not one)."""
        with os.scandir(self.store) as entries:
            parked = [entry.name[:-len(self.suffix)] for entry in entries
                      if entry.name.endswith(self.suffix) and
                      made_here(entry.stat(follow_symlinks=False))]
        for name in parked:
            if name in finished or name in self.announced:
                continue
            jobid = self.parked_jobids.pop(name, None) or \
                self.jobid_prefix + name
            job = Job(jobid, name, self.in_store + name + self.suffix)
            self.open[name] = job
            self._finish(job)

    def _flush(self, job):
        """Write the lines buffered for a job to its file."""
        if not job.buf:
            return
        if job.fd is None:
            job.fd = self._open_append(job.path)
            self._track(job)
        job.buf.append(b"")           # the last LF, without a copy more
        data = b"\n".join(job.buf)
        try:
            write_all(job.fd, data)
        except OSError as exc:
            raise Error("cannot write %s: %s" % (job.path, exc.strerror))
        self.counts["exported"] += len(job.buf) - 1 + job.joined
        job.size += len(data)
        job.buf = []
        job.buffered = job.joined = 0

    def reject(self, number, line, reason, more=()):
        """Keep a bad line where the admin sees it; go on with the rest.

        The rejects file holds, for each bad line, "# line N: reason"
        and then the line itself, byte for byte (`more`: further pieces
        of an overlong line, written as they come), so nothing of the
        input is lost.
        """
        self.counts["rejected"] += 1
        try:
            if self.rejects_fd is None:
                # begin() removed any: one there now was planted.
                self.rejects_fd = os.open(self.rejects_path, os.O_WRONLY |
                                          os.O_CREAT | os.O_EXCL, 0o600)
            write_all(self.rejects_fd, b"# line %d: %s\n%s" % (
                number, reason.encode("utf-8", "replace"), line))
            for piece in more:
                write_all(self.rejects_fd, piece)
            write_all(self.rejects_fd, b"\n")
        except OSError as exc:
            raise Error("cannot write %s: %s" % (self.rejects_path,
                                                 exc.strerror))
        if self.report_reject:
            self.report_reject(number, reason)

    # -- publication --------------------------------------------------------

    def _finish(self, job):
        """A job is complete: queue it for the next batch."""
        del self.open[job.name]
        self._forget_fields(job)
        self._flush(job)
        if job.fd is not None:
            os.close(job.fd)          # fsync reopens it: fds are limited
            job.fd = None
        job.finished = time.monotonic()
        self.pending.append(job)
        self.pending_bytes += job.size
        if len(self.pending) >= BATCH_JOBS or \
                self.pending_bytes >= BATCH_BYTES:
            self.publish()
        elif job.finished - self._oldest() >= BATCH_SECONDS:
            self.drain()              # a slow input: announce them now

    def _oldest(self):
        """When the job waiting longest to be announced was complete."""
        for batch in (self.written, self.syncing, self.pending):
            if batch:
                return batch[0].finished

    def publish(self):
        """Move every batch of finished jobs one step on to new/.

        Three batches can be on their way: the newest gets its files
        synced; the one before, whose files are on disk, gets its
        messages written in tmp/ and journaled, synced along; the one
        before that, whose messages and journal entries are on disk, is
        linked into new/.  One sync a step, for the whole of it, keeps a
        dump of 100,000 small jobs fast; and it runs in a thread while
        the next batch is split, so the disk's waits cost no time.  The
        order holds whatever happens: no message before its job's file
        is on disk, no link before the message and its entry are.
        """
        self._wait_sync()
        # 3. announce the batch whose messages are on disk;
        announced, self.written = self.written, []
        self._announce(announced)
        # 2. write the messages of the batch whose files are on disk;
        batch, self.syncing = self.syncing, []
        fresh = [job for job in batch if job.retracted is None]
        try:
            if fresh:
                # Names of messages written from now on are not earlier
                # than this: a rerun after a kill in the middle knows
                # which empty tmp/ files it left (_recover).
                write_all(self.journal_fd, b"batch %d_%06d\n" % clock())
                for job in fresh:
                    job.message = self._write_message(job)
                write_all(self.journal_fd, "".join(
                    "%s\t%s\t%s\n" % (job.message, job.jobid,
                                       job.name + self.suffix)
                    for job in fresh).encode("utf-8"))
        except OSError as exc:
            # Its messages, journaled or not, are the rerun's to redo.
            raise Error("cannot journal the batch: %s" % exc.strerror)
        self.written = batch
        # 1. the newest batch's files.
        self.syncing, self.pending = self.pending, []
        self.pending_bytes = 0
        paths = [job.path for job in self.syncing]
        if paths:
            paths.append(self.store)
        if fresh:
            paths += [self.in_tmp + job.message for job in fresh]
            paths += [self.in_tmp, self.journal_path()]
        if announced:
            paths.append(self.in_new)
        if paths:
            self.sync_thread = SyncThread(paths)

    def _announce(self, jobs):
        """Link the message of each of `jobs` into new/ (or rename its
        retracted one back).  Raises Error when one cannot be published.
        """
        for job in jobs:
            target = self.in_new + job.message
            try:
                if job.retracted:
                    os.rename(job.retracted, target)
                else:
                    os.link(self.in_tmp + job.message, target)
            except OSError as exc:
                raise Error("cannot publish %s: %s" % (target, exc.strerror))
            job.published = True

    def drain(self):
        """Publish every finished job now, and wait for the disk."""
        while self.pending or self.syncing or self.written:
            self.publish()
        self._wait_sync()

    def _wait_sync(self):
        """Wait for the sync of the last batch, if one runs.  Raises Error
        when it failed; the batch written is then not published.
        """
        thread, self.sync_thread = self.sync_thread, None
        if thread is None:
            return
        thread.join()
        if thread.error is not None:
            # The batch written is not known to be on disk: not to be
            # published (by abandon()); the rerun's recovery redoes it.
            self.written = []
            raise Error("cannot make the batch durable: %s"
                        % thread.error.strerror)

    def _write_message(self, job):
        """The job's message in tmp/ (the maildir way; linked later)."""
        # The original's bytes: padded keys, no newline after the last
        # line; "jpps" on a line of its own (the original's -j ran it
        # into the file name).
        data = "jobid  %s\nfile   %s" % (job.jobid, job.path)
        if self.jpps:
            data += "\njpps   %s" % self.jpps
        sec, usec = clock()
        while True:
            name = "%d_%06d.localhost" % (sec, usec)
            path = self.in_tmp + name
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o600)
                break
            except FileExistsError:
                usec += 1
                if usec == 1000000:
                    sec, usec = sec + 1, 0
            except OSError as exc:
                raise Error("cannot write a message in %s: %s"
                            % (self.in_tmp, exc.strerror))
        try:
            write_all(fd, data.encode("utf-8"))
        except OSError as exc:
            os.close(fd)
            unlink_quietly(path)
            raise Error("cannot write message %s: %s" % (path, exc.strerror))
        os.close(fd)
        return name

    def finish(self):
        """End of input: publish every job still open, mark the journal."""
        finished = set(self.open)
        for job in list(self.open.values()):
            self._finish(job)
        if self.mixed:
            self._finish_parked(finished)
        self.current = self.current_field = None
        self.drain()
        write_all(self.journal_fd, COMPLETE)
        os.fsync(self.journal_fd)

    def abandon(self):
        """After a fatal error: remove what no message will point at.

        The batch whose messages are journaled is published if its sync
        succeeds (else the rerun's recovery takes it back).  Jobs without
        a message lose their file; the rerun exports them again.
        """
        try:
            self._wait_sync()
            self._announce(self.written)
        except Error:
            pass
        for job in list(self.open.values()) + self.pending + self.syncing:
            if job.fd is not None:
                try:
                    os.close(job.fd)
                except OSError:
                    pass
            if job.published:
                continue
            if job.retracted:
                unlink_quietly(job.retracted)
            if job.message:
                unlink_quietly(self.in_tmp + job.message)
            unlink_quietly(job.path)
        if self.mixed and self.dump_id:
            # Parked jobs are known by their files alone: remove those
            # that no journal entry (this run's or an earlier one's) names.
            try:
                journaled = set(entry[2] for entry in self._read_journal()[0])
                for filename in os.listdir(self.store):
                    if filename.endswith(self.suffix) and \
                            filename not in journaled:
                        unlink_quietly(self.in_store + filename)
            except OSError:
                pass                      # the rerun's recovery does it


# ---------------------------------------------------------------------------
# The run: read, split, report
# ---------------------------------------------------------------------------

class Progress:
    """A progress line on a terminal, every half second."""

    def __init__(self, stream, total):
        """Progress on `stream` (a terminal) of an input of `total` bytes,
        or of unknown size (None).
        """
        self.stream, self.total = stream, total
        self.started = self.last = time.monotonic()

    def update(self, done, jobs, final=False):
        """Show `done` bytes read and `jobs` exported, at most every half
        second; final: show it now and end the line.
        """
        now = time.monotonic()
        if not final and now - self.last < 0.5:
            return
        self.last = now
        rate = done / 1e6 / max(now - self.started, 1e-6)
        of = " of %.0f MB (%d%%)" % (self.total / 1e6, done * 100 //
                                     self.total) if self.total else ""
        self.stream.write("\r%.0f MB%s, %d jobs, %.0f MB/s " % (
            done / 1e6, of, jobs, rate))
        if final:
            self.stream.write("\n")
        self.stream.flush()


def export(o, stderr=sys.stderr):
    """Run the export of options `o`; return the exit status."""
    store = private_store(os.path.abspath(o.store), o.allow_shared_dirs)
    maildir = os.path.abspath(o.maildir)
    source = o.dump if o.dump not in (None, "-") else "<stdin>"

    def report(number, reason):
        # The first ones (a flood would bury the summary); all of them
        # are in the rejects file.
        if exporter.counts["rejected"] <= REJECTS_SHOWN:
            stderr.write("%s:%d: %s\n" % (source, number, reason))

    exporter = Exporter(store, maildir, o.jpps, o.mixed,
                        o.allow_shared_dirs, reject=report)
    stream, total, raw, fd = open_input(o.dump)
    try:
        exporter.prepare()
        exporter.prune_journals()
    except Error:
        stream.close()
        raise
    started = time.monotonic()
    progress = None
    if not o.quiet and stderr.isatty():
        progress = Progress(stderr, total)
    read = reader(stream, source, fd, exporter.drain)

    def position():
        # Of the file as stored (compressed or not) when it is a file.
        return raw.tell() if total is not None else read.done
    try:
        chunk = read()
        head = chunk
        while len(head) < FINGERPRINT_BYTES and chunk:
            chunk = read()
            head += chunk
        if not exporter.begin(head):
            if not o.quiet:
                stderr.write("%s: %s was exported completely before (see "
                             "%s); nothing to do\n"
                             % (PROG, source, exporter.journal_path()))
            return 0
        try:
            tick = None
            if progress:
                def tick():
                    progress.update(position(), exporter.counts["jobs"])
            number = split(exporter, read, head, tick)
            exporter.finish()
        except BaseException:
            exporter.abandon()
            raise
        done = position()         # asks the file: before it is closed
    finally:
        stream.close()
    counts = exporter.counts
    if progress:
        progress.update(done, counts["jobs"], final=True)
    if counts["rejected"] > REJECTS_SHOWN:
        stderr.write("%s: ... and %d more rejected lines (see %s)\n"
                     % (PROG, counts["rejected"] - REJECTS_SHOWN,
                        exporter.rejects_path))
    if not o.quiet:
        stderr.write(
            "%s: %d job(s) exported from %s in %.1fs: %d lines, %d exported, "
            "%d rejected, %d blank%s%s\n" % (
                PROG, counts["jobs"], source, time.monotonic() - started,
                number, counts["exported"], counts["rejected"],
                counts["blank"],
                ", %d of jobs announced by an earlier run" % counts["earlier"]
                if counts["earlier"] else "",
                "; rejects in %s" % exporter.rejects_path
                if counts["rejected"] else ""))
    return EXIT_REJECTED if counts["rejected"] else 0


class Checker:
    """A child process that runs Exporter._block_ids() on the blocks
    handed to it, while the exporter routes and writes the block before:
    the checks, most of the exporter's CPU time, run on another core.

    It touches no file and holds no state: it reads a block from memory
    shared with the exporter and answers with the jobids.  Killed, or
    silent for CHECKER_WAIT seconds, it is done without: the exporter
    checks the blocks itself.  It ends when the exporter's end of the
    pipe closes, also when the exporter is killed.
    """

    SLOTS = 2                     # blocks handed over, not yet taken

    def __init__(self):
        """Fork the checker.  Raises OSError when it cannot be started."""
        self.size = MAX_LINE + 2 * CHUNK       # a block is never longer
        self.shared = mmap.mmap(-1, self.size * self.SLOTS)
        self.waiting = []         # blocks handed over, oldest first
        self.slot = 0
        asks, self.ask = os.pipe()
        self.answers, answer = os.pipe()
        try:
            self.pid = os.fork()
        except OSError:
            for fd in (asks, self.ask, self.answers, answer):
                os.close(fd)
            raise
        if self.pid == 0:
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                os.close(self.ask)
                os.close(self.answers)
                self._serve(asks, answer)
            finally:
                os._exit(0)
        os.close(asks)
        os.close(answer)

    def _serve(self, asks, answer):
        """The child: check each block asked for until the pipe ends."""
        with os.fdopen(asks, "rb") as requests:
            for request in requests:
                slot, length = map(int, request.split())
                start = slot * self.size
                reply = marshal.dumps(Exporter._block_ids(
                    self.shared[start:start + length]))
                write_all(answer, b"%010d%s" % (len(reply), reply))

    def give(self, data):
        """Hand the block `data` over; False when the checker cannot
        take it (gone, or all slots are waiting to be taken)."""
        if self.pid is None or len(self.waiting) >= self.SLOTS or \
                len(data) > self.size:
            return False
        start = self.slot * self.size
        self.shared[start:start + len(data)] = data
        try:
            write_all(self.ask, b"%d %d\n" % (self.slot, len(data)))
        except OSError:
            self.close()
            return False
        self.slot = (self.slot + 1) % self.SLOTS
        self.waiting.append(data)
        return True

    def take(self):
        """(block, its jobids as _block_ids() gives them) of the oldest
        block handed over; checked here if the checker is gone."""
        data = self.waiting.pop(0)
        if self.pid is not None:
            try:
                size = int(self._read(10))
                return data, marshal.loads(self._read(size))
            except (OSError, ValueError, EOFError, TypeError):
                self.close()
        return data, Exporter._block_ids(data)

    def _read(self, size):
        """`size` bytes of the answer pipe.  Raises EOFError when the
        checker is gone or silent for CHECKER_WAIT seconds."""
        got = []
        while size:
            if not select.select([self.answers], [], [], CHECKER_WAIT)[0]:
                raise EOFError("checker silent")
            piece = os.read(self.answers, size)
            if not piece:
                raise EOFError("checker gone")
            got.append(piece)
            size -= len(piece)
        return b"".join(got)

    def close(self):
        """End the checker (blocks still waiting are checked by take())."""
        if self.pid is None:
            return
        for fd in (self.ask, self.answers):
            os.close(fd)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass
        os.waitpid(self.pid, 0)
        self.pid = None


def reader(stream, source, fd=None, idle=None):
    """read() of CHUNK bytes, with read errors as one clear Error.

    `fd`: the descriptor under `stream` when the input may pause (a
    pipe): once what `stream` buffered is read, every BATCH_SECONDS that
    nothing comes, idle() is called (it publishes the finished jobs).
    read.ready() says whether read() would return without waiting;
    read.done counts the bytes returned.
    """
    # read1: what is there, up to CHUNK; read() would wait on a pipe for
    # the whole CHUNK, holding back the jobs already complete.
    read_some = getattr(stream, "read1", stream.read)

    def read_fd(size):
        """Up to `size` bytes of `fd`, calling idle() every BATCH_SECONDS
        that nothing comes.
        """
        while not select.select([fd], [], [], BATCH_SECONDS)[0]:
            idle()
        return os.read(fd, size)

    def read():
        """The next block of the input (b"" at its end).  Raises Error
        when the input cannot be read.
        """
        try:
            if read.drained:
                data = read_fd(CHUNK)
            else:
                # read1 returns what stream holds, if anything, and reads
                # no further: after it, the descriptor tells all.
                data = read_some(CHUNK)
                read.drained = fd is not None and idle is not None
        except (OSError, EOFError, zlib.error) as exc:
            raise Error("cannot read %s: %s" % (source, getattr(
                exc, "strerror", None) or exc))
        read.done += len(data)
        return data
    def ready():
        """Would read() return without waiting for the input?"""
        return not read.drained or bool(select.select([fd], [], [], 0)[0])
    read.done = 0
    read.drained = False
    read.ready = ready
    return read


def split(exporter, read, data, tick=None):
    """Feed every line of the input to the exporter; the line count.

    exporter: the Exporter; read: a reader() function; data: the first
    bytes of the input, already read; tick: called after each block
    (the progress line), or None.  The input is read in big blocks and
    handed on as blocks of whole lines (Exporter.block), so that the
    per-line work is done by bytes and re methods on a whole block.
    From the second block on, a Checker checks each block on another
    core while the one before is routed.
    """
    number = 0
    carry = b""
    blocks = 0
    checker = None

    def routed(number, keep=0):
        # The blocks handed to the checker, in order, until `keep` wait.
        while checker is not None and len(checker.waiting) > keep:
            block, ids = checker.take()
            number = exporter.block(number, block, ids)
        return number
    try:
        while True:
            end = data.rfind(b"\n") + 1
            if not end:
                block, carry = b"", carry + data
            elif carry:
                # One copy of the block, not two (carry + data, then cut).
                block = b"".join((carry, memoryview(data)[:end]))
                carry = data[end:]
            else:
                block, carry = data[:end], data[end:]
            first = block.find(b"\n")
            if first > MAX_LINE:
                # Only the first can be: the end of a long carry came in
                # data.
                number = routed(number)
                number += 1
                exporter.reject(number, block[:first], "line longer than "
                                "%d bytes" % MAX_LINE)
                block = block[first + 1:]
            if block:
                blocks += 1
                if blocks == 2:
                    checker = start_checker()
                if checker is not None and checker.give(block):
                    number = routed(number, checker.SLOTS - 1)
                else:
                    number = routed(number)
                    number = exporter.block(number, block)
            if len(carry) > MAX_LINE:
                # No end in sight: all of it into the rejects file, a
                # block at a time as it is read (a line of a gigabyte, or
                # a small gzip of one, costs no gigabyte of memory).
                number = routed(number)
                number += 1
                rest = []

                def pieces():
                    piece = read()
                    while piece and b"\n" not in piece:
                        yield piece
                        if tick:
                            tick()
                        piece = read()
                    end = piece.find(b"\n") if piece else 0
                    yield piece[:end]
                    rest.append(piece[end + 1:])
                exporter.reject(number, carry, "line longer than %d bytes"
                                % MAX_LINE, pieces())
                carry, data = b"", rest[0]
                if not data:
                    data = read()
                    if not data:
                        break
                continue
            if tick:
                tick()
            if checker is not None and not read.ready():
                # A pause in the input (a pipe): what came is routed now,
                # so that its finished jobs are published while it lasts.
                number = routed(number)
            data = read()
            if not data:
                break
        number = routed(number)
    finally:
        if checker is not None:
            checker.close()
    if carry:                  # a last line without LF
        number = exporter.lines(number, [carry])
    return number


def start_checker():
    """A new Checker; None where it would not help (one CPU), is not
    safe (threads running: the fork would copy none of them) or cannot
    start."""
    if (os.cpu_count() or 1) < 2 or threading.active_count() > 1 or \
            not hasattr(os, "fork"):
        return None
    try:
        return Checker()
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

SHORTOPTS = "hd:s:j:m:xq"
LONGOPTS = ["help", "dump=", "store=", "jpps=", "lbmaildir=", "mixed",
            "quiet", "allow-shared-dirs", "version"]


class Options:
    """The parsed command line."""

    def __init__(self):
        self.help = self.version = self.mixed = self.quiet = False
        self.allow_shared_dirs = False
        self.dump = self.jpps = None
        self.store = DEFAULT_STORE
        self.maildir = DEFAULT_MAILDIR


def parse_args(argv):
    """Options for argv; raises getopt.GetoptError on a usage error."""
    opts, args = getopt.gnu_getopt(argv, SHORTOPTS, LONGOPTS)
    if args:
        raise getopt.GetoptError("unexpected argument %r" % args[0])
    o = Options()
    for opt, arg in opts:
        if opt in ("-h", "--help"):
            o.help = True
        elif opt == "--version":
            o.version = True
        elif opt in ("-d", "--dump"):
            o.dump = arg
        elif opt in ("-s", "--store"):
            o.store = arg
        elif opt in ("-j", "--jpps"):
            o.jpps = check_jpps(arg)
        elif opt in ("-m", "--lbmaildir"):
            o.maildir = arg
        elif opt in ("-x", "--mixed"):
            o.mixed = True
        elif opt in ("-q", "--quiet"):
            o.quiet = True
        elif opt == "--allow-shared-dirs":
            o.allow_shared_dirs = True
    return o


def usage(stream):
    """Write the help text (the module's docstring) to `stream`."""
    stream.write(__doc__ % {"prog": PROG, "store": DEFAULT_STORE,
                            "maildir": DEFAULT_MAILDIR, "maxline": MAX_LINE,
                            "shown": REJECTS_SHOWN,
                            "keep": JOURNAL_KEEP // 86400})


def main(argv=None):
    """Run the command; return the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        o = parse_args(argv)
    except getopt.GetoptError as exc:
        sys.stderr.write("%s: %s\nTry '%s --help'.\n" % (PROG, exc, PROG))
        return 2
    if o.help:
        usage(sys.stdout)
        return 0
    if o.version:
        sys.stdout.write("%s %s\n" % (PROG, __version__))
        return 0
    # Past a file size limit, write() fails with EFBIG (a clear error)
    # instead of the process being killed by the signal.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        return export(o)
    except Error as exc:
        sys.stderr.write("%s: %s\n" % (PROG, exc))
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("%s: interrupted; run the same command again to "
                         "finish\n" % PROG)
        return 130


if __name__ == "__main__":
    sys.exit(main())
