"""Named weights: the paper's published files, found in the cache or fetched on first use.

    path = resolve("byol_acdc_backbone_last.pth")    # -> the file in the cache, downloaded if missing
    ok, detail = status("supervised_imagenet")         # looks in the cache only, never downloads

Every weight source of the paper is a name that `--weights`, `--init` and `--checkpoint` accept
(checkpoints.read_checkpoint asks resolve() about any source that is not an existing file):

    name                                      what it is; where it comes from
    byol_acdc_backbone_last.pth               BYOL on ACDC from random initialisation, the backbone alone
    byol-imagenet-acdc-ep=34.ckpt             BYOL on ImageNet, then on ACDC: solo-learn's Lightning file
    byol-imagenet-acdc-ep=25.pth              the same model at epoch 25, a flat state dict
    supervised-imagenet-byol-acdc-ep=25.pth   supervised ImageNet, then BYOL on ACDC, epoch 25
        (these four: models.zip of the paper's v1.0 release, RELEASE below)
    supervised_imagenet                       timm 0.6.12's default resnet50 weights, which the paper's
                                              U-Net loaded: resnet50_a1_0-14fe96d1.pth
    torchvision_imagenet                      torchvision's ResNet50_Weights.IMAGENET1K_V2,
                                              resnet50-11ad3fa6.pth
    resnet50_byol_imagenet2012.pth.tar        BYOL on ImageNet (yaox12/BYOL-PyTorch), on Google Drive: never
                                              downloaded here; the error says where to put it

Files live where torchvision and timm keep theirs, torch.hub.get_dir()/checkpoints (that is
$TORCH_HOME/hub/checkpoints, by default ~/.cache/torch/hub/checkpoints), under their original names.
A file there is used without any network access: on an offline machine, copy the files there.
models.zip is downloaded once, to a temporary file in that folder; its four models are extracted flat
by their base names (a path inside the archive is never used; sizes limited), each to a temporary file
renamed once all four are complete and safe to load, and the archive is then deleted. A models.zip copied
into the folder by hand is extracted from and kept. The two ImageNet files are checked against the start
of the SHA-256 in their names, as torch.hub does. A failed, stalled or killed download leaves nothing
behind (a later fetch removes what SIGKILL left) and says how to get the file by hand.

Environment variables:
    SSL_MEDSEG_MIRROR=URL   fetch URL/models.zip, URL/resnet50_a1_0-14fe96d1.pth and URL/resnet50-11ad3fa6.pth
                            instead of the original addresses (a mirror, or a local server in the tests)
    SSL_MEDSEG_OFFLINE=1    never download: a missing file is an error that says where to copy it
"""
import collections
import contextlib
import hashlib
import os
import posixpath
import re
import shutil
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections import namedtuple

import torch
from tqdm import tqdm

import files

RELEASE = "https://github.com/kaland313/SSL-MedSeg/releases/download/v1.0/models.zip"
DRIVE = "https://drive.google.com/file/d/1TLZHDbV-qQlLjkR8P0LZaxzwEE6O_7g1/view"  # yaox12/BYOL-PyTorch's link
TIMM = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-rsb-weights/"
TORCHVISION = "https://download.pytorch.org/models/"
TIMEOUT = 30  # seconds without a byte before a download gives up (urllib's socket timeout)
WINDOW, MIN_BYTES = 60, 64 << 10  # a download fails when fewer than MIN_BYTES arrived in the last WINDOW seconds
MEMBER_LIMIT, ARCHIVE_LIMIT = 2 << 30, 4 << 30  # bytes unpacked from models.zip (its files are at most 0.5 GB)
STALE = 600  # seconds a temporary file may go without growing before anyone removes it (clusters share the cache)

Source = namedtuple("Source", "file url what")  # the file's original name, where it is published, in words
NAMES = {
    "byol_acdc_backbone_last.pth": Source("byol_acdc_backbone_last.pth", RELEASE,
                                          "BYOL on ACDC from random initialisation, the backbone alone"),
    "byol-imagenet-acdc-ep=34.ckpt": Source("byol-imagenet-acdc-ep=34.ckpt", RELEASE,
                                            "BYOL on ImageNet, then BYOL on ACDC (solo-learn, Lightning)"),
    "byol-imagenet-acdc-ep=25.pth": Source("byol-imagenet-acdc-ep=25.pth", RELEASE,
                                           "BYOL on ImageNet, then BYOL on ACDC, epoch 25 (flat state dict)"),
    "supervised-imagenet-byol-acdc-ep=25.pth": Source("supervised-imagenet-byol-acdc-ep=25.pth", RELEASE,
                                                      "supervised ImageNet, then BYOL on ACDC, epoch 25"),
    "supervised_imagenet": Source("resnet50_a1_0-14fe96d1.pth", TIMM + "resnet50_a1_0-14fe96d1.pth",
                                  "supervised ImageNet: timm 0.6.12's default resnet50, the paper's"),
    "torchvision_imagenet": Source("resnet50-11ad3fa6.pth", TORCHVISION + "resnet50-11ad3fa6.pth",
                                   "supervised ImageNet: torchvision's ResNet50_Weights.IMAGENET1K_V2"),
    "resnet50_byol_imagenet2012.pth.tar": Source("resnet50_byol_imagenet2012.pth.tar", DRIVE,
                                                 "BYOL on ImageNet (yaox12/BYOL-PyTorch), on Google Drive"),
}
RELEASE_FILES = [s.file for s in NAMES.values() if s.url == RELEASE]
HASH = re.compile(r"-([a-f0-9]{8,})\.")  # torch.hub's convention: NAME-<first hex digits of the SHA-256>.EXT


class WeightsError(Exception):
    """a named file that is not here and cannot be fetched; the message says how to get it by hand"""


class DownloadFailed(Exception):
    """why one download failed, in a few words"""


# -----------------------------------------------------------------------------
# names and places

def cache_dir():
    """torch's cache of downloaded weights, shared with torchvision and timm"""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def name_of(source):
    """the key of NAMES that `source` means (the name, its file name, or a path ending in either), or None"""
    base = os.path.basename(str(source).rstrip("/\\"))
    return next((n for n, s in NAMES.items() if base in (n, s.file)), None)


def is_known(source):
    return name_of(source) is not None


def url_of(name):
    """where NAMES[name] is fetched from: its original address, or the mirror's file of the same name"""
    source, mirror = NAMES[name], os.environ.get("SSL_MEDSEG_MIRROR", "").strip()
    if mirror and source.url != DRIVE:
        return mirror.rstrip("/") + "/" + posixpath.basename(source.url)
    return source.url


def by_hand(name):
    """how to put NAMES[name] in the cache without this module: one sentence"""
    source, folder = NAMES[name], cache_dir()
    if source.url == DRIVE:
        return (f"download {source.file} from {DRIVE} (yaox12/BYOL-PyTorch; Google Drive needs a browser) "
                f"and put it in {folder}")
    if source.url == RELEASE:
        return f"put {source.file} (from models.zip of {RELEASE}), or models.zip itself, in {folder}"
    return f"download {source.url} by other means and put {source.file} in {folder}"


def unknown(source):
    return f"{source}: no such file, and not a known name; the known names: {', '.join(NAMES)}"


def offline():
    return os.environ.get("SSL_MEDSEG_OFFLINE", "") not in ("", "0")


def downloadable(source):
    """whether resolve() would fetch this name by itself (not the Google Drive file, not offline)"""
    name = name_of(source)
    return name is not None and NAMES[name].url != DRIVE and not offline()


def status(source):
    """-> (available, detail), looking only, never downloading: detail is the local path, or one line
    saying which file is missing and how to get it"""
    if os.path.isfile(str(source)):
        return True, str(source)
    name = name_of(source)
    if name is None:
        return False, unknown(source)
    path = os.path.join(cache_dir(), NAMES[name].file)
    if os.path.isfile(path):
        return True, path
    archive = os.path.join(cache_dir(), "models.zip")
    if NAMES[name].url == RELEASE and os.path.isfile(archive):
        return True, path  # extracted from the archive on first use
    if NAMES[name].url == DRIVE:
        return False, f"{name}: not in the cache; {by_hand(name)}"
    if offline():
        return False, (f"{name}: not in the cache and downloads are off (SSL_MEDSEG_OFFLINE is set); "
                       f"{by_hand(name)}")
    return False, (f"{name}: not in the cache yet; fetched on first use from {url_of(name)}, "
                   f"or {by_hand(name)}")


# -----------------------------------------------------------------------------
# resolving a name to a file

def resolve(source, download=True, check=lambda path, name: None):
    """a path or a known name -> a local file: an existing path as it is; a known name (or a missing
    path whose base name is one) -> its file in the cache, fetched first where it is missing and
    download is True. Prints where a named file came from; raises WeightsError, in one line. Before a new file
    takes its name, check(path, name) raises DownloadFailed unless it may (checkpoints.py's safe loader)."""
    if os.path.isfile(str(source)):
        return str(source)
    if os.path.isdir(str(source)):
        raise WeightsError(f"{source}: a folder, not a checkpoint file")
    name = name_of(source)
    if name is None:
        raise WeightsError(unknown(source))
    entry, folder = NAMES[name], cache_dir()
    path = os.path.join(folder, entry.file)
    if os.path.isfile(path):
        print(f"{source}: {path} (from the cache)")
        return path
    remove_temporaries(folder)
    archive = os.path.join(folder, "models.zip")
    if entry.url == RELEASE and os.path.isfile(archive):  # put there by hand: extract, keep it
        try:
            with cleaned_up(folder):
                extract(archive, folder, check)
        except DownloadFailed as e:
            raise WeightsError(f"{source}: {archive}: {e}; remove it, or {by_hand(name)}") from None
        print(f"{source}: {path} (extracted from {archive})")
        return path
    if entry.url == DRIVE:
        raise WeightsError(f"{source}: not in the cache; {by_hand(name)}")
    if offline() or not download:
        why = "SSL_MEDSEG_OFFLINE is set" if download else "this only looks in the cache"
        raise WeightsError(f"{source}: not in the cache and downloads are off ({why}); {by_hand(name)}")

    url = url_of(name)
    print(f"{source}: downloading {url} into {folder} (once: later runs use that copy)")
    try:
        os.makedirs(folder, exist_ok=True)
        with cleaned_up(folder):
            tmp = temporary(folder, posixpath.basename(url))
            digest = fetch(url, tmp)
            if entry.url == RELEASE:
                extract(tmp, folder, check)
            else:
                expected = HASH.search(entry.file).group(1)
                if not digest.startswith(expected):
                    raise DownloadFailed(f"SHA-256 {digest[:12]}... does not start with {expected}, its name's")
                check(tmp, entry.file)
                os.replace(tmp, path)
    except (DownloadFailed, OSError) as e:  # OSError: the cache folder cannot be written
        why = e if isinstance(e, DownloadFailed) else f"{type(e).__name__}: {e}"
        why = " ".join(str(why).split())  # one line, whatever the reason (urllib's redirect loop spans three)
        raise WeightsError(f"{source}: download of {url} failed ({why}); {by_hand(name)}") from None
    return path


def fetch(url, dest):
    """url -> the file dest, with a progress bar; -> its SHA-256 (hex). Raises DownloadFailed."""
    request = urllib.request.Request(url, headers={"User-Agent": "ssl-medseg"})
    sha, size = hashlib.sha256(), 0
    marks = collections.deque([(time.monotonic(), 0)])  # (time, bytes so far): the start, then recent reads
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response, open(dest, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0)
            with tqdm(total=total or None, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                      desc=posixpath.basename(url), dynamic_ncols=True) as bar:
                while chunk := response.read1(1 << 20):  # what has arrived, at once: every read is checked
                    f.write(chunk)
                    sha.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
                    check_rate(marks, size)
    except urllib.error.HTTPError as e:
        raise DownloadFailed(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:  # no network, no such host, refused, no answer
        timed_out = isinstance(e.reason, TimeoutError)
        raise DownloadFailed(f"no answer in {TIMEOUT} s" if timed_out else str(e.reason)) from None
    except TimeoutError:
        raise DownloadFailed(f"no data for {TIMEOUT} s") from None
    except DownloadFailed:
        raise
    except Exception as e:  # a dropped connection, a malformed response, a full disk
        raise DownloadFailed(f"{type(e).__name__}: {e}") from None
    if total and size != total:
        raise DownloadFailed(f"truncated: {size} of {total} bytes arrived")
    return sha.hexdigest()


def check_rate(marks, size):
    """raise DownloadFailed when fewer than MIN_BYTES arrived in the last WINDOW s (a byte now and then
    resets the socket's timeout). marks: (time, bytes so far) of the start and earlier reads, oldest first"""
    now = time.monotonic()
    while len(marks) > 1 and marks[1][0] <= now - WINDOW:  # the newest mark at least WINDOW s old is enough
        marks.popleft()
    if marks[0][0] <= now - WINDOW and size - marks[0][1] < MIN_BYTES:
        raise DownloadFailed(f"too slow: {size} bytes received, fewer than {MIN_BYTES} in the last {WINDOW} s; "
                             f"try again later")
    if now - marks[-1][0] >= WINDOW / 100:  # enough marks for a window 1% too long at most
        marks.append((now, size))


def extract(archive, folder, check):
    """the release's four models out of the zip archive, flat into folder by their base names; all four
    or none (each goes to a temporary file first: the caller's cleaned_up() removes them) and each
    accepted by check (see resolve). Raises DownloadFailed."""
    try:
        with zipfile.ZipFile(archive) as z:
            # by base name only: a path inside the archive never decides where a file goes
            members = {posixpath.basename(i.filename): i for i in z.infolist() if not i.is_dir()}
            if missing := [file for file in RELEASE_FILES if file not in members]:
                raise DownloadFailed(f"the archive holds no models/{missing[0]}")
            # zipfile stops a member at its declared size (then fails its CRC): limits on those bound a zip bomb
            sizes = [members[file].file_size for file in RELEASE_FILES]
            if max(sizes) > MEMBER_LIMIT or sum(sizes) > ARCHIVE_LIMIT:
                raise DownloadFailed(f"its models would unpack to {sum(sizes)} bytes, {max(sizes)} the largest (at "
                                     f"most {MEMBER_LIMIT} a file, {ARCHIVE_LIMIT} in all): not the release")
            for file in RELEASE_FILES:
                with z.open(members[file]) as src, open(temporary(folder, file), "wb") as dst:  # CRC checked
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise DownloadFailed(f"not a valid zip archive: {e}") from None
    for file in RELEASE_FILES:  # all four accepted before any takes its name
        check(temporary(folder, file), file)
    for file in RELEASE_FILES:
        os.replace(temporary(folder, file), os.path.join(folder, file))


# -----------------------------------------------------------------------------
# temporary files: removed however a fetch ends, and by a later fetch where that could not be done

def temporary(folder, name):
    """the temporary file for `name` in folder: .tmp<host>.<pid>.<name>, which says whose it is"""
    return os.path.join(folder, f".tmp{socket.gethostname()}.{os.getpid()}.{name}")


@contextlib.contextmanager
def cleaned_up(folder):
    """this process's temporary files in folder are removed when the block ends, however it ends (Ctrl-C
    included). Meanwhile SIGTERM, whose default action would end the process at once, removes them first"""
    def die(signum, frame):
        remove_temporaries(folder, mine=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # the end SIGTERM would have brought, exit status included
    main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    default = main and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if default:
        signal.signal(signal.SIGTERM, die)
    try:
        yield
    finally:
        if default:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        remove_temporaries(folder, mine=True)


def remove_temporaries(folder, mine=False):
    """remove this process's temporary files in folder (mine=True), or those that fetches ended beyond
    help (SIGKILL, a lost node) left: this host's whose process is gone, any host's not grown for STALE s"""
    ours, ends = f".tmp{socket.gethostname()}.", tuple(f".{s.file}" for s in NAMES.values()) + (".models.zip",)
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if not name.startswith(".tmp") or not name.endswith(ends):  # not a fetch's
            continue
        pid = name.removeprefix(ours).split(".")[0] if name.startswith(ours) else ""  # "": another host's
        path, dead = os.path.join(folder, name), pid.isdigit() and files.process_gone(int(pid))
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile, by its process or another fetch
            if (pid == str(os.getpid())) if mine else (dead or time.time() - os.path.getmtime(path) > STALE):
                os.remove(path)

