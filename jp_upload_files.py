#!/usr/bin/env python3
"""jp_upload_files -- queue a job's sandbox files for the JP primary storage.

Usage: %(prog)s [-h] [-p PROXY] -j JOBID [-m MAILDIR] [-s HOST:PORT] FILE...

Packs FILE... into one tar archive in the private spool directory of the
sandbox maildir (MAILDIR/spool/) and writes an upload message into
MAILDIR, which jp_importer's sandbox worker delivers to the JP primary
storage.  Nothing is uploaded by this command itself.  A drop-in
replacement for glite-jp-primary-upload_files.

Options (as the original):
  -h, -?, --help          show this help and exit
  -p, --proxy FILE        the user's proxy, named in the message
                          (default: $X509_USER_PROXY)
  -j, --jobid JOBID       the job, https://host[:port]/unique (required)
  -m, --maildir DIR       sandbox maildir (default: %(maildir)s, the one
                          jp_importer watches by default)
  -s, --jpps HOST:PORT    JP primary storage for this job (default: the
                          importer's own)

New options (long only):
  --allow-shared-dirs     accept a maildir owned by another user or
                          writable by group or others
  --version               print the version and exit

Member names in the archive are the paths as given, leading '/' removed;
a path with a '..' component is refused.

Exit status: 0 success, 1 runtime error, 2 usage error.
Requires only the Python 3.6+ standard library.

As a library:
    from jp_upload_files import upload_files, UploadFilesError
    message = upload_files(jobid, ["/path/a", "/path/b"], proxy=None,
                           maildir="/var/glite/jpsandbox", jpps=None)
"""

__version__ = "1.0.0"

import getopt
import os
import re
import signal
import stat
import sys
import tarfile
import time
import urllib.parse

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

PROG = "jp_upload_files"

# jp_importer's default sandbox maildir.  The original library fell back to
# /tmp/lb_maildir, which no importer watches.
DEFAULT_MAILDIR = "/var/glite/jpsandbox"
SUBDIRS = ("tmp", "new", "work", "post", "undeliverable")
SPOOL = "spool"

# The original wrote GNU tar with libtar.  Set explicitly: the tarfile
# default changed from GNU to PAX in Python 3.8.
TAR_FORMAT = tarfile.GNU_FORMAT
COPY_BLOCK = 1024 * 1024

CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
JOBID_RE = re.compile(r"^https://(\[[^\]\s/]+\]|[^\s/:?\[\]]+)(?::(\d+))?"
                      r"/([^\s?]+)(\?\S*)?$")

# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class UploadFilesError(Exception):
    """Any reason the request could not be written; str() says why.

    Nothing is left behind when it is raised: no archive, no message.
    """


class UsageError(UploadFilesError):
    """A bad argument (jobid, JPPS address, file list): exit status 2."""


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def parse_jobid(text):
    """The normal form of an LB jobid, https://host:port/unique[?info].

    Parsed as the original (port 9000 when absent); the same rules as
    jp_importer's, so a message written here is never quarantined there.
    """
    if CONTROL_RE.search(text) or not JOBID_RE.match(text):
        raise UsageError("invalid jobid %r (want https://host[:port]/unique,"
                         " without blanks)" % text)
    host, port, unique, info = JOBID_RE.match(text).groups()
    port = int(port) if port else 9000
    if not 0 < port < 65536:
        raise UsageError("invalid jobid %r: port out of range" % text)
    return "https://%s:%d/%s%s" % (host, port, unique, info or "")


def check_jpps(text):
    """Check a JPPS address the way jp_importer will read it."""
    url = text if "://" in text else "https://" + text
    try:
        parts = urllib.parse.urlsplit(url)
        ok = (parts.scheme in ("http", "https", "httpg") and parts.hostname
              and not CONTROL_RE.search(text) and not any(c.isspace()
                                                          for c in text))
        parts.port                          # raises on a bad port
    except ValueError:
        ok = False
    if not ok:
        raise UsageError("invalid JPPS address %r (want host:port)" % text)
    return text


def member_name(path):
    """The archive member name of `path`: as the original, without '/'.

    A '..' component could write outside the directory on extraction.
    """
    name = path.lstrip("/")
    parts = name.split("/")
    if ".." in parts:
        raise UsageError("refusing %s: a '..' in an archive member could "
                         "escape on extraction" % path)
    if not name or CONTROL_RE.search(name):
        raise UsageError("refusing %r as an archive member name" % path)
    return name


def fsync_dir(path):
    """Sync directory `path`, so an entry made in it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path):
    """Remove `path` if it is there; a failure is ignored (cleaning up)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def strerror(exc):
    """The reason of OSError `exc`, without its errno number."""
    return exc.strerror or str(exc)


def prepare_directory(path, allow_shared=False):
    """Create `path` (0700) when missing and check it is safe to use.

    A directory another user owns or can write to could swap our files
    (jp_importer refuses such maildirs for the same reason).
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UploadFilesError("cannot create directory %s: %s"
                               % (path, strerror(exc)))
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UploadFilesError("%s is not a directory (or is a symbolic "
                               "link)" % path)
    if not allow_shared and st.st_uid != os.geteuid():
        raise UploadFilesError("directory %s is owned by uid %d, not by us; "
                               "use --allow-shared-dirs to accept it"
                               % (path, st.st_uid))
    if not allow_shared and st.st_mode & 0o022:
        raise UploadFilesError("directory %s is writable by group or others "
                               "(mode %04o); use --allow-shared-dirs to "
                               "accept it" % (path, stat.S_IMODE(st.st_mode)))
    if not os.access(path, os.W_OK | os.X_OK):
        raise UploadFilesError("directory %s is not writable by us" % path)


def unique_name(directory, suffix):
    """Create directory/<sec>_<usec>.<suffix> exclusively; (path, fd).

    The time-based prefix keeps the maildir's order; O_EXCL plus a bumped
    microsecond on collision makes the name ours alone (the original's
    predictable /tmp name could be taken by anybody).
    """
    now = time.time()
    sec, usec = int(now), int((now % 1) * 1e6)
    for _ in range(1000):
        path = os.path.join(directory, "%d_%06d.%s" % (sec, usec, suffix))
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY |
                         getattr(os, "O_NOFOLLOW", 0), 0o600)
            return path, fd
        except FileExistsError:
            usec += 1
            if usec == 1000000:
                sec, usec = sec + 1, 0
        except OSError as exc:
            raise UploadFilesError("cannot create a file in %s: %s"
                                   % (directory, strerror(exc)))
    raise UploadFilesError("cannot find a free name in %s" % directory)


# ---------------------------------------------------------------------------
# Core: the archive and the message
# ---------------------------------------------------------------------------

def open_inputs(files):
    """Open every input for reading; [(member name, file object, stat)].

    Everything is checked before anything is written, so a bad file costs
    nothing.  A file is opened, then fstat'ed: what is archived is what
    was checked, even if the path is swapped meanwhile.
    """
    if not files:
        raise UsageError("no files to upload")
    opened, names = [], set()
    try:
        for path in files:
            name = member_name(path)
            if name in names:
                raise UsageError("%s is given twice" % path)
            names.add(name)
            try:
                st = os.stat(path)
            except OSError as exc:
                raise UploadFilesError("%s: %s" % (path, strerror(exc)))
            if not stat.S_ISREG(st.st_mode):
                raise UploadFilesError("%s is not a regular file" % path)
            try:
                f = open(path, "rb")
            except OSError as exc:
                raise UploadFilesError("%s: %s" % (path, strerror(exc)))
            opened.append((name, f, os.fstat(f.fileno())))
            if not stat.S_ISREG(opened[-1][2].st_mode):
                raise UploadFilesError("%s is not a regular file" % path)
    except BaseException:
        for _, f, _ in opened:
            f.close()
        raise
    return opened


def write_archive(fd, inputs):
    """Write a complete GNU tar of `inputs` to `fd`, fsync it.

    Complete means with the end-of-archive blocks, which the original
    never wrote.  Files are streamed, never read whole.
    """
    with os.fdopen(fd, "wb", buffering=COPY_BLOCK) as out:
        with tarfile.open(fileobj=out, mode="w", format=TAR_FORMAT) as tar:
            for name, f, st in inputs:
                info = tarfile.TarInfo(name)
                info.size = st.st_size
                info.mtime = int(st.st_mtime)
                info.mode = stat.S_IMODE(st.st_mode)
                info.uid, info.gid = st.st_uid, st.st_gid
                tar.addfile(info, f)
                if f.read(1):
                    raise UploadFilesError("%s grew while it was archived"
                                           % f.name)
        out.flush()
        os.fsync(out.fileno())


def build_message(jobid, archive, proxy, jpps=None):
    """The message bytes (README, "Sandbox"): tab-separated, LF each."""
    lines = ["jobid\t%s\n" % jobid, "file\t%s\n" % archive,
             "proxy\t%s\n" % proxy]
    if jpps:
        lines.append("jpps\t%s\n" % jpps)
    return "".join(lines).encode("utf-8")


def store_message(maildir, data):
    """Write a message the maildir way; return its path in new/.

    tmp/<name> (O_EXCL, 0600), written, fsynced, closed, then linked into
    new/: a reader never sees a partial message.  The tmp/ copy stays, it
    is the master copy jp_importer manages.
    """
    tmp_path, fd = unique_name(os.path.join(maildir, "tmp"), "localhost")
    new_path = os.path.join(maildir, "new", os.path.basename(tmp_path))
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp_path, new_path)
    except OSError as exc:
        unlink_quietly(tmp_path)
        raise UploadFilesError("cannot write the message in %s: %s"
                               % (maildir, strerror(exc)))
    except BaseException:
        unlink_quietly(tmp_path)
        raise
    try:
        fsync_dir(os.path.dirname(new_path))
    except OSError:
        pass            # published all the same; the rename will be synced
    return new_path


def upload_files(jobid, files, proxy=None, maildir=DEFAULT_MAILDIR,
                 jpps=None, allow_shared_dirs=False):
    """Queue `files` of job `jobid` for upload; return the message path.

    jobid   -- str, https://host[:port]/unique
    files   -- list of str, regular files (member names: leading '/' off)
    proxy   -- str, the user's proxy file (default $X509_USER_PROXY)
    maildir -- str, the sandbox maildir jp_importer watches
    jpps    -- str or None, host:port of the JP primary storage
    Raises UploadFilesError (a clear message); then nothing is left
    behind.
    """
    jobid = parse_jobid(jobid)
    if jpps:
        check_jpps(jpps)
    if isinstance(files, str):
        raise UsageError("files must be a list of paths, not one string")
    proxy = proxy or os.environ.get("X509_USER_PROXY")
    if not proxy:
        raise UsageError("no proxy: give -p/--proxy or set X509_USER_PROXY")
    proxy = os.path.abspath(proxy)
    if not os.path.isfile(proxy):
        raise UploadFilesError("proxy %s does not exist or is not a regular "
                               "file" % proxy)
    for what, text in (("jobid", jobid), ("proxy path", proxy)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError("%s %r is not valid UTF-8" % (what, text))
    if CONTROL_RE.search(proxy):
        raise UploadFilesError("proxy path %r has control characters"
                               % proxy)
    maildir = os.path.abspath(maildir)
    inputs = open_inputs(files)
    try:
        for sub in ("",) + SUBDIRS + (SPOOL,):
            prepare_directory(os.path.join(maildir, sub), allow_shared_dirs)
        spool = os.path.join(maildir, SPOOL)
        archive, fd = unique_name(
            spool, "%d.%s.tar" % (os.getpid(), os.urandom(8).hex()))
        try:
            write_archive(fd, inputs)
            fsync_dir(spool)
            return store_message(maildir, build_message(jobid, archive,
                                                        proxy, jpps))
        except OSError as exc:
            unlink_quietly(archive)
            raise UploadFilesError("cannot write the archive %s: %s"
                                   % (archive, strerror(exc)))
        except BaseException:
            unlink_quietly(archive)
            raise
    finally:
        for _, f, _ in inputs:
            f.close()


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

SHORTOPTS = "h?p:j:m:s:"
LONGOPTS = ["help", "proxy=", "jobid=", "maildir=", "jpps=",
            "allow-shared-dirs", "version"]


class Options:
    """The parsed command line."""

    def __init__(self):
        self.help = self.version = self.allow_shared_dirs = False
        self.proxy = self.jobid = self.jpps = None
        self.maildir = DEFAULT_MAILDIR
        self.files = []


def parse_args(argv):
    """Options for argv; raises getopt.GetoptError on a usage error."""
    opts, args = getopt.gnu_getopt(argv, SHORTOPTS, LONGOPTS)
    o = Options()
    for opt, arg in opts:
        if opt in ("-h", "-?", "--help"):
            o.help = True
        elif opt == "--version":
            o.version = True
        elif opt in ("-p", "--proxy"):
            o.proxy = arg
        elif opt in ("-j", "--jobid"):
            o.jobid = arg
        elif opt in ("-m", "--maildir"):
            o.maildir = arg
        elif opt in ("-s", "--jpps"):
            o.jpps = arg
        elif opt == "--allow-shared-dirs":
            o.allow_shared_dirs = True
    o.files = args
    if not (o.help or o.version):
        if not o.jobid:
            raise getopt.GetoptError("-j JOBID is required")
        if not o.files:
            raise getopt.GetoptError("no files given")
    return o


def usage(stream):
    """Write the help (the module docstring) to `stream`."""
    stream.write(__doc__ % {"prog": PROG, "maildir": DEFAULT_MAILDIR})


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
    # Past a file size limit, let write() fail with EFBIG (a clear error
    # and a clean-up) instead of being killed by the signal.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        upload_files(o.jobid, o.files, o.proxy, o.maildir, o.jpps,
                     o.allow_shared_dirs)
    except UsageError as exc:
        sys.stderr.write("%s: %s\n" % (PROG, exc))
        return 2
    except UploadFilesError as exc:
        sys.stderr.write("%s: %s\n" % (PROG, exc))
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
