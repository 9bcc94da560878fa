"""m2f-predict around the flags: the files it writes, its one-line errors, the images that fail, a fused-head artifact.

Fast (test_flags_predict's hand-written graph, a few ms a run), so that mutmut's per-mutant selection can run it; the
same behaviours on a real export are in test_predict_cli.py and test_bad_inputs.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from PIL import Image
from test_flags_predict import CLASS, PRE, WEIGHT
from test_gates import write_graph

import m2f_deploy.runtime as runtime
from m2f_deploy import coco, viz
from m2f_deploy.cli import predict as predict_cli
from m2f_deploy.cli.common import run
from m2f_deploy.demo import demo_image
from m2f_deploy.errors import InputError, M2FError, OutputError
from m2f_deploy.export.heads import fuse_onnx
from m2f_deploy.runtime import Segmenter


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict-output")
    artifact = write_graph(root / "m.onnx", dynamic_hw=False, class_logits=CLASS, preprocessing=PRE,
                           conv_weight=WEIGHT)  # fmt: skip
    images = root / "images"
    images.mkdir()
    for i, size in enumerate([(100, 80), (90, 70), (64, 96)]):
        demo_image().resize(size).rotate(90 * i).save(images / f"im{i}.png")
    return artifact, images


def _main(artifact, inputs, out, *flags):
    return predict_cli.main([str(artifact), *map(str, inputs), "-o", str(out), "-q", *flags])


def test_panoptic_files_equal_the_runtimes_results(files, tmp_path):
    artifact, images = files
    paths = sorted(images.glob("*.png"))
    assert _main(artifact, [images], tmp_path, "--fuse", "1") == 0
    data = json.loads((tmp_path / "panoptic.json").read_text())
    assert data["info"] == {"description": f"m2f-predict results of {artifact}"}
    assert data["categories"] == coco.categories({0: "a", 1: "b"}, [1])
    assert [(i["id"], i["file_name"]) for i in data["images"]] == [(n + 1, str(p)) for n, p in enumerate(paths)]
    with Segmenter(artifact) as seg:
        for n, path in enumerate(paths):
            result = seg.predict(path, "panoptic", label_ids_to_fuse={1})[0]
            ids, segments = coco.panoptic_record(result)
            annotation = data["annotations"][n]
            assert annotation == {"image_id": n + 1, "file_name": path.name, "segments_info": segments}
            png = np.asarray(Image.open(tmp_path / "panoptic" / path.name))
            np.testing.assert_array_equal(coco.rgb_to_id(png), ids)
            overlay = np.asarray(Image.open(tmp_path / "overlays" / path.name))
            expected = viz.draw_panoptic(Image.open(path), result, {0: "a", 1: "b"})
            np.testing.assert_array_equal(overlay, np.asarray(expected))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlays", "panoptic", "panoptic.json"]  # lock removed


def test_instance_annotations_are_numbered_across_images(files, tmp_path):
    artifact, images = files
    paths = sorted(images.glob("*.png"))
    assert _main(artifact, paths, tmp_path, "--task", "instance", "--threshold", "0.3") == 0
    data = json.loads((tmp_path / "instances.json").read_text())
    expected = []
    with Segmenter(artifact) as seg:
        for n, path in enumerate(paths):
            result = seg.predict(path, "instance", threshold=0.3, return_binary_maps=True)[0]
            expected += coco.instance_annotations(result, n + 1, first_id=len(expected) + 1)
            overlay = np.asarray(Image.open(tmp_path / "overlays" / path.name))
            np.testing.assert_array_equal(overlay, np.asarray(viz.draw_instance(Image.open(path), result,
                                                                                 {0: "a", 1: "b"})))  # fmt: skip
    assert len(expected) > 3 and data["annotations"] == json.loads(json.dumps(expected))
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(expected) + 1))
    assert [(i["id"], i["file_name"]) for i in data["images"]] == [(n + 1, str(p)) for n, p in enumerate(paths)]
    assert data["info"]["description"] == f"m2f-predict results of {artifact}"
    assert not (tmp_path / "panoptic.json").exists() and not (tmp_path / "panoptic").exists()


def test_semantic_pngs_are_16_bit_past_256_labels(tmp_path):
    labels = 257  # ids 0..256: 256 does not fit in 8 bits
    cls = np.full((2, labels + 1), -3.0, np.float32)
    cls[0, 256] = cls[1, 255] = 3.0
    weight = np.zeros((2, 3, 4, 4), np.float32)
    weight[1] = 1.0 / 16  # query 1 wins where the image is bright
    artifact = write_graph(tmp_path / "big.onnx", dynamic_hw=False, class_logits=cls, preprocessing=PRE,
                           conv_weight=weight, conv_bias=np.zeros(2, np.float32),
                           id2label={i: f"c{i}" for i in range(labels)})  # fmt: skip
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 32:] = 255
    Image.fromarray(image).save(tmp_path / "half.png")
    assert _main(artifact, [tmp_path / "half.png"], tmp_path / "out", "--task", "semantic", "--no-overlay") == 0
    png = Image.open(tmp_path / "out" / "semantic" / "half.png")
    assert png.mode.startswith("I")  # 16-bit grey: label 256 is kept
    assert set(np.unique(np.asarray(png))) == {255, 256}
    assert sorted(os.listdir(tmp_path / "out")) == ["semantic"]  # no JSON for semantic, no overlays asked
    assert _main(artifact, [tmp_path / "half.png"], tmp_path / "o8", "--task", "semantic") == 0
    assert (tmp_path / "o8" / "overlays" / "half.png").is_file()


def test_semantic_pngs_are_8_bit_up_to_256_labels(files, tmp_path):
    artifact, images = files
    assert _main(artifact, [images / "im0.png"], tmp_path, "--task", "semantic", "--batch", "1") == 0
    assert Image.open(tmp_path / "semantic" / "im0.png").mode == "L"


def test_help_and_three_inputs_with_one_stem(files, tmp_path, capsys):
    artifact, images = files
    with pytest.raises(SystemExit):
        predict_cli.main(["--help"])
    usage = capsys.readouterr().out
    assert usage.startswith("usage: m2f-predict ")
    for flag in ("--task {semantic,instance,panoptic}", "--fuse IDS", "--max-pixels N",
                 "--backend {auto,tensorrt,ort-tensorrt,cuda,cpu}"):  # as the README's table
        assert flag in usage, flag
    inputs = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        inputs.append(tmp_path / name / "x.png")
        inputs[-1].write_bytes((images / "im0.png").read_bytes())
    assert _main(artifact, inputs, tmp_path / "out", "--no-overlay") == 0
    assert sorted(os.listdir(tmp_path / "out" / "panoptic")) == ["x-1.png", "x-2.png", "x.png"]


BAD = [
    (["--batch", "0"], "--batch must be at least 1, got 0"),
    (["--max-pixels", "-1"], "--max-pixels must be 0 (no limit) or more, got -1"),
    (["--threshold", "1.5"], "--threshold must be in [0, 1], got 1.5"),
    (["--mask-threshold", "-0.5"], "--mask-threshold must be in [0, 1], got -0.5"),
    (["--overlap-threshold", "2"], "--overlap-threshold must be in [0, 1], got 2.0"),
    (["--fuse", "0,7"], "--fuse 0,7: '7' is not a label id of this model (0..1)"),
    (["--fuse", "-1"], "--fuse -1: '-1' is not a label id of this model (0..1)"),
    (["--fuse", "X1"], "--fuse X1: 'X1' is not a label id of this model (0..1)"),
]


@pytest.mark.parametrize(("flags", "message"), BAD)
def test_bad_flag_is_one_clear_error_and_nothing_is_written(files, tmp_path, flags, message):
    artifact, images = files
    with pytest.raises(InputError) as e:
        _main(artifact, [images], tmp_path / "out", *flags)
    assert str(e.value) == message
    assert not (tmp_path / "out").exists()


def test_fuse_takes_spaces_and_empty_parts(files, tmp_path):
    artifact, images = files
    assert _main(artifact, [images / "im0.png"], tmp_path, "--fuse", " 1 , ,0,") == 0
    data = json.loads((tmp_path / "panoptic.json").read_text())
    assert [c["isthing"] for c in data["categories"]] == [0, 0]


def test_bad_out_is_one_clear_error(files, tmp_path):
    artifact, images = files
    (tmp_path / "afile").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    cases = [(tmp_path / "afile", "is a file, not a folder"), (tmp_path / "afile" / "sub", "afile is a file"),
             (tmp_path / "link" / "sub", "is a dangling link")]  # fmt: skip
    for out, message in cases:
        with pytest.raises(OutputError) as e:
            _main(artifact, [images], out)
        assert str(e.value).startswith(f"--out {out}: ") and message in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["afile", "link"]  # the probe left nothing
    with pytest.raises(InputError, match="no such file"):
        _main(tmp_path / "none.onnx", [images], tmp_path / "out")


def test_out_that_cannot_be_created_is_an_output_error(files, tmp_path, monkeypatch):
    artifact, images = files
    monkeypatch.setattr(predict_cli, "check_out", lambda out: None)
    real = type(tmp_path).mkdir

    def refuse(self, *args, **kwargs):
        if self.name == "out":
            raise PermissionError(13, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "mkdir", refuse)
    with pytest.raises(OutputError) as e:
        _main(artifact, [images], tmp_path / "out")
    assert str(e.value) == f"--out {tmp_path / 'out'}: cannot write there (Permission denied)"


def test_second_writer_is_refused_and_the_lock_released(files, tmp_path):
    artifact, images = files
    out = tmp_path / "out"
    out.mkdir()
    holder = predict_cli.OutLock(out)
    try:
        assert (out / ".m2f-predict.lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(OutputError) as e:
            _main(artifact, [images], out)
        assert str(e.value) == (f"--out {out}: another m2f-predict (pid {os.getpid()}) is writing there; wait for it "
                                "or choose another folder")  # fmt: skip
    finally:
        holder.release()
    assert not (out / ".m2f-predict.lock").exists()
    assert _main(artifact, [images], out) == 0
    assert not (out / ".m2f-predict.lock").exists()


def test_failed_images_are_listed_and_the_others_written(files, tmp_path, capsys):
    artifact, images = files
    (tmp_path / "notes.png").write_text("not an image\n")
    argv = [str(artifact), str(tmp_path / "notes.png"), str(images / "im0.png"), "-o", str(tmp_path / "out"), "-q"]
    assert run("m2f-predict", predict_cli.main, argv) == 1
    skipped, head, line = capsys.readouterr().err.splitlines()  # errors show with -q too
    assert skipped.startswith(f"skipped: {tmp_path / 'notes.png'}: ") and head == "m2f-predict: 1 of 2 image(s) failed:"
    assert line.startswith(f"  {tmp_path / 'notes.png'}: ") and "not an image" in line
    data = json.loads((tmp_path / "out" / "panoptic.json").read_text())
    assert [i["file_name"] for i in data["images"]] == [str(images / "im0.png")]
    assert _main(artifact, [tmp_path / "notes.png"], tmp_path / "none") == 1
    assert not (tmp_path / "none" / "panoptic.json").exists()  # no image worked: no JSON


def test_a_failing_batch_is_retried_image_by_image(files, tmp_path, monkeypatch, capsys):
    artifact, images = files
    real = Segmenter.predict
    calls = []

    def predict(self, items, task="panoptic", *, timings, **kwargs):
        calls.append(len(items))
        if any(i.width == 90 for i in items):  # im1 fails in the runtime (it loads fine)
            raise M2FError("im1 is refused")
        timings["inference"] = timings.get("inference", 0.0) + 0.03 * len(items)  # known: 30 ms per image
        return real(self, items, task, **kwargs)

    monkeypatch.setattr(Segmenter, "predict", predict)
    out = tmp_path / "out"
    argv = [str(artifact), str(images), "-o", str(out), "--batch", "2"]
    assert run("m2f-predict", predict_cli.main, argv) == 1
    assert calls == [2, 1, 1, 1]  # [im0, im1] fails, then each alone; then im2
    err = capsys.readouterr().err.splitlines()
    assert err[-2:] == ["m2f-predict: 1 of 3 image(s) failed:", f"  {images / 'im1.png'}: im1 is refused"]
    assert "2 image(s) in 0.06 s: per image (ms) inference 30.0" in err  # the retried image's time counted too
    data = json.loads((out / "panoptic.json").read_text())
    assert [i["file_name"] for i in data["images"]] == [str(images / "im0.png"), str(images / "im2.png")]
    assert [(i["width"], i["height"]) for i in data["images"]] == [(100, 80), (64, 96)]


def test_interrupted_and_disk_errors_mid_run(files, tmp_path, monkeypatch, capsys):
    artifact, images = files
    real, done = predict_cli.Writer.add, []

    def add(self, path, image, result, error=KeyboardInterrupt):
        if len(done) == 2:
            raise error
        done.append(path)
        return real(self, path, image, result)

    monkeypatch.setattr(predict_cli.Writer, "add", add)
    out = tmp_path / "out"
    assert run("m2f-predict", predict_cli.main, [str(artifact), str(images), "-o", str(out), "-q"]) == 130
    assert capsys.readouterr().err.splitlines() == [
        f"m2f-predict: interrupted: the files of 2 image(s) were written to {out}; no COCO JSON was written"]
    assert not (out / "panoptic.json").exists() and not (out / ".m2f-predict.lock").exists()
    done.clear()
    monkeypatch.setattr(predict_cli.Writer, "add", lambda *a: add(*a, error=OSError(28, "No space left on device")))
    with pytest.raises(OutputError) as e:
        _main(artifact, [images], out)
    assert str(e.value) == (f"--out {out}: cannot write (No space left on device); the files of 2 image(s) were "
                            f"written to {out}; no COCO JSON was written")  # fmt: skip
    assert not (out / ".m2f-predict.lock").exists()


def test_max_pixels_and_pillows_limit(files, tmp_path):
    artifact, images = files
    limit = Image.MAX_IMAGE_PIXELS
    assert _main(artifact, [images / "im0.png"], tmp_path / "a", "--max-pixels", "7999") == 1  # 100 x 80
    assert _main(artifact, [images / "im0.png"], tmp_path / "b", "--max-pixels", "8000") == 0
    seen = []
    real = predict_cli._run
    predict_cli._run = lambda *a: seen.append(Image.MAX_IMAGE_PIXELS) or real(*a)
    try:
        assert _main(artifact, [images / "im0.png"], tmp_path / "c", "--max-pixels", "0") == 0
        assert _main(artifact, [images / "im0.png"], tmp_path / "d", "--max-pixels", "8000") == 0
        assert _main(artifact, [images / "im0.png"], tmp_path / "e") == 0
    finally:
        predict_cli._run = real
    assert seen == [None, limit, limit]  # 0: no limit; below Pillow's: Pillow's own stays; default: Pillow's
    assert Image.MAX_IMAGE_PIXELS == limit  # restored


def test_non_utf8_file_name_is_escaped(files, tmp_path):
    artifact, images = files
    name = os.fsdecode(b"caf\xe9.png")
    (tmp_path / name).write_bytes((images / "im0.png").read_bytes())
    assert _main(artifact, [tmp_path / name], tmp_path / "out") == 0
    data = json.loads((tmp_path / "out" / "panoptic.json").read_bytes().decode("utf-8", "strict"))
    assert data["images"][0]["file_name"] == str(tmp_path) + "/caf\\xe9.png"
    assert data["annotations"][0]["file_name"] == "caf\\xe9.png"
    assert (tmp_path / "out" / "panoptic" / "caf\\xe9.png").is_file()
    assert predict_cli.safe_text("café") == "café"


@pytest.fixture(scope="module")
def fused(files, tmp_path_factory):
    artifact, _ = files
    root = tmp_path_factory.mktemp("predict-fused")
    raw = root / "raw.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(onnx.load(str(artifact))), str(raw))
    return fuse_onnx(raw, root / "semantic.onnx", "semantic", validate=False)


def test_fused_head_artifact(files, fused, tmp_path, monkeypatch):
    artifact, images = files
    demo_image().resize((64, 64)).save(square := tmp_path / "square.png")
    assert _main(fused, [square], tmp_path / "out") == 0  # its head's task by default
    with Segmenter(artifact) as seg:
        expected = seg.predict(square, "semantic")[0]  # an image that fills the canvas: the same map
    assert len(np.unique(expected)) == 2
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "semantic" / "square.png")), expected)
    assert not (tmp_path / "out" / "panoptic.json").exists()
    with pytest.raises(InputError) as e:
        _main(fused, [images / "im2.png"], tmp_path / "other", "--task", "panoptic")
    assert str(e.value) == (f"{fused}: returns semantic results (exported with --heads semantic), not panoptic: "
                            "use --task semantic")  # fmt: skip
    assert not (tmp_path / "other").exists()
    made = []
    monkeypatch.setattr(runtime, "Segmenter", lambda *a, **kw: made.append(Segmenter(*a, **kw)) or made[-1])
    assert _main(artifact, [images / "im2.png"], tmp_path / "plain") == 0  # a logits graph: panoptic by default
    assert (tmp_path / "plain" / "panoptic.json").is_file() and made[0].head is None


def test_progress_and_the_timing_summary_without_quiet(files, tmp_path, monkeypatch, capsys):
    """Without -q: the progress counter and the per-image times, averaged over the images that worked."""
    artifact, images = files
    real = Segmenter.predict

    def predict(self, items, task="panoptic", *, timings, **kwargs):  # known times: 100 ms / 30 ms per image
        results = real(self, items, task, **kwargs)
        for key, ms in (("preprocess", 100), ("inference", 30)):
            timings[key] = timings.get(key, 0.0) + ms / 1000 * len(items)
        return results

    monkeypatch.setattr(Segmenter, "predict", predict)
    (tmp_path / "notes.png").write_text("not an image\n")
    argv = [str(artifact), str(images), str(tmp_path / "notes.png"), "-o", str(tmp_path / "out")]
    assert run("m2f-predict", predict_cli.main, argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.endswith(" images")] == [f"{n}/4 images" for n in (1, 2, 3, 4)]
    summary = [line for line in err if "per image" in line]
    assert summary == ["3 image(s) in 0.39 s: per image (ms) preprocess 100.0, inference 30.0"], err


def test_out_is_probed_where_it_would_be_created(files, tmp_path, monkeypatch):
    """The nearest existing folder takes a probe file, removed at once; one that refuses data is one clear error."""
    import tempfile

    artifact, images = files
    real, probed = tempfile.mkstemp, []
    monkeypatch.setattr(tempfile, "mkstemp", lambda **kw: probed.append(kw["dir"]) or real(**kw))
    assert _main(artifact, [images / "im0.png"], tmp_path / "new" / "out", "--no-overlay") == 0
    assert probed[0] == tmp_path and sorted(os.listdir(tmp_path)) == ["new"]  # then the PNGs' atomic writes
    full = OSError(28, "No space left on device")
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(full))
    with pytest.raises(OutputError) as e:
        _main(artifact, [images / "im0.png"], tmp_path / "full")
    assert str(e.value) == f"--out {tmp_path / 'full'}: cannot write in {tmp_path} (No space left on device)"
    assert sorted(os.listdir(tmp_path)) == ["new"]  # the probe removed, nothing created


def test_lock_file_mode_unknown_holder_and_a_removed_file(tmp_path, monkeypatch):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    old = os.umask(0o022)
    try:
        lock = predict_cli.OutLock(out)
    finally:
        os.umask(old)
    assert (out / ".m2f-predict.lock").stat().st_mode & 0o777 == 0o644
    (out / ".m2f-predict.lock").unlink()  # removed by hand while held: releasing still works
    lock.release()
    fd = os.open(out / ".m2f-predict.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held by a process that wrote no pid
    try:
        with pytest.raises(OutputError, match=r"another m2f-predict \(pid \?\) is writing there"):
            predict_cli.OutLock(out)
    finally:
        os.close(fd)
    # a finishing run removes the file between our open and our flock: the lock must end on the file there now
    first = predict_cli.OutLock(out)
    real_open, opened = os.open, []

    def open_then_finish(path, *args):
        fd = real_open(path, *args)
        opened.append(fd)
        if len(opened) == 1:
            first.release()
        return fd

    monkeypatch.setattr(os, "open", open_then_finish)
    old = os.umask(0o022)
    try:
        second = predict_cli.OutLock(out)
    finally:
        os.umask(old)
        monkeypatch.undo()
    assert len(opened) == 2 and os.fstat(second.fd).st_ino == (out / ".m2f-predict.lock").stat().st_ino
    assert (out / ".m2f-predict.lock").read_text() == f"{os.getpid()}\n"
    assert (out / ".m2f-predict.lock").stat().st_mode & 0o777 == 0o644
    with pytest.raises(OutputError, match="another m2f-predict"):
        predict_cli.OutLock(out)
    second.release()
    assert not (out / ".m2f-predict.lock").exists()
