"""Tests for weights.py: named weights served by a local HTTP server on 127.0.0.1 (SSL_MEDSEG_MIRROR),
cached under $TORCH_HOME/hub/checkpoints, refused when damaged with nothing left behind; never the internet.
Run: python -m pytest tests/test_weights.py"""
import hashlib
import http.server
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from types import SimpleNamespace

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import resnet  # noqa: E402
import weights  # noqa: E402
from checkpoints import CheckpointError, load_backbone, load_weights, read_checkpoint  # noqa: E402
from test_checkpoints import System, save_as  # noqa: E402
from unet import UNet  # noqa: E402


def backbone(in_chans, fc=False, marker=1.0):
    """a resnet18 state dict with real names and shapes: zeros (an archive of them is tiny), conv1 = marker"""
    with torch.device("meta"):
        model = resnet.resnet18(in_chans, num_classes=1000 if fc else 0)
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}
    state["conv1.weight"] = torch.full(state["conv1.weight"].shape, marker)
    return state


def saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def release():
    """models.zip as the paper's v1.0 release lays it out: models/<name>, each file in its layout"""
    target = backbone(1, marker=2.0)
    online = {**target, "conv1.weight": torch.full((64, 1, 7, 7), 5.0)}  # shared tensors are saved once
    solo = {**{"backbone." + k: v for k, v in online.items()}, **{"momentum_backbone." + k: v for k, v in target.items()}}
    files = {"byol_acdc_backbone_last.pth": target, "byol-imagenet-acdc-ep=34.ckpt": {"state_dict": solo, "epoch": 34},
             "byol-imagenet-acdc-ep=25.pth": solo, "supervised-imagenet-byol-acdc-ep=25.pth": solo}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("models/", "")  # a folder entry, as zip tools write one
        for name, obj in files.items():
            z.writestr("models/" + name, saved(obj))
    return buf.getvalue()


@pytest.fixture
def server(monkeypatch, tmp_path):
    """a local server for SSL_MEDSEG_MIRROR: files (name -> bytes), cut (names sent half, their full length
    announced), slow (name -> how many bytes are sent at once before the rest trickles, a byte every 0.03 s),
    loops (names redirected to themselves), hits (paths asked for); the cache in tmp_path"""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("SSL_MEDSEG_OFFLINE", raising=False)
    files, cut, slow, loops, hits = {}, set(), {}, set(), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            name = self.path.rsplit("/", 1)[-1]
            if name in loops:
                self.send_response(302)
                self.send_header("Location", self.path)
                return self.end_headers()
            if name not in files:
                return self.send_error(404)
            self.send_response(200)
            self.send_header("Content-Length", str(len(files[name])))
            self.end_headers()
            if name in slow:
                return self.trickle(files[name], slow[name])
            self.wfile.write(files[name][:len(files[name]) // 2] if name in cut else files[name])

        def trickle(self, data, burst):
            try:
                self.wfile.write(data[:burst])
                for i in range(burst, len(data)):
                    time.sleep(0.03)
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
            except OSError:  # the client gave up
                pass

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    mirror = f"http://127.0.0.1:{httpd.server_port}/files"
    monkeypatch.setenv("SSL_MEDSEG_MIRROR", mirror)

    def stop():
        httpd.shutdown()
        httpd.server_close()
    yield SimpleNamespace(files=files, cut=cut, slow=slow, loops=loops, hits=hits, mirror=mirror, stop=stop,
                          cache=os.path.join(str(tmp_path / "torch"), "hub", "checkpoints"))
    if httpd.socket.fileno() != -1:
        stop()


def cached(server):
    return sorted(os.listdir(server.cache)) if os.path.isdir(server.cache) else []


def test_first_use_downloads_then_the_cache_serves_without_network(server, release, capsys):
    server.files["models.zip"] = release
    assert weights.status("byol_acdc_backbone_last.pth")[0] is False
    state = load_backbone("byol_acdc_backbone_last.pth")
    assert torch.equal(state["conv1.weight"], torch.full((64, 1, 7, 7), 2.0))
    out, err = capsys.readouterr()
    assert out.startswith(f"byol_acdc_backbone_last.pth: downloading {server.mirror}/models.zip into {server.cache}")
    assert "models.zip" in err and "100%" in err  # the progress bar
    assert cached(server) == sorted(weights.RELEASE_FILES)  # the four, flat; no archive, no temporary file
    assert server.hits == ["/files/models.zip"]

    server.stop()
    for source in ("byol-imagenet-acdc-ep=34.ckpt", "elsewhere/byol-imagenet-acdc-ep=25.pth"):
        state = load_backbone(source, branch="online")
        assert torch.equal(state["conv1.weight"], torch.full((64, 1, 7, 7), 5.0))
        out = capsys.readouterr().out
        path = os.path.join(server.cache, os.path.basename(source))
        assert out.startswith(f"{source}: {path} (from the cache)\nloaded resnet18 backbone 'backbone.*'")
    assert weights.status("supervised-imagenet-byol-acdc-ep=25.pth") == (
        True, os.path.join(server.cache, "supervised-imagenet-byol-acdc-ep=25.pth"))


def test_imagenet_files_are_checked_against_the_hash_in_their_names(server, monkeypatch, capsys):
    data = saved(backbone(3, fc=True))  # torchvision's and timm's layout: 3-channel conv1, fc
    sha = hashlib.sha256(data).hexdigest()
    name = f"resnet18_test-{sha[:8]}.pth"
    monkeypatch.setitem(weights.NAMES, "supervised_imagenet", weights.Source(name, "https://example.org/" + name, ""))
    server.files[name] = data
    state = load_backbone("supervised_imagenet")
    assert torch.equal(state["conv1.weight"], torch.full((64, 1, 7, 7), 3.0))  # summed over RGB
    assert "conv1 3 -> 1 channels (summed)" in capsys.readouterr().out

    server.files["resnet50-11ad3fa6.pth"] = data  # under torchvision's name, whose hash it does not have
    with pytest.raises(CheckpointError) as err:
        read_checkpoint("torchvision_imagenet", flag="--weights")
    assert str(err.value) == (
        f"--weights torchvision_imagenet: download of {server.mirror}/resnet50-11ad3fa6.pth failed (SHA-256 "
        f"{sha[:12]}... does not start with 11ad3fa6, its name's); download "
        f"https://download.pytorch.org/models/resnet50-11ad3fa6.pth by other means and put resnet50-11ad3fa6.pth "
        f"in {server.cache}")
    assert cached(server) == [name]


def damaged(release):
    """the archive with a byte of its last model's compressed data flipped"""
    with zipfile.ZipFile(io.BytesIO(release)) as z:
        info = z.getinfo("models/supervised-imagenet-byol-acdc-ep=25.pth")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)  # 30: the local header's fixed part
    data = bytearray(release)
    data[start + info.compress_size // 2] ^= 0xFF
    return bytes(data)


def test_failed_downloads_say_why_and_leave_nothing_behind(server, release, monkeypatch):
    hand = f"put byol_acdc_backbone_last.pth (from models.zip of {weights.RELEASE}), or models.zip itself, in "
    cases = {"damaged": ("not a valid zip archive: ", damaged(release)),
             "truncated file": ("not a valid zip archive: File is not a zip file", release[:len(release) // 2]),
             "cut connection": (f"truncated: {len(release) // 2} of {len(release)} bytes arrived", release),
             "missing": ("HTTP 404 Not Found", None)}
    for case, (reason, data) in cases.items():
        server.files.pop("models.zip", None)
        if data is not None:
            server.files["models.zip"] = data
        if case == "cut connection":
            server.cut.add("models.zip")
        with pytest.raises(CheckpointError) as err:
            load_backbone("byol_acdc_backbone_last.pth", flag="--weights")
        message = str(err.value)
        assert message.startswith(f"--weights byol_acdc_backbone_last.pth: download of {server.mirror}/models.zip "
                                  f"failed ({reason}"), case
        assert message.endswith(hand + server.cache) and "\n" not in message, case
        assert cached(server) == [], case
    # no answer at all: a socket that accepts and never replies, with a short timeout
    silent = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setattr(weights, "TIMEOUT", 0.5)
    monkeypatch.setenv("SSL_MEDSEG_MIRROR", f"http://127.0.0.1:{silent.getsockname()[1]}")
    with pytest.raises(CheckpointError, match=r"failed \(no data for 0.5 s\)"):
        read_checkpoint("byol_acdc_backbone_last.pth")
    silent.close()
    assert cached(server) == []


def test_google_drive_file_is_never_downloaded(server):
    name = "resnet50_byol_imagenet2012.pth.tar"
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(name, flag="--weights")
    assert str(err.value) == (f"--weights {name}: not in the cache; download {name} from {weights.DRIVE} "
                              f"(yaox12/BYOL-PyTorch; Google Drive needs a browser) and put it in {server.cache}")
    assert server.hits == [] and weights.status(name) == (False, str(err.value).removeprefix("--weights "))
    os.makedirs(server.cache)  # the user puts it there: yaox12's layout loads
    torch.save({"online_backbone": backbone(3), "target_backbone": backbone(3, marker=4.0)}, f"{server.cache}/{name}")
    assert torch.equal(load_backbone(name)["conv1.weight"], torch.full((64, 1, 7, 7), 12.0))


def test_offline_mode_never_downloads(server, release, monkeypatch):
    monkeypatch.setenv("SSL_MEDSEG_OFFLINE", "1")
    server.files["models.zip"] = release
    with pytest.raises(CheckpointError) as err:
        read_checkpoint("byol_acdc_backbone_last.pth")
    assert str(err.value) == (
        f"byol_acdc_backbone_last.pth: not in the cache and downloads are off (SSL_MEDSEG_OFFLINE is set); put "
        f"byol_acdc_backbone_last.pth (from models.zip of {weights.RELEASE}), or models.zip itself, in {server.cache}")
    with pytest.raises(weights.WeightsError, match="supervised_imagenet: not in the cache and downloads are off"):
        weights.resolve("supervised_imagenet")
    monkeypatch.delenv("SSL_MEDSEG_OFFLINE")
    with pytest.raises(weights.WeightsError, match=r"downloads are off \(this only looks in the cache\)"):
        weights.resolve("torchvision_imagenet", download=False)
    assert server.hits == []
    # a models.zip copied into the cache is extracted from, without any network, and kept
    monkeypatch.setenv("SSL_MEDSEG_OFFLINE", "1")
    os.makedirs(server.cache)
    with open(os.path.join(server.cache, "models.zip"), "wb") as f:
        f.write(release)
    assert weights.status("byol-imagenet-acdc-ep=34.ckpt")[0]
    assert weights.resolve("byol-imagenet-acdc-ep=34.ckpt") == os.path.join(server.cache, "byol-imagenet-acdc-ep=34.ckpt")
    assert cached(server) == sorted(weights.RELEASE_FILES + ["models.zip"]) and server.hits == []


def test_unknown_names_list_the_known_ones(server):
    with pytest.raises(CheckpointError) as err:
        read_checkpoint("byol_acdc_backbone.pth", flag="--weights")
    assert str(err.value) == ("--weights byol_acdc_backbone.pth: no such file, and not a known name; the known names: "
                              + ", ".join(weights.NAMES))
    assert weights.status("byol_acdc_backbone.pth") == (False, str(err.value).removeprefix("--weights "))
    assert weights.is_known("supervised_imagenet") and weights.is_known("/any/where/resnet50-11ad3fa6.pth")
    assert not weights.is_known("byol_acdc_backbone.pth") and server.hits == []



def test_fine_tuning_starts_from_the_papers_backbone_by_name(server, release, capsys):
    """the call train_segment.py --weights NAME makes"""
    server.files["models.zip"] = release
    net = UNet(arch="resnet18")
    assert load_weights(net, "byol_acdc_backbone_last.pth", flag="--weights") == (
        "the encoder from byol_acdc_backbone_last.pth; decoder and head start from random weights")
    assert torch.equal(net.encoder.conv1.weight, torch.full((64, 1, 7, 7), 2.0))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("byol_acdc_backbone_last.pth: downloading") and len(out) == 2
    assert out[1].startswith("loaded resnet18 backbone (ResNet, state dict) from byol_acdc_backbone_last.pth")


# -----------------------------------------------------------------------------
# archives that would fill the disk, files the safe loader refuses, servers that hang or loop

def archive_of(members=None, **replaced):
    """a zip archive of models/<name> for each (name, bytes) of members -> bytes; by default the release's
    four names, each a tiny state dict"""
    members = {**(members or {name: saved({"w": torch.zeros(2)}) for name in weights.RELEASE_FILES}), **replaced}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr("models/" + name, data)
    return buf.getvalue()


def test_zip_bombs_are_refused_before_writing_and_leave_nothing(server, monkeypatch):
    monkeypatch.setattr(weights, "MEMBER_LIMIT", 1 << 20)
    monkeypatch.setattr(weights, "ARCHIVE_LIMIT", 3 << 20)
    big, fine = bytes(2 << 20), bytes(900 << 10)  # zeros: a few kB compressed
    cases = {"a member over the limit": (archive_of(**{"byol-imagenet-acdc-ep=25.pth": big}), f"{2 << 20} the largest"),
             "the four over the total": (archive_of(dict.fromkeys(weights.RELEASE_FILES, fine)),
                                         f"unpack to {4 * (900 << 10)} bytes")}
    for case, (archive, says) in cases.items():
        server.files["models.zip"] = archive
        with pytest.raises(CheckpointError) as err:
            read_checkpoint("byol_acdc_backbone_last.pth")
        assert says in str(err.value) and f"at most {1 << 20} a file, {3 << 20} in all" in str(err.value), case
        assert cached(server) == [], case
    # a central directory that declares less than a member holds: zipfile stops at the declared size, and
    # the CRC refuses it
    data = bytearray(archive_of(**{"byol-imagenet-acdc-ep=25.pth": big}))
    entry = data.index(b"PK\x01\x02")  # the central directory's first entry, then the next ones
    while not data[entry + 46:].startswith(b"models/byol-imagenet-acdc-ep=25.pth"):
        entry = data.index(b"PK\x01\x02", entry + 4)
    data[entry + 24:entry + 28] = (1000).to_bytes(4, "little")  # its uncompressed size
    server.files["models.zip"] = bytes(data)
    with pytest.raises(CheckpointError, match="not a valid zip archive: Bad CRC-32"):
        read_checkpoint("byol_acdc_backbone_last.pth")
    assert cached(server) == []


class AttributeDict(dict):
    """Lightning's hyper-parameters, as a .ckpt keeps them"""


def test_a_file_takes_its_name_only_once_the_safe_loader_reads_it(server, tmp_path, monkeypatch):
    evil = saved({"conv1.weight": torch.zeros(1), "payload": System()})
    server.files["models.zip"] = archive_of(**{"supervised-imagenet-byol-acdc-ep=25.pth": evil})
    with pytest.raises(CheckpointError) as err:
        read_checkpoint("byol_acdc_backbone_last.pth")  # a good file, of an archive with a bad one
    assert "failed (supervised-imagenet-byol-acdc-ep=25.pth: holds objects that the safe loader" in str(err.value)
    assert f"(the first: {os.system.__module__}.system)" in str(err.value) and cached(server) == []
    name = f"resnet18_test-{hashlib.sha256(evil).hexdigest()[:8]}.pth"  # its hash is right: the loader decides
    monkeypatch.setitem(weights.NAMES, "supervised_imagenet", weights.Source(name, "https://example.org/" + name, ""))
    server.files[name] = evil
    with pytest.raises(CheckpointError, match=f"failed \\({name}: holds objects that the safe loader"):
        read_checkpoint("supervised_imagenet")
    assert cached(server) == []
    # Lightning's objects are read by the stand-ins: a .ckpt with its hyper-parameters is accepted
    ckpt = tmp_path / "ep34.ckpt"
    save_as({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": AttributeDict(lr=1.0)}, ckpt,
            (AttributeDict, "pytorch_lightning.utilities.parsing.AttributeDict"))
    server.files["models.zip"] = archive_of(**{"byol-imagenet-acdc-ep=34.ckpt": ckpt.read_bytes()})
    assert read_checkpoint("byol-imagenet-acdc-ep=34.ckpt")["hyper_parameters"] == {"lr": 1.0}
    assert cached(server) == sorted(weights.RELEASE_FILES)


def test_a_slow_server_fails_once_a_window_brings_too_little(server, monkeypatch):
    """fewer than MIN_BYTES in the last WINDOW s: from the start (a trickle), or later (a burst, then a trickle)"""
    monkeypatch.setattr(weights, "WINDOW", 0.3)
    monkeypatch.setattr(weights, "MIN_BYTES", 64)
    server.files["models.zip"] = bytes(300)  # a trickle of 10 bytes in a window, for 9 s
    for burst in (0, 100):
        server.slow["models.zip"] = burst
        start = time.monotonic()
        with pytest.raises(CheckpointError) as err:
            read_checkpoint("byol_acdc_backbone_last.pth")
        assert 0.3 <= time.monotonic() - start < 1.5, burst
        message = str(err.value)
        assert message.startswith(f"byol_acdc_backbone_last.pth: download of {server.mirror}/models.zip failed (too "
                                  f"slow: "), burst
        received = int(message.split("too slow: ")[1].split(" ")[0])
        assert burst < received < burst + 20 and "bytes received, fewer than 64 in the last 0.3 s; try again later)" \
            in message and "\n" not in message, burst
        assert cached(server) == [], burst


def test_a_redirect_loop_is_told_in_one_line(server):
    server.loops.add("models.zip")
    with pytest.raises(CheckpointError) as err:
        read_checkpoint("byol_acdc_backbone_last.pth")
    assert f"download of {server.mirror}/models.zip failed (HTTP 302 " in str(err.value)
    assert "infinite loop" in str(err.value) and "\n" not in str(err.value) and cached(server) == []


def test_sigterm_during_a_download_removes_its_temporary_file(server):
    server.files["models.zip"], server.slow["models.zip"] = archive_of(), 10  # a trickle: the download lasts
    child = subprocess.Popen([sys.executable, "-c", "import weights; weights.resolve('byol_acdc_backbone_last.pth')"],
                             cwd=os.path.dirname(HERE), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    temporary = f".tmp{socket.gethostname()}.{child.pid}.models.zip"
    deadline = time.monotonic() + 20
    while cached(server) != [temporary] and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    assert cached(server) == [temporary]
    child.send_signal(signal.SIGTERM)
    assert child.wait(10) == -signal.SIGTERM and cached(server) == []


def test_ctrl_c_removes_the_temporary_file(server, monkeypatch):
    data = saved({"w": torch.zeros(2)})
    name = f"resnet18_test-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    monkeypatch.setitem(weights.NAMES, "supervised_imagenet", weights.Source(name, "https://example.org/" + name, ""))
    server.files[name] = data

    def interrupted(path, file):  # Ctrl-C once the file is complete, before it takes its name
        assert path == os.path.join(server.cache, f".tmp{socket.gethostname()}.{os.getpid()}.{name}")
        assert cached(server) == [os.path.basename(path)]
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        weights.resolve("supervised_imagenet", check=interrupted)
    assert cached(server) == []


def test_a_later_fetch_removes_the_temporary_files_of_dead_fetches(server):
    """this host's whose process is gone; any host's (the cache may be shared) that have not grown for 10 minutes"""
    server.files["models.zip"] = archive_of()
    host, finished = socket.gethostname(), subprocess.Popen([sys.executable, "-c", ""])
    finished.wait()
    os.makedirs(server.cache)
    left = {f".tmp{host}.{finished.pid}.models.zip": 0, f".tmpother.{finished.pid}.models.zip": 0,
            f".tmp{host}.{os.getppid()}.models.zip": 0, ".tmpother.42.byol_acdc_backbone_last.pth": 601,
            f".tmp{host}.{os.getppid()}.byol-imagenet-acdc-ep=34.ckpt": 599, ".tmp42.models.zip": 601,
            ".tmpother.42.notes.txt": 601}
    for name, age in left.items():
        open(os.path.join(server.cache, name), "w").close()
        os.utime(os.path.join(server.cache, name), (time.time() - age,) * 2)
    read_checkpoint("byol_acdc_backbone_last.pth")
    kept = [f".tmpother.{finished.pid}.models.zip", f".tmp{host}.{os.getppid()}.models.zip",
            f".tmp{host}.{os.getppid()}.byol-imagenet-acdc-ep=34.ckpt", ".tmpother.42.notes.txt"]
    assert cached(server) == sorted(weights.RELEASE_FILES + kept)
