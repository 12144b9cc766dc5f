"""pictures.py: the PNG encoder against torchvision's decoder, overlays, labelled slice tiles, and the SVG writer."""
import pytest
import torch
import torchvision

import pictures


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_png_bytes_decode():
    image = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    data = pictures.png_bytes(image)
    assert torch.equal(torchvision.io.decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8)), image)


def test_overlay_colours_only_the_structures():
    gray = torch.full((2, 2), 100.0)
    labels = torch.tensor([[0, 1], [2, 3]])
    rgb = pictures.overlay(gray, labels, alpha=0.5)
    assert torch.equal(rgb[:, 0, 0], torch.full((3,), 100.0))  # background stays grey
    assert torch.allclose(rgb[:, 0, 1], 0.5 * 100 + 0.5 * pictures.COLOURS[1])


def test_nice_and_log_ticks():
    assert pictures.nice_ticks(0.03, 0.91) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert pictures.log_ticks(0.001, 1.0) == [0.001, 0.01, 0.1, 1]
    assert pictures.log_ticks(0.01, 0.5) == [0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
    assert pictures.log_ticks(1, 100000) == [1, 10, 100, 1000, 10000, 100000]


def test_chart_svg_is_xml_with_one_series_per_line(tmp_path):
    import xml.etree.ElementTree as ET
    chart = pictures.Chart("test IoU <phantom>", "label fraction", "IoU", xlog=True)
    chart.line([0.01, 0.1, 1.0], [0.3, 0.6, float("nan")], "none", band=([0.2, 0.5, 0.7], [0.4, 0.7, 0.9]))
    chart.line([0.01, 0.1, 1.0], [0.5, 0.7, 0.8], "BYOL & ACDC")
    chart.mark(0.1, "ED")
    path = tmp_path / "c.svg"
    pictures.write_svg(str(path), [chart, pictures.Chart("empty", "x", "y")])
    root = ET.parse(path).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    series = root.findall(f".//{ns}polyline[@class='series']")
    assert [s.get("data-name") for s in series] == ["none", "BYOL & ACDC"]
    assert len(series[0].get("points").split()) == 2  # the nan point is a gap
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert "test IoU <phantom>" in texts and "0.01" in texts and "label fraction (log scale)" in texts
    assert len(root.findall(f".//{ns}polygon")) == 1  # the band


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tiles_embed_png_pictures_with_text(tmp_path):
    import base64
    import xml.etree.ElementTree as ET
    tile = torch.randint(0, 256, (3, 20, 10), dtype=torch.uint8)
    panel = pictures.Tiles([[tile, tile], [tile, tile]], title="patient 1", captions=["ED: Dice LV 0.91", "ES"],
                           tile=40, columns=["slice 2 of 9", "slice 5 of 9"], subtitle="EF LV 61 %")
    pictures.write_svg(str(tmp_path / "t.svg"), [panel])
    root = ET.parse(tmp_path / "t.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    images = root.findall(f".//{ns}image")
    assert len(images) == 4
    data = base64.b64decode(images[0].get("href").split(",", 1)[1])
    decoded = torchvision.io.decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    assert decoded.shape == (3, 40, 40)
    texts = {t.text: t for t in root.iter(f"{ns}text")}
    assert {"patient 1", "EF LV 61 %", "ED: Dice LV 0.91", "ES", "RV", "MYO", "LV"} <= set(texts)
    # each column label centred above its column, the legend below the subtitle, every text above its tiles
    column = texts["slice 5 of 9"]
    assert float(column.get("x")) == float(images[1].get("x")) + 20 and column.get("text-anchor") == "middle"
    assert float(texts["EF LV 61 %"].get("y")) < float(texts["RV"].get("y")) < float(column.get("y"))
    assert float(column.get("y")) < float(texts["ED: Dice LV 0.91"].get("y")) < float(images[0].get("y"))
    assert float(root.get("height")) >= float(images[3].get("y")) + 40
