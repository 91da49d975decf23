"""Training / evaluation (``CocoTasksDataset.load_image``) and ``toist predict`` (``load_rgb``) read
the same pixels from one file: EXIF orientation ignored (COCO annotations are made in the stored
pixel grid), 16-bit PNGs reduced to 8 bits by dropping the low byte, a JPEG cut short refused."""

import json
import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from toist_core.data.coco_tasks import CocoTasksDataset
from toist_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from toist_core.visualize import load_rgb

H, W = 20, 40  # stored (raw) pixel grid of every test image


def _dataset(tmp_path, names, check_images=True):
    images = [{"id": k + 1, "file_name": name, "height": H, "width": W} for k, name in enumerate(names)]
    path = tmp_path / "task_1_test.json"
    path.write_text(json.dumps({"images": images, "annotations": []}))
    return CocoTasksDataset(path, tmp_path, check_images=check_images)


def _left_red():
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, : W // 2] = (255, 0, 0)
    return rgb


@pytest.mark.parametrize("orientation", [3, 6])  # 180 degrees; 90 degrees (the displayed image is W x H)
def test_exif_orientation_is_ignored_by_both_loaders(tmp_path, orientation):
    image = Image.fromarray(_left_red())
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "turned.jpg", exif=exif, quality=100)
    dataset = _dataset(tmp_path, ["turned.jpg"])

    train = dataset.load_image(0).permute(1, 2, 0).numpy()
    predict = load_rgb(tmp_path / "turned.jpg")
    assert train.shape == predict.shape == (H, W, 3)  # the record's size: boxes stay where annotated
    for pixels in (train, predict):
        assert pixels[:, : W // 2 - 2, 0].min() > 240 and pixels[:, W // 2 + 2:].max() < 15  # red on the left
    assert np.array_equal(train, predict)  # one decoder


@pytest.mark.parametrize("channels", [3, 1])
def test_16_bit_png_reads_as_predict_reads_it(tmp_path, channels):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 2 ** 16, size=(H, W, channels) if channels == 3 else (H, W), dtype=np.uint16)
    assert cv2.imwrite(str(tmp_path / "deep.png"), raw)  # BGR order on disk for 3 channels
    dataset = _dataset(tmp_path, ["deep.png"])

    train = dataset.load_image(0)
    assert train.dtype == torch.uint8
    predict = load_rgb(tmp_path / "deep.png")
    assert np.array_equal(train.permute(1, 2, 0).numpy(), predict)
    expected = (raw >> 8).astype(np.uint8)
    expected = expected[..., ::-1] if channels == 3 else np.repeat(expected[..., None], 3, axis=2)
    assert np.array_equal(predict, expected)
    # Normalised as any 8-bit image (it was divided by 255 as uint16: values up to ~1100).
    image, _ = dataset[0]
    top = ((1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).max()
    assert image.max() <= top + 1e-5


def test_a_jpeg_cut_short_is_refused_by_both_loaders(tmp_path):
    """OpenCV decoded it as far as it went (grey below) and `toist predict` wrote results for it;
    training refused it."""
    Image.fromarray(_left_red()).save(tmp_path / "whole.jpg", quality=95)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=r"cut.jpg: cannot decode image"):
        load_rgb(tmp_path / "cut.jpg")
    with pytest.raises(ValueError, match=r"cut.jpg: cannot decode image \(image id 1 in .*task_1_test.json\)"):
        _dataset(tmp_path, ["cut.jpg"], check_images=False).load_image(0)
    with pytest.raises(ValueError, match=r"cut.jpg: cannot read the image \(image id 1 in .*task_1_test.json\)"):
        _dataset(tmp_path, ["cut.jpg"])   # its header is cut short too: refused when the dataset is built


def test_cmyk_jpeg_and_other_formats(tmp_path):
    """A CMYK JPEG gives training's pixels exactly (OpenCV's differed by a level); BMP, which
    training does not decode, is still read by OpenCV; a folder or a text file is refused by name."""
    rgb = _left_red()
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "print.jpg", quality=95)
    train = _dataset(tmp_path, ["print.jpg"]).load_image(0).permute(1, 2, 0).numpy()
    assert np.array_equal(load_rgb(tmp_path / "print.jpg"), train)
    assert cv2.imwrite(str(tmp_path / "plain.bmp"), rgb[..., ::-1])
    assert np.array_equal(load_rgb(tmp_path / "plain.bmp"), rgb)
    with pytest.raises(ValueError, match=r"folder: cannot read the image: Is a directory"):
        load_rgb(tmp_path.joinpath("folder").mkdir() or tmp_path / "folder")
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ValueError, match=r"notes.png: cannot read the image \(not a format toist reads"):
        load_rgb(tmp_path / "notes.png")


@pytest.mark.parametrize("suffix", [".tiff", ".bmp"])
@pytest.mark.parametrize("layout", ["grey", "bgr", "bgra"])
def test_opencv_formats_give_the_pixels_imread_color_gave(tmp_path, suffix, layout):
    """Files training does not decode are read by OpenCV as stored, then made RGB as IMREAD_COLOR
    made them (grey repeated, alpha dropped)."""
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 256, size={"grey": (H, W), "bgr": (H, W, 3), "bgra": (H, W, 4)}[layout], dtype=np.uint8)
    path = tmp_path / f"picture{suffix}"
    assert cv2.imwrite(str(path), stored)
    expected = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.array_equal(load_rgb(path), expected)


@pytest.mark.parametrize("suffix", [".tiff", ".bmp"])
def test_an_opencv_format_cut_short_is_called_damaged_not_unsupported(tmp_path, suffix):
    """A BMP or TIFF cut short was "not a format toist reads", though both are read."""
    path = tmp_path / f"picture{suffix}"
    assert cv2.imwrite(str(path), np.random.default_rng(3).integers(0, 256, size=(300, 400, 3), dtype=np.uint8))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=rf"picture\{suffix}: cannot decode the image: damaged or cut short"):
        load_rgb(path)


def test_a_header_claiming_more_pixels_than_opencv_decodes_is_refused_by_name(tmp_path):
    """A 70-byte BMP whose header says 40000 x 30000 ended toist predict with cv2.error's traceback."""
    import struct

    width, height = 40000, 30000
    header = b"BM" + struct.pack("<IHHI", 70, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0,
                                                                        2835, 2835, 0, 0)
    (tmp_path / "big_header.bmp").write_bytes(header + bytes(16))
    # (toist's own limit, from the header, comes before OpenCV's: "OpenCV refused it (pixels <=
    # CV_IO_MAX_IMAGE_PIXELS)" before it existed)
    with pytest.raises(ValueError, match=r"big_header\.bmp: the image declares .*more than the 178,956,970 pixels toist "
                                         r"decodes"):
        load_rgb(tmp_path / "big_header.bmp")


def test_a_16_bit_tiff_drops_its_low_byte_as_16_bit_png_does(tmp_path):
    raw = np.random.default_rng(2).integers(0, 2 ** 16, size=(H, W, 3), dtype=np.uint16)
    assert cv2.imwrite(str(tmp_path / "deep.tiff"), raw)
    assert np.array_equal(load_rgb(tmp_path / "deep.tiff"), (raw >> 8).astype(np.uint8)[..., ::-1])


@pytest.mark.parametrize("suffix", [".pfm", ".tiff"])
def test_float_pixels_are_refused_not_made_black(tmp_path, suffix):
    """A float image with NaN read through IMREAD_COLOR gave black pixels (PFM) and `toist predict`
    wrote results for them; a float TIFF was said not to be an image at all."""
    pixels = np.full((H, W, 3), 0.5, np.float32)
    pixels[: H // 2] = np.nan
    path = tmp_path / f"float{suffix}"
    assert cv2.imwrite(str(path), pixels)
    with pytest.raises(ValueError, match=rf"float{suffix}: float32 pixels; toist reads 8- and 16-bit images"):
        load_rgb(path)


def test_an_animated_gif_is_read_as_its_first_frame_by_both_loaders(tmp_path):
    """torchvision returns every frame of an animated GIF: `toist predict` stopped on it (OpenCV
    and PIL, the reference's loader, read the first frame)."""
    first = Image.fromarray(_left_red())
    second = Image.fromarray(np.zeros((H, W, 3), np.uint8))
    first.save(tmp_path / "moving.gif", save_all=True, append_images=[second], duration=100)
    predict = load_rgb(tmp_path / "moving.gif")
    train = _dataset(tmp_path, ["moving.gif"]).load_image(0).permute(1, 2, 0).numpy()
    assert predict.shape == (H, W, 3) and np.array_equal(predict, train)
    assert predict[:, : W // 2 - 2, 0].min() > 200   # the red first frame, not the black second


def test_file_names_that_are_not_utf8_are_read_by_both_loaders(tmp_path):
    """Linux allows any bytes in a file name. torchvision's reader refused a Latin-1 name as
    undecodable (a valid PNG skipped by `toist predict`, training stopped), and OpenCV's killed
    the process (segmentation fault) on a BMP so named."""
    rgb = _left_red()
    folder = tmp_path / os.fsdecode(b"photos_\xe9t\xe9")  # Latin-1 "été": not UTF-8
    folder.mkdir()
    for suffix in (".png", ".bmp"):
        path = folder / os.fsdecode(b"caf\xe9" + suffix.encode())
        assert path.write_bytes(cv2.imencode(suffix, rgb[..., ::-1])[1].tobytes())
        assert np.array_equal(load_rgb(path), rgb)
    train = _dataset(folder, [os.fsdecode(b"caf\xe9.png")]).load_image(0).permute(1, 2, 0).numpy()
    assert np.array_equal(train, rgb)


def test_an_empty_file_is_refused_by_name_by_both_loaders(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "empty.bmp").write_bytes(b"")
    for name in ("empty.bmp", "empty.png"):   # a copy that never happened, said as such (was "not a format")
        with pytest.raises(ValueError, match=rf"{name}: cannot read the image: the file is empty"):
            load_rgb(tmp_path / name)
    with pytest.raises(ValueError, match=r"empty.png: cannot decode image \(image id 1 .*\): the file is empty"):
        _dataset(tmp_path, ["empty.png"], check_images=False).load_image(0)
    with pytest.raises(ValueError, match=r"empty.png: cannot read the image \(image id 1 .*\): the file is empty$"):
        _dataset(tmp_path, ["empty.png"])


@pytest.mark.parametrize("orientation, big", [(3, False), (6, False), (3, True)])
def test_a_turned_tiff_is_refused_naming_its_tag_not_read_turned(tmp_path, orientation, big):
    """OpenCV applies a TIFF's orientation tag although told to ignore it (tag 3: the picture
    came out turned 180 degrees, silently), and fails on tags 5-8 (the file was called damaged);
    a BigTIFF too."""
    Image.fromarray(_left_red()).save(tmp_path / "turned.tif", tiffinfo={274: orientation}, big_tiff=big)
    with pytest.raises(ValueError, match=rf"turned.tif: a TIFF whose orientation tag is {orientation} .*save it upright"):
        load_rgb(tmp_path / "turned.tif")
    Image.fromarray(_left_red()).save(tmp_path / "upright.tif", tiffinfo={274: 1})
    assert np.array_equal(load_rgb(tmp_path / "upright.tif"), _left_red())


def test_an_animated_webp_is_refused_when_the_dataset_is_checked(tmp_path):
    """The header check passed it, and training's decoder refused it at its first read."""
    first = Image.fromarray(_left_red())
    first.save(tmp_path / "moving.webp", save_all=True, append_images=[Image.new("RGB", (W, H))], duration=100,
               lossless=True)
    with pytest.raises(Exception, match=r"moving.webp: an animated WebP, which training and evaluation do not decode"):
        _dataset(tmp_path, ["moving.webp"])
    first.save(tmp_path / "still.webp", lossless=True)
    _dataset(tmp_path, ["still.webp"])


def test_a_file_of_another_format_is_named_once_in_its_refusal(tmp_path):
    """The refusal was wrapped in a second one: "x.jpg: cannot read the image (...): x.jpg: ... (...)"."""
    Image.fromarray(_left_red()).save(tmp_path / "bitmap.jpg", format="BMP")
    with pytest.raises(Exception) as info:
        _dataset(tmp_path, ["bitmap.jpg"])
    message = str(info.value)
    assert "this file is BMP although named .jpg" in message and "cannot read the image" not in message
    assert message.count(str(tmp_path / "bitmap.jpg")) == 1


@pytest.mark.parametrize("width, height, pillow_limit", [(15000, 13000, True), (15000, 13000, False),
                                                          (12000, 9000, True)])
def test_a_picture_declaring_too_many_pixels_is_refused_from_its_header(tmp_path, monkeypatch, width, height,
                                                                        pillow_limit):
    """A 656 KB PNG declaring 15000 x 15000 pixels was decoded whole (4.1 GB); a few MB more and
    the process was killed for want of memory, without a word. A 108-megapixel photo is read."""
    import struct
    import zlib

    from PIL import Image

    from toist_core.visualize import MAX_IMAGE_PIXELS

    if not pillow_limit:   # toist's own check, not Pillow's error, refuses it
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                        + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    if width * height <= MAX_IMAGE_PIXELS:   # read (and found cut short), not refused for its size
        with pytest.raises(ValueError) as info:
            load_rgb(tmp_path / "bomb.png")
        assert "toist decodes" not in str(info.value)
        return
    with pytest.raises(ValueError, match=r"bomb.png: the image declares .*more than the 178,956,970 pixels toist decodes"):
        load_rgb(tmp_path / "bomb.png")
