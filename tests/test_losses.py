"""Tests for mlcrl_tf.losses against plain NumPy loop references."""

import json
import os
import subprocess
import sys
import textwrap

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

from mlcrl_tf.modeling import losses

from helpers import reference_crl
from helpers import reference_crl_terms
from helpers import reference_mse_per_example
from helpers import reference_soft_margin_per_example

# --------------------------------------------------------------------------
# Obviously-correct references: Python loops, float64, math.sqrt.
# --------------------------------------------------------------------------


def _random_inputs(seed, num_images, num_classes, dim, density=0.3):
    rng = np.random.default_rng(seed)
    labels = (rng.random((num_images, num_classes)) < density).astype(np.float32)
    fe = rng.normal(size=(num_images, dim)).astype(np.float32)
    emb = rng.normal(size=(num_classes, dim)).astype(np.float32)
    return labels, fe, emb


def _special_labels():
    """Rows with 0 positives, 1 positive, all positives, and a mix."""
    return np.array([
        [0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 1, 1, 0],
        [0, 0, 1, 0, 1],
    ], np.float32)


class CrlValueTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(
        ("tiny_mean", 2, 3, 2, 0.5, "mean"),
        ("small_sum", 5, 7, 4, 0.4, "sum"),
        ("e_differs", 6, 10, 3, 0.3, "mean"),
        ("coco_like", 4, 80, 80, 0.1, "mean"),
        ("coco_like_sum", 4, 80, 16, 0.1, "sum"),
        ("dense", 3, 12, 5, 0.8, "mean"),
    )
    def test_matches_reference(self, num_images, num_classes, dim, density,
                               reduction):
        labels, fe, emb = _random_inputs(num_images * 100 + num_classes,
                                         num_images, num_classes, dim, density)
        got = losses.constrained_ranking_loss(labels, fe, emb, reduction=reduction)
        want = reference_crl(labels, fe, emb, reduction=reduction)
        self.assertEqual(got.dtype, tf.float32)
        self.assertAllClose(got, want, rtol=1e-5, atol=1e-5)

    @parameterized.named_parameters(
        ("mean", "mean", 0.2, 0.3, 0.9),
        ("sum", "sum", 1.5, 1.0, 0.0),
        ("label_only", "mean", 0.7, 0.0, 1.0),
    )
    def test_custom_margin_and_weights(self, reduction, margin, image_weight,
                                       label_weight):
        labels, fe, emb = _random_inputs(7, 6, 9, 4, 0.4)
        got = losses.constrained_ranking_loss(
            labels, fe, emb, margin=margin, image_weight=image_weight,
            label_weight=label_weight, reduction=reduction)
        want = reference_crl(labels, fe, emb, margin, image_weight, label_weight,
                             reduction)
        self.assertAllClose(got, want, rtol=1e-5, atol=1e-5)

    @parameterized.parameters("mean", "sum")
    def test_special_rows(self, reduction):
        labels = _special_labels()
        _, fe, emb = _random_inputs(3, 5, 5, 3)
        got = losses.constrained_ranking_loss(labels, fe, emb, reduction=reduction)
        self.assertAllClose(got, reference_crl(labels, fe, emb, reduction=reduction),
                            rtol=1e-5, atol=1e-5)
        terms = losses.crl_terms(labels, fe, emb)
        ref = reference_crl_terms(labels, fe, emb)
        # Row 0 and row 2 add nothing; row 1 adds 4 image triplets only.
        self.assertEqual(ref[1], 4 + 6 + 6)
        self.assertEqual(ref[3], 3 * 2 * 2 + 2 * 1 * 3)
        self.assertAllClose([terms[k] for k in
                             ("image_sum", "image_count", "label_sum", "label_count")],
                            ref, rtol=1e-5, atol=1e-5)

    def test_rows_without_triplets_add_nothing(self):
        labels = _special_labels()
        _, fe, emb = _random_inputs(4, 5, 5, 3)
        full = losses.crl_terms(labels, fe, emb)
        # Rows 0 (no positive) and 2 (no negative) add nothing at all.
        part = losses.crl_terms(labels[[1, 3, 4]], fe[[1, 3, 4]], emb)
        for key in full:
            self.assertAllClose(full[key], part[key], rtol=1e-6)
        # Row 1 (one positive) adds nothing to the label term.
        part = losses.crl_terms(labels[[3, 4]], fe[[3, 4]], emb)
        for key in ("label_sum", "label_count"):
            self.assertAllClose(full[key], part[key], rtol=1e-6)
        self.assertGreater(full["image_count"], part["image_count"])

    @parameterized.named_parameters(
        ("no_positives", [[0, 0, 0], [0, 0, 0]]),
        ("all_positive", [[1, 1, 1], [1, 1, 1]]),
        ("one_positive_each", [[1, 0, 0], [0, 0, 1]]),
    )
    def test_empty_terms_are_zero_not_nan(self, labels):
        labels = np.array(labels, np.float32)
        _, fe, emb = _random_inputs(5, 2, 3, 2)
        with tf.GradientTape() as tape:
            fe_t, emb_t = tf.constant(fe), tf.constant(emb)
            tape.watch([fe_t, emb_t])
            value = losses.constrained_ranking_loss(labels, fe_t, emb_t)
        grads = tape.gradient(value, [fe_t, emb_t])
        self.assertTrue(np.isfinite(value.numpy()))
        self.assertAllClose(value, reference_crl(labels, fe, emb), atol=1e-6)
        for grad in grads:
            self.assertIsNotNone(grad)  # Both embeddings enter every distance.
            self.assertAllEqual(np.isfinite(grad), np.ones_like(grad, bool))
        terms = losses.crl_terms(labels, fe, emb)
        self.assertEqual(float(terms["label_count"]), 0.0)
        self.assertEqual(float(terms["label_sum"]), 0.0)

    @parameterized.parameters(np.float32, np.int32, np.int64, bool)
    def test_label_dtypes(self, dtype):
        labels, fe, emb = _random_inputs(11, 4, 6, 3, 0.5)
        want = losses.constrained_ranking_loss(labels, fe, emb)
        got = losses.constrained_ranking_loss(labels.astype(dtype), fe, emb)
        self.assertAllClose(got, want)

    def test_float64_inputs_stay_float64(self):
        labels, fe, emb = _random_inputs(12, 4, 6, 3, 0.5)
        got = losses.constrained_ranking_loss(labels, fe.astype(np.float64),
                                              emb.astype(np.float64))
        self.assertEqual(got.dtype, tf.float64)
        self.assertAllClose(got, reference_crl(labels, fe, emb), rtol=1e-12)

    def test_split_batch_sums_equal_whole_batch(self):
        # What the distributed loop relies on: all-reduce sums and counts.
        labels, fe, emb = _random_inputs(13, 10, 8, 5, 0.4)
        whole = losses.crl_terms(labels, fe, emb)
        halves = [losses.crl_terms(labels[s], fe[s], emb)
                  for s in (slice(0, 3), slice(3, 10))]
        combined = {k: halves[0][k] + halves[1][k] for k in whole}
        for key in whole:
            self.assertAllClose(combined[key], whole[key], rtol=1e-6)
        for reduction in ("mean", "sum"):
            self.assertAllClose(
                losses.combine_crl_terms(combined, reduction=reduction),
                losses.constrained_ranking_loss(labels, fe, emb,
                                                reduction=reduction),
                rtol=1e-6)
        # The global mean is not the mean of the two half-batch means.
        self.assertNotAllClose(
            losses.constrained_ranking_loss(labels, fe, emb),
            0.5 * (losses.combine_crl_terms(halves[0])
                   + losses.combine_crl_terms(halves[1])))

    def test_tf_function_unknown_batch(self):
        num_classes, dim = 7, 4
        spec = [tf.TensorSpec([None, num_classes], tf.float32),
                tf.TensorSpec([None, dim], tf.float32),
                tf.TensorSpec([num_classes, dim], tf.float32)]

        @tf.function(input_signature=spec)
        def compiled(labels, fe, emb):
            with tf.GradientTape() as tape:
                tape.watch([fe, emb])
                value = losses.constrained_ranking_loss(labels, fe, emb)
            return value, tape.gradient(value, [fe, emb])

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32)] * 3)
        def all_unknown(labels, fe, emb):
            return losses.constrained_ranking_loss(labels, fe, emb)

        for num_images in (3, 9):
            labels, fe, emb = _random_inputs(num_images, num_images, num_classes,
                                             dim, 0.4)
            value, grads = compiled(labels, fe, emb)
            self.assertAllClose(value, reference_crl(labels, fe, emb),
                                rtol=1e-5, atol=1e-6)
            self.assertAllClose(all_unknown(labels, fe, emb), value, rtol=1e-6)
            fe_t, emb_t = tf.constant(fe), tf.constant(emb)
            with tf.GradientTape() as tape:
                tape.watch([fe_t, emb_t])
                eager = losses.constrained_ranking_loss(labels, fe_t, emb_t)
            for got, want in zip(grads, tape.gradient(eager, [fe_t, emb_t])):
                self.assertAllClose(got, want, rtol=1e-5, atol=1e-6)

    def test_label_term_memory_bounded_b32_c80(self):
        """TF allocator peak of forward + backward at B=32, C=80, E=80.

        A naive label term materialises B*C^3 = 16.4M floats (65.5 MB); the
        vectorised one keeps O(C^3 + B*C^2). Measured with TensorFlow's BFC
        allocator in a fresh process; the probe shows the same measurement
        does see a B*C^3 tensor, so the bound can fail.
        """
        script = textwrap.dedent("""
            import json, numpy as np, tensorflow as tf
            from mlcrl_tf.modeling import losses

            def peak(fn):
                tf.config.experimental.reset_memory_stats("CPU:0")
                before = tf.config.experimental.get_memory_info("CPU:0")["current"]
                fn()
                return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before

            rng = np.random.default_rng(14)
            labels = tf.constant((rng.random((32, 80)) < 2.9 / 80).astype(np.float32))
            fe = tf.constant(rng.normal(size=(32, 80)).astype(np.float32))
            emb = tf.constant(rng.normal(size=(80, 80)).astype(np.float32))

            def step():
                with tf.GradientTape() as tape:
                    tape.watch([fe, emb])
                    value = losses.constrained_ranking_loss(labels, fe, emb)
                grads = tape.gradient(value, [fe, emb])
                assert np.isfinite(value.numpy()) and float(tf.reduce_sum(tf.abs(grads[1]))) > 0

            step()  # one-time initialisation, not counted
            naive = lambda: tf.reduce_sum(tf.ones((32, 80, 80, 80))).numpy()
            print(json.dumps({"crl": peak(step), "naive_probe": peak(naive)}))
        """)
        env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true", TF_CPP_MIN_LOG_LEVEL="2")
        out = subprocess.run([sys.executable, "-c", script], env=env, check=True,
                             capture_output=True, text=True, timeout=300).stdout
        peaks = json.loads(out.strip().splitlines()[-1])
        self.assertGreater(peaks["naive_probe"], 64 * 2**20)  # the method sees B*C^3
        self.assertLess(peaks["crl"], 32 * 2**20)


class CrlGradientTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters("mean", "sum")
    def test_gradient_matches_finite_differences(self, reduction):
        labels, fe, emb = _random_inputs(21, 3, 4, 3, 0.5)
        labels = np.array([[1, 0, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]], np.float32)
        fe, emb = fe.astype(np.float64), emb.astype(np.float64)

        def loss_of(fe_t, emb_t):
            return losses.constrained_ranking_loss(labels, fe_t, emb_t, margin=1.0,
                                                   reduction=reduction)

        theoretical, numerical = tf.test.compute_gradient(
            loss_of, [tf.constant(fe), tf.constant(emb)], delta=1e-6)
        for got, want in zip(theoretical, numerical):
            self.assertGreater(np.abs(want).max(), 1e-3)  # the check can fail
            self.assertAllClose(got, want, rtol=1e-5, atol=1e-6)

    def test_coincident_embeddings_have_finite_gradients(self):
        labels = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
        emb = np.array([[0.5, 0.5], [0.5, 0.5], [0.0, 1.0]], np.float32)
        fe = np.array([[0.5, 0.5], [0.0, 1.0]], np.float32)  # on top of rows
        fe_t, emb_t = tf.constant(fe), tf.constant(emb)
        with tf.GradientTape() as tape:
            tape.watch([fe_t, emb_t])
            value = losses.constrained_ranking_loss(labels, fe_t, emb_t)
        grads = tape.gradient(value, [fe_t, emb_t])
        self.assertAllClose(value, reference_crl(labels, fe, emb), atol=1e-6)
        for grad in grads:
            self.assertTrue(np.all(np.isfinite(grad.numpy())))

    def test_pairwise_distance_gradient_at_zero_is_zero(self):
        a = tf.constant([[1.0, 2.0], [1.0, 2.0]])
        with tf.GradientTape() as tape:
            tape.watch(a)
            d = losses.pairwise_distances(a, a)
        self.assertAllClose(d, np.zeros((2, 2)))
        self.assertAllEqual(tape.gradient(d, a), np.zeros((2, 2)))

    def test_distances_exact_for_large_norms(self):
        # ‖a‖²+‖b‖²−2ab would lose this 1e-3 difference on 1e4-sized vectors.
        a = np.array([[1e4, 1e4]], np.float32)
        b = np.array([[1e4 + 1e-3 * 1024, 1e4]], np.float32)  # representable
        self.assertAllClose(losses.pairwise_distances(a, b),
                            [[float(b[0, 0]) - float(a[0, 0])]], rtol=1e-6)


class SoftMarginAndMseTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters((1, 1), (4, 5), (16, 80))
    def test_soft_margin_matches_reference(self, num_images, num_classes):
        rng = np.random.default_rng(num_classes)
        labels = (rng.random((num_images, num_classes)) < 0.3).astype(np.float32)
        logits = (3 * rng.normal(size=(num_images, num_classes))).astype(np.float32)
        want = reference_soft_margin_per_example(labels, logits)
        self.assertAllClose(
            losses.multilabel_soft_margin_per_example(labels, logits), want,
            rtol=1e-5, atol=1e-6)
        self.assertAllClose(losses.multilabel_soft_margin_loss(labels, logits),
                            want.mean(), rtol=1e-5, atol=1e-6)
        keras_loss = losses.MultiLabelSoftMarginLoss()
        self.assertAllClose(keras_loss(labels, logits), want.mean(), rtol=1e-5)

    def test_soft_margin_is_stable_for_extreme_logits(self):
        labels = np.array([[1, 0, 1, 0]], np.float32)
        logits = np.array([[200.0, -200.0, -200.0, 200.0]], np.float32)
        value = losses.multilabel_soft_margin_loss(labels, logits)
        self.assertAllClose(value, 100.0, rtol=1e-6)

    def test_soft_margin_bool_labels_and_sample_weight(self):
        labels = np.array([[True, False], [False, False]])
        logits = np.array([[1.0, -2.0], [0.5, 3.0]], np.float32)
        per = reference_soft_margin_per_example(labels.astype(float), logits)
        self.assertAllClose(losses.multilabel_soft_margin_loss(labels, logits),
                            per.mean(), rtol=1e-6)
        keras_loss = losses.MultiLabelSoftMarginLoss()
        self.assertAllClose(keras_loss(labels, logits, sample_weight=[1.0, 0.0]),
                            per[0] / 2, rtol=1e-6)

    def test_mse_matches_reference(self):
        rng = np.random.default_rng(0)
        fe = rng.normal(size=(5, 6)).astype(np.float32)
        fl = rng.normal(size=(5, 6)).astype(np.float32)
        want = reference_mse_per_example(fe, fl)
        self.assertAllClose(losses.embedding_mse_per_example(fe, fl), want,
                            rtol=1e-6)
        self.assertAllClose(losses.embedding_mse_loss(fe, fl), want.mean(),
                            rtol=1e-6)
        self.assertAllClose(losses.EmbeddingMSELoss()(fl, fe), want.mean(),
                            rtol=1e-6)

    def test_per_example_functions_in_tf_function(self):
        spec = [tf.TensorSpec([None, 6], tf.float32)] * 2

        @tf.function(input_signature=spec)
        def compiled(a, b):
            return (losses.multilabel_soft_margin_per_example(a, b),
                    losses.embedding_mse_per_example(a, b))

        rng = np.random.default_rng(1)
        labels = (rng.random((3, 6)) < 0.5).astype(np.float32)
        x = rng.normal(size=(3, 6)).astype(np.float32)
        soft, mse = compiled(labels, x)
        self.assertAllClose(soft, reference_soft_margin_per_example(labels, x),
                            rtol=1e-5)
        self.assertAllClose(mse, reference_mse_per_example(labels, x), rtol=1e-6)


class KerasClassesTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters(
        dict(margin=0.5, image_weight=0.5, label_weight=0.5,
             triplet_reduction="mean"),
        dict(margin=0.3, image_weight=1.0, label_weight=0.2,
             triplet_reduction="sum"),
    )
    def test_crl_class_equals_function(self, **kwargs):
        labels, fe, emb = _random_inputs(31, 6, 9, 4, 0.4)
        loss = losses.ConstrainedRankingLoss(name="crl", **kwargs)
        got = loss(y_true=labels,
                   y_pred={"image_embeddings": fe, "label_embeddings": emb})
        reduction = kwargs.pop("triplet_reduction")
        want = losses.constrained_ranking_loss(labels, fe, emb,
                                               reduction=reduction, **kwargs)
        self.assertEqual(got.shape, ())
        self.assertAllClose(got, want, rtol=1e-6)

        config = loss.get_config()
        self.assertEqual(config, {**kwargs, "triplet_reduction": reduction,
                                  "name": "crl"})
        clone = losses.ConstrainedRankingLoss.from_config(config)
        self.assertEqual(clone.get_config(), config)
        revived = keras.losses.deserialize(keras.losses.serialize(loss))
        self.assertIsInstance(revived, losses.ConstrainedRankingLoss)
        self.assertEqual(revived.get_config(), config)

    def test_crl_class_bool_labels_and_tf_function(self):
        labels, fe, emb = _random_inputs(32, 4, 5, 3, 0.5)
        loss = losses.ConstrainedRankingLoss()
        compiled = tf.function(lambda y, a, b: loss(
            y, {"image_embeddings": a, "label_embeddings": b}))
        self.assertAllClose(compiled(labels.astype(bool), fe, emb),
                            reference_crl(labels, fe, emb), rtol=1e-5)

    @parameterized.parameters(
        (losses.MultiLabelSoftMarginLoss, dict(reduction="sum", name="sm")),
        (losses.EmbeddingMSELoss, dict(reduction="none", name="mse")),
    )
    def test_simple_class_config_round_trip(self, cls, config):
        loss = cls(**config)
        self.assertEqual(loss.get_config(), config)
        self.assertEqual(cls.from_config(loss.get_config()).get_config(), config)

    def test_crl_class_rejects_bad_y_pred_and_sample_weight(self):
        labels, fe, emb = _random_inputs(33, 2, 3, 2)
        loss = losses.ConstrainedRankingLoss()
        with self.assertRaisesRegex(ValueError, "y_pred"):
            loss(labels, (fe, emb))
        with self.assertRaisesRegex(ValueError, "sample_weight"):
            loss(labels, {"image_embeddings": fe, "label_embeddings": emb},
                 sample_weight=np.ones(2))
        with self.assertRaisesRegex(ValueError, "triplet_reduction"):
            losses.ConstrainedRankingLoss(triplet_reduction="max")
        with self.assertRaisesRegex(ValueError, "y_true"):
            loss(np.array([["a", "b", "c"]] * 2),
                 {"image_embeddings": fe, "label_embeddings": emb})


def _crl_kwargs(labels=(2, 3), fe=(2, 4), emb=(3, 4)):
    return dict(labels=np.zeros(labels, np.float32),
                image_embeddings=np.zeros(fe, np.float32),
                label_embeddings=np.zeros(emb, np.float32))


class BadInputTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(
        ("labels_rank1", _crl_kwargs(labels=(3,)), "labels"),
        ("labels_rank3", _crl_kwargs(labels=(2, 3, 1)), "labels"),
        ("fe_rank3", _crl_kwargs(fe=(2, 4, 1)), "image_embeddings"),
        ("emb_rank1", _crl_kwargs(emb=(12,)), "label_embeddings"),
        ("batch_mismatch", _crl_kwargs(fe=(5, 4)),
         "image_embeddings has 5 images.*labels has 2"),
        ("class_mismatch", _crl_kwargs(emb=(7, 4)),
         "label_embeddings has 7 classes.*labels has 3"),
        ("dim_mismatch", _crl_kwargs(emb=(3, 6)),
         "image_embeddings has 4 embedding dims.*label_embeddings has 6"),
    )
    def test_crl_static_errors(self, kwargs, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            losses.constrained_ranking_loss(**kwargs)
        with self.assertRaisesRegex(ValueError, pattern):
            losses.crl_terms(**kwargs)
        # Static checks also fire at trace time inside tf.function.
        with self.assertRaisesRegex(ValueError, pattern):
            tf.function(losses.crl_terms)(**kwargs)

    def test_crl_string_labels(self):
        kwargs = _crl_kwargs()
        kwargs["labels"] = np.array([["1", "0", "1"]] * 2)
        with self.assertRaisesRegex(ValueError, "labels"):
            losses.constrained_ranking_loss(**kwargs)

    def test_unknown_reduction(self):
        with self.assertRaisesRegex(ValueError, "reduction"):
            losses.constrained_ranking_loss(**_crl_kwargs(), reduction="max")

    def test_value_checks_only_eager(self):
        kwargs = _crl_kwargs()
        kwargs["labels"] = np.full((2, 3), 2.0, np.float32)
        with self.assertRaisesRegex(ValueError, "labels.*0 and 1"):
            losses.constrained_ranking_loss(**kwargs)
        tf.function(losses.constrained_ranking_loss)(**kwargs)  # no raise
        kwargs = _crl_kwargs()
        kwargs["image_embeddings"][0, 0] = np.nan
        with self.assertRaisesRegex(ValueError, "image_embeddings.*NaN"):
            losses.constrained_ranking_loss(**kwargs)
        kwargs = _crl_kwargs()
        kwargs["label_embeddings"][0, 0] = np.inf
        with self.assertRaisesRegex(ValueError, "label_embeddings.*NaN or Inf"):
            losses.crl_terms(**kwargs)

    @parameterized.named_parameters(
        ("labels_rank1", (3,), (2, 3), "labels"),
        ("logits_rank3", (2, 3), (2, 3, 1), "logits"),
        ("batch", (2, 3), (4, 3), "logits has 4 images"),
        ("classes", (2, 3), (2, 5), "logits has 5 classes"),
    )
    def test_soft_margin_errors(self, labels_shape, logits_shape, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            losses.multilabel_soft_margin_loss(np.zeros(labels_shape),
                                               np.zeros(logits_shape))

    def test_soft_margin_value_errors(self):
        with self.assertRaisesRegex(ValueError, "labels"):
            losses.multilabel_soft_margin_loss([[0.5, 1.0]], [[0.0, 0.0]])
        with self.assertRaisesRegex(ValueError, "logits"):
            losses.multilabel_soft_margin_loss([[0, 1]], [[np.nan, 0.0]])
        with self.assertRaisesRegex(ValueError, "labels"):
            losses.multilabel_soft_margin_loss([["0", "1"]], [[0.0, 0.0]])

    @parameterized.named_parameters(
        ("rank", (2, 3, 1), (2, 3), "image_embeddings"),
        ("batch", (2, 3), (4, 3), "projected_labels has 4 images"),
        ("dims", (2, 3), (2, 5), "projected_labels has 5 embedding dims"),
    )
    def test_mse_errors(self, fe_shape, fl_shape, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            losses.embedding_mse_loss(np.zeros(fe_shape), np.zeros(fl_shape))


if __name__ == "__main__":
    tf.test.main()
