"""Export options and the serving contract's edges: an XLA-compiled export
(`--jit_compile`) against the float32 one on real images, top-k ranked by
logit when float32 sigmoids saturate, and the export CLI's one-line errors."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from mlcrl_tf.modeling.model import build_model
from mlcrl_tf.serving import contract
from mlcrl_tf.serving import export_lib
from mlcrl_tf.serving import request_checks
from mlcrl_tf.serving import serving_module

from conftest import REPO
from helpers import CANVAS_SIZE
from helpers import FASHION_CLASS_NAMES
from helpers import FASHION_CLASSES
from helpers import SMALL_BACKBONE
from helpers import encode_image
from helpers import fashion_canvases
from helpers import train_on_canvases

# XLA fuses and reorders the float32 arithmetic of the same weights.
XLA_TOLERANCE = 1e-4


def _xla_functions(path):
    """Names of the SavedModel's functions marked for XLA compilation."""
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    library = proto.meta_graphs[0].graph_def.library
    return [f.signature.name for f in library.function if f.attr["_XlaMustCompile"].b]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One briefly trained crl model exported without and with XLA."""
    keras.utils.set_random_seed(0)
    root = str(tmp_path_factory.mktemp("jit"))
    model = train_on_canvases(build_model(FASHION_CLASSES, SMALL_BACKBONE, CANVAS_SIZE, "crl"))
    return {jit: export_lib.export_model(model, os.path.join(root, str(jit)), FASHION_CLASS_NAMES,
                                         jit_compile=jit)
            for jit in (False, True)}


@pytest.fixture(scope="module")
def real_images():
    """Real JPEG and PNG canvases of two sizes, and a float batch at the model size."""
    small, _ = fashion_canvases(3, CANVAS_SIZE, CANVAS_SIZE, seed=7)
    large, _ = fashion_canvases(2, 90, 120, seed=8)
    encoded = [encode_image(small[0], "JPEG", quality=90), encode_image(small[1], "PNG"),
               encode_image(large[0], "JPEG"), encode_image(large[1], "PNG")]
    return encoded, small.astype(np.float32)


def test_jit_compiled_export_matches_the_float32_export(exports, real_images):
    encoded, pixels = real_images
    plain, xla = (tf.saved_model.load(exports[jit]) for jit in (False, True))
    assert not _xla_functions(exports[False])
    assert _xla_functions(exports[True])  # The forward pass really is compiled.
    for signature, inputs in (("serving_default", {"image_bytes": tf.constant(encoded)}),
                              ("serve_tensor", {"images": tf.constant(pixels)})):
        expected = plain.signatures[signature](**inputs)
        got = xla.signatures[signature](**inputs)
        for key in ("logits", "probabilities"):
            np.testing.assert_allclose(got[key].numpy(), expected[key].numpy(),
                                       rtol=XLA_TOLERANCE, atol=XLA_TOLERANCE)
        assert np.ptp(expected["logits"].numpy(), axis=0).max() > 1e-2  # Not constant.
    for jit, loaded in ((False, plain), (True, xla)):
        metadata = loaded.signatures["metadata"]()
        assert bool(metadata["jit_compile"].numpy()) is jit
        assert metadata["precision"].numpy().decode() == "float32"


def test_jit_compiled_export_runs_in_a_tf1_session_like_tf_serving(exports, real_images):
    encoded, _ = real_images
    direct = tf.saved_model.load(exports[True]).signatures["serving_default"](
        image_bytes=tf.constant(encoded))["logits"].numpy()
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(
            session, [tf.saved_model.SERVING], exports[True])
        signature = meta_graph.signature_def["serving_default"]
        logits = session.run(signature.outputs["logits"].name,
                             {signature.inputs["image_bytes"].name: encoded})
    np.testing.assert_allclose(logits, direct, atol=1e-6)


def test_jit_compile_must_be_a_bool(tmp_path):
    model = build_model(FASHION_CLASSES, SMALL_BACKBONE, CANVAS_SIZE, "baseline")
    with pytest.raises(ValueError, match="jit_compile must be True or False"):
        export_lib.export_model(model, str(tmp_path / "e"), FASHION_CLASS_NAMES, jit_compile="yes")


# --------------------------------------------------------------------------
# Top k by logit: float32 sigmoid saturates to 1.0 above a logit of ~16.6.
# --------------------------------------------------------------------------

# Confident logits in 17-40, in no particular class order: all sigmoid to 1.0.
SATURATED = np.array([17.0, 40.0, 23.5, 31.0, 18.25, 36.0, 26.0, 20.0, 33.5, 29.0],
                     np.float32)


def test_top_k_ranking_helper_follows_the_logits():
    logits = tf.constant(np.stack([SATURATED, -SATURATED[::-1], SATURATED / 2]))
    probabilities = tf.sigmoid(logits)
    assert np.all(probabilities.numpy()[0] == 1.0)  # The ties the ranking must not see.
    scores, ids = request_checks.top_k_by_logits(logits, probabilities, 4)
    expected = np.argsort(-logits.numpy(), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(ids.numpy(), expected)
    np.testing.assert_array_equal(
        scores.numpy(), np.take_along_axis(probabilities.numpy(), expected, 1))


def _saturated_model():
    """A Keras model whose logits are SATURATED (plus 0 x the image) for any input."""
    images = keras.Input((CANVAS_SIZE, CANVAS_SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(images)
    logits = keras.layers.Dense(FASHION_CLASSES, kernel_initializer="zeros",
                                bias_initializer=keras.initializers.Constant(SATURATED))(pooled)
    return keras.Model(images, logits)


def test_served_top_k_follows_the_logits_when_probabilities_tie(tmp_path, real_images):
    encoded, pixels = real_images
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{name}\n" for name in FASHION_CLASS_NAMES))
    info = contract.ServingInfo(class_names=tuple(FASHION_CLASS_NAMES), backbone="test",
                               image_size=CANVAS_SIZE, threshold=0.5, top_k=5, variant="test")
    module = serving_module.ServingModule(_saturated_model(), info, str(labels))
    tf.saved_model.save(module, str(tmp_path / "m"), signatures=module.signatures())
    loaded = tf.saved_model.load(str(tmp_path / "m"))
    expected = np.argsort(-SATURATED)[:5]  # [1 5 8 3 9]
    for signature, inputs in (("serving_default", {"image_bytes": tf.constant(encoded)}),
                              ("serve_tensor", {"images": tf.constant(pixels)})):
        out = loaded.signatures[signature](**inputs)
        ids = out["top_k_class_ids"].numpy()
        np.testing.assert_array_equal(ids, np.tile(expected, (len(ids), 1)))
        names = [[n.decode() for n in row] for row in out["top_k_classes"].numpy()]
        assert names == [[FASHION_CLASS_NAMES[i] for i in expected]] * len(ids)
        np.testing.assert_array_equal(out["top_k_scores"].numpy(), 1.0)
        np.testing.assert_allclose(out["logits"].numpy()[0], SATURATED, rtol=1e-6)


# --------------------------------------------------------------------------
# The CLI: expected failures are one line, never a traceback.
# --------------------------------------------------------------------------

_FAILING_EXPORT = """
import sys
import tensorflow as tf
from absl import app
from mlcrl_tf import export
from mlcrl_tf.serving import export_lib

def fail(*unused_args, **unused_kwargs):
    raise {error}

export_lib.export_from_model_dir = fail
export.define_flags()
sys.argv = ["export", "--model_dir=run", "--export_dir=/srv/models/demo"]
app.run(export.main, flags_parser=export.console.parse_flags)
"""


@pytest.mark.parametrize("error, line", [
    ("PermissionError(13, 'Permission denied', '/srv/models/demo/.tmp-1-ab')",
     "error: the export failed on '/srv/models/demo/.tmp-1-ab': PermissionError: "
     "Permission denied"),
    ("tf.errors.PermissionDeniedError(None, None, '/srv/models/demo; Permission denied')",
     "error: the export failed: PermissionDeniedError: /srv/models/demo; Permission denied"),
])
def test_cli_io_errors_are_one_line(error, line):
    proc = subprocess.run([sys.executable, "-c", _FAILING_EXPORT.format(error=error)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == line
