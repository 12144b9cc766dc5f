"""precision.py: autocast, TF32 as --amp and --tf32 set it, each script's defaults, what TF32 would cost the
stem at the paper's input scale, and a U-Net that torch.compile captures as one graph."""
import torch
import torch.nn.functional as F

import bench
import evaluate
import normalisation
import precision
import predict
import train_pretrain
import train_segment
from resnet import resnet18
from unet import UNet

CPU = torch.device("cpu")


def test_autocast_off_on_cpu_by_default():
    ctx, scaler, amp = precision.autocast(CPU, "auto")
    assert amp == "off" and not scaler.is_enabled() and precision.name(CPU, amp) == "fp32"
    ctx, scaler, amp = precision.autocast(CPU, "bf16")
    with ctx():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16 and not scaler.is_enabled() and precision.name(CPU, amp) == "bf16"


def test_tf32_is_set_for_the_process_by_amp_and_tf32(capsys):
    expected = {("off", "auto"): (True, False), ("off", "on"): (True, True), ("off", "off"): (False, False),
                ("bf16", "auto"): (False, False), ("fp16", "off"): (False, False), ("bf16", "on"): (False, False)}
    for (amp, tf32), (conv, matmul) in expected.items():
        precision.set_tf32(not conv, not matmul)  # what an earlier run in this process left: not inherited
        precision.autocast(CPU, amp, tf32)
        assert precision.tf32_state() == {"convolutions": conv, "matmuls": matmul}, (amp, tf32)
        notice = capsys.readouterr().out
        assert ("--tf32 on is ignored under --amp bf16" in notice) is ((amp, tf32) == ("bf16", "on"))
    precision.set_tf32(True, False)  # PyTorch's defaults, for the tests that follow


def test_each_script_has_its_precision_defaults():
    # evaluation and prediction in IEEE fp32, as the paper scored; training and bench as fast as it goes
    assert vars(evaluate.parse_args(["--checkpoint", "x", "--data", "d"])).items() >= {"amp": "off", "tf32": "off"}.items()
    assert vars(predict.parse_args(["--checkpoint", "x", "-i", "x", "-o", "y"])).items() >= {
        "amp": "off", "tf32": "off"}.items()
    for args in (train_segment.parse_args(["--data", "d"]), train_pretrain.parse_args(["--data", "d"]),
                 bench.parse_args(["segment"])):
        assert (args.amp, args.tf32) == ("auto", "auto")


def tf32(x):
    """x rounded to TF32's 10-bit mantissa (to nearest): what a TF32 convolution reads of an fp32 tensor"""
    return ((x.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


def test_tf32_would_cost_the_stem_its_grey_levels_at_the_paper_scale():
    grey = torch.arange(1001.0)
    assert tf32(normalisation.normalize(grey, *normalisation.paper_scale())).unique().numel() == 95
    assert tf32(normalisation.normalize(grey, *normalisation.PUBLISHED)).unique().numel() == 1001
    torch.manual_seed(0)
    weight, raw = resnet18(in_chans=1).conv1.weight.detach(), 1000 * torch.rand(4, 1, 32, 32)
    errors = []
    for scale in (normalisation.paper_scale(), normalisation.PUBLISHED):
        x = normalisation.normalize(raw, *scale)
        # inside the 2-pixel border ring (zero padding): what bn1's batch statistics leave of conv1's output
        exact = F.conv2d(x.double(), weight.double(), stride=2, padding=3)[..., 2:-2, 2:-2]
        rounded = F.conv2d(tf32(x), tf32(weight), stride=2, padding=3)[..., 2:-2, 2:-2]
        errors.append(((rounded - exact).std() / (exact - exact.mean((0, 2, 3), keepdim=True)).std()).item())
    assert errors[0] > 0.01 and errors[1] < 0.001  # 1.4% of the signal at the paper's scale, 0.05% at ours


def test_the_unet_compiles_as_one_graph_under_autocast():
    # the stem's switch to fp32 is torch.autocast inside forward, which dynamo captures; no break
    model = UNet(in_chans=1, num_classes=4, arch="resnet18").eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(torch.randn(1, 1, 32, 32))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
