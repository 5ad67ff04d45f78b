"""Tests of pipelines.input_pipeline on real images (Fashion-MNIST items and
scikit-learn's sample photos), with TFRecords written by hand through
`tfrecord_lib.make_example` (no dependency on the converters)."""

import io
import os
import shutil
import tempfile

from absl.testing import parameterized
import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_image
import tensorflow as tf

from pipelines.demo import fashion_mnist
from pipelines.records import schema
from pipelines.tfdata import decoder
from pipelines.tfdata import input_pipeline
from pipelines.tfdata import preprocessing
from pipelines.tfdata import skip_counts

NUM_CLASSES = 10


def _encode(array, fmt, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _photo(height=60, width=80, offset=0):
    """A crop of a real photo (scikit-learn's china.jpg)."""
    return np.ascontiguousarray(
        load_sample_image("china.jpg")[100 + offset:100 + offset + height,
                                       200:200 + width])


def _items():
    images, labels = fashion_mnist.load_fashion_mnist("test")
    return images, labels


def _write_records(path, examples):
    with tf.io.TFRecordWriter(path) as writer:
        for example in examples:
            writer.write(example.SerializeToString())


def _collect(dataset):
    """All batches of a finite dataset, concatenated per key."""
    batches = list(dataset.as_numpy_iterator())
    return {key: np.concatenate([b[key] for b in batches])
            for key in batches[0]}


class DecodeTest(tf.test.TestCase, parameterized.TestCase):

    def _formats(self):
        """name -> (encoded bytes, expected RGB uint8, exact?)."""
        item = _items()[0][0]                      # a real 28x28 gray item
        photo = _photo()
        rgba = np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])
        gif = io.BytesIO()
        frames = [Image.fromarray(photo).convert("P"),
                  Image.fromarray(photo[::-1]).convert("P")]
        frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
        gif_first = np.asarray(Image.open(io.BytesIO(gif.getvalue()))
                               .convert("RGB"))
        gray3 = np.repeat(item[..., None], 3, axis=2)
        rgb_jpeg = _encode(photo, "JPEG", quality=95)
        gray_jpeg = _encode(item, "JPEG", quality=95)

        def pil_rgb(data):
            return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

        return {
            "rgb_jpeg": (rgb_jpeg, pil_rgb(rgb_jpeg), False),
            "gray_jpeg": (gray_jpeg, pil_rgb(gray_jpeg), False),
            "rgb_png": (_encode(photo, "PNG"), photo, True),
            "gray_png": (_encode(item, "PNG"), gray3, True),
            "rgba_png": (_encode(rgba, "PNG"), photo, True),
            "png_named_jpg": (_encode(photo, "PNG"), photo, True),
            "gif_first_frame": (gif.getvalue(), gif_first, True),
            "bmp": (_encode(photo, "BMP"), photo, True),
        }

    def test_decode_image_gives_rgb(self):
        for name, (data, expected, exact) in self._formats().items():
            with self.subTest(name):
                image = decoder.decode_image(tf.constant(data))
                self.assertEqual(image.dtype, tf.uint8)
                self.assertEqual(image.shape, expected.shape)
                if exact:
                    self.assertAllEqual(image, expected)
                else:  # TF's fast IDCT vs PIL's: ~1-2 levels
                    diff = np.abs(image.numpy().astype(int) - expected)
                    self.assertLess(diff.mean(), 2.0)

    def test_decode_example(self):
        photo = _encode(_photo(), "JPEG")
        example = schema.make_example(photo, "a/b.jpg", [3, 1, 3], [1])
        features = decoder.decode_example(
            tf.constant(example.SerializeToString()), NUM_CLASSES)
        self.assertEqual(features["image_bytes"].numpy(), photo)
        self.assertEqual(features["filename"].numpy(), b"a/b.jpg")
        self.assertAllEqual(features["labels"],
                            np.eye(NUM_CLASSES)[[1, 3]].sum(0))
        self.assertEqual(features["labels"].dtype, tf.float32)
        self.assertAllEqual(features["difficult"], np.arange(10) == 1)

    def test_decode_example_no_labels(self):
        example = schema.make_example(b"x", "none.jpg", [])
        features = decoder.decode_example(
            tf.constant(example.SerializeToString()), NUM_CLASSES)
        self.assertAllEqual(features["labels"], np.zeros(NUM_CLASSES))

    @parameterized.parameters(([5],), ([-1],), ([0, 12],))
    def test_out_of_range_label_is_an_error(self, labels):
        example = schema.make_example(b"x", "bad.jpg", labels)
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                    r"num_classes=5.*\n?.*bad\.jpg"):
            decoder.decode_example(
                tf.constant(example.SerializeToString()), 5)


class PreprocessTest(tf.test.TestCase, parameterized.TestCase):

    def test_eval_of_same_size_is_the_pixels(self):
        """RGB in [0, 255] out: the model normalises, not the pipeline."""
        photo = _photo(48, 48)
        out = preprocessing.preprocess_eval(photo, 48)
        self.assertEqual(out.dtype, tf.float32)
        self.assertAllClose(out, photo.astype(np.float32), atol=1e-4)

    def test_antialias_changes_nothing_at_the_model_size(self):
        """The demo's canvases are already S x S: with or without antialiasing
        the model sees the same pixels (so the demo's numbers cannot move)."""
        photo = _photo(96, 96)
        self.assertAllEqual(preprocessing.preprocess_eval(photo, 96, antialias=True),
                            preprocessing.preprocess_eval(photo, 96, antialias=False))
        smaller = [preprocessing.preprocess_eval(_photo(96, 96), 64, antialias=a)
                   for a in (True, False)]
        self.assertGreater(float(tf.reduce_max(tf.abs(smaller[0] - smaller[1]))), 1.0)

    def test_eval_resizes_without_keeping_aspect(self):
        out = preprocessing.preprocess_eval(_photo(60, 80), 32)
        self.assertEqual(out.shape, (32, 32, 3))
        self.assertEqual(out.dtype, tf.float32)

    @parameterized.parameters(False, True)
    def test_resize_keeps_the_whole_image_no_crop(self, antialias):
        """A 60x80 image with 8-pixel borders of four colours, squeezed to 32x32:
        every border is still at its edge (a crop, e.g. a centre crop or an
        aspect-keeping resize-then-crop, would cut the left and right ones)."""
        height, width, border = 60, 80, 8
        image = np.full((height, width, 3), 128, np.uint8)
        colours = {"top": (255, 0, 0), "bottom": (0, 0, 255), "left": (0, 255, 0),
                   "right": (255, 255, 0)}
        image[:border] = colours["top"]
        image[-border:] = colours["bottom"]
        image[border:-border, :border] = colours["left"]
        image[border:-border, -border:] = colours["right"]
        out = preprocessing.preprocess_eval(image, 32, antialias=antialias).numpy()
        middle = slice(8, 24)
        self.assertAllClose(out[0, middle], np.tile(colours["top"], (16, 1)), atol=1e-3)
        self.assertAllClose(out[-1, middle], np.tile(colours["bottom"], (16, 1)), atol=1e-3)
        self.assertAllClose(out[middle, 0], np.tile(colours["left"], (16, 1)), atol=1e-3)
        self.assertAllClose(out[middle, -1], np.tile(colours["right"], (16, 1)), atol=1e-3)
        self.assertAllClose(out[14:18, 14:18], np.full((4, 4, 3), 128.0), atol=1e-3)
        # Each border keeps its share of the side: 8/60 of 32 rows, 8/80 of 32
        # columns (about 4.3 and 3.2): the two axes are scaled differently.
        top_rows = int(np.sum(np.all(np.abs(out[:, 16] - colours["top"]) < 1, axis=-1)))
        left_cols = int(np.sum(np.all(np.abs(out[16, :] - colours["left"]) < 1, axis=-1)))
        self.assertBetween(top_rows, 3, 5)
        self.assertBetween(left_cols, 2, 3)

    def test_train_default_equals_eval(self):
        photo = _photo()
        self.assertAllEqual(
            preprocessing.preprocess_train(photo, 40),
            preprocessing.preprocess_eval(photo, 40))

    @parameterized.parameters(False, True)
    def test_eager_equals_tf_data(self, augment):
        photos = np.stack([_photo(offset=10 * i) for i in range(3)])
        seeds = np.array([[7, i] for i in range(3)], np.int64)
        augmentation = preprocessing.Augmentation(
            random_flip=augment,
            crop_scales=preprocessing.ML_GCN_CROP_SCALES if augment else None)

        def train(photo, seed):
            return preprocessing.preprocess_train(photo, 36, augmentation, seed=seed)

        def evaluate(photo, unused_seed):
            return preprocessing.preprocess_eval(photo, 36)

        for fn in (train, evaluate):
            eager = [fn(tf.constant(p), tf.constant(s))
                     for p, s in zip(photos, seeds)]
            ds = tf.data.Dataset.from_tensor_slices((photos, seeds)).map(fn)
            self.assertAllClose(np.stack(eager), np.stack(list(ds)),
                                atol=1e-5, msg=fn.__name__)

    def test_multi_scale_crop_is_a_window_of_allowed_size(self):
        height, width = 40, 50
        image = tf.reshape(tf.range(height * width * 3), (height, width, 3))
        base = min(height, width)
        allowed = {int(base * s) for s in preprocessing.ML_GCN_CROP_SCALES}
        sizes = set()
        for i in range(40):
            crop = preprocessing._multi_scale_crop(
                image, preprocessing.ML_GCN_CROP_SCALES,
                tf.constant([3, i])).numpy()
            h, w = crop.shape[:2]
            self.assertIn(h, allowed)
            self.assertIn(w, allowed)
            top, left = divmod(crop[0, 0, 0] // 3, width)
            self.assertAllEqual(crop, image[top:top + h, left:left + w])
            sizes.add((h, w))
        self.assertGreater(len(sizes), 3)

    def test_flip_is_a_mirror_and_depends_on_the_seed(self):
        photo = _photo(32, 32)
        plain = preprocessing.preprocess_eval(photo, 32)
        flipped = 0
        for i in range(20):
            out = preprocessing.preprocess_train(
                photo, 32, preprocessing.Augmentation(random_flip=True),
                seed=tf.constant([1, i]))
            if np.allclose(out, plain):
                continue
            self.assertAllClose(out, plain[:, ::-1])
            flipped += 1
        self.assertBetween(flipped, 3, 17)


def _bilinear_reference(image, out_height, out_width):
    """tf.image.resize's bilinear (half-pixel centres, no antialiasing) by loops:
    output pixel (y, x) samples the input at ((y + .5) * H/h - .5, (x + .5) * W/w - .5),
    edges clamped."""
    image = np.asarray(image, np.float64)
    in_height, in_width = image.shape[:2]
    out = np.zeros((out_height, out_width, image.shape[2]))

    def taps(o, in_size, out_size):
        src = (o + 0.5) * in_size / out_size - 0.5
        low = int(np.floor(src))
        frac = src - low
        return (min(max(low, 0), in_size - 1), min(max(low + 1, 0), in_size - 1), frac)

    for y in range(out_height):
        y0, y1, fy = taps(y, in_height, out_height)
        for x in range(out_width):
            x0, x1, fx = taps(x, in_width, out_width)
            top = (1 - fx) * image[y0, x0] + fx * image[y0, x1]
            bottom = (1 - fx) * image[y1, x0] + fx * image[y1, x1]
            out[y, x] = (1 - fy) * top + fy * bottom
    return out


def _real_images():
    """A real Fashion-MNIST item (28x28, grey as RGB) and a real photo crop (60x80)."""
    item = np.repeat(_items()[0][7][..., None], 3, axis=2)
    return {"fashion_mnist": item, "photo": _photo(60, 80)}


# Sizes below, at and above the inputs: downscaling (where antialiasing matters),
# upscaling (where it changes nothing) and a change of aspect ratio.
RESIZE_SIZES = (12, 20, 32, 64, 100)


class ResizeReferenceTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters(*RESIZE_SIZES)
    def test_antialias_is_pils_bilinear_resize_of_the_whole_image(self, size):
        """PIL's Image.resize(BILINEAR) (the PyTorch reference's Resize) of the
        whole image: measured max |difference| 1.00 grey level (PIL rounds to
        uint8), mean <= 0.31, on both images at every size; without
        antialiasing these downscales are off by 38-77 levels."""
        for name, image in _real_images().items():
            pil = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR),
                             np.float64)
            got = preprocessing.preprocess_eval(image, size, antialias=True).numpy()
            diff = np.abs(got - pil)
            self.assertLessEqual(diff.max(), 1.5, msg=f"{name} -> {size}")
            self.assertLess(diff.mean(), 0.5, msg=f"{name} -> {size}")
            if size < min(image.shape[:2]):  # the check can fail
                plain = preprocessing.preprocess_eval(image, size, antialias=False).numpy()
                self.assertGreater(np.abs(plain - pil).max(), 10.0, msg=f"{name} -> {size}")

    @parameterized.parameters(*RESIZE_SIZES)
    def test_without_antialias_is_tf_bilinear_and_the_loop_reference(self, size):
        for name, image in _real_images().items():
            got = preprocessing.preprocess_eval(image, size, antialias=False).numpy()
            self.assertAllEqual(got, tf.image.resize(image.astype(np.float32), (size, size),
                                                     method="bilinear", antialias=False))
            self.assertAllClose(got, _bilinear_reference(image, size, size), rtol=0,
                                atol=1e-3, msg=f"{name} -> {size}")
            train = preprocessing.preprocess_train(image, size, antialias=False)
            self.assertAllEqual(train, got)


class MakeDatasetTest(tf.test.TestCase, parameterized.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.images, cls.labels = _items()

    def _write_split(self, num_records, num_files, bad=(), prefix="data"):
        """Real Fashion-MNIST PNGs; `bad` indices get broken bytes.

        Returns (file pattern, {filename: label}).
        """
        directory = self._new_dir()
        truth = {}
        examples = [[] for _ in range(num_files)]
        for i in range(num_records):
            name = f"item_{i:04d}.png"
            data = _encode(self.images[i], "PNG")
            if i in bad:  # alternately garbage and a truncated JPEG
                data = (b"not an image" if i % 2 else
                        _encode(_photo(), "JPEG")[:400])
            else:
                truth[name] = int(self.labels[i])
            examples[i % num_files].append(schema.make_example(
                data, name, [self.labels[i]]))
        for k, shard in enumerate(examples):
            _write_records(os.path.join(directory, schema.shard_filename(
                prefix, k, num_files)), shard)
        return os.path.join(directory, f"{prefix}-*.tfrecord"), truth

    def _new_dir(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        return directory

    def _make(self, pattern, batch_size, training, **kwargs):
        flip, crop = kwargs.pop("random_flip", False), kwargs.pop("crop_scales", None)
        if flip or crop:
            kwargs["augmentation"] = preprocessing.Augmentation(flip, crop)
        return input_pipeline.make_dataset(
            pattern, batch_size, 28, NUM_CLASSES, training, **kwargs)

    def test_eval_every_record_once_in_a_fixed_order(self):
        pattern, truth = self._write_split(23, 3)
        ds = self._make(pattern, 5, training=False)  # 5 does not divide 23
        first = _collect(ds)
        names = [n.decode() for n in first["filename"]]
        self.assertCountEqual(names, truth)
        self.assertEqual(first["images"].shape, (23, 28, 28, 3))
        self.assertEqual(first["images"].dtype, np.float32)
        self.assertEqual(first["difficult"].dtype, bool)
        for name, labels in zip(names, first["labels"]):
            self.assertAllEqual(labels, np.eye(NUM_CLASSES)[truth[name]])
        index = int(names[0][5:9])
        self.assertAllClose(first["images"][0],
                            np.repeat(self.images[index][..., None], 3, 2)
                            .astype(np.float32), atol=1e-3)
        second = _collect(ds)
        self.assertAllEqual(first["filename"], second["filename"])
        self.assertAllEqual(first["images"], second["images"])

    @parameterized.named_parameters(
        ("first", (0,)), ("middle", (11,)), ("last", (22,)),
        ("two", (4, 22)))
    def test_undecodable_records_are_skipped_and_counted(self, bad):
        pattern, truth = self._write_split(23, 1, bad=bad)
        counter = skip_counts.SkipCounter()
        got = _collect(self._make(pattern, 4, training=False,
                                  skip_counter=counter))
        self.assertCountEqual([n.decode() for n in got["filename"]], truth)
        self.assertEqual(counter.skipped, len(bad))
        self.assertEqual(counter.read, 23)
        self.assertEqual(counter.delivered, 23 - len(bad))

    def test_skip_count_in_training_follows_the_epochs(self):
        pattern, _ = self._write_split(10, 2, bad=(5,))
        counter = skip_counts.SkipCounter()
        ds = self._make(pattern, 3, training=True, skip_counter=counter,
                        seed=0)
        for batch in ds.take(12):  # 36 images = 4 epochs of 9
            self.assertEqual(batch["images"].shape, (3, 28, 28, 3))
        # Pass p is counted once pass p + 2 starts (it is then surely through
        # the pipeline, even decoded out of order); the pipeline may already
        # be ahead by a few prefetched images.
        delivered, skipped = counter.delivered, counter.skipped
        self.assertGreaterEqual(delivered, 36)
        self.assertBetween(skipped, max(1, delivered // 9 - 3), delivered // 9 + 1)

    def test_counter_belongs_to_one_dataset(self):
        pattern, _ = self._write_split(4, 1)
        counter = skip_counts.SkipCounter()
        self._make(pattern, 2, training=False, skip_counter=counter)
        with self.assertRaisesRegex(ValueError, "one per dataset"):
            self._make(pattern, 2, training=False, skip_counter=counter)

    def test_training_shuffles_repeats_and_is_seeded(self):
        pattern, truth = self._write_split(20, 4)
        ds = self._make(pattern, 8, training=True, seed=3, random_flip=True,
                        crop_scales=(1.0, 0.75), deterministic=True)
        batches = list(ds.take(6).as_numpy_iterator())  # 48 > 20 records
        names = np.concatenate([b["filename"] for b in batches])
        self.assertEqual(set(n.decode() for n in names), set(truth))
        self.assertNotEqual(list(names[:20]), sorted(names[:20]))
        again = list(self._make(pattern, 8, training=True, seed=3,
                                random_flip=True, crop_scales=(1.0, 0.75),
                                deterministic=True)
                     .take(6).as_numpy_iterator())
        for a, b in zip(batches, again):
            self.assertAllEqual(a["filename"], b["filename"])
            self.assertAllEqual(a["images"], b["images"])

    def test_skip_batches_resumes_the_same_stream(self):
        pattern, _ = self._write_split(20, 4)
        kwargs = dict(training=True, seed=5, random_flip=True,
                      crop_scales=(1.0, 0.5), deterministic=True)
        full = list(self._make(pattern, 4, **kwargs).take(7)
                    .as_numpy_iterator())
        resumed = list(self._make(pattern, 4, skip_batches=3, **kwargs)
                       .take(4).as_numpy_iterator())
        for a, b in zip(full[3:], resumed):
            self.assertAllEqual(a["filename"], b["filename"])
            self.assertAllEqual(a["images"], b["images"])
        with self.assertRaisesRegex(ValueError, "skip_batches"):
            self._make(pattern, 4, training=False, skip_batches=1)

    def test_training_drops_the_partial_batch(self):
        pattern, _ = self._write_split(5, 1)
        ds = self._make(pattern, 4, training=True)
        self.assertEqual(ds.element_spec["images"].shape, (4, 28, 28, 3))

    def test_eval_keeps_the_partial_batch(self):
        pattern, _ = self._write_split(5, 1)
        ds = self._make(pattern, 4, training=False)
        self.assertEqual([len(b["filename"]) for b in ds], [4, 1])

    def test_no_files(self):
        with self.assertRaisesRegex(ValueError, "matches no file"):
            self._make(os.path.join(self._new_dir(), "x-*.tfrecord"), 4, training=False)

    @parameterized.named_parameters(("by_file", 4), ("by_record", 1))
    def test_input_pipelines_split_the_records(self, num_files):
        pattern, truth = self._write_split(21, num_files)
        seen = []
        for pipeline_id in range(2):
            context = tf.distribute.InputContext(
                num_input_pipelines=2, input_pipeline_id=pipeline_id,
                num_replicas_in_sync=2)
            ds = self._make(pattern, 6, training=False, input_context=context)
            got = _collect(ds)
            self.assertLessEqual(max(len(b["filename"]) for b in
                                     ds.as_numpy_iterator()), 3)  # per replica
            seen.append([n.decode() for n in got["filename"]])
        self.assertEmpty(set(seen[0]) & set(seen[1]))
        self.assertCountEqual(seen[0] + seen[1], truth)
        self.assertBetween(len(seen[0]), 7, 14)

    def test_uneven_files_shared_by_more_pipelines_fit_the_padded_evaluation(self):
        """Files of 1 and 5 records for 3 pipelines (record sharding): the end
        markers take no record's place, so each pipeline's share fits the
        batches `eval_batches_per_pipeline` plans and no record is cut off."""
        directory = self._new_dir()
        names = [f"item_{i:04d}.png" for i in range(6)]
        examples = [schema.make_example(_encode(self.images[i], "PNG"), name,
                                              [self.labels[i]])
                    for i, name in enumerate(names)]
        for k, part in enumerate((examples[:1], examples[1:])):
            _write_records(os.path.join(directory, schema.shard_filename(
                "data", k, 2)), part)
        pattern = os.path.join(directory, "data-*.tfrecord")
        batches, _ = input_pipeline.eval_batches_per_pipeline(pattern, 3, 3, 3)
        seen = []
        for pipeline_id in range(3):
            context = tf.distribute.InputContext(
                num_input_pipelines=3, input_pipeline_id=pipeline_id,
                num_replicas_in_sync=3)
            ds = input_pipeline.padded_eval_dataset(pattern, 3, 28, NUM_CLASSES, context,
                                                    batches)
            seen += [n.decode() for n in _collect(ds)["filename"]]
        self.assertCountEqual(seen, names)


if __name__ == "__main__":
    tf.test.main()
