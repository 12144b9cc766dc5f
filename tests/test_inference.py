"""inference.py: padding and cropping, slice and volume prediction, loading a fine-tuned model."""
import numpy as np
import torch

import acdc
import inference
import unet
from inference import crop_to, pad_to


def test_pad_and_crop_round_trip():
    x = torch.randn(2, 1, 50, 70)
    padded, hw = pad_to(x, 32)
    assert padded.shape == (2, 1, 64, 96) and hw == (50, 70)
    assert torch.equal(padded[..., :50, :70], x) and padded[..., 50:, :].abs().sum() == 0  # top-left
    assert torch.equal(crop_to(padded, hw), x)
    assert pad_to(x, 32, min_size=224)[0].shape == (2, 1, 224, 224)
    labels = torch.randint(0, 4, (2, 64, 64))
    assert torch.equal(pad_to(labels, 32)[0], labels)  # already a multiple: unchanged


class Threshold(torch.nn.Module):
    """a stand-in model: LV (3) wherever the normalised intensity is above 0, background elsewhere"""

    def forward(self, x):  # (B, 1, H, W) -> (B, 4, H, W)
        never = torch.full_like(x, -1e9)
        return torch.cat([-x, never, never, x], 1)


def test_predict_volume_keeps_orientation_and_crops_padding():
    volume = np.random.default_rng(0).uniform(0, 150, size=(40, 50, 3)).astype(np.float32)  # X, Y, Z
    pred = inference.predict_volume(Threshold(), volume, "cpu", batch_size=2)  # padded to 224 x 224, cropped back
    assert pred.shape == (40, 50, 3) and pred.dtype == torch.uint8
    expected = np.where(acdc.normalize(volume) > 0, 3, 0)
    assert np.array_equal(pred.numpy(), expected)


def test_load_model_reads_the_papers_lightning_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = unet.UNet(arch="resnet18").eval()
    # the paper's fine-tuned checkpoints: Lightning, the U-Net as `model.`, timm's encoder as `encoder.model.`,
    # no architecture field
    state = {"model." + k.replace("encoder.", "encoder.model.", 1): v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "paper.ckpt")
    loaded, norm = inference.load_model(str(tmp_path / "paper.ckpt"), torch.device("cpu"))
    assert norm[:2] == (255 * acdc.MEAN, 255 * acdc.STD)  # albumentations' Normalize, max_pixel_value 255
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)  # loaded in channels_last: same values
